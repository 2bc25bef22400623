"""End-to-end semantic calibration: :class:`CalibratedModel` joins a hooked model, a fitted
:class:`~vsem_lens.calibration.heads.NeuralClusteringHead` and a task's prompt, so new texts are classified
(and saved heads reloaded) in one call; features are read in any frame
(:func:`vsem_lens.lenses.frames.resolve_frame`).

Example:
    >>> cm = CalibratedModel.fit(model, load_task("sentiment"), epochs=50)   # doctest: +SKIP
    >>> cm.predict(["A delight from start to finish."])                       # doctest: +SKIP
    ['positive']
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from jaxtyping import Float
from torch import Tensor

from ..core.errors import ArtifactError, InputError
from ..core.loading import load_model
from ..core.models import check_texts
from ..lenses.base import Lens
from ..lenses.frames import lens_identity, resolve_frame
from ..readout.basis import SemanticBasis
from .datasets import TextClassificationTask
from .features import POOLS, extract_features
from .heads import NeuralClusteringHead
from .metrics import classification_metrics


class CalibratedModel:
    """A hooked model + a fitted head + a task: classify new texts end to end.

    Args:
        model: the :class:`~vsem_lens.core.models.HookedModel` the features come from.
        head: a fitted :class:`NeuralClusteringHead`.
        task: the task (gives the template and label words); only its prompt is used.
        layer, frame, pool, max_length: how features are extracted (as in training); ``frame`` is a frame
            name or a :class:`~vsem_lens.lenses.base.Lens` (see :func:`~vsem_lens.lenses.frames.resolve_frame`).
        lens: the tuned lens for ``frame="tuned"`` (default: the one cached for the model).

    Example:
        >>> cm = CalibratedModel.fit(model, load_task("sentiment"), epochs=50)   # doctest: +SKIP
        >>> cm.predict(["A delight from start to finish."])                       # doctest: +SKIP
        ['positive']
        >>> cm.representation(["Dull."]).shape                                    # doctest: +SKIP
        torch.Size([1, 576])
    """

    def __init__(
        self,
        model: Any,
        head: NeuralClusteringHead,
        task: Any,
        *,
        layer: int = -1,
        frame: str | Lens = "final_norm",
        pool: str = "tokens",
        max_length: int | None = None,
        lens: Lens | None = None,
    ):
        if head.module_ is None:
            raise InputError("the head is not fitted; fit it first or use CalibratedModel.fit.")
        if pool not in POOLS:
            raise InputError(f"unknown pool {pool!r}; choose one of {', '.join(POOLS)}.")
        if list(head.classes) != list(task.label_names):
            raise InputError(f"the head's classes {head.classes} differ from the task's {task.label_names}.")
        self.model, self.head, self.task = model, head, task
        self.lens = resolve_frame(frame, model, lens=lens)
        self.frame = self.lens.frame
        self.layer, self.pool, self.max_length = layer, pool, max_length

    @classmethod
    def fit(
        cls,
        model: Any,
        task: Any,
        *,
        layer: int = -1,
        frame: str | Lens = "final_norm",
        pool: str = "tokens",
        max_length: int | None = None,
        lens: Lens | None = None,
        cache: bool = True,
        progress: bool = True,
        features: Mapping[str, Any] | None = None,
        **head_kwargs: Any,
    ) -> "CalibratedModel":
        """Extract (cached) features of the task's ``train``/``validation`` splits and fit a head.

        ``head_kwargs`` go to :class:`NeuralClusteringHead`. Without a ``validation`` split no early
        stopping is done. ``features`` (by split name) are used instead of extracting them again, e.g.
        the ones a ``torchrun`` run extracted with ``extract_features(..., distributed=env)``. ``cache``
        reads and writes the feature cache (a custom :class:`~vsem_lens.lenses.base.Lens` needs ``False``).

        Example:
            >>> cm = CalibratedModel.fit(model, load_task("topic"), head="prototype")  # doctest: +SKIP
        """
        lens = resolve_frame(frame, model, lens=lens)
        basis = SemanticBasis.from_model(model)
        bases = basis.for_words(task.label_words)
        head = NeuralClusteringHead(bases, classes=task.label_names, **head_kwargs)
        given = dict(features or {})

        def split_input(name: str) -> list[Any]:
            split = task.split(name)
            if name not in given:
                given[name] = extract_features(
                    model, split, layer=layer, frame=lens, max_length=max_length, cache=cache, progress=progress
                )
            return [given[name].head_input(pool), split.y]

        args = split_input("train") + (split_input("validation") if task.has_split("validation") else [])
        if lens_identity(lens) is not None:  # a custom lens cannot be recorded; save() says so
            head.metadata.update(prompt_metadata(model, task, layer, lens, pool, max_length))
        head.fit(*args)
        return cls(model, head, task, layer=layer, frame=lens, pool=pool, max_length=max_length)

    def features(self, texts: Sequence[str], *, cache: bool = False) -> Tensor:
        """Head input of texts (their zero-shot prompt features)."""
        texts = check_texts(texts)
        feats = extract_features(
            self.model, self.task, texts=texts, layer=self.layer, frame=self.lens,
            max_length=self.max_length, cache=cache, progress=False,
        )
        return feats.head_input(self.pool)

    def predict(self, texts: str | Sequence[str]) -> list[str]:
        """Label of each text."""
        return self.head.predict_labels(self.features(texts))

    def predict_proba(self, texts: str | Sequence[str]) -> Float[Tensor, "n k"]:
        """Class probabilities of each text (columns in ``task.label_names`` order)."""
        return self.head.predict_proba(self.features(texts))

    def representation(self, texts: str | Sequence[str]) -> Float[Tensor, "n d_model"]:
        """The calibrated representation ``lambda(r)`` of each text (for the analyses)."""
        return self.head.transform(self.features(texts))

    def evaluate(self, task: Any, *, cache: bool = True) -> dict[str, float]:
        """Accuracy and macro-F1 on a labelled task (e.g. ``task.split("test")``)."""
        feats = extract_features(
            self.model, task, layer=self.layer, frame=self.lens, max_length=self.max_length, cache=cache, progress=False
        )
        return classification_metrics(task.y, self.head.predict(feats.head_input(self.pool)), task.n_classes)

    def save(self, path: str | os.PathLike) -> Path:
        """Save the head with everything needed to rebuild the classifier (model spec, prompt, layer, frame).

        A tuned-lens frame is recorded by name and weight digest (loading finds the lens in the cache or
        takes ``lens=``); a custom :class:`~vsem_lens.lenses.base.Lens` cannot be recorded and is refused.
        """
        self.head.metadata.update(prompt_metadata(self.model, self.task, self.layer, self.lens, self.pool, self.max_length))
        return self.head.save(path)

    @classmethod
    def load(cls, path: str | os.PathLike, model: Any = None, *, lens: Lens | None = None) -> "CalibratedModel":
        """Load a saved classifier; loads the recorded model unless ``model`` is given (a hooked model,
        or a model spec for :func:`~vsem_lens.core.loading.load_model`, loaded with the recorded BOS rule).
        The recorded model is loaded from local files only (the embedded model, a local folder or the HF
        cache): a saved head never makes vsem-lens download a model; pass ``model`` to choose one.
        A head trained in the ``tuned`` frame needs the same tuned lens (``lens=`` or the cached one).

        Example:
            >>> cm = CalibratedModel.load("calibration-out/head")  # doctest: +SKIP
        """
        head = NeuralClusteringHead.load(path)
        meta = head.metadata
        required = ("template", "verbalizer", "layer", "frame", "pool")
        missing = [k for k in required if k not in meta]
        if missing:
            raise ArtifactError(f"the head in {path} lacks the prompt metadata {missing}; save it with CalibratedModel.save.")
        if model is None or isinstance(model, (str, os.PathLike)):
            spec = meta.get("model", "embedded") if model is None else model
            # A model named by the head's files is never downloaded: a folder must not decide what is fetched.
            model = load_model(spec, prepend_bos=bool(meta.get("prepend_bos", False)), local_only=model is None)
        if meta.get("fingerprint") and meta["fingerprint"] != model.fingerprint:
            raise ArtifactError(
                f"the head in {path} was trained on another model (fingerprint {meta['fingerprint']} vs "
                f"{model.fingerprint}); pass the model it was trained with."
            )
        verbalizer = dict(meta["verbalizer"])
        task = TextClassificationTask(
            meta.get("task", "task"), ["-"] * 2, list(verbalizer)[:2], ["train", "train"], verbalizer, meta["template"]
        )
        frame = resolve_frame(meta["frame"], model, lens=lens)
        if meta.get("frame_identity") and meta["frame_identity"] != lens_identity(frame):
            raise ArtifactError(
                f"the head in {path} was trained through another {meta['frame']!r} lens than the one given or "
                "cached for this model; pass the lens it was trained with as lens=."
            )
        return cls(model, head, task, layer=int(meta["layer"]), frame=frame, pool=meta["pool"], max_length=meta.get("max_length"))

    def __repr__(self) -> str:
        return f"CalibratedModel({self.model!r}, {self.head!r}, task={self.task.name!r}, layer={self.layer})"


def prompt_metadata(model: Any, task: Any, layer: int, lens: Lens, pool: str, max_length: int | None) -> dict:
    """What a saved head records to rebuild its classifier: model spec and fingerprint, BOS rule, prompt,
    verbalizer, layer, frame (name and :func:`~vsem_lens.lenses.frames.lens_identity`), pooling.

    Example:
        >>> prompt_metadata(model, task, -1, RawLens(), "tokens", None)["frame"]  # doctest: +SKIP
        'raw'
    """
    identity = lens_identity(lens)
    if identity is None:
        raise InputError(
            f"a classifier read through the custom lens {lens!r} cannot be saved: the lens has no name or "
            "fingerprint to record. Use frame='raw', 'final_norm' or 'tuned'."
        )
    name = getattr(model, "name", "")
    spec = "embedded" if name == "SmolLM2-135M-Instruct" else name
    return {
        "model": spec,
        "fingerprint": getattr(model, "fingerprint", ""),
        "prepend_bos": bool(getattr(model, "prepend_bos", False)),
        "task": task.name,
        "template": task.template,
        "verbalizer": dict(task.verbalizer),
        "layer": int(layer) % model.n_layers if hasattr(model, "n_layers") else int(layer),
        "frame": lens.frame,
        "frame_identity": identity,
        "pool": pool,
        "max_length": max_length,
    }


__all__ = ["CalibratedModel", "prompt_metadata"]
