"""Linguistic task spaces: minimal pairs, their scoring (final layer and by layer), gradient
similarity between phenomena and fine-tuning with gradient differences (FTGD).
"""

from .minimal_pairs import (
    MinimalPair,
    generate_minimal_pairs,
    load_minimal_pairs,
    minimal_pair_accuracy,
    minimal_pair_accuracy_by_layer,
    preference_onset,
    score_minimal_pairs,
)
from .space import (
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

__all__ = [
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
