"""Labelled text-classification tasks: the embedded ones and loaders for user files and datasets.

A :class:`TextClassificationTask` is a list of texts with string labels and a split name per
example, plus what the zero-shot prompt needs: a **template** with one ``{text}`` slot, after which
the model is expected to say the label word, and a **verbalizer** mapping each label to that word.
The label *token* of a word is the last sub-token of ``" " + word`` (the authors' rule, see
:meth:`vsem_lens.readout.basis.SemanticBasis.token_ids_for_words`); the embedded tasks use words that are a
single token for SmolLM2.

Embedded tasks (``vsem_lens/data/tasks/*.jsonl``, splits ``train``/``validation``/``test``):

============ ===================================== ==============================================
task         labels -> words                       template
============ ===================================== ==============================================
sentiment    positive, negative                    ``Review: {text}\\nSentiment:``
topic        world -> international, sports ->     ``Article: {text}\\nTopic:``
             sport, business, science
question     abbreviation, description ->          ``Question: {text}\\nAnswer type:``
             definition, entity -> object, human
             -> person, location -> place, number
             -> numeric
============ ===================================== ==============================================

The topic and question label words were picked among a few natural single-token candidates per label
(e.g. world: world/politics/international/news) by zero-shot next-token accuracy on the
**validation** split of SmolLM2-135M-Instruct (test never looked at): the literal label names are poor
words for this model (topic 0.75 vs 0.88, question 0.25 vs 0.71 on validation). This favours the
zero-shot baselines slightly, which makes the comparison with calibrated heads conservative.

User files: ``.jsonl`` (one JSON object per line) or ``.csv`` (header row) with a text and a label
column, optionally a split column; or an in-memory ``datasets.Dataset`` / ``DatasetDict`` (its keys
become split names) or a pandas ``DataFrame``. Every malformed row is reported with its line number;
a task with one class, empty texts or labels missing from the verbalizer is a
:class:`~vsem_lens.core.errors.DataError`.

Example:
    >>> task = load_task("topic")
    >>> task.label_names, task.verbalizer["sports"]
    (['world', 'sports', 'business', 'science'], 'sport')
    >>> train = task.split("train"); len(train)
    360
    >>> print(task.prompt("Stocks rallied on Friday."))
    Article: Stocks rallied on Friday.
    Topic:
"""

from __future__ import annotations

import csv
import io
import os
import random
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from ..core.errors import DataError, InputError
from ..core.io import iter_jsonl_objects, read_user_file

SPLITS = ("train", "validation", "test")
DEFAULT_TEMPLATE = "Text: {text}\nLabel:"

#: Embedded tasks: file, template and verbalizer (label -> word; every " " + word is one SmolLM2 token).
EMBEDDED_TASKS: dict[str, dict[str, Any]] = {
    "sentiment": {
        "file": "sentiment.jsonl",
        "template": "Review: {text}\nSentiment:",
        "verbalizer": {"positive": "positive", "negative": "negative"},
    },
    "topic": {
        "file": "topic.jsonl",
        "template": "Article: {text}\nTopic:",
        "verbalizer": {"world": "international", "sports": "sport", "business": "business", "science": "science"},
    },
    "question": {
        "file": "question.jsonl",
        "template": "Question: {text}\nAnswer type:",
        "verbalizer": {
            "abbreviation": "abbreviation",
            "description": "definition",
            "entity": "object",
            "human": "person",
            "location": "place",
            "number": "numeric",
        },
    },
}


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


def embedded_task_names() -> list[str]:
    """Names of the embedded tasks whose data file is installed.

    Example:
        >>> "topic" in embedded_task_names()
        True
    """
    folder = resources.files("vsem_lens") / "data" / "tasks"
    return [name for name, spec in EMBEDDED_TASKS.items() if (folder / spec["file"]).is_file()]


