"""Tuned lens: per-layer affine translators trained by KL to the final layer (Belrose et al. 2023).

Placeholder until the tuned-lens module lands: no tuned lens is ever found in the cache.
"""

from __future__ import annotations

from typing import Any


def find_cached_tuned_lens(model: Any) -> Any:
    """Return a tuned lens cached for ``model``, or ``None`` (none can exist yet)."""
    return None
