"""Zero-shot baselines: the model's own next-token logits over the label tokens (``matmul``) and the
cosine of the LM-head input to the label tokens' semantic bases (``affinity``).

Example:
    >>> zero_shot_matmul(test_features, test.y).accuracy  # doctest: +SKIP
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from ..core.errors import InputError
from .features import Features
from .results import BaselineResult, baseline_result


def zero_shot_matmul(features: Features, y: Int[Tensor, " n"], n_classes: int | None = None) -> BaselineResult:
    """Zero-shot: argmax of the model's next-token logits over the label tokens.

    Example:
        >>> zero_shot_matmul(test_features, test.y).accuracy  # doctest: +SKIP
        0.95
    """
    started = time.perf_counter()
    pred = features.label_logits.argmax(dim=1)
    k = n_classes or features.label_logits.shape[1]
    return baseline_result("zero-shot", y, pred, k, features.seconds + time.perf_counter() - started, readout="matmul logits")


def zero_shot_affinity(
    features: Features, label_bases: Float[Tensor, "k d"], y: Int[Tensor, " n"]
) -> BaselineResult:
    """Zero-shot with vocabulary-affinity logits: argmax of ``cos(r, s_label)`` over the label bases.

    ``features`` must be last-layer ``final_norm`` features (the LM-head input, where the bases live).

    Example:
        >>> zero_shot_affinity(test_features, basis.for_words(task.label_words), test.y)  # doctest: +SKIP
    """
    if features.frame != "final_norm":
        raise InputError("the affinity baseline needs final_norm features (the LM-head input); extract them with frame='final_norm'.")
    started = time.perf_counter()
    bases = torch.as_tensor(label_bases, dtype=torch.float32).cpu()
    cos = F.normalize(features.X, dim=1) @ F.normalize(bases, dim=1).T
    pred = cos.argmax(dim=1)
    counts = torch.bincount(pred, minlength=bases.shape[0]).tolist()
    return baseline_result(
        "affinity", y, pred, bases.shape[0], features.seconds + time.perf_counter() - started,
        readout="cosine to label bases", predicted_counts=str(counts),
    )


__all__ = ["zero_shot_affinity", "zero_shot_matmul"]
