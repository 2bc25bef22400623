"""Labelled text-classification tasks: the :class:`TextClassificationTask` record. The shipped tasks are in
:mod:`vsem_lens.calibration.shipped_tasks`, loaders of user files and datasets in
:mod:`vsem_lens.calibration.task_files`, split completion in :mod:`vsem_lens.calibration.splits`.

A :class:`TextClassificationTask` is a list of texts with string labels and a split name per
example, plus what the zero-shot prompt needs: a **template** with one ``{text}`` slot, after which
the model is expected to say the label word, and a **verbalizer** mapping each label to that word.
The label *token* of a word is the last sub-token of ``" " + word`` (the authors' rule, see
:meth:`vsem_lens.readout.basis.SemanticBasis.token_ids_for_words`); the embedded tasks use words that are a
single token for SmolLM2.

Example:
    >>> task = TextClassificationTask("t", ["good", "bad"], ["pos", "neg"], ["train", "train"],
    ...                               {"pos": "positive", "neg": "negative"}, "Review: {text}\\nSentiment:")
    >>> task.label_words
    ['positive', 'negative']
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from ..core.errors import DataError, InputError

SPLITS = ("train", "validation", "test")
DEFAULT_TEMPLATE = "Text: {text}\nLabel:"


@dataclass
class TextClassificationTask:
    """A labelled text-classification task with its zero-shot prompt.

    Attributes:
        name: short name (keys the feature cache together with a hash of the texts).
        texts: the example texts (none empty).
        labels: the gold label (a string) of each text.
        splits: the split name (``train``, ``validation``, ``test``, ...) of each text.
        verbalizer: label -> label word; its order fixes the class indices (``label_names``).
        template: the prompt, with exactly one ``{text}`` slot; the label word is meant to be the
            next token after it (so end it with e.g. ``"\\nSentiment:"``, no trailing space).
        metadata: optional extra per-example columns (e.g. ``domain``).

    Example:
        >>> task = TextClassificationTask("toy", ["good", "bad"], ["pos", "neg"], ["train", "train"],
        ...                               {"pos": "positive", "neg": "negative"}, "Review: {text}\\nSentiment:")
        >>> task.y.tolist(), task.label_words
        ([0, 1], ['positive', 'negative'])
    """

    name: str
    texts: list[str]
    labels: list[str]
    splits: list[str]
    verbalizer: dict[str, str]
    template: str = DEFAULT_TEMPLATE
    metadata: dict[str, list[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.texts = list(self.texts)
        self.labels = [str(label) for label in self.labels]
        self.splits = [str(split) for split in self.splits]
        self.verbalizer = {str(k): str(v) for k, v in dict(self.verbalizer).items()}
        check_template(self.template)
        n = len(self.texts)
        if n == 0:
            raise DataError(f"task {self.name!r} has no examples.")
        if len(self.labels) != n or len(self.splits) != n:
            raise DataError(
                f"task {self.name!r}: {n} texts but {len(self.labels)} labels and {len(self.splits)} split names."
            )
        for column, values in self.metadata.items():
            if len(values) != n:
                raise DataError(f"task {self.name!r}: metadata column {column!r} has {len(values)} values, not {n}.")
        for index, text in enumerate(self.texts):
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"task {self.name!r}: example {index} has an empty text.")
        for label, word in self.verbalizer.items():
            if not word.strip():
                raise DataError(f"task {self.name!r}: the verbalizer maps label {label!r} to an empty word.")
        missing = sorted(set(self.labels) - set(self.verbalizer))
        if missing:
            raise DataError(
                f"task {self.name!r}: label(s) {missing} are not in the verbalizer {self.verbalizer}; "
                "add a label word for each label."
            )
        if len(set(self.verbalizer.values())) != len(self.verbalizer):
            raise DataError(f"task {self.name!r}: two labels share a label word in {self.verbalizer}.")
        if len(self.verbalizer) < 2:
            raise DataError(f"task {self.name!r} has a single class {list(self.verbalizer)}; it needs at least two.")

    # -- views ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.texts)

    @property
    def label_names(self) -> list[str]:
        """Class names in class-index order (the verbalizer's order)."""
        return list(self.verbalizer)

    @property
    def label_words(self) -> list[str]:
        """Label word of each class, in class-index order."""
        return list(self.verbalizer.values())

    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return len(self.verbalizer)

    @property
    def y(self) -> Int[Tensor, " n"]:
        """Class index of each example."""
        index = {label: i for i, label in enumerate(self.verbalizer)}
        return torch.tensor([index[label] for label in self.labels], dtype=torch.long)

    @property
    def split_names(self) -> list[str]:
        """The split names present, in first-seen order."""
        return list(dict.fromkeys(self.splits))

    def has_split(self, split: str) -> bool:
        """Whether any example belongs to ``split``."""
        return split in self.splits

    def split(self, name: str) -> "TextClassificationTask":
        """The examples of one split, as a task with the same prompt and verbalizer.

        Example:
            >>> from vsem_lens.calibration import load_task
            >>> len(load_task("question").split("test"))
            120
        """
        keep = [i for i, s in enumerate(self.splits) if s == name]
        if not keep:
            raise InputError(f"task {self.name!r} has no {name!r} split; it has {self.split_names}.")
        return self.subset(keep)

    def subset(self, indices: Sequence[int]) -> "TextClassificationTask":
        """The examples at ``indices`` (any order), keeping the prompt and the verbalizer.

        Example:
            >>> from vsem_lens.calibration import load_task
            >>> len(load_task("topic").subset([0, 1, 2]))
            3
        """
        return TextClassificationTask(
            self.name,
            [self.texts[i] for i in indices],
            [self.labels[i] for i in indices],
            [self.splits[i] for i in indices],
            dict(self.verbalizer),
            self.template,
            {k: [v[i] for i in indices] for k, v in self.metadata.items()},
        )

    def prompt(self, text: str) -> str:
        """The zero-shot prompt of one text (the template with ``{text}`` filled; other braces kept)."""
        return self.template.replace("{text}", text)

    def prompts(self) -> list[str]:
        """Zero-shot prompts of all examples."""
        return [self.prompt(text) for text in self.texts]

    def with_prompt(self, *, template: str | None = None, verbalizer: Mapping[str, str] | None = None) -> "TextClassificationTask":
        """A copy with another template and/or verbalizer.

        Example:
            >>> from vsem_lens.calibration import load_task
            >>> load_task("topic").with_prompt(template="News: {text}\\nCategory:").template
            'News: {text}\\nCategory:'
        """
        return TextClassificationTask(
            self.name, self.texts, self.labels, self.splits,
            dict(verbalizer) if verbalizer is not None else dict(self.verbalizer),
            template if template is not None else self.template, dict(self.metadata),
        )

    def with_splits(
        self, *, validation: float = 0.15, test: float = 0.15, seed: int = 42, only: str | None = None
    ) -> "TextClassificationTask":
        """Assign ``train``/``validation``/``test`` splits by a stratified random draw (fixed seed).

        Args:
            validation, test: fractions of each class to move into those splits (0 skips the split).
            seed: seed of the draw.
            only: re-split only the examples of this split (e.g. ``"train"`` to carve a validation
                split out of a training file while keeping a given test split); others keep theirs.

        Example:
            >>> t = TextClassificationTask("t", [f"x{i}" for i in range(20)], ["a", "b"] * 10,
            ...                            ["train"] * 20, {"a": "yes", "b": "no"})
            >>> sorted(set(t.with_splits(validation=0.2, test=0.2).splits))
            ['test', 'train', 'validation']
        """
        for fraction in (validation, test):
            if not 0.0 <= fraction < 1.0:
                raise InputError(f"split fractions must be in [0, 1), got {fraction}.")
        if validation + test >= 1.0:
            raise InputError(f"validation + test = {validation + test} leaves no training examples.")
        rng = random.Random(seed)
        splits = list(self.splits)
        for label in self.label_names:
            members = [i for i, (lab, s) in enumerate(zip(self.labels, splits)) if lab == label and (only is None or s == only)]
            rng.shuffle(members)
            n_val = int(round(validation * len(members)))
            n_test = int(round(test * len(members)))
            if len(members) - n_val - n_test < 1 and members:
                raise DataError(f"class {label!r} has {len(members)} example(s): too few to split.")
            for rank, i in enumerate(members):
                splits[i] = "validation" if rank < n_val else "test" if rank < n_val + n_test else "train"
        return TextClassificationTask(
            self.name, self.texts, self.labels, splits, dict(self.verbalizer), self.template, dict(self.metadata)
        )

    def cross_split_duplicates(self) -> list[str]:
        """Texts that occur in more than one split (leakage between train and test).

        Example:
            >>> from vsem_lens.calibration import load_task
            >>> load_task("topic").cross_split_duplicates()
            []
        """
        seen: dict[str, set[str]] = {}
        for text, split in zip(self.texts, self.splits):
            seen.setdefault(text.strip(), set()).add(split)
        return sorted(text for text, where in seen.items() if len(where) > 1)

    def __repr__(self) -> str:
        counts = {s: self.splits.count(s) for s in self.split_names}
        return f"TextClassificationTask({self.name!r}, n={len(self)}, classes={self.label_names}, splits={counts})"


def check_template(template: Any) -> str:
    """Validate a prompt template: a string with exactly one ``{text}`` slot.

    Example:
        >>> check_template("Review: {text}\\nSentiment:")
        'Review: {text}\\nSentiment:'
    """
    if not isinstance(template, str):
        raise InputError(f"the prompt template must be a string, got {type(template).__name__}.")
    count = template.count("{text}")
    if count != 1:
        raise InputError(
            f"the prompt template must contain exactly one {{text}} slot (found {count}): {template!r}; "
            "e.g. 'Review: {text}\\nSentiment:'."
        )
    if template.endswith(" "):
        warnings.warn(
            "the prompt template ends with a space; the label token is ' ' + word, so the prompt should end "
            "right before that space.",
            stacklevel=3,
        )
    return template


__all__ = ["DEFAULT_TEMPLATE", "SPLITS", "TextClassificationTask", "check_template"]
