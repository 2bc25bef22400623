"""The saved report in a real browser: headless Chromium opens index.html from disk (fresh profile).

Checked over the Chrome DevTools protocol (a small standard-library client in ``_cdp.py``): every figure
draws its plotly SVG, the console shows no error and no uncaught exception, no dialog opens (the
malicious example text stays text), and the page makes no network request at all (only the file itself
and the ``data:`` images plotly generates). A full-page screenshot is kept in the test's tmp dir and
copied to ``/tmp/vsem_report_screenshot.png``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from _cdp import find_chromium, render_report
from conftest import TINY_TEXTS

from vsem_lens.report.build import build_report

SCREENSHOT_COPY = Path("/tmp/vsem_report_screenshot.png")
EVIL = 'Evil <script>alert(1)</script> and "><img src=x onerror=alert(1)> done.'

pytestmark = pytest.mark.skipif(
    find_chromium() is None, reason="chromium is not installed (apt-get install chromium) - browser test skipped"
)


def test_report_renders_in_chromium(tiny_model, tmp_path):
    report = build_report(tiny_model, TINY_TEXTS * 3 + [EVIL], lens_tokens=50, examples=[EVIL, TINY_TEXTS[1]])
    out = report.save(tmp_path / "report")
    result = render_report(out / "index.html", tmp_path / "browser")

    figures = {item["id"]: item for item in result["figures"]}
    assert len(figures) == len(report.figures), figures
    for div_id, item in figures.items():
        assert not item["error"], f"{div_id} failed to draw"
        assert item["svg"] > 0, f"{div_id} has no plotly SVG"
        assert item["traces"] > 0, f"{div_id} has no traces"
    assert result["errors"] == [], result["errors"]
    external = [u for u in result["requests"] if not u.startswith(("file:", "data:", "blob:", "about:"))]
    assert external == [], external
    assert not any(u.rstrip("/").endswith("/x") for u in result["requests"])  # the <img src=x> never became a tag
    assert result["dialogs"] == 0
    assert result["title"].startswith("Layerwise semantic report")
    shot = result["screenshot"]
    assert shot.stat().st_size > 50_000
    try:
        shutil.copyfile(shot, SCREENSHOT_COPY)
    except OSError:
        pass  # the copy is a convenience; the artifact stays in tmp_path


def test_notebook_fragment_renders_in_chromium(tiny_model, tmp_path):
    """_repr_html_ (what Jupyter shows) draws every figure when inserted into a page, twice on one page (the second
    output without plotly.js, using the first one's)."""
    report = build_report(tiny_model, TINY_TEXTS, lens_tokens=20, examples=[TINY_TEXTS[0]])
    page = tmp_path / "notebook.html"
    page.write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>notebook</title></head><body>"
        f"<div class='cell'>{report._repr_html_()}</div><div class='cell'>{report._repr_html_()}</div></body></html>",
        encoding="utf-8",
    )
    result = render_report(page, tmp_path / "browser")
    assert len(result["figures"]) == 2 * len(report.figures)
    assert all(item["svg"] > 0 and not item["error"] for item in result["figures"]), result["figures"]
    assert result["errors"] == [], result["errors"]
    assert [u for u in result["requests"] if not u.startswith(("file:", "data:", "blob:", "about:"))] == []
