"""Semantic calibration: labelled tasks, prompt features, neural clustering heads and the baselines
they are compared with (zero-shot, probes, kNN, kNN prompting, ICL, LoRA/IA3).
"""

from .baselines import run_baselines
from .calibrated import CalibratedModel
from .datasets import TextClassificationTask
from .features import Features, extract_features
from .heads import NeuralClusteringHead
from .metrics import classification_metrics
from .results import BaselineResult
from .shipped_tasks import load_task
from .task_files import load_task_file

__all__ = [
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
