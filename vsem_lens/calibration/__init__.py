"""Semantic calibration: labelled tasks, prompt features, neural clustering heads and the baselines
they are compared with (zero-shot, probes, kNN, kNN prompting, ICL, LoRA/IA3).

One module per idea: tasks (:mod:`.datasets`, :mod:`.shipped_tasks`, :mod:`.task_files`, :mod:`.splits`),
features (:mod:`.features`, read in any frame of :func:`vsem_lens.lenses.resolve_frame`), the head
(:mod:`.heads`, :mod:`.head_modules`, :mod:`.head_files`, :mod:`.head_checkpoint`, :mod:`.checks`),
the end-to-end classifier (:mod:`.calibrated`), metrics and results (:mod:`.metrics`, :mod:`.results`)
and the baselines (:mod:`.zero_shot`, :mod:`.knn`, :mod:`.probe`, :mod:`.icl`, :mod:`.finetune`, run
together by :mod:`.baselines`).

Example:
    >>> task = load_task("sentiment")
    >>> task.label_names
    ['positive', 'negative']
    >>> cm = CalibratedModel.fit(model, task, frame="final_norm", epochs=50)   # doctest: +SKIP
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
