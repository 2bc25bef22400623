"""The documentation: the MkDocs site builds with --strict, public objects carry examples, results render in Jupyter."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

import vsem_lens as vl

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.embedded
def test_mkdocs_build_strict(tmp_path, executed_notebooks):
    """The site builds with --strict, with the generated parts, offline math and the executed notebooks."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    pytest.importorskip("nbclient")
    site = tmp_path / "site"
    # the notebooks run once per session: the site shows the outputs of the test run's executions
    env = {**os.environ, "VSEM_EXECUTED_NOTEBOOKS": str(executed_notebooks.all())}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert (site / "index.html").is_file()
    # generated parts: the CLI options come from the parser, the API reference from the docstrings
    report_page = (site / "cli" / "report" / "index.html").read_text(encoding="utf-8")
    assert "--max-tokens" in report_page
    api_page = (site / "api" / "basis" / "index.html").read_text(encoding="utf-8")
    assert "SemanticBasis" in api_page and "from_model" in api_page
    # formulas are MathML written at build time: no raw LaTeX left, no math script
    concepts = (site / "concepts" / "isotropy" / "index.html").read_text(encoding="utf-8")
    assert concepts.count("<math") >= 10 and 'class="arithmatex"' not in concepts and "mathjax" not in concepts.lower()
    _check_math_in_chromium(site / "concepts" / "isotropy" / "index.html", tmp_path / "browser")
    _check_notebook_pages(site, tmp_path / "browser-notebooks")


def _check_notebook_pages(site: Path, workdir: Path) -> None:
    """Each example notebook is a page with its outputs: every figure drawn in Chromium, nothing from a CDN,
    plotly.js served once from the site and never inlined into a page."""
    from _cdp import find_chromium, render_report

    from vsem_lens.report.html import plotly_js

    assert (site / "js" / "plotly.min.js").read_text(encoding="utf-8") == plotly_js()
    pages = sorted((site / "examples").glob("0*/index.html"))
    assert [p.parent.name for p in pages] == [p.stem for p in sorted((ROOT / "examples").glob("*.ipynb"))]
    for page in pages:
        text = page.read_text(encoding="utf-8")
        assert 'class="nb-output"' not in text  # every placeholder was filled
        assert text.count('src="../../js/plotly.min.js"') == 1 and 'id="plotly-js"' not in text
        assert "<table" in text and "Plotly.newPlot" in text, page  # tables and figures came through
        assert len(text) < 4 * 2**20, f"{page}: {len(text):,} bytes"
    if find_chromium() is None:
        pytest.skip("chromium is not installed (apt-get install chromium) - the notebook pages check needs it")
    probe_page = site / "examples" / "01_probe_activations" / "index.html"
    assert "vsem-probe-" in probe_page.read_text(encoding="utf-8")
    for page in pages:
        result = render_report(page, workdir / page.parent.name)
        assert result["figures"], f"{page.parent.name}: no figure on the page"
        assert all(f["svg"] > 0 and not f["error"] for f in result["figures"]), (page.parent.name, result["figures"])
        # the theme's search runs in a Web Worker, which browsers refuse to start from a file:// page
        errors = [e for e in result["errors"] if "search/worker.js" not in e]
        assert errors == [], (page.parent.name, errors)
        external = [u for u in result["requests"] if not u.startswith(("file:", "data:", "blob:", "about:"))]
        assert external == [], (page.parent.name, external)


def _check_math_in_chromium(page_path: Path, workdir: Path) -> None:
    """The concepts page in headless Chromium: every formula is laid out as MathML, no request leaves the disk."""
    import time

    from _cdp import Browser, find_chromium

    chromium = find_chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium) - the offline math check needs it")
    with Browser(chromium, workdir / "profile") as browser:
        page = browser.page()
        page.call("Page.navigate", url=page_path.resolve().as_uri())
        page.wait_event("Page.loadEventFired", 60)
        time.sleep(0.5)
        maths = page.evaluate(
            "Array.from(document.querySelectorAll('math')).map(m => ({display: getComputedStyle(m).display,"
            " height: m.getBoundingClientRect().height, width: m.getBoundingClientRect().width}))"
        )
        raw = page.evaluate(r"document.body.innerText.includes('\\zeta') || document.body.innerText.includes('\\(')")
        page.ws.close()
    assert maths and all(m["display"] in ("math", "block math", "inline math") for m in maths), maths[:3]
    assert all(m["height"] > 0 and m["width"] > 0 for m in maths)
    assert not raw  # no LaTeX source shows as text
    external = [u for u in page.requests if not u.startswith(("file:", "data:", "blob:", "about:"))]
    assert external == [], external


