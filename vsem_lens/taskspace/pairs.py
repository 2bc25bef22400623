r"""BLiMP-style minimal pairs as data: the :class:`MinimalPair` record, the JSONL file format (write,
load, the shipped snapshot) and the check every analysis runs on its input.

A minimal pair is a grammatical sentence and an ungrammatical one that differ in one word, labelled
with the linguistic phenomenon the difference tests (Warstadt et al. 2020, "BLiMP"). The shipped pairs
come from the generator in :mod:`vsem_lens.taskspace.templates`.

Example:
    >>> pairs = load_minimal_pairs()
    >>> pairs[0].phenomenon
    'sv_agreement_relative_clause'
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..core.errors import DataError, InputError
from ..core.io import atomic_write, iter_jsonl_objects, read_user_file

DEFAULT_FILE = "minimal_pairs.jsonl"


@dataclass(frozen=True)
class MinimalPair:
    """One minimal pair: ``good`` (grammatical) and ``bad`` differ in the word at index ``critical``.

    ``critical`` is ``None`` for user pairs whose difference was not annotated.

    Example:
        >>> MinimalPair("anaphor_agreement", "Mary hurt herself.", "Mary hurt himself.", 2).bad
        'Mary hurt himself.'
    """

    phenomenon: str
    good: str
    bad: str
    critical: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the JSONL row format)."""
        return asdict(self)


def write_minimal_pairs(pairs: Iterable[MinimalPair], path: str | os.PathLike) -> Path:
    """Write pairs as JSONL (one object per line: phenomenon, good, bad, critical).

    Example:
        >>> from vsem_lens.taskspace import generate_minimal_pairs
        >>> write_minimal_pairs(generate_minimal_pairs(1), "/tmp/pairs.jsonl").name
        'pairs.jsonl'
    """
    text = "".join(json.dumps(pair.to_dict(), ensure_ascii=False) + "\n" for pair in pairs)
    return atomic_write(path, lambda tmp: tmp.write_bytes(text.encode("utf-8")))


def snapshot_path() -> Path:
    """Path of the shipped snapshot (``vsem_lens/data/minimal_pairs.jsonl``) in a source checkout.

    Example:
        >>> snapshot_path().name
        'minimal_pairs.jsonl'
    """
    return Path(__file__).parents[1] / "data" / DEFAULT_FILE


def load_minimal_pairs(
    spec: str | os.PathLike = "default", *, phenomena: Sequence[str] | None = None
) -> list[MinimalPair]:
    """Load minimal pairs: the shipped snapshot (``"default"``) or a user JSONL file.

    A user file has one JSON object per line with string fields ``good``, ``bad`` and ``phenomenon``
    (an optional integer ``critical`` word index; other fields are ignored; blank lines are skipped).

    Args:
        spec: ``"default"`` or a path to a ``.jsonl`` file.
        phenomena: keep only these phenomena (each must occur in the file).

    Raises:
        InputError: the file does not exist or is not a ``.jsonl`` file.
        DataError: a row is malformed; the message gives the line number and what to fix.

    Example:
        >>> pairs = load_minimal_pairs()
        >>> len(pairs) >= 8 * 200
        True
    """
    if isinstance(spec, str) and spec == "default":
        content = resources.files("vsem_lens").joinpath("data", DEFAULT_FILE).read_text(encoding="utf-8")
        pairs = _parse(content, "the packaged minimal pairs")
    else:
        path, content = read_user_file(
            spec, "minimal-pair file", (".jsonl",),
            "a .jsonl file (one JSON object per line with 'good', 'bad' and 'phenomenon')",
        )
        pairs = _parse(content, repr(str(path)))
    if phenomena is not None:
        present = {p.phenomenon for p in pairs}
        missing = [name for name in phenomena if name not in present]
        if missing:
            raise InputError(f"phenomena {missing} are not in the file; it has {sorted(present)}.")
        keep = set(phenomena)
        pairs = [p for p in pairs if p.phenomenon in keep]
    return pairs


def _parse(content: str, where: str) -> list[MinimalPair]:
    pairs = []
    for number, obj in iter_jsonl_objects(content, where):
        for key in ("good", "bad", "phenomenon"):
            value = obj.get(key)
            if key not in obj:
                raise DataError(
                    f"{where}, line {number}: missing field {key!r}; every row needs 'good', 'bad' and "
                    "'phenomenon'."
                )
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{where}, line {number}: field {key!r} must be a non-empty string.")
        if obj["good"] == obj["bad"]:
            raise DataError(f"{where}, line {number}: 'good' and 'bad' are the same sentence; fix or remove it.")
        critical = obj.get("critical")
        if critical is not None and (isinstance(critical, bool) or not isinstance(critical, int) or critical < 0):
            raise DataError(f"{where}, line {number}: 'critical' must be a word index (integer >= 0) or absent.")
        pairs.append(MinimalPair(obj["phenomenon"], obj["good"], obj["bad"], critical))
    if not pairs:
        raise DataError(f"{where} contains no minimal pairs.")
    return pairs


def check_pairs(pairs: Sequence[MinimalPair]) -> list[MinimalPair]:
    """``pairs`` as a non-empty list of :class:`MinimalPair` (one pair is wrapped), else :class:`InputError`.

    Example:
        >>> check_pairs(MinimalPair("npi", "a b", "a c"))
        [MinimalPair(phenomenon='npi', good='a b', bad='a c', critical=None)]
    """
    if isinstance(pairs, MinimalPair):
        pairs = [pairs]
    pairs = list(pairs)
    if not pairs:
        raise InputError("no minimal pairs were given; pass a non-empty list (see load_minimal_pairs).")
    for index, pair in enumerate(pairs):
        if not isinstance(pair, MinimalPair):
            raise InputError(
                f"pair {index} is a {type(pair).__name__}, not a MinimalPair; load pairs with "
                "load_minimal_pairs or build MinimalPair(phenomenon, good, bad)."
            )
    return pairs


__all__ = ["DEFAULT_FILE", "MinimalPair", "check_pairs", "load_minimal_pairs", "snapshot_path", "write_minimal_pairs"]
