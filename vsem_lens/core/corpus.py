"""Load a text corpus for the layerwise report: the packaged default corpus or a user file.

Formats (chosen by the file extension):

========== ===========================================================================
``.txt``   one text per non-empty line (lines are stripped of their line break only)
``.jsonl`` one JSON object per line with a string field ``"text"`` (blank lines skipped)
``.csv``   a header row with a column named ``text`` (other columns are ignored)
========== ===========================================================================

``"default"`` is the embedded corpus shipped in the package (``vsem_lens/data/corpus.jsonl``, read
with :mod:`importlib.resources`, so it works from a wheel or a zip). Errors are
:class:`~vsem_lens.core.errors.VsemLensError` subclasses that name the file and, for malformed records,
the line (JSONL) or row (CSV) number.

Example:
    >>> texts = load_corpus("default")          # doctest: +SKIP
    >>> len(texts), texts[0][:30]               # doctest: +SKIP
    (360, 'The river wound slowly through')
"""

from __future__ import annotations

import csv
import io
import os
from importlib import resources

from .errors import DataError
from .io import iter_jsonl_objects, read_user_file

DEFAULT_CORPUS = "corpus.jsonl"
FORMATS = (".txt", ".jsonl", ".csv")


def load_corpus(spec: str | os.PathLike = "default") -> list[str]:
    """Read a corpus into a list of texts.

    Args:
        spec: ``"default"`` (the packaged corpus) or a path to a ``.txt``, ``.jsonl`` or ``.csv`` file.

    Returns:
        The texts, in file order (never empty; no text is empty or whitespace only).

    Raises:
        InputError: the file does not exist, is a directory, or has an unsupported extension.
        DataError: the corpus is empty, or a record is malformed (the message gives its line/row).

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "c.jsonl"
        >>> _ = path.write_text('{"text": "Hello world."}\\n\\n{"text": "Second text."}\\n')
        >>> load_corpus(path)
        ['Hello world.', 'Second text.']
    """
    if isinstance(spec, str) and spec == "default":
        return _parse("jsonl", default_corpus_text(), "the packaged default corpus")
    path, content = read_user_file(
        spec, "corpus file", tuple(FORMATS), "a .txt (one text per line), .jsonl (a \"text\" field per line) "
        "or .csv (a \"text\" column) file, or --corpus default"
    )
    return _parse(path.suffix.lower()[1:], content, repr(str(path)))


def default_corpus_text() -> str:
    """The raw JSONL content of the packaged default corpus.

    Example:
        >>> default_corpus_text().count("\\n") > 0   # doctest: +SKIP
        True
    """
    resource = resources.files("vsem_lens").joinpath("data", DEFAULT_CORPUS)
    try:
        return resource.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(
            f"the packaged default corpus (vsem_lens/data/{DEFAULT_CORPUS}) is missing; reinstall vsem-lens "
            "or pass --corpus FILE."
        ) from None


def _parse(kind: str, content: str, where: str) -> list[str]:
    texts = {"txt": _parse_txt, "jsonl": _parse_jsonl, "csv": _parse_csv}[kind](content, where)
    if not texts:
        raise DataError(f"corpus {where} contains no texts; add at least one non-empty text.")
    return texts


def _parse_txt(content: str, where: str) -> list[str]:
    return [line for line in content.splitlines() if line.strip()]


def _parse_jsonl(content: str, where: str) -> list[str]:
    texts = []
    for number, record in iter_jsonl_objects(content, f"corpus {where}"):
        if "text" not in record:
            fields = ", ".join(map(str, record)) or "none"
            raise DataError(f"corpus {where}, line {number}: no \"text\" field (fields: {fields}).")
        text = record["text"]
        if not isinstance(text, str):
            raise DataError(f"corpus {where}, line {number}: \"text\" is a {type(text).__name__}, not a string.")
        if not text.strip():
            raise DataError(f"corpus {where}, line {number}: \"text\" is empty; remove the line.")
        texts.append(text)
    return texts


def _parse_csv(content: str, where: str) -> list[str]:
    reader = csv.reader(io.StringIO(content, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return []
    except csv.Error as exc:
        raise DataError(f"corpus {where}, line 1: malformed CSV ({exc}).") from None
    names = [name.strip() for name in header]
    if "text" not in names:
        shown = ", ".join(repr(n) for n in names) or "none"
        raise DataError(f"corpus {where} has no \"text\" column (columns: {shown}); name the text column \"text\".")
    column = names.index("text")
    texts = []
    try:
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue  # blank line
            line = reader.line_num
            if column >= len(row):
                raise DataError(f"corpus {where}, line {line}: the row has no \"text\" cell ({len(row)} cells).")
            text = row[column]
            if not text.strip():
                raise DataError(f"corpus {where}, line {line}: the \"text\" cell is empty; remove the row.")
            texts.append(text)
    except csv.Error as exc:
        raise DataError(f"corpus {where}, line {reader.line_num}: malformed CSV ({exc}).") from None
    return texts
