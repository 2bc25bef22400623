"""Atomic file writes: a temporary file in the destination folder, fsync, then ``os.replace``.

A reader (or a run interrupted midway) sees either the old file or the complete new one, never a
partial write. One helper for every artifact the package writes; :func:`rename_exchange` swaps two
directories atomically (Linux) for artifacts written as a folder.

Example:
    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "table.csv"
    >>> atomic_write(out, lambda tmp: tmp.write_text("a,b\\n1,2\\n")).read_text()
    'a,b\\n1,2\\n'
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch

from .errors import ArtifactError, DataError, InputError


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], *, mkdir: bool = True) -> Path:
    """Call ``write(tmp_path)`` on a temporary path next to ``path``, then move it into place.

    The temporary file is removed if ``write`` raises, and the destination is left untouched.
    ``mkdir=False`` lets a missing folder fail (``OSError``) instead of creating it.
    """
    path = Path(path)
    if mkdir:
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


def read_user_file(path: str | os.PathLike, what: str, suffixes: tuple[str, ...], formats: str) -> tuple[Path, str]:
    """Read a user's UTF-8 text file, with a clear error for every way it can be wrong.

    Args:
        path: the file (``~`` is expanded).
        what: how messages name it, e.g. ``"corpus file"``.
        suffixes: accepted extensions (lower case, with the dot).
        formats: what to pass instead, for the messages, e.g. ``"a .txt, .jsonl or .csv file"``.

    Returns:
        The path and its content (a UTF-8 byte-order mark is dropped).

    Raises:
        InputError: the file does not exist, is a directory, has another extension, or cannot be read.
        DataError: the file is not UTF-8.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "t.txt"; _ = p.write_text("hi")
        >>> read_user_file(p, "corpus file", (".txt",), "a .txt file")[1]
        'hi'
    """
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if not path.exists():
        raise InputError(f"{what} {str(path)!r} does not exist; check the path.")
    if path.is_dir():
        raise InputError(f"{what} {str(path)!r} is a directory; pass {formats}.")
    if suffix not in suffixes:
        raise InputError(f"{what} {str(path)!r} has an unsupported extension {suffix or '(none)'!r}; pass {formats}.")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}.") from None
    try:
        return path, raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{what} {str(path)!r} is not UTF-8 (byte {exc.start}); re-save it as UTF-8.") from None


def check_writable(path: str | os.PathLike, *, kind: str, option: str = "--out") -> Path:
    """``path`` as an absolute path that can be written as a ``kind`` (``"file"`` or ``"dir"``), checked
    before any work so a bad output path fails in a second, not after a long run.

    Raises:
        InputError: ``path`` exists with the other kind, or neither it nor its nearest existing parent is
            a writable folder.

    Example:
        >>> check_writable("/no/such/root/out.csv", kind="file")  # doctest: +SKIP
    """
    path = Path(path).expanduser().absolute()
    if path.exists() and (path.is_dir() != (kind == "dir")):
        want = "a folder" if kind == "dir" else "a file"
        raise InputError(f"{option} {str(path)!r} exists and is not {want}; choose another path.")
    parent = path if path.is_dir() else path.parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir():
        raise InputError(f"{option} {str(path)!r} cannot be written (it is not a folder: {existing}); choose another path.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{option} {str(path)!r} cannot be written (no write permission in {existing}).")
    return path


def texts_digest(texts: Iterable[str], *, digest_size: int = 10) -> str:
    """A hex digest of a sequence of texts (length-prefixed, so ``["ab", "c"]`` and ``["a", "bc"]`` differ).

    One corpus identity for every cache and checkpoint key.

    Example:
        >>> texts_digest(["ab", "c"]) != texts_digest(["a", "bc"])
        True
    """
    digest = hashlib.blake2b(digest_size=digest_size)
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """A SHA-256 of named tensors' names, dtypes, shapes and bytes: the content identity of a weights file.

    Written next to every weights file the package saves and checked on load, so a file that changed
    after it was written (a flipped byte, a NaN pasted into a row, a truncated copy) is caught instead
    of silently producing wrong numbers.

    Example:
        >>> a = {"w": torch.zeros(2, 3)}
        >>> tensors_digest(a) == tensors_digest({"w": torch.zeros(2, 3)}) != tensors_digest({"w": torch.ones(2, 3)})
        True
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def state_digest(state: Any) -> str:
    """A SHA-256 of a nested state (dicts, lists, tensors, numbers, strings): a checkpoint's content identity.

    Tensors are hashed by :func:`tensors_digest` under their path in the structure, everything else by
    its ``repr``, so the digest changes with any value and is the same for equal states.

    Example:
        >>> state_digest({"a": [1, torch.ones(2)]}) == state_digest({"a": [1, torch.ones(2)]})
        True
    """
    tensors: dict[str, torch.Tensor] = {}
    others: list[str] = []

    def walk(value: Any, where: str) -> None:
        if isinstance(value, torch.Tensor):
            tensors[where] = value
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                walk(value[key], f"{where}/{key}")
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(item, f"{where}[{index}]")
        else:
            others.append(f"{where}={value!r}")

    walk(state, "")
    return hashlib.sha256((tensors_digest(tensors) + "|" + "|".join(others)).encode()).hexdigest()


