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

import os
import uuid
from pathlib import Path
from typing import Callable


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
