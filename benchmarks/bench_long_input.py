"""Benchmark the capture of one long text: one 8,192-token text (SmolLM2's whole context) through the
embedded model, every layer's ``resid_post``, against a plain Hugging Face forward with SDPA attention
on the same tokens (the decoder with ``output_hidden_states=True``: the same hidden states, no LM head).

Each side runs in its own process (so one side's freed memory cannot hide the other's peak), single
threaded by default, after a 16-token warm-up forward (the weights are memory-mapped: the first
forward pages them in). Reported per side: wall time of the call, peak RSS growth during the call (a 2 ms
sampling thread) and the process's ``ru_maxrss`` (model weights included); then the ratios ours / HF.
Target: within 1.2x of HF's time and memory. The text is the embedded corpus joined and cut to the
token count.

Run it niced on a shared machine:

    nice -n 5 python benchmarks/bench_long_input.py [--tokens 8192] [--threads 1] [--with-eager] [--json out.json]

``--with-eager`` adds a third process: the same capture with ``attention="eager"`` (the bridge's own
step-by-step attention, what every capture ran before SDPA was used; ~7.5 GB and several minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

from _measure import PeakRSS, token_batch  # noqa: E402

SIDES = ("ours", "hf_sdpa", "ours_eager")


def measure(side: str, n_tokens: int, threads: int) -> dict:
    """Load the embedded model, run ``side`` once on one ``n_tokens`` text, return time and memory."""
    import torch

    import vsem_lens as vl
    from vsem_lens.core.models import Tokens

    torch.set_num_threads(threads)
    model = vl.load_model("embedded")
    ids = token_batch(model.tokenizer, 1, n_tokens)
    if side.startswith("ours"):
        tokens = Tokens(ids, torch.ones_like(ids))
        extra = {"attention": "eager"} if side == "ours_eager" else {}

        def run():
            acts = vl.capture(model, tokens, batch_size=1, **extra)
            return tuple(acts["resid_post"].shape)
    else:
        from transformers import AutoModelForCausalLM

        del model
        hf = AutoModelForCausalLM.from_pretrained(vl.core.loading.embedded_model_dir(), attn_implementation="sdpa").eval()

        def run():
            with torch.no_grad():
                out = hf.model(ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
            hidden = out.hidden_states[1:]  # kept as HF returns them (no stacking copy)
            return (len(hidden), *hidden[0].shape[1:])

    warm = ids[:, :16]  # touch every weight page once (safetensors are memory-mapped) before measuring
    with torch.no_grad():
        model.bridge(warm) if side.startswith("ours") else hf.model(warm)
    with PeakRSS() as peak:
        start = time.perf_counter()
        shape = run()
        seconds = time.perf_counter() - start
    return {
        "side": side, "tokens": n_tokens, "threads": threads, "seconds": round(seconds, 2),
        "peak_extra_mib": round(peak.extra_mib, 1),
        "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "output_shape": list(shape),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--with-eager", action="store_true",
                        help="also run the capture with attention='eager' (the bridge's own attention; slow, ~7.5 GB)")
    parser.add_argument("--side", choices=SIDES, default=None, help=argparse.SUPPRESS)  # one side, in-process
    args = parser.parse_args()
    if args.side:
        print(json.dumps(measure(args.side, args.tokens, args.threads)))
        return
    results = {}
    sides = SIDES if args.with_eager else SIDES[:2]
    for side in sides:
        proc = subprocess.run(
            [sys.executable, __file__, "--side", side, "--tokens", str(args.tokens), "--threads", str(args.threads)],
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            raise SystemExit(f"{side} failed:\n{proc.stderr[-3000:]}")
        results[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    ours, hf = results["ours"], results["hf_sdpa"]
    print(f"one {args.tokens:,}-token text, all 30 layers' resid_post, {args.threads} thread(s)")
    print(f"{'':24}{'time s':>10}{'peak +MiB':>12}{'maxrss MiB':>12}")
    for side in sides:
        r = results[side]
        print(f"{side:24}{r['seconds']:>10.1f}{r['peak_extra_mib']:>12.0f}{r['ru_maxrss_mib']:>12.0f}")
    ratios = {
        "time": ours["seconds"] / hf["seconds"],
        "peak_extra": ours["peak_extra_mib"] / max(hf["peak_extra_mib"], 1.0),
        "maxrss": ours["ru_maxrss_mib"] / hf["ru_maxrss_mib"],
    }
    print(f"ratios ours / HF sdpa: time {ratios['time']:.2f}x, peak growth {ratios['peak_extra']:.2f}x, "
          f"max RSS {ratios['maxrss']:.2f}x (target <= 1.2x)")
    if args.with_eager:
        eager = results["ours_eager"]
        ratios["eager_over_sdpa_time"] = eager["seconds"] / ours["seconds"]
        ratios["eager_over_sdpa_peak_extra"] = eager["peak_extra_mib"] / max(ours["peak_extra_mib"], 1.0)
        print(f"attention='eager' / 'sdpa': time {ratios['eager_over_sdpa_time']:.2f}x, "
              f"peak growth {ratios['eager_over_sdpa_peak_extra']:.2f}x")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"tokens": args.tokens, "threads": args.threads, "results": results, "ratios": ratios}, handle, indent=2)


if __name__ == "__main__":
    main()