def check_tensors(
    tensors: Mapping[str, torch.Tensor], where: str, *, digest: str | None = None, remedy: str = ""
) -> None:
    """Refuse a loaded artifact whose floating tensors are not finite or whose content changed since saving.

    Args:
        tensors: the loaded tensors.
        where: what and where the artifact is, for the message (e.g. ``"the basis in /path"``).
        digest: the :func:`tensors_digest` recorded at save time (``None`` for files written before
            digests existed: then only finiteness is checked).
        remedy: what the user should do, appended to the message.

    Raises:
        ArtifactError: a NaN/inf value (named tensor and count) or a digest mismatch.

    Example:
        >>> check_tensors({"w": torch.tensor([1.0, float("nan")])}, "the example")
        Traceback (most recent call last):
        ...
        vsem_lens.core.errors.ArtifactError: the example is corrupt: tensor 'w' has 1 non-finite value(s).
    """
    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise ArtifactError(f"{where} is corrupt: tensor {name!r} has {bad} non-finite value(s).{remedy}")
    if digest is not None and tensors_digest(tensors) != digest:
        raise ArtifactError(f"{where} is corrupt: its content does not match the digest written with it.{remedy}")


def temp_dir_name(target: str, *, pid: int | None = None) -> str:
    """Name of a temporary sibling folder of ``target`` that records its writer's process id.

    Everything the package writes as a folder (a report, a converted model) is first written under
    this name and renamed into place, so :func:`remove_stale_temp_dirs` can tell a dead writer's
    leftovers from a live writer's work in progress.

    Example:
        >>> temp_dir_name("model", pid=42).startswith(".tmp-model-42-")
        True
    """
    return f".tmp-{target}-{os.getpid() if pid is None else pid}-{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale_temp_dirs(parent: str | os.PathLike, target: str) -> list[Path]:
    """Delete the temporary folders of ``target`` (named by :func:`temp_dir_name`) whose writer is dead.

    Only folders named exactly ``.tmp-<target>-<pid>-<8 hex>`` are considered, and only when process
    ``pid`` no longer exists on this machine, so a live writer's folder (another process converting
    or saving the same target right now) and anything else in ``parent`` are never touched.

    Returns:
        The folders removed.
    """
    import re
    import shutil

    pattern = re.compile(rf"^\.tmp-{re.escape(target)}-(\d+)-[0-9a-f]{{8}}$")
    removed = []
    parent = Path(parent)
    if not parent.is_dir():
        return removed
    for path in parent.iterdir():
        match = pattern.match(path.name)
        if match and path.is_dir() and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def rename_exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Atomically swap two existing directory entries (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns ``False`` (nothing done) where the call is not available (other systems, old kernels, file
    systems without support), so the caller can fall back to two renames.

    Raises:
        OSError: the exchange is supported but failed (e.g. a path does not exist).

    Example:
        >>> import tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> (root / "a").mkdir(); (root / "b").mkdir(); _ = (root / "a" / "x").write_text("")
        >>> rename_exchange(root / "a", root / "b") in (True, False)
        True
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd, exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def replace_dir(tmp: str | os.PathLike, out: str | os.PathLike) -> None:
    """Move the finished folder ``tmp`` to ``out``, replacing an earlier ``out`` only at the last moment.

    On Linux the two are swapped atomically (:func:`rename_exchange`), so a reader sees either the old
    folder or the new one, never a mix; elsewhere the old folder survives as a hidden sibling until the
    new one is in place.

    Example:
        >>> import tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> (root / "new").mkdir(); _ = (root / "new" / "x").write_text("1")
        >>> replace_dir(root / "new", root / "out"); sorted(p.name for p in root.iterdir())
        ['out']
    """
    import shutil

    tmp, out = Path(tmp), Path(out)
    if not out.exists():
        os.rename(tmp, out)
        return
    if rename_exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the earlier folder
        return
    old = out.parent / temp_dir_name(out.name)
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
