"""Errors raised by vsem-lens.

Every error a user can trigger with bad input is a :class:`VsemLensError` subclass whose message says
what was wrong and what to do about it, so that nobody has to read a deep torch traceback.

Example:
    >>> from vsem_lens.core.errors import VsemLensError, InputError
    >>> issubclass(InputError, VsemLensError)
    True
"""

from __future__ import annotations

import numbers
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
