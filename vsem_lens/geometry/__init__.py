"""The geometry of the hidden states: isotropy (IsoScore, IsoScore*, I-STAR) and disentanglement
(basis coherence, affinity sparsity, residual decomposition), per layer and streamed over a corpus.

One idea per module:

- :mod:`~vsem_lens.geometry.metrics`: IsoScore, IsoScore*, participation ratio, outlier dimensions.
- :mod:`~vsem_lens.geometry.cosine`: average cosine, in memory and streamed (:class:`CosineAccumulator`).
- :mod:`~vsem_lens.geometry.istar`: the differentiable I-STAR penalty and its reference covariance.
- :mod:`~vsem_lens.geometry.streaming`: the mergeable per-(site, layer, frame) :class:`IsotropyState`.
- :mod:`~vsem_lens.geometry.isotropy`: :func:`isotropy_by_layer` over a corpus.
- :mod:`~vsem_lens.geometry.coherence`: :func:`basis_coherence` of the semantic basis.
- :mod:`~vsem_lens.geometry.sparsity`: :func:`affinity_sparsity_by_layer`.
- :mod:`~vsem_lens.geometry.decomposition`: the residual decomposition by layer.

Example:
    >>> from vsem_lens.geometry import isoscore
    >>> import torch
    >>> round(isoscore(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])), 6)
    1.0
"""

from .coherence import BasisCoherence, basis_coherence, pairwise_cosine_stats
from .cosine import CosineAccumulator, average_cosine
from .decomposition import DECOMPOSITION_SITES, DecompositionAccumulator, decomposition_by_layer
from .isotropy import isotropy_by_layer
from .istar import istar_penalty, reference_covariance
from .metrics import isoscore, isoscore_star, outlier_dimensions, participation_ratio
from .sparsity import affinity_sparsity_by_layer
from .streaming import IsotropyState

__all__ = [
    "DECOMPOSITION_SITES",
    "BasisCoherence",
    "CosineAccumulator",
    "DecompositionAccumulator",
    "IsotropyState",
    "affinity_sparsity_by_layer",
    "average_cosine",
    "basis_coherence",
    "decomposition_by_layer",
    "isoscore",
    "isoscore_star",
    "isotropy_by_layer",
    "istar_penalty",
    "outlier_dimensions",
    "pairwise_cosine_stats",
    "participation_ratio",
    "reference_covariance",
]
