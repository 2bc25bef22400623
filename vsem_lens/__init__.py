"""vsem-lens: read a language model's latent space in the coordinates of its own vocabulary.

The data flows one way: model -> capture -> basis / affinity / statistics -> analyses -> report.

Example:
    >>> import vsem_lens as vl                                  # doctest: +SKIP
    >>> model = vl.load_model()                                 # embedded SmolLM2-135M-Instruct
    >>> basis = vl.SemanticBasis.from_model(model)              # pinv of the unembedding
    >>> df = vl.layerwise_affinity(model, "The capital of France is")
"""

from .affinity import iter_layer_readouts, layerwise_affinity, logit_lens, vocab_affinity
from .basis import SemanticBasis, pinv_by_gram
from .capture import Activations, capture, iter_capture
from .errors import (
    ArtifactError,
    DataError,
    InputError,
    ModelLoadError,
    NumericalError,
    VocabularyError,
    VsemLensError,
)
from .lenses import FinalNormLens, Lens, RawLens
from .models import HookedModel, load_model

__version__ = "0.1.0"

__all__ = [
    "Activations",
    "ArtifactError",
    "DataError",
    "FinalNormLens",
    "HookedModel",
    "InputError",
    "Lens",
    "ModelLoadError",
    "NumericalError",
    "RawLens",
    "SemanticBasis",
    "VocabularyError",
    "VsemLensError",
    "capture",
    "iter_capture",
    "iter_layer_readouts",
    "layerwise_affinity",
    "load_model",
    "logit_lens",
    "pinv_by_gram",
    "vocab_affinity",
]

# Isotropy and disentanglement analyses (figures: ``vsem_lens.plots``, imported on demand).
from .disentangle import (  # noqa: E402
    BasisCoherence,
    affinity_sparsity_by_layer,
    basis_coherence,
    decomposition_by_layer,
)
from .isotropy import IsotropyState, isotropy_by_layer  # noqa: E402

__all__ += [
    "BasisCoherence",
    "IsotropyState",
    "affinity_sparsity_by_layer",
    "basis_coherence",
    "decomposition_by_layer",
    "isotropy_by_layer",
]

# The layerwise report (``vsem-lens report``) and corpus loading.
from .corpus import load_corpus  # noqa: E402
from .report import Report, build_report  # noqa: E402

__all__ += ["Report", "build_report", "load_corpus"]

# Semantic calibration: tasks, zero-shot prompt features, neural clustering heads, baselines.
from .baselines import BaselineResult, run_baselines  # noqa: E402
from .calibration import CalibratedModel, NeuralClusteringHead, classification_metrics  # noqa: E402
from .datasets import TextClassificationTask, load_task, load_task_file  # noqa: E402
from .features import Features, extract_features  # noqa: E402

__all__ += [
    "BaselineResult",
    "CalibratedModel",
    "Features",
    "NeuralClusteringHead",
    "TextClassificationTask",
    "classification_metrics",
    "extract_features",
    "load_task",
    "load_task_file",
    "run_baselines",
]

# Tuned lenses: the 'tuned' frame (per-layer affine translators trained by KL to the final layer).
from .tuned import TrainingConfig, TunedLens  # noqa: E402

__all__ += ["TrainingConfig", "TunedLens"]

# Linguistic task spaces: minimal pairs, their scoring (final layer and by layer), gradient similarity, FTGD.
from .minimal_pairs import (  # noqa: E402
    MinimalPair,
    generate_minimal_pairs,
    load_minimal_pairs,
    minimal_pair_accuracy,
    minimal_pair_accuracy_by_layer,
    preference_onset,
    score_minimal_pairs,
)
from .taskspace import (  # noqa: E402
    FTGDConfig,
    TaskGradients,
    compare_with_hypothesis,
    ftgd_finetune,
    ftgd_transfer,
    gradient_similarity,
    phenomenon_gradients,
    plot_task_space,
    task_space_matrix,
)

__all__ += [
    "FTGDConfig",
    "MinimalPair",
    "TaskGradients",
    "compare_with_hypothesis",
    "ftgd_finetune",
    "ftgd_transfer",
    "generate_minimal_pairs",
    "gradient_similarity",
    "load_minimal_pairs",
    "minimal_pair_accuracy",
    "minimal_pair_accuracy_by_layer",
    "phenomenon_gradients",
    "plot_task_space",
    "preference_onset",
    "score_minimal_pairs",
    "task_space_matrix",
]
