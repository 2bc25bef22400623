"""Lenses map a layer's hidden state into the frame the unembedding reads: ``raw``, ``final_norm`` and
trained ``tuned`` lenses, and :func:`resolve_frame`, which turns a frame name or a ``Lens`` into a lens.
"""

from .base import FinalNormLens, Lens, RawLens
from .frames import FRAMES, check_frame, resolve_frame
from .training import TrainingConfig
from .tuned import TunedLens

__all__ = [
    "FRAMES",
    "FinalNormLens",
    "Lens",
    "RawLens",
    "TrainingConfig",
    "TunedLens",
    "check_frame",
    "resolve_frame",
]
