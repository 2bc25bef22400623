r"""Linguistic task spaces (Weber et al., ACL 2024): minimal pairs, their scoring (final layer and by
layer), gradient similarity between phenomena and fine-tuning with gradient differences (FTGD).

A *task space* places linguistic phenomena (minimal-pair tasks) in a space whose geometry says which
phenomena the model treats alike (docs/studies/task-spaces.md). One module per idea: :mod:`.pairs`
(the pair record and files), :mod:`.templates` (the generator), :mod:`.minimal_pairs` (scoring),
:mod:`.parameters`, :mod:`.gradients` and :mod:`.similarity` (gradient similarity), :mod:`.ftgd` and
:mod:`.transfer` (FTGD), :mod:`.matrix` (task-space matrices, clustering, plots, hypothesis tests).

**Across training.** Every function takes any :class:`~vsem_lens.core.models.HookedModel`, so the same
study runs on training checkpoints: TransformerLens resolves ``checkpoint_index`` /
``checkpoint_value`` to a hub revision for model families with published checkpoints (e.g.
``TransformerBridge.boot_transformers("EleutherAI/pythia-70m", checkpoint_index=i)``; see
``transformer_lens.model_bridge.sources.transformers.get_checkpoint_labels``). Load each checkpoint's
HF weights (``AutoModelForCausalLM.from_pretrained(name, revision=...)``, or a local directory per
checkpoint), wrap them with ``vsem_lens.load_model((hf_model, tokenizer))`` and run the functions
of this package per checkpoint; vsem-lens itself never downloads anything.

Example:
    >>> pairs = load_minimal_pairs()                                       # doctest: +SKIP
    >>> grads = phenomenon_gradients(model, pairs, max_pairs=40)           # doctest: +SKIP
    >>> sim = gradient_similarity(grads, top_frac=0.01)                    # doctest: +SKIP
    >>> task_space_matrix(sim, "cosine")                                   # doctest: +SKIP
    >>> result = ftgd_transfer(model, pairs, n_train=40, n_eval=60)        # doctest: +SKIP
    >>> plot_task_space(result.matrix("delta_accuracy")).show()            # doctest: +SKIP
"""

from .ftgd import FTGDConfig, ftgd_finetune, random_mask
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
    "random_mask",
    "score_minimal_pairs",
    "task_space_matrix",
]
