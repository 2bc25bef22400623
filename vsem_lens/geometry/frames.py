"""Which activation sites a frame applies to in the geometry analyses.

Every analysis here that reads an intermediate layer takes ``frame: str | Lens`` (or a list of them),
resolved by :func:`vsem_lens.lenses.frames.resolve_frames`, so ``raw``, ``final_norm``, ``tuned`` and a
user's own lens go through the same code. This module adds the one rule the geometry tables need on
top: a lens (which maps a residual state into the LM-head space) applies to residual sites only.

Example:
    >>> check_site_frame("mlp_out", "raw")          # any site in the raw frame
    >>> check_site_frame("resid_post", "final_norm")
"""

from __future__ import annotations

from ..core.capture import SITES
from ..core.errors import InputError
from ..lenses.frames import frame_name

#: Sites whose activations are residual-stream states: frames other than ``raw`` apply only to these.
RESIDUAL_SITES = ("embed", "resid_pre", "resid_mid", "resid_post")


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
