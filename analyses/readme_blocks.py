"""Rendered blocks in a study's README: every number a README quotes comes from a committed output.

A study's README marks the parts that ``run.py`` renders from its committed CSV/JSON outputs::

    <!-- begin results -->
    | task | method | accuracy |
    ...
    <!-- end results -->

Each study has a ``tables.py`` whose ``render(folder)`` reads only committed files (no model) and
returns ``{block name: markdown}``. ``run.py`` calls :func:`write_blocks` after writing its outputs;
``tests/test_studies.py`` calls :func:`stale_blocks` and fails on any difference, so a README can
neither drift from its outputs nor be edited by hand inside a block.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

_BLOCK = re.compile(r"(<!-- begin (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end (?P=name) -->)", re.S)


def blocks_in(text: str) -> dict[str, str]:
    """The rendered blocks of a README text, ``{name: body}`` (body without the markers)."""
    return {match["name"]: match["body"] for match in _BLOCK.finditer(text)}


def replace_blocks(text: str, blocks: Mapping[str, str]) -> str:
    """``text`` with every named block's body replaced; a block missing from either side is an error."""
    present = blocks_in(text)
    missing = sorted(set(blocks) - set(present))
    unrendered = sorted(set(present) - set(blocks))
    if missing or unrendered:
        raise ValueError(f"README blocks without markers: {missing}; markers without a renderer: {unrendered}")

    def body(match: re.Match) -> str:
        rendered = blocks[match["name"]].rstrip("\n") + "\n"
        return match.group(1) + rendered + match.group(4)

    return _BLOCK.sub(body, text)


def write_blocks(readme: Path, blocks: Mapping[str, str]) -> None:
    """Re-render ``readme``'s blocks in place (atomic: temp file + rename)."""
    readme = Path(readme)
    text = replace_blocks(readme.read_text(encoding="utf-8"), blocks)
    handle, tmp = tempfile.mkstemp(dir=readme.parent, prefix=".readme-", suffix=".tmp")
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        out.write(text)
    os.replace(tmp, readme)


def stale_blocks(readme: Path, blocks: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """Blocks whose committed body differs from the rendering: ``{name: (committed, rendered)}``."""
    text = Path(readme).read_text(encoding="utf-8")
    rendered = blocks_in(replace_blocks(text, blocks))
    committed = blocks_in(text)
    return {name: (committed[name], rendered[name]) for name in rendered if committed[name] != rendered[name]}


def fmt(value: Any, digits: int = 3) -> str:
    """A number as the READMEs print it: fixed ``digits`` decimals, integers as they are, NaN as 'n/a'."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    value = float(value)
    if math.isnan(value):
        return "n/a"
    return f"{value:.{digits}f}"


def markdown_table(
    rows: Sequence[Mapping[str, Any]] | Any,
    columns: Mapping[str, str | Callable[[Mapping[str, Any]], str]],
    *,
    align: str | None = None,
) -> str:
    """A GitHub markdown table.

    Args:
        rows: dicts, or a pandas DataFrame (its records are used).
        columns: header -> a key of the row (formatted with :func:`fmt`) or a function of the row that
            returns the cell text.
        align: one character per column, ``l`` or ``r`` (default: left for the first, right for the rest).

    Example:
        >>> print(markdown_table([{"x": "a", "y": 0.5}], {"name": "x", "value": "y"}))
        | name | value |
        |---|---:|
        | a | 0.500 |
    """
    if hasattr(rows, "to_dict"):
        rows = rows.to_dict("records")
    headers = list(columns)
    align = align or "l" + "r" * (len(headers) - 1)
    if len(align) != len(headers):
        raise ValueError(f"align has {len(align)} characters for {len(headers)} columns")
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    for row in rows:
        cells = []
        for spec in columns.values():
            value = spec(row) if callable(spec) else row[spec]
            cells.append(value if isinstance(value, str) else fmt(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
