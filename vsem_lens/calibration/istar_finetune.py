"""I-STAR fine-tuning (Rudman & Eickhoff, ICLR 2024): train the hooked model on a labelled task with
the isotropy regulariser, end to end.

The loss of a mini-batch is

    ``L = CE(label logits, y) + lambda * (1 - IsoScore*(states))``

- **CE** over the task's label tokens: the model's own logits (final norm, live LM head, the
  architecture's output transform) at the last prompt token, restricted to the label tokens, exactly
  as the zero-shot baseline reads them (:func:`evaluate_labels` before training equals ``zero-shot``).
- **states**: the ``resid_post`` of the regularised blocks (all by default; the embedding output is
  never one of them), taken from the TransformerLens hooks with their gradients
  (:func:`~vsem_lens.core.capture.hooked_states`), padding masked, all layers pooled into one point cloud.
- **IsoScore\\*** with the covariance shrunk toward a reference: ``Sigma = (1 - zeta) C_batch + zeta C0``
  (:func:`~vsem_lens.geometry.istar.istar_penalty`). ``C0`` is the covariance of the token states of
  the training split (the same layers, pooled), streamed in float64 with the weights of the start of
  each epoch, so it is refreshed every epoch as the authors do (they use ~250k states; the embedded
  model's 360 sentiment prompts give ~400k). ``c0="identity"`` shrinks toward the identity instead.

Sign: ``lambda > 0`` pushes isotropy up, ``lambda < 0`` down. The authors' finding is that *decreasing*
isotropy helps; the defaults are their recommended setting (``zeta=0.2``, ``lambda=-5``; their search
covered ``lambda`` in [-5, 5] and ``zeta`` in [0.2, 0.8]). ``lambda=0`` is plain CE fine-tuning.

Training is resumable: with ``checkpoint_dir`` the weights, the AdamW moments, the step, the current
epoch's ``C0`` and the history are saved every ``checkpoint_every`` steps (atomically); rerunning with
the same arguments continues and ends with the same weights as an uninterrupted run (the data order
is a pure function of the seed and the epoch). The hooked model passed in is never modified: training
runs on an independent copy.

Example:
    >>> result = istar_finetune(model, load_task("sentiment"), IStarConfig(weight=-5.0))  # doctest: +SKIP
    >>> result.test.accuracy, result.save("istar-out")                                     # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from ..core.capture import check_layers, hooked_states, iter_capture
from ..core.errors import (
    ArtifactError,
    DataError,
    InputError,
    NumericalError,
    check_float,
    check_int,
    check_positive_int,
)
from ..core.io import atomic_write, texts_digest
from ..core.loading import export_hf_model, load_model, save_hf_model
from ..core.logits import Unembedding
from ..core.models import HookedModel, Tokens
from ..geometry.istar import istar_penalty, reference_covariance
from ..geometry.metrics import check_zeta
from .datasets import TextClassificationTask
from .features import build_prompts, extract_features, label_token_ids
from .results import BaselineResult
from .zero_shot import zero_shot_matmul

#: Bumped when the checkpoint layout changes; an older checkpoint is refused with a clear message.
CHECKPOINT_VERSION = 1
CHECKPOINT_FILE = "istar_checkpoint.pt"
C0_SOURCES = ("train", "identity")
METHODS = ("full", "lora")


@dataclass(frozen=True)
class IStarConfig:
    """Hyper-parameters of I-STAR fine-tuning (defaults: the paper's regulariser, a small CPU budget).

    Attributes:
        weight: lambda, the regulariser's strength; < 0 lowers isotropy (the authors' recommendation,
            -5), > 0 raises it, 0 is plain CE fine-tuning.
        zeta: shrinkage weight of ``C0`` in ISoScore*'s covariance, in [0, 1] (paper: 0.2).
        layers: blocks whose ``resid_post`` is regularised (``None`` = all; negative counts from the end).
        c0: ``"train"`` (covariance of the training split's token states, refreshed each epoch) or
            ``"identity"``.
        c0_texts: training prompts used for ``C0`` (a seeded subsample; ``None`` = all of them). The
            sample must hold at least ``d_model`` token states.
        epochs: passes over the training split.
        lr: AdamW learning rate (no weight decay, constant).
        batch_size: prompts per step.
        max_length: prompts are shortened (text words, never the template's suffix) to this many tokens.
        max_grad_norm: global gradient-norm clip (``None``: no clipping); 1.0 as in HF's Trainer.
        method: ``"full"`` (every weight) or ``"lora"`` (``peft`` LoRA adapters on the attention
            projections; for models too big to fine-tune fully).
        lora_r, lora_alpha: LoRA rank and scale.
        seed: data order, ``C0`` subsample and adapter initialisation.

    Example:
        >>> IStarConfig(weight=1.0, zeta=0.2).to_dict()["weight"]
        1.0
    """

    weight: float = -5.0
    zeta: float = 0.2
    layers: tuple[int, ...] | None = None
    c0: str = "train"
    c0_texts: int | None = None
    epochs: int = 1
    lr: float = 1e-5
    batch_size: int = 8
    max_length: int = 64
    max_grad_norm: float | None = 1.0
    method: str = "full"
    lora_r: int = 8
    lora_alpha: int = 16
    seed: int = 42

    def checked(self, n_layers: int) -> "IStarConfig":
        """The config with every value validated (and ``layers`` made absolute), else :class:`InputError`."""
        if self.c0 not in C0_SOURCES:
            raise InputError(f"c0 must be one of {', '.join(C0_SOURCES)}, got {self.c0!r}.")
        if self.method not in METHODS:
            raise InputError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}.")
        layers = None if self.layers is None else tuple(check_layers(list(self.layers), n_layers))
        return IStarConfig(
            weight=check_float(self.weight, "lambda (weight)"),
            zeta=check_zeta(self.zeta),
            layers=layers,
            c0=self.c0,
            c0_texts=None if self.c0_texts is None else check_positive_int(self.c0_texts, "c0_texts"),
            epochs=check_positive_int(self.epochs, "epochs"),
            lr=check_float(self.lr, "lr", positive=True),
            batch_size=check_positive_int(self.batch_size, "batch_size"),
            max_length=check_positive_int(self.max_length, "max_length"),
            max_grad_norm=None if self.max_grad_norm is None else check_float(self.max_grad_norm, "max_grad_norm", positive=True),
            method=self.method,
            lora_r=check_positive_int(self.lora_r, "lora_r"),
            lora_alpha=check_positive_int(self.lora_alpha, "lora_alpha"),
            seed=check_int(self.seed, "seed", minimum=0),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values."""
        out = asdict(self)
        out["layers"] = None if self.layers is None else list(self.layers)
        return out


@dataclass
class IStarResult:
    """A fine-tuned model and what happened while training it.

    Attributes:
        model: the fine-tuned :class:`HookedModel` (an independent copy; LoRA adapters merged).
        config: the validated :class:`IStarConfig`.
        history: one row per step: epoch, step, loss, ce, penalty, batch IsoScore*, grad_norm, seconds.
        test: accuracy and macro-F1 on the task's test split (``method="istar"``).
        meta: task, model, label tokens, regularised layers, C0 sample sizes, wall times.
    """

    model: HookedModel
    config: IStarConfig
    history: pd.DataFrame
    test: BaselineResult
    meta: dict = field(default_factory=dict)

    def save(self, directory: str | Path) -> Path:
        """Write ``model/`` (an HF directory with safetensors weights: ``load_model`` and
        ``vsem-lens report --model DIR/model`` read it), ``istar.json`` and ``history.csv``.

        Example:
            >>> result.save("istar-out")   # doctest: +SKIP
            PosixPath('istar-out')
        """
        out = Path(directory)
        save_hf_model(self.model, out / "model")
        summary = {"config": self.config.to_dict(), "test": self.test.as_row(), **self.meta}
        atomic_write(out / "istar.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))
        atomic_write(out / "history.csv", lambda tmp: self.history.to_csv(tmp, index=False, float_format="%.6g"))
        return out


def label_logits(
    model: HookedModel, tokens: Tokens, label_head: Unembedding, layers: Sequence[int]
) -> tuple[Float[Tensor, "batch label"], list[Float[Tensor, "batch pos d_model"]]]:
    """The model's logits over the label tokens at each prompt's last token, and the ``resid_post`` of
    ``layers`` (which must include the last block), in the caller's grad mode.

    Example:
        >>> logits, states = label_logits(model, model.tokenize(prompts), head, [0, 29])  # doctest: +SKIP
    """
    states = hooked_states(model, tokens, layers=layers)
    last = states[-1]
    position = tokens.lengths.to(last.device) - 1
    h = last[torch.arange(last.shape[0], device=last.device), position]
    return label_head(model.final_norm(h)), states


def istar_loss(
    model: HookedModel,
    tokens: Tokens,
    y: Int[Tensor, " batch"],
    label_ids: Sequence[int],
    config: IStarConfig,
    c0: Float[Tensor, "d_model d_model"] | None,
) -> dict[str, Tensor]:
    """One mini-batch's I-STAR loss: ``{"loss", "ce", "penalty", "isoscore_star"}`` (``config`` checked).

    ``penalty`` is ``lambda * (1 - IsoScore*)`` of the regularised layers' non-padding states pooled;
    with ``lambda = 0`` it is not computed (exactly 0) and ``isoscore_star`` is measured without gradient.

    Example:
        >>> parts = istar_loss(model, tokens, y, [2731, 3524], IStarConfig().checked(30), c0)   # doctest: +SKIP
        >>> parts["loss"].backward()                                                      # doctest: +SKIP
    """
    regularised = check_layers(list(config.layers) if config.layers is not None else None, model.n_layers)
    wanted = sorted(set(regularised) | {model.n_layers - 1})
    # Built per call: the head is a view of the live LM-head weights, part of this step's graph.
    head = model.trainable_unembedding().columns(label_ids)
    logits, states = label_logits(model, tokens, head, wanted)
    ce = F.cross_entropy(logits.float(), y.to(logits.device))
    pooled = [states[wanted.index(layer)] for layer in regularised]
    mask = tokens.mask.to(pooled[0].device)
    if config.weight != 0:
        penalty = istar_penalty(pooled, mask, zeta=config.zeta, c0=c0, weight=config.weight)
        iso = 1.0 - penalty.detach() / config.weight
    else:
        penalty = torch.zeros((), dtype=torch.float64, device=ce.device)
        with torch.no_grad():
            iso = 1.0 - istar_penalty([s.detach() for s in pooled], mask, zeta=config.zeta, c0=c0, weight=1.0)
    loss = ce + penalty.to(ce.dtype)
    if not torch.isfinite(loss):
        raise NumericalError(
            f"the I-STAR loss is not finite (ce {float(ce):.4g}, penalty {float(penalty):.4g}); lower lr or |lambda|."
        )
    return {"loss": loss, "ce": ce.detach(), "penalty": penalty.detach(), "isoscore_star": iso}


def evaluate_labels(
    model: HookedModel, task: TextClassificationTask, *, split: str = "test", max_length: int = 64, batch_size: int = 16,
    method: str = "label logits",
) -> BaselineResult:
    """Accuracy of the model's own label-token logits on a split: the zero-shot readout
    (:func:`~vsem_lens.calibration.zero_shot.zero_shot_matmul`) of any model, fine-tuned or not.

    The feature cache is not used: it is keyed by the unembedding and final norm, which fine-tuning of
    other weights (LoRA on the attention, say) leaves unchanged.

    Example:
        >>> evaluate_labels(model, load_task("sentiment")).accuracy   # doctest: +SKIP
    """
    part = task.split(split)
    features = extract_features(model, part, max_length=max_length, batch_size=batch_size, cache=False, progress=False)
    result = zero_shot_matmul(features, part.y, task.n_classes)
    result.method = method
    return result


def _check_c0_sample(model: HookedModel, prompts: Sequence[str], layers: Sequence[int]) -> None:
    """Refuse a C0 sample with fewer token states than ``d_model`` (its covariance would be singular)."""
    n_states = sum(len(row) for row in model.token_ids(list(prompts))) * len(layers)
    if n_states < model.d_model:
        raise InputError(
            f"the C0 sample holds {n_states} token states, fewer than d_model={model.d_model}; use more "
            "training texts (or c0_texts), more layers, or c0='identity'."
        )


def training_covariance(
    model: HookedModel, prompts: Sequence[str], layers: Sequence[int], *, batch_size: int = 16, progress: bool = False
) -> Float[Tensor, "d_model d_model"]:
    """``C0``: the float64 covariance of the non-padding ``resid_post`` states of ``layers`` over ``prompts``,
    pooled and streamed (bounded memory).

    Raises:
        InputError: fewer token states than ``d_model`` (the covariance would be singular).

    Example:
        >>> c0 = training_covariance(model, prompts, range(30))   # doctest: +SKIP
    """
    _check_c0_sample(model, prompts, layers)
    was_training = model.training
    model.eval()
    try:
        batches = iter_capture(model, list(prompts), layers=list(layers), batch_size=batch_size, progress=progress)
        return reference_covariance(batch.acts["resid_post"] for batch in batches)
    finally:
        model.train(was_training)


def trainable_copy(model: HookedModel, config: IStarConfig) -> HookedModel:
    """An independent hooked copy of ``model`` to train (LoRA adapters injected for ``method="lora"``), on
    the model's device; the loop of :func:`istar_finetune` trains it, and studies and benchmarks that time
    single steps use it the same way.

    Example:
        >>> copy = trainable_copy(model, IStarConfig().checked(model.n_layers))   # doctest: +SKIP
    """
    hf = export_hf_model(model)
    if config.method == "lora":
        try:
            import peft  # optional: only the LoRA variant needs it
        except ImportError:  # pragma: no cover - peft is in the calibration extra
            raise InputError("method='lora' needs the 'peft' package: pip install peft") from None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            lora = peft.LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0)
            try:
                hf = peft.inject_adapter_in_model(lora, hf)
            except ValueError as exc:
                raise InputError(f"peft cannot add LoRA adapters to this model ({exc}).") from None
        for name, param in hf.named_parameters():
            param.requires_grad_("lora_" in name)
    tuned = load_model((hf, model.tokenizer), device=model.device, prepend_bos=model.prepend_bos)
    tuned.name = f"{model.name} (I-STAR)"
    return tuned


def _merge_adapters(model: HookedModel) -> None:
    """Fold trained LoRA adapters into their base weights (the saved model is then a plain HF model)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    with torch.no_grad():
        for module in model.hf_model.modules():
            if isinstance(module, BaseTunerLayer) and not module.merged:
                module.merge()


def _run_id(model: HookedModel, task: TextClassificationTask, config: IStarConfig) -> str:
    """Identity of a training run: model weights, task data and settings."""
    digest = hashlib.blake2b(digest_size=12)
    for part in (model.fingerprint, task.template, json.dumps(task.label_words), json.dumps(config.to_dict(), sort_keys=True)):
        digest.update(part.encode())
    digest.update(texts_digest(list(task.texts) + [str(label) for label in task.labels]).encode())
    return digest.hexdigest()


def _order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of epoch ``epoch``: a pure function of (seed, epoch), so a resumed run agrees."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


class _Checkpoint:
    """The resumable state of one run in ``directory/istar_checkpoint.pt`` (``torch.load(weights_only=True)``)."""

    def __init__(self, directory: Path | None, run_id: str):
        self.path = None if directory is None else Path(directory) / CHECKPOINT_FILE
        self.run_id = run_id

    def save(self, step: int, model: HookedModel, optimizer: torch.optim.Optimizer, c0: Tensor | None,
             history: list[dict]) -> None:
        if self.path is None:
            return
        payload = {
            "version": CHECKPOINT_VERSION,
            "run_id": self.run_id,
            "step": step,
            "weights": {name: p.detach().cpu() for name, p in model.named_parameters() if p.requires_grad},
            "optimizer": optimizer.state_dict(),
            "c0": c0.cpu() if c0 is not None else torch.empty(0),
            "history": json.dumps(history),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, lambda tmp: torch.save(payload, tmp))

    def load(self) -> dict | None:
        if self.path is None or not self.path.is_file():
            return None
        try:
            payload = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a torn or foreign file
            raise ArtifactError(f"the checkpoint {self.path} is unreadable ({type(exc).__name__}); delete it to start over.") from exc
        if payload.get("version") != CHECKPOINT_VERSION or payload.get("run_id") != self.run_id:
            raise ArtifactError(
                f"the checkpoint {self.path} belongs to another run (model, task data or settings differ); "
                "delete it, choose another checkpoint directory, or pass resume=False to start over."
            )
        payload["history"] = json.loads(payload["history"])
        return payload


# One training recipe in one place (copy, C0, loop, checkpoints, test pass), about 100 lines.
def istar_finetune(
    model: HookedModel,
    task: TextClassificationTask,
    config: IStarConfig | None = None,
    *,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 10,
    resume: bool = True,
    progress: bool = True,
    callback: Callable[[int, dict], None] | None = None,
) -> IStarResult:
    """Fine-tune an independent copy of ``model`` on ``task`` with the I-STAR loss (see the module docstring).

    Args:
        model: the hooked model (left unchanged).
        task: a task with ``train`` and ``test`` splits (e.g. :func:`~vsem_lens.calibration.load_task`).
        config: hyper-parameters (:class:`IStarConfig`; default: the paper's lambda -5, zeta 0.2).
        checkpoint_dir: where to keep the resumable state (``None``: no checkpoints).
        checkpoint_every: steps between checkpoints (and at the end of each epoch).
        resume: continue from a checkpoint of the same run in ``checkpoint_dir``.
        progress: a tqdm bar over steps.
        callback: ``callback(step, row)`` after every step (row = the history row).

    Raises:
        InputError: a bad hyper-parameter, a task without train/test splits, a C0 sample smaller than d_model.
        ArtifactError: a checkpoint of another run in ``checkpoint_dir``.

    Example:
        >>> result = istar_finetune(model, load_task("topic"), IStarConfig(weight=1.0), progress=False)  # doctest: +SKIP
    """
    config = (config or IStarConfig()).checked(model.n_layers)
    checkpoint_every = check_positive_int(checkpoint_every, "checkpoint_every")
    for split in ("train", "test"):
        if not task.has_split(split):
            raise DataError(f"task {task.name!r} has no {split!r} split; give it train/test splits (ensure_splits).")
    started = time.perf_counter()
    train = task.split("train")
    label_ids = label_token_ids(model, task.label_words)
    prompts, shortened = build_prompts(model, task.template, train.texts, max_length=config.max_length)
    regularised = check_layers(list(config.layers) if config.layers is not None else None, model.n_layers)
    c0_prompts = prompts
    if config.c0_texts is not None and config.c0_texts < len(prompts):
        pick = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(config.seed))[: config.c0_texts]
        c0_prompts = [prompts[i] for i in sorted(pick.tolist())]
    needs_c0 = config.c0 == "train" and config.weight != 0
    if needs_c0:  # fail before copying the model
        _check_c0_sample(model, c0_prompts, regularised)

    tuned = trainable_copy(model, config)
    params = [p for p in tuned.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    checkpoint = _Checkpoint(Path(checkpoint_dir) if checkpoint_dir is not None else None, _run_id(model, task, config))
    steps_per_epoch = -(-len(prompts) // config.batch_size)
    total = steps_per_epoch * config.epochs
    step, history, c0 = 0, [], None
    saved = checkpoint.load() if resume else None
    if saved is not None:
        with torch.no_grad():
            named = dict(tuned.named_parameters())
            for name, value in saved["weights"].items():
                named[name].copy_(value)
        optimizer.load_state_dict(saved["optimizer"])
        step, history = int(saved["step"]), saved["history"]
        c0 = saved["c0"].to(tuned.device) if saved["c0"].numel() else None
    y_train = train.y
    c0_seconds = 0.0
    bar = tqdm(total=total, initial=step, desc="I-STAR", unit="step", disable=not progress)
    try:
        while step < total:
            epoch, index = divmod(step, steps_per_epoch)
            if needs_c0 and (index == 0 or c0 is None):  # refreshed at every epoch's start
                began = time.perf_counter()
                c0 = training_covariance(tuned, c0_prompts, regularised)
                c0_seconds += time.perf_counter() - began
            order = _order(len(prompts), config.seed, epoch)
            batch = order[index * config.batch_size : (index + 1) * config.batch_size]
            began = time.perf_counter()
            tuned.train()
            parts = istar_loss(tuned, tuned.tokenize([prompts[i] for i in batch]), y_train[batch], label_ids, config, c0)
            optimizer.zero_grad(set_to_none=True)
            parts["loss"].backward()
            clip = config.max_grad_norm if config.max_grad_norm is not None else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            step += 1
            row = {"epoch": epoch, "step": step, **{k: float(v.detach()) for k, v in parts.items()},
                   "grad_norm": float(grad_norm), "seconds": round(time.perf_counter() - began, 4)}
            history.append(row)
            bar.update(1)
            bar.set_postfix(ce=f"{row['ce']:.3f}", iso=f"{row['isoscore_star']:.3f}")
            if step % checkpoint_every == 0 or step % steps_per_epoch == 0:
                checkpoint.save(step, tuned, optimizer, c0, history)
            if callback is not None:
                callback(step, row)
    finally:
        bar.close()
    tuned.eval()
    if config.method == "lora":
        _merge_adapters(tuned)
    test = evaluate_labels(tuned, task, max_length=config.max_length, method="istar")
    meta = {
        "task": task.name, "model": model.name, "label_words": task.label_words, "label_token_ids": label_ids,
        "regularised_layers": regularised, "n_train": len(prompts), "prompts_shortened": shortened,
        "c0_source": config.c0, "c0_texts": len(c0_prompts) if config.c0 == "train" else 0,
        "steps": total, "train_seconds": round(sum(r["seconds"] for r in history), 2),
        "c0_seconds_this_run": round(c0_seconds, 2), "seconds_this_run": round(time.perf_counter() - started, 2),
    }
    return IStarResult(tuned, config, pd.DataFrame(history), test, meta)


__all__ = [
    "IStarConfig",
    "IStarResult",
    "evaluate_labels",
    "istar_finetune",
    "istar_loss",
    "label_logits",
    "trainable_copy",
    "training_covariance",
]
