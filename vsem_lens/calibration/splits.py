"""Making sure a task has ``train``, ``validation`` and ``test`` splits (merging a separate test set, or
drawing the missing splits, stratified, from ``train``).

Example:
    >>> t = TextClassificationTask("t", [f"x{i}" for i in range(40)], ["a", "b"] * 20,
    ...                            ["train"] * 40, {"a": "yes", "b": "no"})
    >>> sorted(set(ensure_splits(t).splits))
    ['test', 'train', 'validation']
"""

from __future__ import annotations

import warnings

from ..core.errors import DataError
from .datasets import TextClassificationTask


def ensure_splits(
    task: TextClassificationTask,
    *,
    test: TextClassificationTask | None = None,
    validation: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 42,
) -> TextClassificationTask:
    """Make sure a task has ``train``, ``validation`` and ``test`` splits.

    - With ``test`` (e.g. a separate test file): all of ``task`` becomes the training pool and all of
      ``test`` the test split; a validation split is drawn from the training pool unless ``task``
      already has one (rows of ``task`` in any other split are treated as training rows).
    - Without it: a task that already has the three splits is returned as is; one that has only
      some of them gets the missing ones drawn, stratified, from its ``train`` rows.

    Example:
        >>> t = TextClassificationTask("t", [f"x{i}" for i in range(40)], ["a", "b"] * 20,
        ...                            ["train"] * 40, {"a": "yes", "b": "no"})
        >>> sorted(set(ensure_splits(t).splits))
        ['test', 'train', 'validation']
    """
    if test is not None:
        if test.verbalizer != task.verbalizer and set(test.labels) - set(task.verbalizer):
            raise DataError(f"the test data has labels {sorted(set(test.labels) - set(task.verbalizer))} unknown to the training data.")
        has_val = task.has_split("validation")
        splits = [s if (has_val and s == "validation") else "train" for s in task.splits]
        merged = TextClassificationTask(
            task.name, task.texts + test.texts, task.labels + test.labels, splits + ["test"] * len(test),
            dict(task.verbalizer), task.template,
        )
        if not has_val and validation > 0:
            merged = merged.with_splits(validation=validation, test=0.0, seed=seed, only="train")
        duplicates = merged.cross_split_duplicates()
        if duplicates:
            warnings.warn(
                f"{len(duplicates)} test text(s) also occur in the training data (e.g. {duplicates[0][:60]!r}); "
                "test scores will be optimistic.",
                stacklevel=2,
            )
        return merged
    have = set(task.splits)
    if {"train", "validation", "test"} <= have:
        return task
    if "train" not in have:
        raise DataError(f"task {task.name!r} has splits {task.split_names} but no 'train' split to draw from.")
    return task.with_splits(
        validation=0.0 if "validation" in have else validation,
        test=0.0 if "test" in have else test_fraction,
        seed=seed,
        only="train",
    )


__all__ = ["ensure_splits"]
