"""The geometry of the hidden states: isotropy (IsoScore, IsoScore*, I-STAR) and disentanglement
(basis coherence, affinity sparsity, residual decomposition), per layer and streamed over a corpus.
"""

from .disentangle import BasisCoherence, affinity_sparsity_by_layer, basis_coherence, decomposition_by_layer
from .isotropy import IsotropyState, isotropy_by_layer

__all__ = [
    "BasisCoherence",
    "IsotropyState",
    "affinity_sparsity_by_layer",
    "basis_coherence",
    "decomposition_by_layer",
    "isotropy_by_layer",
]
