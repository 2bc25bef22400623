"""The foundation: model loading, ``HookedModel``, activation capture, the one logits path, streaming
statistics, ``torch.distributed`` helpers, atomic file I/O, corpora and the error types.

Nothing in ``core`` imports from another vsem-lens subpackage (see docs/architecture.md).
"""

from .capture import ActivationBatch, Activations, capture, hooked_states, iter_capture
from .corpus import load_corpus
from .errors import (
    ArtifactError,
    DataError,
    InputError,
    MemoryLimitError,
    ModelLoadError,
    NumericalError,
    VocabularyError,
    VsemLensError,
)
from .loading import load_model
from .logits import Unembedding, final_distribution
from .models import HookedModel
from .moments import Moments
from .stats import RunningScalars, Stat

__all__ = [
    "ActivationBatch",
    "Activations",
    "ArtifactError",
    "DataError",
    "HookedModel",
    "InputError",
    "MemoryLimitError",
    "ModelLoadError",
    "Moments",
    "NumericalError",
    "RunningScalars",
    "Stat",
    "Unembedding",
    "VocabularyError",
    "VsemLensError",
    "capture",
    "final_distribution",
    "hooked_states",
    "iter_capture",
    "load_corpus",
    "load_model",
]
