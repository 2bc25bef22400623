"""Every study README's rendered blocks equal a fresh rendering from the committed outputs (no model run)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ANALYSES = ROOT / "analyses"
sys.path.insert(0, str(ANALYSES))

import readme_blocks  # noqa: E402

STUDIES = sorted(path.parent.name for path in ANALYSES.glob("*/run.py"))


def _tables(study: str):
    spec = importlib.util.spec_from_file_location(f"{study}_tables", ANALYSES / study / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("study", STUDIES)
def test_readme_blocks_match_committed_outputs(study):
    folder = ANALYSES / study
    assert (folder / "tables.py").exists(), f"{study} has no tables.py to render its README from its outputs"
    blocks = _tables(study).render(folder)
    assert blocks, f"{study}: tables.render returned no blocks"
    stale = readme_blocks.stale_blocks(folder / "README.md", blocks)
    assert not stale, "README blocks differ from the committed outputs (rerun run.py or tables.py):\n" + "\n".join(
        f"--- {name} committed\n{old}\n+++ rendered\n{new}" for name, (old, new) in stale.items()
    )


def test_block_check_fails_on_a_hand_edit(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- begin t -->\n| a |\n<!-- end t -->\nouter 0.5\n")
    assert readme_blocks.stale_blocks(readme, {"t": "| a |"}) == {}
    assert set(readme_blocks.stale_blocks(readme, {"t": "| b |"})) == {"t"}
    readme_blocks.write_blocks(readme, {"t": "| b |"})
    assert readme.read_text() == "intro\n<!-- begin t -->\n| b |\n<!-- end t -->\nouter 0.5\n"
    with pytest.raises(ValueError, match="without markers"):
        readme_blocks.stale_blocks(readme, {"t": "x", "u": "y"})
    with pytest.raises(ValueError, match="without a renderer"):
        readme_blocks.stale_blocks(readme, {})


def test_study_figures_work_offline():
    """No study writes a figure that needs the network: no plotly.js from a CDN, no committed page with an external script."""
    for run in ANALYSES.glob("*/run.py"):
        text = run.read_text()
        assert 'include_plotlyjs="cdn"' not in text and "include_plotlyjs='cdn'" not in text, run
    for page in ANALYSES.glob("**/*.html"):
        assert 'src="http' not in page.read_text(errors="replace"), page
