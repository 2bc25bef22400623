"""The example notebooks, each executed at most once per test session (docs/notebooks.py runs them).

``tests/test_notebooks.py`` checks each executed notebook; the docs build in ``tests/test_docs.py``
gets the same executed copies (``VSEM_EXECUTED_NOTEBOOKS``), so the site shows the outputs the test
run produced and no notebook runs twice.
"""

from __future__ import annotations

import os
from pathlib import Path


def docs_notebooks():
    """``docs/notebooks.py``, loaded the way the docs build loads it (``docs/`` is on the tests' path)."""
    import hooks

    return hooks._notebooks()


class ExecutedNotebooks:
    """Executes notebooks on first request into ``folder``; later requests get the same result (or error)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._done: dict[str, object] = {}

    def get(self, path: Path):
        """The executed notebook at ``path``; a failing cell raises ``CellExecutionError`` (every time)."""
        if path.name not in self._done:
            # One torch thread in the kernel: on a shared CI machine this is 3-4x faster than torch's
            # default (measured: 36 s vs 154 s for 03 under load); VSEM_NOTEBOOK_THREADS overrides it.
            saved = os.environ.get("OMP_NUM_THREADS")
            os.environ["OMP_NUM_THREADS"] = os.environ.get("VSEM_NOTEBOOK_THREADS", "1")
            nbs = docs_notebooks()
            try:
                nb = nbs.execute(path)
                nbs.write(nb, self.folder / path.name)
                self._done[path.name] = nb
            except Exception as exc:  # remembered, so the docs build and the notebook test report the same failure
                self._done[path.name] = exc
            finally:
                if saved is None:
                    os.environ.pop("OMP_NUM_THREADS", None)
                else:
                    os.environ["OMP_NUM_THREADS"] = saved
        result = self._done[path.name]
        if isinstance(result, Exception):
            raise result
        return result

    def all(self) -> Path:
        """Execute every example notebook; returns the folder holding them."""
        for path in docs_notebooks().notebooks():
            self.get(path)
        return self.folder
