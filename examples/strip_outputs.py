"""Strip outputs, execution counts and run metadata from the example notebooks before committing.

Usage: ``.venv/bin/python examples/strip_outputs.py [NOTEBOOK ...]`` (default: every examples/*.ipynb).
Exits 1 with ``--check`` if any notebook would change (for CI or a pre-commit hook).
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

KEEP_NOTEBOOK_METADATA = ("kernelspec", "language_info")


def strip(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Remove outputs and volatile metadata in place; returns the notebook."""
    nb.metadata = {k: v for k, v in nb.metadata.items() if k in KEEP_NOTEBOOK_METADATA}
    if "language_info" in nb.metadata:
        nb.metadata["language_info"] = {"name": nb.metadata["language_info"].get("name", "python")}
    for cell in nb.cells:
        cell.metadata = {}
        cell.pop("id", None)
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    return nb


def main(argv: list[str]) -> int:
    check = "--check" in argv
    paths = [Path(a) for a in argv if a != "--check"] or sorted(Path(__file__).parent.glob("*.ipynb"))
    changed = []
    for path in paths:
        before = path.read_text(encoding="utf-8")
        nb = strip(nbformat.read(path, as_version=4))
        nb.nbformat, nb.nbformat_minor = 4, 4   # minor 4: no cell ids, so files stay diff-stable
        after = nbformat.writes(nb) + "\n"
        if after != before:
            changed.append(path)
            if not check:
                path.write_text(after, encoding="utf-8")
    for path in changed:
        print(("would strip " if check else "stripped ") + str(path))
    return 1 if check and changed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
