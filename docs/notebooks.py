"""The example notebooks on the documentation site, with their outputs: executed, then written as pages.

The notebooks are committed without outputs (``examples/strip_outputs.py``). The site shows them
executed, never with outputs committed by hand:

- :func:`execute` runs one notebook top to bottom with a kernel of this Python (a kernelspec written
  into a temporary Jupyter data directory), in a temporary working directory.
- :func:`executed` is what the docs build uses. With ``VSEM_EXECUTED_NOTEBOOKS=DIR`` (the test suite
  sets it after executing every notebook once) it reads ``DIR/<name>.ipynb`` and fails if one is missing.
  Otherwise it executes the notebook, cached under ``$VSEM_LENS_CACHE/docs-notebooks`` by the hash of
  the notebook and of the ``vsem_lens`` sources, so a rebuild with nothing changed is instant.
  ``VSEM_DOCS_EXECUTE=0`` builds pages without outputs (a quick preview; the page says so).
- :func:`to_markdown` turns an executed notebook into a page: markdown cells as they are, code cells as
  Python blocks, outputs as raw HTML held in placeholders (:func:`fill_outputs` puts them back after the
  Markdown pass, so Python-Markdown never rewrites a table or a script). Figures are drawn with one
  plotly.js per page, served from the site (``js/plotly.min.js``, written by the build): the copy a
  vsem-lens object carries in its first notebook output is dropped, plain plotly figures
  (``application/vnd.plotly.v1+json``) are drawn by the same script as the report's.
"""

from __future__ import annotations

import functools
import hashlib
import html
import json
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
KERNEL_NAME = "vsem-lens-docs"
CELL_TIMEOUT_S = 600
#: Where a page's outputs wait for the Markdown pass to finish (one empty element per output).
PLACEHOLDER = re.compile(r'<div class="nb-output" data-output="(\d+)"></div>')
PLOTLY_JS_ELEMENT = re.compile(r'<script id="plotly-js">.*?</script>', flags=re.S)
PLOTLY_MIME = "application/vnd.plotly.v1+json"
#: "# 1. Title": the number goes (the menu shows it); a heading id starting with a digit breaks the theme's
#: table of contents (an invalid CSS selector for its scroll spy).
NUMBERED_HEADING = re.compile(r"^(#{1,6})\s+\d+\.\s+", flags=re.M)
SITE_PLOTLY = "js/plotly.min.js"


def notebooks() -> list[Path]:
    """The example notebooks, in order."""
    return sorted(EXAMPLES.glob("*.ipynb"))


def page_path(notebook: Path) -> str:
    """The site page of a notebook, relative to ``docs/`` (``examples/01_probe_activations.md``)."""
    return f"examples/{notebook.stem}.md"


def write_kernelspec(data_dir: Path, python: str = sys.executable) -> str:
    """A kernelspec for ``python`` under ``data_dir/kernels``; returns its name."""
    spec_dir = data_dir / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "vsem-lens",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    return KERNEL_NAME


def execute(path: Path, workdir: Path | None = None, timeout: int = CELL_TIMEOUT_S):
    """Run the notebook at ``path`` top to bottom; returns the executed ``nbformat`` notebook.

    A failing cell raises ``nbclient.exceptions.CellExecutionError``. The kernel is this Python and
    inherits the environment (``HF_HUB_OFFLINE=1`` is set when unset: the examples use the embedded model).
    """
    import nbclient
    import nbformat

    with tempfile.TemporaryDirectory(prefix="vsem-nb-") as scratch:
        data_dir = Path(scratch) / "jupyter"
        run_dir = workdir or Path(scratch) / "work"
        run_dir.mkdir(parents=True, exist_ok=True)
        saved = {key: os.environ.get(key) for key in ("JUPYTER_PATH", "HF_HUB_OFFLINE")}
        os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(data_dir), saved["JUPYTER_PATH"]]))
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            nb = nbformat.read(path, as_version=4)
            client = nbclient.NotebookClient(
                nb, kernel_name=write_kernelspec(data_dir), timeout=timeout, allow_errors=False,
                resources={"metadata": {"path": str(run_dir)}},
            )
            client.execute()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    return nb


def write(nb, path: Path) -> Path:
    """Write an executed notebook atomically (the project's temp file + rename)."""
    import nbformat

    from vsem_lens.core.io import atomic_write

    return atomic_write(path, lambda tmp: nbformat.write(nb, tmp))


@functools.lru_cache(maxsize=1)
def _package_hash() -> bytes:
    """Digest of the ``vsem_lens`` sources, read once per build (every notebook's cache key includes it)."""
    digest = hashlib.sha256()
    for source in sorted((ROOT / "vsem_lens").rglob("*.py")):
        digest.update(source.relative_to(ROOT).as_posix().encode())
        digest.update(source.read_bytes())
    return digest.digest()


def _source_hash(notebook: Path) -> str:
    return hashlib.sha256(_package_hash() + notebook.read_bytes()).hexdigest()[:16]


