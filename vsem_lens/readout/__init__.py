"""Vocabulary readouts: the semantic basis (pseudoinverse of the unembedding), the logit lens and
vocabulary-affinity readouts of every layer.
"""

from .affinity import iter_layer_readouts, layerwise_affinity, logit_lens, vocab_affinity
from .basis import SemanticBasis, pinv_by_gram

__all__ = [
    "SemanticBasis",
    "iter_layer_readouts",
    "layerwise_affinity",
    "logit_lens",
    "pinv_by_gram",
    "vocab_affinity",
]