def load_task(name: str, *, template: str | None = None, verbalizer: Mapping[str, str] | None = None) -> TextClassificationTask:
    """Load an embedded task (``sentiment``, ``topic`` or ``question``) with its prompt and verbalizer.

    Args:
        name: the task name, or a path to a ``.jsonl``/``.csv`` file (then see :func:`load_task_file`).
        template, verbalizer: override the task's prompt template / label words.

    Example:
        >>> task = load_task("question")
        >>> task.verbalizer["human"], task.template
        ('person', 'Question: {text}\\nAnswer type:')
    """
    if isinstance(name, os.PathLike):
        return load_task_file(name, template=template, verbalizer=verbalizer)
    if not isinstance(name, str):
        raise InputError(f"task name must be a string or a path, got {type(name).__name__}.")
    if name not in EMBEDDED_TASKS:
        if Path(name).suffix.lower() in (".jsonl", ".csv", ".json"):
            return load_task_file(name, template=template, verbalizer=verbalizer)
        raise InputError(f"unknown task {name!r}; choose one of {', '.join(EMBEDDED_TASKS)} or pass a .jsonl/.csv file.")
    spec = EMBEDDED_TASKS[name]
    resource = resources.files("vsem_lens") / "data" / "tasks" / spec["file"]
    if not resource.is_file():
        raise DataError(f"the embedded task file {spec['file']} is not installed; reinstall vsem-lens.")
    content = resource.read_text(encoding="utf-8")
    records = _parse_jsonl(content, f"embedded task {spec['file']}")
    return _task_from_records(
        records,
        name=name,
        where=f"embedded task {spec['file']}",
        text_column="text",
        label_column="label",
        split_column="split",
        verbalizer=dict(verbalizer) if verbalizer is not None else dict(spec["verbalizer"]),
        template=template if template is not None else spec["template"],
        metadata_columns=("domain",),
    )


def load_task_file(
    source: str | os.PathLike | Any,
    text_column: str = "text",
    label_column: str = "label",
    split_column: str | None = None,
    verbalizer: Mapping[str, str] | None = None,
    template: str | None = None,
    *,
    name: str | None = None,
    default_split: str = "train",
) -> TextClassificationTask:
    """Load a task from a ``.jsonl``/``.csv`` file, a ``datasets.Dataset``/``DatasetDict`` or a DataFrame.

    Args:
        source: a file path, a ``datasets.Dataset`` (``ClassLabel`` labels are turned into their
            names), a ``datasets.DatasetDict`` (its keys become the split names) or a pandas DataFrame.
        text_column, label_column: column names of the text and the label.
        split_column: column holding each row's split name; ``None`` puts every row in
            ``default_split`` (use :meth:`TextClassificationTask.with_splits` to draw splits).
        verbalizer: label -> label word; by default each label is its own word (labels must then be
            words of the model's vocabulary).
        template: prompt template with one ``{text}`` slot (default ``"Text: {text}\\nLabel:"``).
        name: task name (default: the file stem, or ``"dataset"``).
        default_split: split name of rows without a split column.

    Raises:
        InputError: the file is missing or has an unsupported extension.
        DataError: a malformed row (the message names its line), an empty text, a missing label,
            a single class, or labels missing from the verbalizer.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "reviews.csv"
        >>> _ = path.write_text("text,label\\ngreat film,pos\\nawful plot,neg\\n")
        >>> task = load_task_file(path, verbalizer={"pos": "positive", "neg": "negative"},
        ...                       template="Review: {text}\\nSentiment:")
        >>> task.labels, task.splits
        (['pos', 'neg'], ['train', 'train'])
    """
    if template is not None:
        check_template(template)
    for option, value in (("text_column", text_column), ("label_column", label_column)):
        if not isinstance(value, str) or not value:
            raise InputError(f"{option} must be a column name, got {value!r}.")
    kwargs = dict(
        text_column=text_column,
        label_column=label_column,
        split_column=split_column,
        verbalizer=dict(verbalizer) if verbalizer is not None else None,
        template=template if template is not None else DEFAULT_TEMPLATE,
        default_split=default_split,
    )
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        records = _read_file(path)
        return _task_from_records(records, name=name or path.stem, where=repr(str(path)), **kwargs)
    records = _records_from_object(source, text_column, label_column, split_column)
    return _task_from_records(records, name=name or "dataset", where=f"the {type(source).__name__}", **kwargs)


# -- parsing -------------------------------------------------------------------------------------
# A record is (line number, mapping); line numbers are 1-based file lines (CSV: the row's first line).
Record = tuple[int, Mapping[str, Any]]


def _read_file(path: Path) -> list[Record]:
    path, content = read_user_file(
        path, "task file", (".jsonl", ".csv", ".json"),
        "a .jsonl (one JSON object per line) or .csv (a header row) file",
    )
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _parse_csv(content, repr(str(path)))
    return _parse_jsonl(content, repr(str(path)))


def _parse_jsonl(content: str, where: str) -> list[Record]:
    return list(iter_jsonl_objects(content, where))


def _parse_csv(content: str, where: str) -> list[Record]:
    reader = csv.DictReader(io.StringIO(content, newline=""))
    if not reader.fieldnames:
        raise DataError(f"{where} is empty; it needs a header row and at least one data row.")
    records = []
    try:
        row_start = reader.line_num + 1
        for row in reader:
            if None in row:  # more fields than the header
                raise DataError(f"{where}, line {row_start}: more fields than the header has columns.")
            if any(value is not None and value != "" for value in row.values()):
                records.append((row_start, row))
            row_start = reader.line_num + 1
    except csv.Error as exc:
        raise DataError(f"{where}, line {reader.line_num}: malformed CSV ({exc}).") from None
    return records


