"""Benchmark tables of the documentation, rendered from the committed results in ``benchmarks/results/``.

Each benchmark quoted in ``docs/`` writes its numbers with ``--json benchmarks/results/NAME.json``; the
pages mark the quoted tables with ``<!-- begin NAME -->`` / ``<!-- end NAME -->`` and this module
renders them from those files only (no benchmark is run). ``tests/test_benchmark_docs.py`` fails when
a page differs from its rendering, so no benchmark number in the docs lacks a committed output.
Re-render after a new benchmark run with ``python benchmarks/doc_tables.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "analyses"))

from readme_blocks import fmt, markdown_table, write_blocks  # noqa: E402


def _load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def _mib(value: float) -> str:
    return f"{value:,.0f} MiB"


def long_input() -> str:
    data = _load("long_input")
    ours, hf = data["results"]["ours"], data["results"]["hf_sdpa"]
    tokens = f"{data['tokens']:,}"
    rows = [
        {"case": f"{tokens} tokens: `capture` (SDPA attention, every layer's `resid_post`)", **ours},
        {"case": f"{tokens} tokens: plain HF decoder forward, SDPA, `output_hidden_states=True`", **hf},
    ]
    table = markdown_table(rows, {
        "One text, SmolLM2": "case", "time": lambda r: f"{r['seconds']:.1f} s",
        "peak growth": lambda r: _mib(r["peak_extra_mib"]), "process max RSS": lambda r: _mib(r["ru_maxrss_mib"]),
    }, align="lrrr")
    r = data["ratios"]
    return (f"{table}\n\nRatios ours / HF: time {r['time']:.2f}x, peak growth {r['peak_extra']:.2f}x, "
            f"max RSS {r['maxrss']:.2f}x (target: within 1.2x). `benchmarks/results/long_input.json`.")


def report_memory() -> str:
    data = _load("scale")
    rows = sorted(data["memory"], key=lambda r: r["tokens"])
    header = {"Peak RSS of `vsem-lens report`": "label"}
    cells = {"label": f"`--model {data['model']}`" + (" (random d 128, 4 layers, 1k vocabulary: the same code path)"
                                                       if data["model"] == "small" else "")}
    for r in rows:
        header[f"{r['tokens']:,} tokens"] = str(r["tokens"])
        cells[str(r["tokens"])] = _mib(r["peak_rss_mib"])
    table = markdown_table([cells], header, align="l" + "r" * len(rows))
    return (f"{table}\n\nPeak growth from the smallest to the largest corpus: {100 * data['memory_growth']:+.1f}% over a "
            f"{rows[-1]['tokens'] / rows[0]['tokens']:.0f}x larger corpus (target: within 10%). "
            "`benchmarks/results/scale.json`.")


def report_ranks() -> str:
    data = _load("scale")
    d = data["distributed"]
    one, two = d["one"], d["two"]
    rows = [
        {"label": "one process, torch's threads", **one},
        {"label": "`torchrun --nproc_per_node=2 ... --distributed` (1 thread per rank)", **two},
        {"label": "ratio two ranks / one process", "wall_s": d["wall_ratio_two_over_one"],
         "build_report_s": d["build_report_ratio_two_over_one"], "pass_s": d["pass_ratio_two_over_one"], "ratio": True},
    ]

    def cell(key):
        return lambda r: fmt(r[key], 2) if r.get("ratio") else f"{r[key]:.1f} s"

    title = f"Two processes vs one ({data['dist_model']} model, {one['tokens']:,} tokens)"
    table = markdown_table(rows, {title: "label", "wall": cell("wall_s"), "`build_report`": cell("build_report_s"),
                                  "streaming pass": cell("pass_s")}, align="lrrr")
    return (f"{table}\n\nPeak RSS of the streaming pass: {_mib(one['peak_rss_mib_per_rank'][0])} in one process, "
            f"{' and '.join(_mib(v) for v in two['peak_rss_mib_per_rank'])} per rank; {_mib(one['peak_rss_mib'])} "
            "for the whole one-process run (model weights included). `benchmarks/results/scale.json`.")


def lens_ranks() -> str:
    data = _load("tuned_lens_ranks")
    one, two = data["one"], data["two"]
    rows = [
        {"label": "one process, torch's threads", **one},
        {"label": "`torchrun --nproc_per_node=2 ... --distributed` (1 thread per rank)", **two},
    ]
    table = markdown_table(rows, {
        f"{data['steps']} steps x {data['tokens_per_step']} tokens, {data['matmuls']} vocabulary matmuls": "label",
        "wall": lambda r: f"{r['wall_s']:.1f} s", "training (rank 0)": lambda r: f"{r['train_s']:.1f} s",
    }, align="lrr")
    return (f"{table}\n\nRatio two ranks / one process: wall {data['wall_ratio_two_over_one']:.2f}, training "
            f"{data['train_ratio_two_over_one']:.2f}. The two lenses differ by at most "
            f"{data['max_weight_difference']:.1e} (largest weight {data['largest_weight']:.2f}). "
            "`benchmarks/results/tuned_lens_ranks.json`.")


def istar_step() -> str:
    data = _load("istar_step")
    sides = data["sides"]
    labels = {"hf_ce": "plain CE step (HF model, SDPA)", "istar": "I-STAR step (lambda -5, all 30 layers)",
              "istar_lambda0": "our loop with lambda = 0 (hooks, no penalty)"}
    rows = [{"label": labels[name], **side} for name, side in sides.items()]
    table = markdown_table(rows, {
        "one step, 8 prompts, full fine-tuning": "label", "median time": lambda r: f"{r['median_s']:.2f} s",
        "peak RSS growth": lambda r: _mib(r["peak_rss_growth_mib"]),
    }, align="lrr")
    s = data["summary"]
    return (f"{table}\n\nI-STAR step / CE step: {s['istar_vs_ce_time']:.2f}x time (target 1.3x), "
            f"{s['istar_vs_ce_peak_memory']:.2f}x peak memory; with C0's per-epoch pass spread over the epoch's "
            f"steps {s['istar_with_c0_amortised_vs_ce_time']:.2f}x. `benchmarks/results/istar_step.json` "
            f"({s['threads']} thread, {s['steps']} timed steps per side).")


def probe_cost() -> str:
    d = _load("probe")
    return (f"`vl.probe` on one {d['tokens']}-token prompt, all {d['layers']} layers, both readouts (table and two "
            f"figures): {d['probe_s']:.2f} s against {d['anchor_s']:.2f} s for one plain HF forward plus the bare "
            f"readout products of every layer, **{d['ratio']:.2f}x** ({d['threads']} thread, median of {d['repeats']} "
            f"interleaved repeats; target 1.5x). In a notebook its first output is {d['html_bytes'] / 2**20:.1f} MiB, of "
            f"which {d['plotly_js_bytes'] / 2**20:.1f} MiB is plotly.js; a second probe's output is "
            f"{d['later_html_bytes'] / 2**10:,.0f} KiB: plotly.js travels {d['plotly_js_copies']} time(s) per "
            "notebook, in the kernel's first figure output. "
            "`benchmarks/results/probe.json`.")


#: Page -> {block name: renderer}.
PAGES = {
    ROOT / "docs" / "scale.md": {
        "long_input": long_input, "report_memory": report_memory, "report_ranks": report_ranks,
        "lens_ranks": lens_ranks,
    },
    ROOT / "docs" / "cli" / "istar.md": {"istar_step": istar_step},
    ROOT / "docs" / "api" / "report.md": {"probe_cost": probe_cost},
}


def render(page: Path) -> dict[str, str]:
    """``{block name: markdown}`` of one page, from the committed results."""
    return {name: fn() for name, fn in PAGES[page].items()}


if __name__ == "__main__":
    for page in PAGES:
        write_blocks(page, render(page))
        print(f"rendered {page.relative_to(ROOT)}")
