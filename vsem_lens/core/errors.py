"""Errors raised by vsem-lens.

Every error a user can trigger with bad input is a :class:`VsemLensError` subclass whose message says
what was wrong and what to do about it, so that nobody has to read a deep torch traceback.

Example:
    >>> from vsem_lens.core.errors import VsemLensError, InputError
    >>> issubclass(InputError, VsemLensError)
    True
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any


class VsemLensError(Exception):
    """Base class of every error vsem-lens raises on purpose.

    Example:
        >>> try:
        ...     raise InputError("max_tokens must be positive")
        ... except VsemLensError as exc:
        ...     print(f"vsem-lens: error: {exc}")
        vsem-lens: error: max_tokens must be positive
    """


class ModelLoadError(VsemLensError):
    """A model could not be found, read or booted (bad name, offline, corrupt file, missing package).

    Example:
        >>> vl.load_model("no/such-model")      # doctest: +SKIP
        Traceback (most recent call last):
        ModelLoadError: ...
    """


class InputError(VsemLensError, ValueError):
    """Bad user input: empty text, unknown site/frame/layer, text longer than the context, ...

    Example:
        >>> issubclass(InputError, ValueError)   # also catchable as a ValueError
        True
    """


class VocabularyError(InputError):
    """A word or token is not in the model's vocabulary.

    Example:
        >>> issubclass(VocabularyError, InputError)
        True
    """


class NumericalError(VsemLensError, ArithmeticError):
    """NaN or infinite values where finite numbers are required.

    Example:
        >>> issubclass(NumericalError, ArithmeticError)
        True
    """


class DataError(InputError):
    """A data file (corpus, task, minimal pairs) is malformed; the message names the line.

    Example:
        >>> vl.load_corpus("broken.jsonl")      # doctest: +SKIP
        Traceback (most recent call last):
        DataError: broken.jsonl line 3: ...
    """


class ArtifactError(VsemLensError):
    """A saved artifact (basis, lens, head, statistics) is missing, corrupt or does not fit the model.

    Example:
        >>> vl.SemanticBasis.load("not-a-basis/")   # doctest: +SKIP
        Traceback (most recent call last):
        ArtifactError: ...
    """


class MemoryLimitError(VsemLensError, MemoryError):
    """A batch did not fit in memory; the message gives the estimate and the options to lower it
    (``--batch-size``, ``--max-length``).

    Example:
        >>> issubclass(MemoryLimitError, MemoryError)
        True
    """


def check_int(value: Any, name: str, *, minimum: int | None = None) -> int:
    """``value`` as an ``int`` if it is an integer (Python or NumPy, not ``bool``) of at least ``minimum``,
    else :class:`InputError` naming ``name``.

    Example:
        >>> import numpy as np
        >>> check_int(np.int64(0), "ddof", minimum=0)
        0
        >>> check_int(2.5, "ddof")
        Traceback (most recent call last):
        vsem_lens.core.errors.InputError: ddof must be an integer, got 2.5.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name} must be an integer, got {value!r}.")
    if minimum is not None and value < minimum:
        raise InputError(f"{name} must be an integer of at least {minimum}, got {value!r}.")
    return int(value)


def check_positive_int(value: Any, name: str) -> int:
    """``value`` as an ``int`` if it is a positive integer (Python or NumPy, not ``bool``), else
    :class:`InputError` naming ``name``.

    Example:
        >>> check_positive_int(3, "batch_size")
        3
        >>> check_positive_int(0, "batch_size")
        Traceback (most recent call last):
        vsem_lens.core.errors.InputError: batch_size must be a positive integer, got 0.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def check_float(value: Any, name: str, *, positive: bool = False) -> float:
    """``value`` as a finite ``float`` (any real number, not ``bool``; ``positive``: above 0), else
    :class:`InputError` naming ``name``.

    Example:
        >>> check_float(-5, "lambda")
        -5.0
        >>> check_float(float("nan"), "lambda")
        Traceback (most recent call last):
        vsem_lens.core.errors.InputError: lambda must be a finite number, got nan.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value!r}.")
    if positive and value <= 0:
        raise InputError(f"{name} must be a positive number, got {value!r}.")
    return float(value)


def check_int_list(values: Any, name: str) -> list[int]:
    """An integer, or a sequence of integers (list, tuple, range, NumPy array, integer tensor), as a list.

    Floats, strings and ``bool`` are refused, also inside the sequence (``[1.7]`` is not token 1).

    Example:
        >>> import numpy as np
        >>> check_int_list(np.arange(2), "ids"), check_int_list(np.int64(3), "ids")
        ([0, 1], [3])
        >>> check_int_list([1.7], "ids")
        Traceback (most recent call last):
        vsem_lens.core.errors.InputError: ids must be an integer, got 1.7.
    """
    if isinstance(values, numbers.Integral) and not isinstance(values, bool):
        return [int(values)]
    if hasattr(values, "tolist") and not isinstance(values, (str, bytes)):  # NumPy arrays, tensors
        values = values.tolist()
        values = values if isinstance(values, list) else [values]
    if isinstance(values, (str, bytes, dict)) or not isinstance(values, Iterable):
        raise InputError(f"{name} must be an integer or a sequence of integers, got {values!r}.")
    return [check_int(value, name) for value in values]


def check_layer_index(layer: Any, n_layers: int, *, owner: str = "the model") -> int:
    """A layer index in ``0..n_layers - 1`` (negative indices count from the end; NumPy ints accepted),
    else :class:`InputError`.

    Example:
        >>> check_layer_index(-1, 30)
        29
        >>> check_layer_index(30, 30)
        Traceback (most recent call last):
        vsem_lens.core.errors.InputError: layer 30 is out of range: the model has layers 0..29.
    """
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
        raise InputError(f"layer {layer!r} is not an integer.")
    if not -n_layers <= layer < n_layers:
        raise InputError(f"layer {layer} is out of range: {owner} has layers 0..{n_layers - 1}.")
    return int(layer) % n_layers
