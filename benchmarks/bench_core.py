"""Benchmark the core against its anchors on the embedded model (CPU), printing ratios and peak memory.

1. Capture of all 30 layers' resid_post vs a plain HF eager forward on the same 8 x 128 tokens
   (target <= 1.05x); TransformerLens's full ``run_with_cache`` for context.
2. Semantic basis by float64 Gram solve vs ``torch.linalg.pinv`` (fp32 and fp64), accuracy against fp64
   pinv (target >= 4x at the same accuracy); cached load.
3. Per-layer readouts (all layers, full vocabulary, top-k, ranks, KL) vs the compute floor measured in
   the same run (the bare chunked matmuls the readouts need; target <= 1.3x per readout), and the
   logit-lens readout vs TransformerLens's ``tools.analysis.logit_lens`` on the same 4 x 128 tokens
   (target >= 2.5x faster, <= 1/8 of its peak memory). Memory is measured in subprocesses.

Run:  python benchmarks/bench_core.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from _measure import interleaved_medians, token_batch  # noqa: E402


def load():
    from transformers import AutoModelForCausalLM

    import vsem_lens as vl

    model = vl.load_model("embedded")
    hf = AutoModelForCausalLM.from_pretrained(vl.core.loading.embedded_model_dir(), attn_implementation="eager").eval()
    return vl, model, hf


def bench_capture(vl, model, hf, repeats):
    from vsem_lens.core.models import Tokens

    ids = token_batch(model.tokenizer, 8, 128)
    mask = torch.ones_like(ids)
    texts_tokens = Tokens(ids, mask)

    def hf_forward():
        with torch.no_grad():
            hf(ids, attention_mask=mask)

    def ours():
        return vl.capture(model, texts_tokens, batch_size=8)

    def tl_full_cache():
        with torch.no_grad():
            model.bridge.run_with_cache(ids)

    t = interleaved_medians({"hf": hf_forward, "ours": ours, "tl_full": tl_full_cache}, repeats=repeats)
    print("\n[1] capture, 8 x 128 tokens, all 30 layers' resid_post (median of interleaved runs)")
    print(f"    HF eager forward           {t['hf']:.3f} s  = 1.00")
    print(f"    vsem-lens capture          {t['ours']:.3f} s  = {t['ours'] / t['hf']:.2f}x  (target <= 1.05x)")
    print(f"    TL run_with_cache (all)    {t['tl_full']:.3f} s  = {t['tl_full'] / t['hf']:.2f}x")
    return {"capture_ratio": t["ours"] / t["hf"], "tl_full_cache_ratio": t["tl_full"] / t["hf"]}


def bench_basis(vl, model, repeats):
    W = model.W_U
    results = {}
    start = time.perf_counter(); ref = torch.linalg.pinv(W.double()); results["pinv64"] = time.perf_counter() - start
    start = time.perf_counter(); p32 = torch.linalg.pinv(W); results["pinv32"] = time.perf_counter() - start
    start = time.perf_counter(); g64 = vl.readout.pinv_by_gram(W); results["gram64"] = time.perf_counter() - start
    start = time.perf_counter(); g32 = vl.readout.pinv_by_gram(W, compute_dtype=torch.float32); results["gram32"] = time.perf_counter() - start
    t = interleaved_medians(
        {"pinv64": lambda: torch.linalg.pinv(W.double()), "gram64": lambda: vl.readout.pinv_by_gram(W)}, repeats=repeats, warmup=0
    )
    vl.SemanticBasis.from_model(model)  # fill the cache
    start = time.perf_counter(); vl.SemanticBasis.from_model(model); cached = time.perf_counter() - start

    def rel(x):
        return float((x.double() - ref).norm() / ref.norm())

    print("\n[2] semantic basis of W_U [576 x 49152]")
    print(f"    torch.linalg.pinv fp64     {t['pinv64']:.2f} s   (fp32: {results['pinv32']:.2f} s, rel. err {rel(p32):.1e})")
    print(f"    Gram solve fp64 (ours)     {t['gram64']:.2f} s   rel. err vs fp64 pinv {rel(g64):.1e}")
    print(f"    speed-up at fp64 accuracy  {t['pinv64'] / t['gram64']:.1f}x  (target >= 4x)")
    print(f"    Gram solve fp32            {results['gram32']:.2f} s   rel. err {rel(g32):.1e} (why we solve in fp64)")
    print(f"    cached load                {cached * 1000:.0f} ms")
    return {"basis_speedup": t["pinv64"] / t["gram64"], "basis_rel_err": rel(g64), "basis_cached_ms": cached * 1000}


READOUT_WORKER = r"""
import json, os, sys, time, torch
os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, {bench_dir!r})
from _measure import PeakRSS, token_batch
import vsem_lens as vl
from vsem_lens.core.capture import ActivationBatch
mode = {mode!r}
model = vl.load_model("embedded")
basis = vl.SemanticBasis.from_model(model)
ids = token_batch(model.tokenizer, 4, 128)
mask = torch.ones_like(ids)
# Capture once outside the timed region: the readouts are timed on the same residuals for every mode.
from vsem_lens.core.models import Tokens
resid = vl.capture(model, Tokens(ids, mask))["resid_post"]
n = resid.shape[1]
batch = ActivationBatch(acts={{"resid_post": resid}}, layers=list(range(30)), tokens=Tokens(ids, mask),
                        doc_index=torch.arange(n) // 128, positions=torch.arange(n) % 128, token_ids=ids.reshape(-1))
W, b, unit = model.W_U, model.b_U, basis.unit_vectors
lens_readout = vl.readout.ReadoutKernel.for_model(model, basis=basis, readouts=("lens",), k=5)
both_readout = vl.readout.ReadoutKernel.for_model(model, basis=basis, k=5)
aff_readout = vl.readout.ReadoutKernel.for_model(model, basis=basis, readouts=("affinity",), k=5)
def floor(which):
    with torch.no_grad():
        for s in range(0, n, 512):
            for l in range(30):
                h = model.final_norm(resid[l, s:s + 512])
                if "lens" in which: h @ W + b
                if "affinity" in which: (h / h.norm(dim=-1, keepdim=True)) @ unit.T
def tl():
    from transformer_lens.tools.analysis import logit_lens
    with torch.no_grad():
        return logit_lens(model.bridge, ids, positions=None, return_type="logits")
fns = {{
    "floor_lens": lambda: floor(("lens",)), "ours_lens": lambda: lens_readout.read_batch(batch),
    "floor_affinity": lambda: floor(("affinity",)), "ours_affinity": lambda: aff_readout.read_batch(batch),
    "floor_both": lambda: floor(("lens", "affinity")), "ours_both": lambda: both_readout.read_batch(batch),
    "tl": tl,
}}
fn = fns[mode]
times = []
# The warm-up call is inside the peak measurement: buffers allocated once and reused count too.
with PeakRSS() as peak:
    fn()  # warm-up
    for _ in range({repeats}):
        start = time.perf_counter(); out = fn(); times.append(time.perf_counter() - start); del out
times.sort()
print(json.dumps({{"time": times[len(times) // 2], "peak_mib": peak.extra_mib}}))
"""


def bench_readouts(repeats):
    modes = ["floor_lens", "ours_lens", "floor_affinity", "ours_affinity", "floor_both", "ours_both", "tl"]
    res = {}
    for mode in modes:
        code = READOUT_WORKER.format(bench_dir=os.path.dirname(os.path.abspath(__file__)), mode=mode, repeats=repeats)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-3000:])
            raise SystemExit(f"readout worker {mode} failed")
        res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    print("\n[3] readouts: 4 x 128 tokens, all 30 layers, full vocabulary (49,152), top-5 + rank + prob + KL")
    for name in ("lens", "affinity", "both"):
        f, o = res[f"floor_{name}"], res[f"ours_{name}"]
        print(
            f"    {name:<9} floor {f['time']:.2f} s  ours {o['time']:.2f} s  = {o['time'] / f['time']:.2f}x floor "
            f"(target <= 1.3x)   peak +{o['peak_mib']:.0f} MiB"
        )
    tl, ours = res["tl"], res["ours_lens"]
    print(
        f"    TL logit_lens (logits only, positions=None): {tl['time']:.2f} s, peak +{tl['peak_mib']:.0f} MiB -> "
        f"ours is {tl['time'] / ours['time']:.1f}x faster (target >= 2.5x) with "
        f"{ours['peak_mib'] / max(tl['peak_mib'], 1):.3f} of its peak memory (target <= 0.125)"
    )
    return {f"{k}_{m}": v[m] for k, v in res.items() for m in ("time", "peak_mib")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=["capture", "basis", "readouts"], default=None)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    summary = {}
    if args.only in (None, "capture", "basis"):
        vl, model, hf = load()
        if args.only in (None, "capture"):
            summary.update(bench_capture(vl, model, hf, args.repeats))
        if args.only in (None, "basis"):
            summary.update(bench_basis(vl, model, args.repeats))
        del hf
    if args.only in (None, "readouts"):
        summary.update(bench_readouts(args.repeats))
    print("\n" + json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