def _public_objects():
    """Every function and class exported by the top-level package or one of its subpackages."""
    found = {}
    for package in [vl, *(getattr(vl, name) for name in vl.__all__ if inspect.ismodule(getattr(vl, name)))]:
        for name in package.__all__:
            obj = getattr(package, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                found.setdefault(f"{obj.__module__}.{obj.__qualname__}", (f"{package.__name__}.{name}", obj))
    return sorted(found.values())


@pytest.mark.parametrize("name,obj", _public_objects(), ids=[n for n, _ in _public_objects()])
def test_public_api_has_docstring_with_example(name, obj):
    doc = inspect.getdoc(obj) or ""
    assert doc.strip(), f"{name} has no docstring"
    assert "Example" in doc or ">>>" in doc, f"{name}'s docstring has no example"


def test_nav_pages_exist():
    """Every page in the nav exists (the study pages pick up analyses/*/README.md at build time)."""
    import re

    nav = re.findall(r":\s*([\w/.-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(encoding="utf-8"), flags=re.M)
    assert "scale.md" in nav
    # examples/<name>.md are generated from examples/<name>.ipynb by the docs build (docs/notebooks.py)
    generated = {f"examples/{nb.stem}.md" for nb in (ROOT / "examples").glob("*.ipynb")}
    assert generated <= set(nav), f"example notebooks missing from the nav: {sorted(generated - set(nav))}"
    missing = [page for page in nav if not (ROOT / "docs" / page).is_file() and page not in generated]
    assert not missing, f"pages in mkdocs.yml nav but not in docs/: {missing}"


def test_study_pages_include_readme_or_note():
    import hooks

    present = hooks.study("analyses/semantic_calibration")
    assert present.startswith("# Semantic calibration") and "analyses/semantic_calibration/README.md" in present
    # links to repository files are not site pages: rewritten to paths so --strict cannot trip on them
    text = "[the results](results.csv), ![a plot](fig.png), [paper](https://arxiv.org/abs/2401.16184)"
    out = hooks.LINK.sub(lambda m: hooks._rewrite_link(m, "analyses/x"), text)
    assert out.startswith("the results (`analyses/x/results.csv`), *(figure `analyses/x/fig.png`")
    assert out.endswith("[paper](https://arxiv.org/abs/2401.16184)")
    missing = hooks.study("analyses/no_such_study")
    assert missing.startswith("# No such study") and "Not written yet" in missing


# -- objects users look at in Jupyter render as HTML ----------------------------------------------


def test_result_objects_have_repr_html():
    from vsem_lens.geometry import BasisCoherence
    from vsem_lens.report.build import Report

    for cls in (Report, BasisCoherence):
        assert callable(getattr(cls, "_repr_html_", None)), f"{cls.__name__} does not render in Jupyter"


def test_basis_coherence_repr_html(tiny_model):
    coh = vl.geometry.basis_coherence(vl.SemanticBasis.from_model(tiny_model), sample=64, seed=0, bins=10, n_extremes=3)
    html = coh._repr_html_()
    assert html.startswith("<div><b>BasisCoherence</b>") and "<table" in html
    assert "semantic_basis" in html and "unembedding" in html
    assert "high leverage" in html and "low leverage" in html


def test_table_results_render(tiny_model):
    """Isotropy and affinity results are DataFrames, which Jupyter renders as HTML tables."""
    iso = vl.isotropy_by_layer(tiny_model, ["The capital of France is Paris.", "A cat sat on the mat."])
    aff = vl.layerwise_affinity(tiny_model, "The capital of France is", k=2)
    for df in (iso, aff):
        assert "<table" in df._repr_html_()
