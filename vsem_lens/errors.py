"""Errors raised by vsem-lens.

Every error a user can trigger with bad input is a :class:`VsemLensError` subclass whose message says
what was wrong and what to do about it, so that nobody has to read a deep torch traceback.

Example:
    >>> from vsem_lens.errors import VsemLensError, InputError
    >>> issubclass(InputError, VsemLensError)
    True
"""

from __future__ import annotations


class VsemLensError(Exception):
    """Base class of every error vsem-lens raises on purpose."""


class ModelLoadError(VsemLensError):
    """A model could not be found, read or booted (bad name, offline, corrupt file, missing package)."""


class InputError(VsemLensError, ValueError):
    """Bad user input: empty text, unknown site/frame/layer, text longer than the context, ..."""


class VocabularyError(InputError):
    """A word or token is not in the model's vocabulary."""


class NumericalError(VsemLensError, ArithmeticError):
    """NaN or infinite values where finite numbers are required."""


class DataError(InputError):
    """A data file (corpus, task, minimal pairs) is malformed; the message names the line."""


class ArtifactError(VsemLensError):
    """A saved artifact (basis, lens, head, statistics) is missing, corrupt or does not fit the model."""