def _records_from_object(source: Any, text_column: str, label_column: str, split_column: str | None) -> list[Record]:
    """Rows of a DatasetDict, Dataset or DataFrame as records (row numbers are 1-based)."""
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas is a dependency
        pd = None
    if pd is not None and isinstance(source, pd.DataFrame):
        return [(i + 1, row) for i, row in enumerate(source.to_dict(orient="records"))]
    if isinstance(source, Mapping) and source and all(hasattr(v, "column_names") for v in source.values()):
        records: list[Record] = []
        for split_name, dataset in source.items():
            for number, row in _records_from_object(dataset, text_column, label_column, None):
                row = dict(row)
                if split_column is None:
                    row["__split__"] = split_name
                records.append((number, row))
        return records
    if hasattr(source, "column_names") and hasattr(source, "__iter__"):
        names = _class_label_names(source, label_column)
        records = []
        for i, row in enumerate(source):
            row = dict(row)
            if names is not None and isinstance(row.get(label_column), int) and 0 <= row[label_column] < len(names):
                row[label_column] = names[row[label_column]]
            records.append((i + 1, row))
        return records
    raise InputError(
        f"cannot read a task from a {type(source).__name__}; pass a .jsonl/.csv path, a datasets.Dataset, "
        "a datasets.DatasetDict or a pandas DataFrame."
    )


def _class_label_names(dataset: Any, column: str) -> list[str] | None:
    feature = getattr(dataset, "features", {}).get(column) if hasattr(dataset, "features") else None
    names = getattr(feature, "names", None)
    return list(names) if names else None


def _task_from_records(
    records: Iterable[Record],
    *,
    name: str,
    where: str,
    text_column: str,
    label_column: str,
    split_column: str | None,
    verbalizer: dict[str, str] | None,
    template: str,
    default_split: str = "train",
    metadata_columns: Sequence[str] = (),
) -> TextClassificationTask:
    texts, labels, splits = [], [], []
    extra: dict[str, list[Any]] = {column: [] for column in metadata_columns}
    problems: list[str] = []
    for number, row in records:
        text = row.get(text_column)
        label = row.get(label_column)
        if split_column is not None:
            split = row.get(split_column)
        else:
            split = row.get("__split__", default_split)
        if text_column not in row:
            problems.append(f"line {number}: no {text_column!r} column (columns: {sorted(k for k in row if k != '__split__')})")
        elif not isinstance(text, str):
            problems.append(f"line {number}: {text_column!r} is a {type(text).__name__}, not a string")
        elif not text.strip():
            problems.append(f"line {number}: empty text")
        if label_column not in row or label is None or (isinstance(label, str) and not label.strip()):
            problems.append(f"line {number}: missing label ({label_column!r})")
        elif isinstance(label, (dict, list, bool)) or (isinstance(label, float) and label != label):
            problems.append(f"line {number}: label {label!r} is not a string or an integer")
        if split_column is not None and (split is None or not str(split).strip()):
            problems.append(f"line {number}: missing split ({split_column!r})")
        if len(problems) >= 20:
            break
        texts.append(text)
        labels.append(_label_string(label))
        splits.append(str(split).strip() if split is not None else default_split)
        for column in extra:
            extra[column].append(row.get(column))
    if problems:
        shown = "; ".join(problems[:10])
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise DataError(f"{where} has bad rows: {shown}{more}. Fix or remove them.")
    if not texts:
        raise DataError(f"{where} has no examples.")
    classes = list(dict.fromkeys(labels))
    if len(classes) < 2:
        raise DataError(f"{where} has a single class {classes}; classification needs at least two.")
    if verbalizer is None:
        verbalizer = {label: label for label in sorted(classes)}
    else:
        verbalizer = {str(k): str(v) for k, v in verbalizer.items()}
        missing = sorted(set(classes) - set(verbalizer))
        if missing:
            raise DataError(
                f"{where}: label(s) {missing} are not in the verbalizer {verbalizer}; add a label word for each."
            )
    metadata = {column: values for column, values in extra.items() if any(v is not None for v in values)}
    task = TextClassificationTask(name, texts, labels, splits, verbalizer, template, metadata)
    duplicates = task.cross_split_duplicates()
    if duplicates:
        warnings.warn(
            f"{where}: {len(duplicates)} text(s) occur in more than one split (e.g. {duplicates[0][:60]!r}); "
            "test scores will be optimistic.",
            stacklevel=3,
        )
    return task


def _label_string(label: Any) -> str:
    if isinstance(label, float) and label.is_integer():
        label = int(label)
    return str(label).strip()


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
