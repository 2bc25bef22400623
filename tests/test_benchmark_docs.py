"""Benchmark numbers quoted in docs/ equal a fresh rendering from the committed benchmarks/results/ (no benchmark run)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "analyses"))

import readme_blocks  # noqa: E402

_spec = importlib.util.spec_from_file_location("doc_tables", ROOT / "benchmarks" / "doc_tables.py")
doc_tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(doc_tables)


@pytest.mark.parametrize("page", sorted(doc_tables.PAGES), ids=lambda p: str(p.relative_to(ROOT)))
def test_benchmark_blocks_match_committed_results(page):
    stale = readme_blocks.stale_blocks(page, doc_tables.render(page))
    assert not stale, "benchmark tables differ from benchmarks/results/ (run benchmarks/doc_tables.py):\n" + "\n".join(
        f"--- {name} committed\n{old}\n+++ rendered\n{new}" for name, (old, new) in stale.items()
    )


def test_every_committed_result_is_quoted():
    used = {path.stem for path in (ROOT / "benchmarks" / "results").glob("*.json")}
    source = (ROOT / "benchmarks" / "doc_tables.py").read_text()
    assert used and all(f'_load("{name}")' in source for name in used), used
