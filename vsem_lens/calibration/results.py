"""What a calibration baseline returns: :class:`BaselineResult` (test accuracy, macro-F1, wall time,
details, predictions) and the table of several results.

Example:
    >>> results_table([BaselineResult("knn", 0.9, 0.89, 1.5)]).method.tolist()
    ['knn']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import pandas as pd
import torch
from torch import Tensor

from ..core.errors import InputError
from .metrics import classification_metrics


@dataclass
class BaselineResult:
    """Test metrics and cost of one method.

    Example:
        >>> BaselineResult("knn", 0.9, 0.89, 1.5).as_row()["method"]
        'knn'
    """

    method: str
    accuracy: float
    macro_f1: float
    wall_time_s: float
    details: dict = field(default_factory=dict)
    predictions: Tensor | None = field(default=None, repr=False)

    def as_row(self) -> dict:
        """A flat dict for a table (details prefixed with nothing; JSON-able values only)."""
        row = {"method": self.method, "accuracy": self.accuracy, "macro_f1": self.macro_f1, "wall_time_s": self.wall_time_s}
        for key, value in self.details.items():
            if isinstance(value, (int, float, str, bool)) or value is None:
                row[key] = value
        return row


def results_table(results: Sequence[BaselineResult]) -> pd.DataFrame:
    """Results as a tidy table, one row per method.

    Example:
        >>> results_table([BaselineResult("knn", 0.9, 0.89, 1.5)]).shape
        (1, 4)
    """
    return pd.DataFrame([r.as_row() for r in results])


def baseline_result(method: str, y: Tensor, pred: Tensor, n_classes: int, seconds: float, **details: Any) -> BaselineResult:
    """A :class:`BaselineResult` from test labels and predictions (metrics by :func:`classification_metrics`).

    Example:
        >>> baseline_result("knn", torch.tensor([0, 1]), torch.tensor([0, 1]), 2, 0.5).accuracy
        1.0
    """
    metrics = classification_metrics(y, pred, n_classes)
    return BaselineResult(method, metrics["accuracy"], metrics["macro_f1"], float(seconds), dict(details), pred.detach().cpu())


def as_matrix(X: Any, name: str) -> Tensor:
    """``X`` as a non-empty float32 CPU ``[n, d]`` matrix, else :class:`InputError` naming ``name``.

    Example:
        >>> as_matrix([[1, 2]], "X").dtype
        torch.float32
    """
    X = torch.as_tensor(X).detach().cpu()
    if X.dim() != 2 or X.shape[0] == 0:
        raise InputError(f"{name} must be a non-empty [n, d] matrix, got shape {tuple(X.shape)}.")
    return X.float()


__all__ = ["BaselineResult", "as_matrix", "baseline_result", "results_table"]
