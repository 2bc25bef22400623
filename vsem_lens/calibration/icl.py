"""The few-shot in-context-learning baseline: seeded demonstrations per class before the zero-shot
prompt of each test text.

Example:
    >>> icl_baseline(model, load_task("topic"), shots=1).accuracy  # doctest: +SKIP
"""

from __future__ import annotations

import random
import time

from ..core.errors import InputError, check_positive_int
from ..core.models import HookedModel
from .datasets import TextClassificationTask
from .features import build_prompts, extract_features, n_tokens
from .results import BaselineResult, baseline_result


def icl_prefix(
    model: HookedModel, task: TextClassificationTask, *, shots: int = 1, seed: int = 42, demo_max_tokens: int = 64
) -> str:
    """The demonstrations block: ``shots`` train examples per class, each as its filled template
    followed by ``" " + label word`` and a blank line, in a seeded random order.

    Example:
        >>> print(icl_prefix(model, load_task("sentiment"), shots=1))  # doctest: +SKIP
        Review: A gripping ...
        Sentiment: positive
        <BLANKLINE>
        Review: ...
    """
    train = task.split("train")
    parts = []
    for i in icl_demonstrations(task, shots=shots, seed=seed):
        prompt = build_prompts(model, task.template, [train.texts[i]], max_length=demo_max_tokens)[0][0]
        parts.append(f"{prompt} {task.verbalizer[train.labels[i]]}\n\n")
    return "".join(parts)


def icl_demonstrations(task: TextClassificationTask, *, shots: int = 1, seed: int = 42) -> list[int]:
    """Indices (into ``task.split("train")``) of the demonstrations, in prompt order: ``shots``
    examples per class drawn with ``random.Random(seed)``, then shuffled with the same generator.

    Example:
        >>> icl_demonstrations(load_task("sentiment"), shots=1)  # doctest: +SKIP
        [211, 17]
    """
    check_positive_int(shots, "shots")
    train = task.split("train")
    rng = random.Random(seed)
    demos: list[int] = []
    for label in task.label_names:
        members = [i for i, lab in enumerate(train.labels) if lab == label]
        if len(members) < shots:
            raise InputError(f"class {label!r} has {len(members)} training example(s), fewer than shots={shots}.")
        demos += rng.sample(members, shots)
    rng.shuffle(demos)
    return demos


def icl_baseline(
    model: HookedModel,
    task: TextClassificationTask,
    *,
    shots: int = 1,
    seed: int = 42,
    demo_max_tokens: int = 64,
    max_length: int | None = None,
    batch_size: int = 4,
    cache: bool = True,
    progress: bool = False,
) -> BaselineResult:
    """Few-shot ICL: demonstrations (see :func:`icl_prefix`) + the zero-shot prompt of each test text;
    prediction = argmax of the next-token logits over the label tokens.

    Context: each demonstration is shortened to ``demo_max_tokens``; the query to what is left of
    ``max_length`` (default the model's context). Raises InputError if the demonstrations alone do not fit.

    Example:
        >>> icl_baseline(model, load_task("topic"), shots=1).accuracy  # doctest: +SKIP
    """
    started = time.perf_counter()
    prefix = icl_prefix(model, task, shots=shots, seed=seed, demo_max_tokens=demo_max_tokens)
    prefix_seconds = time.perf_counter() - started
    if "{text}" in prefix:
        raise InputError("a demonstration contains the literal '{text}'; it cannot be used as a prompt prefix.")
    limit = model.n_ctx if max_length is None else int(max_length)
    prefix_tokens = n_tokens(model, prefix)
    if prefix_tokens + 8 > limit:
        raise InputError(
            f"the {shots}-shot demonstrations take {prefix_tokens} tokens, leaving no room for a query within "
            f"{limit} tokens; use fewer shots or a smaller demo_max_tokens."
        )
    test = task.split("test")
    icl_task = test.with_prompt(template=prefix + task.template)
    icl_task.name = f"{task.name}-icl{shots}-s{seed}"
    feats = extract_features(model, icl_task, batch_size=batch_size, max_length=limit, cache=cache, progress=progress)
    pred = feats.label_logits.argmax(dim=1)
    seconds = prefix_seconds + feats.seconds
    return baseline_result("icl", test.y, pred, task.n_classes, seconds, shots=shots, prefix_tokens=prefix_tokens)


__all__ = ["icl_baseline", "icl_demonstrations", "icl_prefix"]
