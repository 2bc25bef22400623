"""The linear-probe baseline: multinomial L2 logistic regression on standardised prompt features
(full-batch L-BFGS in float64, torch only), strength chosen on validation.

Example:
    >>> X = torch.tensor([[0.0], [1.0]]); LogisticRegressionProbe().fit(X, torch.tensor([0, 1])).predict(X).tolist()
    [0, 1]
"""

from __future__ import annotations

import math
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


class LogisticRegressionProbe:
    """Multinomial logistic regression with an L2 penalty, in torch.

    Minimises ``mean CE(X W + b, y) + (l2 / 2) ||W||^2`` (bias not penalised) on standardised
    features (train mean and standard deviation) with full-batch L-BFGS in float64; the problem is
    convex, so the result does not depend on a seed.

    Args:
        l2: L2 penalty strength on ``W`` (>= 0).
        max_iter: L-BFGS iterations.
        n_classes: number of classes (default: the largest training label + 1).

    Example:
        >>> X = torch.tensor([[0.0], [1.0], [2.0], [3.0]]); y = torch.tensor([0, 0, 1, 1])
        >>> LogisticRegressionProbe(l2=1e-3).fit(X, y).predict(X).tolist()
        [0, 0, 1, 1]
    """

    def __init__(self, l2: float = 1e-2, max_iter: int = 100, n_classes: int | None = None):
        if not isinstance(l2, (int, float)) or not math.isfinite(l2) or l2 < 0:
            raise InputError(f"l2 must be a finite number >= 0, got {l2!r}.")
        self.l2, self.max_iter, self.n_classes = float(l2), check_positive_int(max_iter, "max_iter"), n_classes

    def fit(
        self, X: Float[Tensor, "n d"], y: Int[Tensor, " n"], *, warm_start: "LogisticRegressionProbe | None" = None
    ) -> "LogisticRegressionProbe":
        """Fit; ``warm_start`` (a probe fitted on the same data) starts L-BFGS from its solution."""
        X = as_matrix(X, "X").double()
        y = torch.as_tensor(y).long().reshape(-1)
        if y.numel() != X.shape[0]:
            raise InputError(f"X has {X.shape[0]} rows but y has {y.numel()} labels.")
        k = self.n_classes or int(y.max()) + 1
        self.mean_ = X.mean(dim=0)
        self.std_ = X.std(dim=0).clamp_min(1e-8)
        Z = (X - self.mean_) / self.std_
        if warm_start is not None and warm_start.W_.shape == (X.shape[1], k):
            W = warm_start.W_.clone().requires_grad_(True)
            b = warm_start.b_.clone().requires_grad_(True)
        else:
            W = torch.zeros(X.shape[1], k, dtype=torch.float64, requires_grad=True)
            b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=self.max_iter, tolerance_grad=1e-9,
                                tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(Z @ W + b, y) + 0.5 * self.l2 * (W * W).sum()
            loss.backward()
            return loss

        opt.step(closure)
        self.W_, self.b_ = W.detach(), b.detach()
        return self

    def decision_function(self, X: Float[Tensor, "m d"]) -> Float[Tensor, "m k"]:
        """Class logits ``Z W + b`` of the standardised rows ``Z``."""
        Z = (as_matrix(X, "X").double() - self.mean_) / self.std_
        return Z @ self.W_ + self.b_

    def predict(self, X: Float[Tensor, "m d"]) -> Int[Tensor, " m"]:
        """Class of each row (argmax of :meth:`decision_function`)."""
        return self.decision_function(X).argmax(dim=1)


def probe_baseline(
    f_train: Features, y_train: Tensor, f_val: Features, y_val: Tensor, f_test: Features, y_test: Tensor,
    *, l2s: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0), n_classes: int | None = None,
) -> BaselineResult:
    """Logistic-regression probe; L2 strength picked on validation accuracy (ties: stronger L2).

    The strengths are fitted from the strongest down, each warm-started from the previous solution
    (on one torch thread, see :func:`~vsem_lens.calibration.threads.torch_threads`).

    Example:
        >>> probe_baseline(f_tr, y_tr, f_va, y_va, f_te, y_te).details["l2"]  # doctest: +SKIP
        0.1
    """
    with torch_threads(1):
        return _probe(f_train, y_train, f_val, y_val, f_test, y_test, l2s, n_classes)


def _probe(f_train, y_train, f_val, y_val, f_test, y_test, l2s, n_classes) -> BaselineResult:
    started = time.perf_counter()
    k_classes = n_classes or int(max(y_train.max(), y_val.max(), y_test.max())) + 1
    best, best_acc, best_l2, previous = None, -1.0, None, None
    for l2 in sorted(l2s, reverse=True):
        probe = LogisticRegressionProbe(l2, n_classes=k_classes).fit(f_train.X, y_train, warm_start=previous)
        previous = probe
        acc = float((probe.predict(f_val.X) == y_val).double().mean())
        if acc > best_acc:
            best, best_acc, best_l2 = probe, acc, l2
    pred = best.predict(f_test.X)
    seconds = f_train.seconds + f_val.seconds + f_test.seconds + time.perf_counter() - started
    return baseline_result("probe", y_test, pred, k_classes, seconds, l2=best_l2, val_accuracy=best_acc)


__all__ = ["LogisticRegressionProbe", "probe_baseline"]
