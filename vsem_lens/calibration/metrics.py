"""Classification metrics shared by the calibration heads and the baselines (accuracy, macro-F1).

Example:
    >>> classification_metrics([0, 1], [0, 1])["accuracy"]
    1.0
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..core.errors import InputError


def classification_metrics(y_true: Any, y_pred: Any, n_classes: int | None = None) -> dict[str, float]:
    """Accuracy and macro-F1 (the unweighted mean of per-class F1; a class never predicted and never
    present is left out, one present but never predicted counts 0).

    Example:
        >>> classification_metrics([0, 0, 1, 1], [0, 1, 1, 1])
        {'accuracy': 0.75, 'macro_f1': 0.7333333333333334}
    """
    t = torch.as_tensor(y_true).long().reshape(-1)
    p = torch.as_tensor(y_pred).long().reshape(-1)
    if t.numel() != p.numel() or t.numel() == 0:
        raise InputError(f"y_true and y_pred must be non-empty and the same length ({t.numel()} vs {p.numel()}).")
    k = int(n_classes) if n_classes is not None else int(max(t.max(), p.max())) + 1
    f1s = []
    for c in range(k):
        tp = int(((p == c) & (t == c)).sum())
        fp = int(((p == c) & (t != c)).sum())
        fn = int(((p != c) & (t == c)).sum())
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": float((t == p).double().mean()), "macro_f1": float(np.mean(f1s)) if f1s else 0.0}


__all__ = ["classification_metrics"]
