"""Vocabulary readouts: the semantic basis (pseudoinverse of the unembedding), the readout kernel, the
logit lens and vocabulary-affinity readouts (tensors that speak tokens) of every layer, per text or
streamed over a corpus, and a fitted temperature for affinity probabilities.
"""

from .affinity import iter_layer_readouts, layerwise_affinity, logit_lens, vocab_affinity
from .aggregator import LensAggregator
from .basis import SemanticBasis, pinv_by_gram
from .kernel import Readout, ReadoutKernel, basis_and_lens
from .scores import TopTokens, VocabScores, vocabulary_strings
from .temperature import TemperatureFit, affinity_kl_at, fit_affinity_temperature, fit_temperature

__all__ = [
    "LensAggregator",
    "Readout",
    "ReadoutKernel",
    "SemanticBasis",
    "TemperatureFit",
    "TopTokens",
    "VocabScores",
    "affinity_kl_at",
    "basis_and_lens",
    "fit_affinity_temperature",
    "fit_temperature",
    "iter_layer_readouts",
    "layerwise_affinity",
    "logit_lens",
    "pinv_by_gram",
    "vocab_affinity",
    "vocabulary_strings",
]
