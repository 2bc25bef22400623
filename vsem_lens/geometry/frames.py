"""Frames of the geometry analyses: the names they record and the sites a frame applies to.

Every analysis here that reads an intermediate layer takes ``frame: str | Lens`` (or a list of them)
and turns it into a :class:`~vsem_lens.lenses.base.Lens` with :func:`vsem_lens.lenses.frames.resolve_frame`,
so ``raw``, ``final_norm``, ``tuned`` and a user's own lens go through the same code. This module adds
only what the geometry tables need on top: the name a frame is recorded under, and the rule that a lens
(which maps a residual state into the LM-head space) applies to residual sites only.

Example:
    >>> from vsem_lens.lenses.base import RawLens
    >>> frame_name(RawLens()), frame_name("final_norm")
    ('raw', 'final_norm')
"""

from __future__ import annotations

from typing import Any, Sequence

from ..core.capture import SITES
from ..core.errors import InputError
from ..lenses.base import Lens
from ..lenses.frames import FRAMES, resolve_frame

#: Sites whose activations are residual-stream states: frames other than ``raw`` apply only to these.
RESIDUAL_SITES = ("embed", "resid_pre", "resid_mid", "resid_post")


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


def check_site_frame(site: str, frame: str) -> None:
    """Raise :class:`InputError` unless ``site`` is known and frame ``frame`` applies to it.

    Example:
        >>> check_site_frame("resid_post", "tuned")
        >>> check_site_frame("mlp_out", "raw")
    """
    if site not in SITES:
        raise InputError(f"unknown site {site!r}; choose from {', '.join(SITES)}.")
    frame_name(frame)
    if frame != "raw" and site not in RESIDUAL_SITES:
        raise InputError(
            f"the {frame!r} frame applies to residual sites ({', '.join(RESIDUAL_SITES)}), not {site!r}; "
            "use frame 'raw' for block outputs."
        )
