"""Argument checks of the calibration estimators: float hyper-parameters (integers use
:func:`vsem_lens.core.errors.check_positive_int`), head inputs and class labels.

Example:
    >>> positive_float(0.05, "temperature")
    0.05
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from ..core.errors import InputError, NumericalError


def finite_float(value: Any, name: str) -> float:
    """``value`` as a finite float, else :class:`InputError` naming ``name``.

    Example:
        >>> finite_float("0.5", "lr")
        0.5
    """
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}.") from None
    if not math.isfinite(out):
        raise InputError(f"{name} must be finite, got {value!r}.")
    return out


def positive_float(value: Any, name: str) -> float:
    """``value`` as a finite float > 0, else :class:`InputError` naming ``name``.

    Example:
        >>> positive_float(1e-3, "lr")
        0.001
    """
    out = finite_float(value, name)
    if out <= 0:
        raise InputError(f"{name} must be positive, got {value!r}.")
    return out


def nonnegative_float(value: Any, name: str) -> float:
    """``value`` as a finite float >= 0, else :class:`InputError` naming ``name``.

    Example:
        >>> nonnegative_float(0, "weight_decay")
        0.0
    """
    out = finite_float(value, name)
    if out < 0:
        raise InputError(f"{name} must be >= 0, got {value!r}.")
    return out



def check_head_input(X: Any, name: str, d_model: int, input_shape: tuple[int, ...] | None = None) -> Tensor:
    """``X`` as a finite float32 CPU tensor ``[n, d_model]`` or ``[n, 3, d_model]`` (last, mean, max) of
    per-example shape ``input_shape`` when given (the shape a head was fitted on).

    Example:
        >>> check_head_input([[0.0, 1.0]], "X", 2).shape
        torch.Size([1, 2])
    """
    try:
        X = torch.as_tensor(X).detach().to("cpu", torch.float32)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(f"{name} must be a numeric array/tensor: {exc}") from None
    if X.dim() not in (2, 3) or X.shape[-1] != d_model or (X.dim() == 3 and X.shape[1] != 3):
        raise InputError(
            f"{name} must be [n, {d_model}] or [n, 3, {d_model}] (last, mean, max), got {tuple(X.shape)}."
        )
    if X.shape[0] == 0:
        raise InputError(f"{name} is empty.")
    if input_shape is not None and tuple(X.shape[1:]) != tuple(input_shape):
        raise InputError(
            f"{name} has per-example shape {tuple(X.shape[1:])} but the head was fitted on {tuple(input_shape)}; "
            "use the same feature pooling as in training."
        )
    if not torch.isfinite(X).all():
        raise NumericalError(f"{name} contains NaN or inf.")
    return X


def class_indices(y: Any, n: int, name: str, classes: Sequence[str]) -> Tensor:
    """``n`` labels (class indices or class names) as a long tensor of indices into ``classes``.

    Example:
        >>> class_indices(["b", 0], 2, "y", ["a", "b"]).tolist()
        [1, 0]
    """
    if isinstance(y, Tensor):
        values = y.detach().cpu().reshape(-1).tolist()
    else:
        values = list(y)
    if len(values) != n:
        raise InputError(f"{name} has {len(values)} labels for {n} examples.")
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for v in values:
        if isinstance(v, str):
            if v not in index:
                raise InputError(f"{name} holds label {v!r}, not one of the classes {classes}.")
            out.append(index[v])
        else:
            try:
                iv = int(v)
            except (TypeError, ValueError):
                raise InputError(f"{name} holds {v!r}, neither a class index nor a class name.") from None
            if iv != v or not 0 <= iv < len(classes):
                raise InputError(f"{name} holds {v!r}, not a class index in 0..{len(classes) - 1}.")
            out.append(iv)
    return torch.tensor(out, dtype=torch.long)


__all__ = ["check_head_input", "class_indices", "finite_float", "nonnegative_float", "positive_float"]