def executed(notebook: Path):
    """The executed notebook for the site (see the module docstring), or ``None`` when execution is off."""
    import nbformat

    given = os.environ.get("VSEM_EXECUTED_NOTEBOOKS")
    if given:
        path = Path(given) / notebook.name
        if not path.is_file():
            raise FileNotFoundError(f"VSEM_EXECUTED_NOTEBOOKS={given} has no {notebook.name}: execute it first.")
        return nbformat.read(path, as_version=4)
    if os.environ.get("VSEM_DOCS_EXECUTE", "1") == "0":
        return None
    from vsem_lens.core.models import cache_dir

    cached = cache_dir() / "docs-notebooks" / f"{notebook.stem}-{_source_hash(notebook)}.ipynb"
    if cached.is_file():
        return nbformat.read(cached, as_version=4)
    print(f"docs: executing {notebook.name} (cached afterwards in {cached.parent})", file=sys.stderr)
    return nbformat.read(write(execute(notebook), cached), as_version=4)


def _text_block(text: str) -> str:
    fence = "````" if "```" in text else "```"
    return f"{fence}text\n{text.rstrip()}\n{fence}"


def _figure_html(figure: dict, div_id: str) -> str:
    from vsem_lens.report.html import figure_scripts

    # display:block: the theme's Bootstrap styles .figure as inline-block, which leaves plotly no width; an
    # autosized figure takes its div's height, so the div gets the figure's height (Jupyter's default 525 px)
    height = int(figure.get("layout", {}).get("height") or 525)
    return (f'<div class="vsem-report"><div class="figure" id="{div_id}" style="display:block;height:{height}px">'
            "</div>"
            f"{figure_scripts({div_id: figure}, include_plotlyjs=False)}</div>")


def _output_html(output: dict, div_id: str) -> str | None:
    """Raw HTML of one output, or ``None`` for outputs shown as text."""
    data = output.get("data", {})
    if PLOTLY_MIME in data:
        return _figure_html(data[PLOTLY_MIME], div_id)
    if "text/html" in data:
        text = data["text/html"]
        text = "".join(text) if isinstance(text, list) else text
        return f'<div class="nb-html">{PLOTLY_JS_ELEMENT.sub("", text)}</div>'
    for mime in ("image/png", "image/jpeg"):
        if mime in data:
            return f'<img class="nb-image" alt="figure" src="data:{mime};base64,{"".join(data[mime]).strip()}">'
    if "image/svg+xml" in data:
        return "".join(data["image/svg+xml"])
    return None


def _output_text(output: dict) -> str:
    if output.get("output_type") == "stream":
        text = output.get("text", "")
    else:
        text = output.get("data", {}).get("text/plain", "")
    return "".join(text) if isinstance(text, list) else text


def to_markdown(nb, notebook: Path) -> tuple[str, list[str]]:
    """A page for ``nb`` (executed, or stripped when ``VSEM_DOCS_EXECUTE=0``): its Markdown and the raw
    HTML of its outputs, in placeholder order (see :func:`fill_outputs`)."""
    parts = [f"*This page is `examples/{notebook.name}`, executed when the site was built.*"]
    if nb is None:
        import nbformat

        nb = nbformat.read(notebook, as_version=4)
        parts[0] = (f'!!! note "Outputs not included"\n    This build skipped execution (`VSEM_DOCS_EXECUTE=0`); '
                    f"the code of `examples/{notebook.name}` is shown without its outputs.")
    raw: list[str] = []
    for cell in nb.cells:
        source = cell.source if isinstance(cell.source, str) else "".join(cell.source)
        if cell.cell_type == "markdown":
            parts.append(NUMBERED_HEADING.sub(r"\1 ", source))
            continue
        if cell.cell_type != "code" or not source.strip():
            continue
        parts.append(f"```python\n{source.rstrip()}\n```")
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stderr":
                continue  # warnings and progress bars: noise on a page
            block = _output_html(output, f"nb-{notebook.stem[:2]}-fig-{len(raw)}")
            if block is not None:
                parts.append(f'<div class="nb-output" data-output="{len(raw)}"></div>')
                raw.append(block)
            elif _output_text(output).strip():
                parts.append(_text_block(_output_text(output)))
    return "\n\n".join(parts) + "\n", raw


def fill_outputs(page_html: str, raw: list[str], plotly_src: str) -> str:
    """Put each output's HTML where its placeholder is, and load plotly.js once when a figure needs it."""
    text = PLACEHOLDER.sub(lambda m: raw[int(m.group(1))], page_html)
    if "Plotly.newPlot" in text:
        text = f'<script src="{html.escape(plotly_src)}"></script>\n{text}'
    return text


def write_plotly(site_dir: Path) -> Path:
    """plotly.js (the version the figures are made for, from plotly.py's bundle) into the built site."""
    from vsem_lens.report.html import plotly_js

    target = Path(site_dir) / SITE_PLOTLY
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(plotly_js(), encoding="utf-8")
    return target
