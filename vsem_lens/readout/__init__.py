"""Vocabulary readouts: the semantic basis (pseudoinverse of the unembedding), the readout kernel, and
the logit lens and vocabulary-affinity readouts of every layer, per text or streamed over a corpus.
"""

from .affinity import iter_layer_readouts, layerwise_affinity, logit_lens, vocab_affinity, vocabulary_strings
from .aggregator import LensAggregator
from .basis import SemanticBasis, pinv_by_gram
from .kernel import Readout, ReadoutKernel, basis_and_lens

__all__ = [
    "LensAggregator",
    "Readout",
    "ReadoutKernel",
    "SemanticBasis",
    "basis_and_lens",
    "iter_layer_readouts",
    "layerwise_affinity",
    "logit_lens",
    "pinv_by_gram",
    "vocab_affinity",
    "vocabulary_strings",
]
