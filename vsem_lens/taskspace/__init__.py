"""Linguistic task spaces: minimal pairs, their scoring (final layer and by layer), gradient
similarity between phenomena and fine-tuning with gradient differences (FTGD).
"""

from .ftgd import FTGDConfig, ftgd_finetune
from .gradients import TaskGradients, phenomenon_gradients
from .matrix import compare_with_hypothesis, plot_task_space, task_space_matrix
from .minimal_pairs import minimal_pair_accuracy, minimal_pair_accuracy_by_layer, preference_onset, score_minimal_pairs
from .pairs import MinimalPair, load_minimal_pairs
from .similarity import gradient_similarity
from .templates import generate_minimal_pairs
from .transfer import ftgd_transfer

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
