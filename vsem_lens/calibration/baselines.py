"""Baselines for semantic calibration, on the same splits and prompts as the heads.

Which baselines exist and running several at once (:func:`run_baselines`). Each baseline returns a
:class:`~vsem_lens.calibration.results.BaselineResult` with test accuracy, macro-F1 and wall time.

=============== ======================================================================================
name            what it does
=============== ======================================================================================
zero-shot       the model's next-token logits over the label tokens (matmul: ``LN_f(h) W_U + b_U``)
affinity        cosine of the LM-head input to the label tokens' semantic bases (docs/concepts/affinity.md)
cosine-knn      cosine k-nearest neighbours on the prompt features (hidden states); k chosen on validation
knn-prompting   kNN prompting (Xu et al. 2023): the next-token distributions over the full vocabulary of
                the training examples after ICL demonstrations are the datastore; the k = 3 anchors
                with the smallest KL(anchor || query) vote (:mod:`~vsem_lens.calibration.knn_prompting`)
probe           multinomial logistic regression (L2) on standardised features; strength chosen on
                validation; full-batch L-BFGS in float64 (torch; no scikit-learn needed)
icl             few-shot in-context learning: ``shots`` demonstrations per class from train, drawn and
                ordered with a fixed seed, the same for every query; long demonstrations are shortened
lora, ia3       parameter-efficient fine-tuning (PyPI ``peft``) of a *fresh copy* of the HF model with
                the zero-shot prompt: cross-entropy over the label-token logits at the last prompt
                token; a short CPU budget (default 1 epoch over train, max_length 64, batch 8)
=============== ======================================================================================

**Wall time** is the full cost of the method from a loaded model: for the feature-based methods it
includes the forward passes that produced the features they use (measured when the features were
first computed, even when read back from the cache, see :class:`~vsem_lens.calibration.features.Features`); for
ICL the forward passes over the long prompts; for LoRA/IA3 copying the model, training and the test
forward passes.

Example:
    >>> results = run_baselines(model, load_task("sentiment"), ["zero-shot", "affinity", "probe"])  # doctest: +SKIP
    >>> results_table(results)[["method", "accuracy", "macro_f1", "wall_time_s"]]                    # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from ..core.errors import InputError
from ..core.models import HookedModel
from ..lenses.base import Lens
from ..lenses.frames import lens_identity, resolve_frame
from ..readout.basis import SemanticBasis
from .cosine_knn import cosine_knn_baseline
from .datasets import TextClassificationTask
from .features import Features, extract_features
from .finetune import finetune_baseline
from .icl import icl_baseline
from .knn_prompting import knn_prompting_baseline
from .probe import probe_baseline
from .results import BaselineResult
from .zero_shot import zero_shot_affinity, zero_shot_matmul

BASELINES = ("zero-shot", "affinity", "cosine-knn", "knn-prompting", "probe", "icl", "lora", "ia3")


def parse_baselines(spec: str | Sequence[str] | None) -> list[str]:
    """Parse a baseline list: ``"zero-shot,cosine-knn"``, ``"all"`` or ``"none"``.

    Aliases: ``knn`` = ``cosine-knn`` (its former name), ``kp`` = ``knn-prompting``, ``matmul`` =
    ``zero-shot``, ``lr`` = ``probe``.

    Example:
        >>> parse_baselines("zero-shot, probe"), parse_baselines("none")
        (['zero-shot', 'probe'], [])
    """
    if spec is None:
        return []
    names = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if names in (["none"], []):
        return []
    if names == ["all"]:
        return list(BASELINES)
    aliases = {"zeroshot": "zero-shot", "zero_shot": "zero-shot", "matmul": "zero-shot",
               "knn": "cosine-knn", "kp": "knn-prompting", "lr": "probe"}
    out = []
    for name in names:
        name = aliases.get(name, name)
        if name not in BASELINES:
            raise InputError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}, all or none.")
        if name not in out:
            out.append(name)
    return out


def run_baselines(
    model: HookedModel,
    task: TextClassificationTask,
    names: str | Sequence[str] = ("zero-shot", "affinity", "cosine-knn", "probe"),
    *,
    layer: int = -1,
    frame: str | Lens = "final_norm",
    lens: Lens | None = None,
    cache: bool = True,
    shots: int = 1,
    finetune_epochs: int = 1,
    finetune_max_length: int = 64,
    seed: int = 42,
    hf_factory: Callable[[], Any] | None = None,
    progress: bool = False,
) -> list[BaselineResult]:
    """Run several baselines on a task with ``train``/``validation``/``test`` splits.

    The zero-shot baseline reads the model's own label logits (the same for any ``layer``/``frame``),
    the affinity baseline the last layer in the ``final_norm`` frame; kNN and the probe use the
    features of ``layer``/``frame`` (the head's input); kNN prompting and ICL read the model's output. ``frame`` is a frame name or a
    :class:`~vsem_lens.lenses.base.Lens` (:func:`~vsem_lens.lenses.frames.resolve_frame`; ``lens`` is the tuned
    lens for ``frame="tuned"``); ``cache`` reads and writes the feature cache (a custom lens needs ``False``).

    Example:
        >>> rows = run_baselines(model, load_task("topic"), "zero-shot,affinity,cosine-knn,probe")  # doctest: +SKIP
    """
    names = parse_baselines(names)
    head_lens = resolve_frame(frame, model, lens=lens)
    for split in ("train", "validation", "test"):
        if not task.has_split(split):
            raise InputError(f"baselines need train/validation/test splits; task {task.name!r} has {task.split_names}.")
    splits = {s: task.split(s) for s in ("train", "validation", "test")}
    results = []
    feats: dict[tuple, Features] = {}

    def get(split: str, lay: int, frm: Lens) -> Features:
        key = (split, lay % model.n_layers, lens_identity(frm) or id(frm))
        if key not in feats:
            feats[key] = extract_features(model, splits[split], layer=lay, frame=frm, cache=cache, progress=progress)
        return feats[key]

    y = {s: t.y for s, t in splits.items()}
    for name in names:
        if name == "zero-shot":
            # The label logits do not depend on the features' layer/frame: reuse the head's features.
            results.append(zero_shot_matmul(get("test", layer, head_lens), y["test"], task.n_classes))
        elif name == "affinity":
            bases = SemanticBasis.from_model(model).for_words(task.label_words)
            results.append(zero_shot_affinity(get("test", -1, resolve_frame("final_norm", model)), bases, y["test"]))
        elif name in ("cosine-knn", "probe"):
            fn = cosine_knn_baseline if name == "cosine-knn" else probe_baseline
            args = [get("train", layer, head_lens), y["train"], get("validation", layer, head_lens), y["validation"],
                    get("test", layer, head_lens), y["test"]]
            results.append(fn(*args, n_classes=task.n_classes))
        elif name == "icl":
            results.append(icl_baseline(model, task, shots=shots, seed=seed, progress=progress))
        elif name == "knn-prompting":
            results.append(knn_prompting_baseline(model, task, shots=shots, seed=seed))
        else:
            results.append(
                finetune_baseline(model, task, name, epochs=finetune_epochs, max_length=finetune_max_length,
                                  seed=seed, hf_factory=hf_factory, progress=progress)
            )
    return results


__all__ = ["BASELINES", "parse_baselines", "run_baselines"]
