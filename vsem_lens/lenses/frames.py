"""Frame names and their resolution: the one place that turns ``"raw" | "final_norm" | "tuned" | Lens``
into a lens.

Every analysis that reads an intermediate layer calls :func:`resolve_frame`, so the tuned frame and a
user's own :class:`~vsem_lens.lenses.base.Lens` are handled the same way everywhere. This module sits above
both :mod:`vsem_lens.lenses.base` and :mod:`vsem_lens.lenses.tuned`, so neither imports the other in a circle.

Example:
    >>> resolve_frame("raw", None)
    RawLens()
"""

from __future__ import annotations

from typing import Any

from ..core.errors import InputError
from .base import FinalNormLens, Lens, RawLens
from .tuned import find_cached_tuned_lens

FRAMES = ("raw", "final_norm", "tuned")


def check_frame(frame: str) -> str:
    """Validate a frame name.

    Example:
        >>> check_frame("raw")
        'raw'
    """
    if frame not in FRAMES:
        raise InputError(f"unknown frame {frame!r}; choose one of {', '.join(FRAMES)}.")
    return frame


def resolve_frame(frame: str | Lens, model: Any, *, lens: Lens | None = None) -> Lens:
    """Turn a frame name (or a ready lens) into a :class:`Lens` for ``model``.

    ``"tuned"`` needs a trained tuned lens, passed as ``lens=`` or found in the cache for this model.

    Example:
        >>> resolve_frame("raw", None)
        RawLens()
    """
    if isinstance(frame, Lens):
        if model is not None:
            frame.check_model(model)
        return frame
    frame = check_frame(frame)
    if frame == "raw":
        return RawLens()
    if frame == "final_norm":
        return FinalNormLens(model)
    if lens is not None:
        if model is not None:
            lens.check_model(model)
        return lens
    cached = find_cached_tuned_lens(model)
    if cached is None:
        raise InputError(
            "frame 'tuned' needs a trained tuned lens for this model, and none was given or cached. "
            "Train one with `vsem-lens lens train --model ...` (it is then cached for this model and found "
            "automatically), or with vsem_lens.TunedLens.fit(model, texts) and pass it as lens=... (or as "
            "frame=); or use frame='final_norm'."
        )
    return cached
