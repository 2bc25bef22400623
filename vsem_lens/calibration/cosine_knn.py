"""The cosine kNN baseline: a cosine k-nearest-neighbour classifier on the prompt features (hidden
states), k chosen on validation.

Not to be confused with kNN prompting (Xu et al. 2023; :mod:`vsem_lens.calibration.knn_prompting`),
whose neighbours are found among next-token *distributions over the vocabulary* by KL divergence.

Example:
    >>> CosineKNNClassifier(k=1).fit(torch.eye(2, 3), torch.tensor([0, 1])).predict(torch.eye(2, 3)).tolist()
    [0, 1]
"""

from __future__ import annotations

import time
from typing import Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from ..core.errors import InputError, check_positive_int
from .features import Features
from .results import BaselineResult, as_matrix, baseline_result
from .threads import torch_threads


class CosineKNNClassifier:
    """Cosine k-nearest-neighbour classifier: majority vote, ties broken by summed similarity.

    Args:
        k: neighbours per vote (at most the number of training rows is used).
        n_classes: number of classes (default: the largest training label + 1).

    Example:
        >>> knn = CosineKNNClassifier(k=1).fit(torch.eye(2, 3), torch.tensor([0, 1]))
        >>> knn.predict(torch.tensor([[0.9, 0.1, 0.0]])).tolist()
        [0]
    """

    def __init__(self, k: int = 5, n_classes: int | None = None):
        check_positive_int(k, "k")
        self.k, self.n_classes = k, n_classes

    def fit(self, X: Float[Tensor, "n d"], y: Int[Tensor, " n"]) -> "CosineKNNClassifier":
        """Store the L2-normalised training rows and their labels; returns ``self``."""
        X = as_matrix(X, "X")
        self.X_ = F.normalize(X.double(), dim=1)
        self.y_ = torch.as_tensor(y).long().reshape(-1)
        if self.y_.numel() != X.shape[0]:
            raise InputError(f"X has {X.shape[0]} rows but y has {self.y_.numel()} labels.")
        self.n_classes_ = self.n_classes or int(self.y_.max()) + 1
        return self

    def predict(self, X: Float[Tensor, "m d"], k: int | None = None) -> Int[Tensor, " m"]:
        """Class of each row by the cosine ``k`` nearest training rows (default the constructor's ``k``)."""
        k = min(k or self.k, self.X_.shape[0])
        sims = F.normalize(as_matrix(X, "X").double(), dim=1) @ self.X_.T
        top, idx = sims.topk(k, dim=1)
        labels = self.y_[idx]
        votes = torch.zeros(X.shape[0], self.n_classes_, dtype=torch.float64)
        votes.scatter_add_(1, labels, torch.ones_like(top))
        weight = torch.zeros_like(votes).scatter_add_(1, labels, top)
        return (votes + 1e-6 * weight).argmax(dim=1)


def cosine_knn_baseline(
    f_train: Features, y_train: Tensor, f_val: Features, y_val: Tensor, f_test: Features, y_test: Tensor,
    *, ks: Sequence[int] = (1, 3, 5, 7, 9, 15, 25), n_classes: int | None = None,
) -> BaselineResult:
    """Cosine kNN on the last-token prompt features; k picked on validation accuracy (ties: smaller k).

    Example:
        >>> cosine_knn_baseline(f_tr, y_tr, f_va, y_va, f_te, y_te).details["k"]  # doctest: +SKIP
        7
    """
    with torch_threads(1):
        return _knn(f_train, y_train, f_val, y_val, f_test, y_test, ks, n_classes)


def _knn(f_train, y_train, f_val, y_val, f_test, y_test, ks, n_classes) -> BaselineResult:
    started = time.perf_counter()
    k_classes = n_classes or int(max(y_train.max(), y_val.max(), y_test.max())) + 1
    knn = CosineKNNClassifier(n_classes=k_classes).fit(f_train.X, y_train)
    best_k, best_acc = None, -1.0
    for k in ks:
        acc = float((knn.predict(f_val.X, k) == y_val).double().mean())
        if acc > best_acc:
            best_k, best_acc = k, acc
    pred = knn.predict(f_test.X, best_k)
    seconds = f_train.seconds + f_val.seconds + f_test.seconds + time.perf_counter() - started
    return baseline_result("cosine-knn", y_test, pred, k_classes, seconds, k=best_k, val_accuracy=best_acc)


__all__ = ["CosineKNNClassifier", "cosine_knn_baseline"]
