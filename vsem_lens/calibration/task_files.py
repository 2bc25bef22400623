"""Loading a task from user data: ``.jsonl``/``.csv`` files, ``datasets.Dataset``/``DatasetDict`` and pandas
DataFrames, turned into checked records and then a :class:`~vsem_lens.calibration.datasets.TextClassificationTask`.

User files: ``.jsonl`` (one JSON object per line) or ``.csv`` (header row) with a text and a label
column, optionally a split column; or an in-memory ``datasets.Dataset`` / ``DatasetDict`` (its keys
become split names) or a pandas ``DataFrame``. Every malformed row is reported with its line number;
a task with one class, empty texts or labels missing from the verbalizer is a
:class:`~vsem_lens.core.errors.DataError`.

Example:
    >>> task = load_task_file("reviews.csv", verbalizer={"pos": "positive", "neg": "negative"})  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from ..core.errors import DataError, InputError
from ..core.io import iter_jsonl_objects, read_user_file
from .datasets import DEFAULT_TEMPLATE, TextClassificationTask, check_template


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
        records = read_task_records(path)
        return task_from_records(records, name=name or path.stem, where=repr(str(path)), **kwargs)
    records = records_from_object(source, text_column, label_column, split_column)
    return task_from_records(records, name=name or "dataset", where=f"the {type(source).__name__}", **kwargs)


# A record is (line number, mapping); line numbers are 1-based file lines (CSV: the row's first line).
Record = tuple[int, Mapping[str, Any]]


def read_task_records(path: Path) -> list[Record]:
    """Records of a user ``.jsonl``/``.csv`` task file.

    Example:
        >>> read_task_records(Path("reviews.csv"))[0]  # doctest: +SKIP
        (2, {'text': 'great film', 'label': 'pos'})
    """
    path, content = read_user_file(
        path, "task file", (".jsonl", ".csv", ".json"),
        "a .jsonl (one JSON object per line) or .csv (a header row) file",
    )
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return parse_csv_records(content, repr(str(path)))
    return parse_jsonl_records(content, repr(str(path)))


def parse_jsonl_records(content: str, where: str) -> list[Record]:
    """Records of JSONL text (one object per line; ``where`` names the source in errors).

    Example:
        >>> parse_jsonl_records('{"text": "a", "label": "x"}', "t")
        [(1, {'text': 'a', 'label': 'x'})]
    """
    return list(iter_jsonl_objects(content, where))


def parse_csv_records(content: str, where: str) -> list[Record]:
    """Records of CSV text with a header row (line numbers of each row's first line).

    Example:
        >>> parse_csv_records("text,label\\na,x\\n", "t")
        [(2, {'text': 'a', 'label': 'x'})]
    """
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


def records_from_object(source: Any, text_column: str, label_column: str, split_column: str | None) -> list[Record]:
    """Rows of a DatasetDict, Dataset or DataFrame as records (row numbers are 1-based).

    Example:
        >>> records_from_object(pd.DataFrame({"text": ["a"], "label": ["x"]}), "text", "label", None)
        [(1, {'text': 'a', 'label': 'x'})]
    """
    if isinstance(source, pd.DataFrame):
        return [(i + 1, row) for i, row in enumerate(source.to_dict(orient="records"))]
    if isinstance(source, Mapping) and source and all(hasattr(v, "column_names") for v in source.values()):
        records: list[Record] = []
        for split_name, dataset in source.items():
            for number, row in records_from_object(dataset, text_column, label_column, None):
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


def _check_columns(records: Sequence[Record], where: str, columns: Mapping[str, str]) -> None:
    """A column that no record has is one error naming the option to set, not one error per row."""
    present = {key for _, row in records for key in row if key != "__split__"}
    for option, column in columns.items():
        if records and column not in present:
            raise DataError(
                f"{where} has no {column!r} column (its columns: {sorted(present)}); name the right one with {option}."
            )


def _row_problems(
    number: int, row: Mapping[str, Any], text_column: str, label_column: str, split_column: str | None
) -> list[str]:
    """What is wrong with one record (empty list when nothing)."""
    problems = []
    text, label = row.get(text_column), row.get(label_column)
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
    split = row.get(split_column) if split_column is not None else None
    if split_column is not None and (split is None or not str(split).strip()):
        problems.append(f"line {number}: missing split ({split_column!r})")
    return problems


def task_from_records(
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
    """Build and check a task from records; every bad row (up to 20) is reported in one :class:`DataError`.

    Example:
        >>> task_from_records([(1, {"t": "a", "l": "x"}), (2, {"t": "b", "l": "y"})], name="n", where="w",
        ...                   text_column="t", label_column="l", split_column=None, verbalizer=None,
        ...                   template="{text}").labels
        ['x', 'y']
    """
    records = list(records)
    _check_columns(records, where, {"--text-column / text_column=": text_column, "--label-column / label_column=": label_column})
    texts, labels, splits = [], [], []
    extra: dict[str, list[Any]] = {column: [] for column in metadata_columns}
    problems: list[str] = []
    for number, row in records:
        text = row.get(text_column)
        label = row.get(label_column)
        split = row.get(split_column) if split_column is not None else row.get("__split__", default_split)
        problems += _row_problems(number, row, text_column, label_column, split_column)
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


__all__ = ["Record", "load_task_file", "parse_csv_records", "parse_jsonl_records", "read_task_records", "records_from_object", "task_from_records"]
