"""Atomic file writes: a temporary file in the destination folder, fsync, then ``os.replace``.

A reader (or a run interrupted midway) sees either the old file or the complete new one, never a
partial write. One helper for every artifact the package writes.

Example:
    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "table.csv"
    >>> atomic_write(out, lambda tmp: tmp.write_text("a,b\\n1,2\\n")).read_text()
    'a,b\\n1,2\\n'
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Callable, Iterator


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)`` on a temporary path next to ``path``, then move it into place.

    The temporary file is removed if ``write`` raises, and the destination is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def iter_jsonl_objects(content: str, where: str) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line of JSONL text; a clear :class:`DataError`
    naming ``where`` and the line for invalid JSON or a value that is not an object.

    Example:
        >>> list(iter_jsonl_objects('{"text": "a"}\\n\\n{"text": "b"}', "corpus.jsonl"))
        [(1, {'text': 'a'}), (3, {'text': 'b'})]
    """
    from .errors import DataError

    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}, line {number}: not valid JSON ({exc.msg} at column {exc.colno}).") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}, line {number}: expected a JSON object, got {type(obj).__name__}.")
        yield number, obj
