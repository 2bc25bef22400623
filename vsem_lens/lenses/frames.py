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

import hashlib
from typing import Any, Sequence

from ..core.errors import InputError
from .base import FinalNormLens, Lens, RawLens
from .tuned import TunedLens, find_cached_tuned_lens

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


def frame_name(frame: str | Lens) -> str:
    """The name a frame is recorded under: the string itself, or the lens's ``frame`` attribute (its class
    name when that is empty).

    Example:
        >>> class Doubled(Lens):
        ...     def forward(self, h, layer):
        ...         return 2 * h
        >>> frame_name(Doubled())
        'Doubled'
    """
    if isinstance(frame, Lens):
        return frame.frame or type(frame).__name__
    if not isinstance(frame, str) or not frame:
        raise InputError(f"a frame is a name ({', '.join(FRAMES)}) or a Lens, got {frame!r}.")
    return frame


def frame_order(name: str) -> tuple[int, str]:
    """Sort key of frame names: the built-in frames in their usual order, then other names alphabetically.

    Example:
        >>> sorted(["mine", "final_norm", "raw"], key=frame_order)
        ['raw', 'final_norm', 'mine']
    """
    return (FRAMES.index(name), "") if name in FRAMES else (len(FRAMES), name)


def resolve_frames(frames: str | Lens | Sequence[str | Lens], model: Any) -> dict[str, Lens]:
    """Resolve frame names and lenses for ``model`` into ``{name: lens}`` (order kept, duplicates dropped).

    Example:
        >>> from vsem_lens.lenses.base import RawLens
        >>> resolve_frames(["raw", "raw"], None)
        {'raw': RawLens()}
        >>> class Halved(RawLens):
        ...     frame = "halved"
        ...     def forward(self, h, layer):
        ...         return h / 2
        >>> list(resolve_frames(["raw", Halved()], None))
        ['raw', 'halved']
    """
    if isinstance(frames, (str, Lens)):
        frames = (frames,)
    frames = list(frames)
    if not frames:
        raise InputError(f"no frames were given; choose from {', '.join(FRAMES)} or pass a Lens.")
    lenses: dict[str, Lens] = {}
    for frame in frames:
        name = frame_name(frame)
        if name not in lenses:
            lenses[name] = resolve_frame(frame, model)
        elif isinstance(frame, Lens) and frame is not lenses[name]:
            raise InputError(f"two different lenses are both named {name!r}; give them distinct frame names.")
    return lenses


def lens_identity(lens: Lens | None) -> str | None:
    """What identifies a lens in a cache or checkpoint key: the name of a parameter-free frame, ``tuned-``
    plus a digest of the model fingerprint and the weights for a :class:`~vsem_lens.lenses.tuned.TunedLens`,
    and ``None`` for no lens or any other lens (its parameters cannot be fingerprinted, so results through
    it are never cached or saved by name).

    Example:
        >>> lens_identity(RawLens()), lens_identity(None)
        ('raw', None)
    """
    if type(lens) in (RawLens, FinalNormLens):
        return lens.frame
    if type(lens) is TunedLens:
        digest = hashlib.blake2b(digest_size=8)
        digest.update(str(lens.fingerprint).encode())
        for tensor in (lens.weight, lens.bias):
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return f"tuned-{digest.hexdigest()}"
    return None
