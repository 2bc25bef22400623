"""Execute every notebook in examples/ top to bottom on the embedded model; a failing cell fails the test.

The kernel is the Python running the tests (``sys.executable``, i.e. the project's own .venv): a
kernelspec pointing at it is written into a temporary Jupyter data directory (``docs/notebooks.py``),
so no globally installed kernel is used or needed. Each notebook runs in a fresh temporary working
directory, once per session: the docs build shows the same executed copies (``executed_notebooks``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))

pytestmark = [pytest.mark.embedded, pytest.mark.slow]


def test_examples_exist():
    names = [p.name for p in NOTEBOOKS]
    assert names[:4] == [
        "01_probe_activations.ipynb",
        "02_layerwise_report.ipynb",
        "03_isotropy_and_istar.ipynb",
        "04_calibration_head.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stripped(path):
    """Notebooks are committed without outputs (run ``python examples/strip_outputs.py``)."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name} has outputs; strip them"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, executed_notebooks):
    try:
        nb = executed_notebooks.get(path)
    except nbclient.exceptions.CellExecutionError as exc:  # show the failing cell, not the kernel traceback
        pytest.fail(f"{path.name}: a cell failed\n{exc}", pytrace=False)
    figures = sum(
        1
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if "application/vnd.plotly.v1+json" in out.get("data", {}) or "text/html" in out.get("data", {})
    )
    assert figures >= 1, f"{path.name} rendered no figure"
