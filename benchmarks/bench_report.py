"""Benchmark `build_report` on the embedded model against a plain HF forward over the same token batches.

For each corpus size N (tokens of the embedded corpus, repeated if it is shorter), a fresh child process
(so that peak RSS is per N) loads the model (excluded from every timing) and measures:

- ``hf``: ``AutoModelForCausalLM`` (eager attention, as the bridge uses) from
  ``vsem_lens.core.loading.embedded_model_dir()``, forward over exactly the report's token batches (same
  length-sorted, right-padded batches of 8 texts).
- ``report``: ``build_report(model, texts, max_tokens=N)`` with the default ``lens_tokens`` plus
  ``Report.save`` (HTML, CSV, JSON) into a temporary directory. Target: <= 3x ``hf``.
- ``report_all`` (``--all``): the same with ``lens_tokens="all"`` (every token read out at every layer,
  two readouts), against the compute floor measured in the same process: ``hf`` + bare
  ``torch.matmul`` of the readout shapes (``N x layers x 2`` rows of ``[d_model] @ [d_model, d_vocab]``
  in products of the engine's row count; a sample of the products is timed and scaled linearly).
  Target: <= 1.3x the floor.
- peak RSS: the child's peak (model weights, both copies, included) and the growth during the report
  (sampled every 2 ms).

Run:  python benchmarks/bench_report.py [--tokens 8192 65536] [--all] [--lens-tokens N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

from _measure import repeat_to_tokens  # noqa: E402


def _texts_with_tokens(model, n_tokens: int) -> list[str]:
    from vsem_lens.core.corpus import load_corpus

    base = load_corpus("default")
    lengths = [len(row) for row in model.token_ids(base, max_length=model.n_ctx)]
    return repeat_to_tokens(base, lengths, n_tokens), "default corpus"


def child(n_tokens: int, lens_tokens: int | None, do_all: bool) -> dict:
    import resource

    import torch
    from _measure import PeakRSS
    from transformers import AutoModelForCausalLM

    import vsem_lens as vl
    from vsem_lens.core.loading import embedded_model_dir
    from vsem_lens.readout import LensAggregator
    from vsem_lens.report import plan_corpus
    from vsem_lens.report.build import DEFAULT_LENS_TOKENS, build_report

    lens_tokens = lens_tokens or DEFAULT_LENS_TOKENS
    model = vl.load_model("embedded")
    hf = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), dtype=torch.float32, attn_implementation="eager").eval()
    texts, source = _texts_with_tokens(model, n_tokens)
    plan = plan_corpus(model, texts, max_tokens=n_tokens, lens_tokens=lens_tokens, batch_size=8, seed=0)
    batches = [model.pad([plan.rows[i] for i in ids]) for ids in plan.batches]

    def hf_forward() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for tokens in batches:
                hf(input_ids=tokens.ids, attention_mask=tokens.mask)
        return time.perf_counter() - start

    # Warm up: the basis cache, kernels, allocator (a tiny report and one HF batch).
    build_report(model, texts[:4], max_tokens=64, lens_tokens=16)
    with torch.no_grad():
        hf(input_ids=batches[0].ids, attention_mask=batches[0].mask)

    out = {"n_tokens": plan.n_tokens, "texts": len(plan.texts), "corpus": source, "lens_tokens": lens_tokens,
           "threads": torch.get_num_threads()}

    def timed_report(lens):
        with tempfile.TemporaryDirectory() as tmp, PeakRSS() as mem:
            start = time.perf_counter()
            report = build_report(model, texts, max_tokens=n_tokens, lens_tokens=lens)
            report.save(os.path.join(tmp, "report"))
            seconds = time.perf_counter() - start
        return seconds, mem.extra_mib, report.summary["timings_s"]

    # Interleave the anchor around the report so load drift hits both.
    hf_a = hf_forward()
    out["report_s"], out["report_extra_mib"], out["report_stages"] = timed_report(lens_tokens)
    hf_b = hf_forward()
    out["hf_s"] = min(hf_a, hf_b)
    out["hf_s_runs"] = [hf_a, hf_b]
    out["ratio_report_vs_hf"] = out["report_s"] / out["hf_s"]
    if do_all:
        out["report_all_s"], out["report_all_extra_mib"], out["report_all_stages"] = timed_report("all")
        # Compute floor: bare matmuls of the readout shapes (rows per product as the engine uses).
        agg = LensAggregator(model, vl.SemanticBasis.from_model(model))
        rows = agg.tokens_per_chunk * len(agg.layers)
        total_rows = plan.n_tokens * len(agg.layers) * 2
        n_products = -(-total_rows // rows)
        sample = min(n_products, 96)
        h = torch.randn(rows, model.d_model)
        W_U, unit_T = model.W_U, agg.kernel.unit_T
        torch.matmul(h, W_U)
        start = time.perf_counter()
        for i in range(sample):
            torch.matmul(h, W_U if i % 2 == 0 else unit_T)
        mm_s = (time.perf_counter() - start) * n_products / sample
        hf_c = hf_forward()
        out["hf_s_runs"].append(hf_c)
        out["floor_matmul_s"] = mm_s
        out["floor_s"] = min(out["hf_s_runs"]) + mm_s
        out["ratio_all_vs_floor"] = out["report_all_s"] / out["floor_s"]
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192], help="corpus sizes N (default 8192)")
    parser.add_argument("--all", action="store_true", help="also time lens_tokens='all' against the compute floor")
    parser.add_argument("--lens-tokens", type=int, default=None, help="lens_tokens of the default run")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.lens_tokens, args.all)))
        return
    results = []
    for n in args.tokens:
        command = [sys.executable, __file__, "--child", str(n)] + (["--all"] if args.all else [])
        if args.lens_tokens:
            command += ["--lens-tokens", str(args.lens_tokens)]
        print(f"N = {n}: running ...", flush=True)
        proc = subprocess.run(command, capture_output=True, text=True)
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            print(proc.stderr[-3000:])
            raise SystemExit(f"child for N={n} failed")
        r = json.loads(line[-1][7:])
        results.append(r)
        print(f"  corpus: {r['corpus']}, {r['n_tokens']} tokens in {r['texts']} texts, {r['threads']} threads")
        print(f"  plain HF forward           {r['hf_s']:8.1f} s   ({1000 * r['hf_s'] / r['n_tokens']:.2f} ms/token)")
        print(f"  report (lens_tokens={r['lens_tokens']})   {r['report_s']:8.1f} s   ratio {r['ratio_report_vs_hf']:.2f}x "
              f"(target <= 3x), growth {r['report_extra_mib']:.0f} MiB")
        stages = {k: v for k, v in r["report_stages"].items() if not k.startswith("total")}
        print("    stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in stages.items()))
        if "report_all_s" in r:
            print(f"  report (lens_tokens=all)   {r['report_all_s']:8.1f} s   floor {r['floor_s']:.1f} s (HF "
                  f"{min(r['hf_s_runs']):.1f} + matmul {r['floor_matmul_s']:.1f}) -> ratio {r['ratio_all_vs_floor']:.2f}x "
                  f"(target <= 1.3x), growth {r['report_all_extra_mib']:.0f} MiB")
            stages = {k: v for k, v in r["report_all_stages"].items() if not k.startswith("total")}
            print("    stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in stages.items()))
        print(f"  peak RSS of the process    {r['peak_rss_mib']:8.0f} MiB (model weights x2 included)")
    if len(results) > 1:
        a, b = results[0], results[-1]
        print(f"peak RSS N={a['n_tokens']}: {a['peak_rss_mib']:.0f} MiB vs N={b['n_tokens']}: {b['peak_rss_mib']:.0f} MiB "
              f"(report growth {a['report_extra_mib']:.0f} vs {b['report_extra_mib']:.0f} MiB)")


if __name__ == "__main__":
    main()
