"""Tuned-lens training on two torchrun ranks (DistributedDataParallel, gloo) vs one process, same work.

Runs ``vsem-lens lens train`` on the embedded model and the embedded corpus twice with identical
hyper-parameters: once as one process (torch's default threads) and once as
``torchrun --nproc_per_node=2 ... --distributed`` (one thread per rank, as torchrun sets). Reported:
wall time of the whole command (imports and model load included), the training time rank 0 records
(``train_seconds`` in the lens's ``config.json``), the ratios two/one, and the largest difference
between the two lenses' weights (DDP averages gradients, so the lenses agree to float32 rounding).

Run it niced on a shared machine:

    nice -n 5 python benchmarks/bench_tuned_lens_ranks.py [--steps 6] [--tokens-per-step 512] [--fp32]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

from _measure import run_cli  # noqa: E402


def train(out: Path, *, ranks: int, steps: int, tokens: int, bf16: bool) -> dict:
    wall = run_cli(["lens", "train", "--steps", str(steps), "--tokens-per-step", str(tokens), "--checkpoint-every",
                    str(steps), "--no-cache", "--out", str(out), "--quiet"] + (["--bf16"] if bf16 else []), ranks=ranks)
    summary = json.loads((out / "config.json").read_text())["summary"]
    return {"ranks": ranks, "wall_s": round(wall, 1), "train_s": summary["train_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="optimiser steps (default 6)")
    parser.add_argument("--tokens-per-step", type=int, default=512, help="tokens per step (default 512)")
    parser.add_argument("--fp32", action="store_true", help="float32 vocabulary matmuls (default: --bf16)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    import torch
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for ranks in (1, 2):
            out = Path(tmp) / f"lens-{ranks}"
            runs[ranks] = train(out, ranks=ranks, steps=args.steps, tokens=args.tokens_per_step, bf16=not args.fp32)
            runs[ranks]["weights"] = load_file(out / "weights.safetensors")
            print(f"{ranks} rank(s): wall {runs[ranks]['wall_s']:.1f} s, training {runs[ranks]['train_s']:.1f} s",
                  flush=True)
    diff = max(float((runs[1]["weights"][k] - runs[2]["weights"][k]).abs().max()) for k in runs[1]["weights"])
    scale = max(float(v.abs().max()) for v in runs[1]["weights"].values())
    print(f"\n{args.steps} steps x {args.tokens_per_step} tokens, {'fp32' if args.fp32 else 'bf16'} vocabulary matmuls, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    print(f"two ranks / one process: wall {runs[2]['wall_s'] / runs[1]['wall_s']:.2f}x, "
          f"training {runs[2]['train_s'] / runs[1]['train_s']:.2f}x")
    print(f"max |weight difference| {diff:.2e} (largest weight {scale:.2e})")
    if args.json:
        results = {
            "steps": args.steps, "tokens_per_step": args.tokens_per_step, "matmuls": "fp32" if args.fp32 else "bf16",
            "torch": torch.__version__, "cpus": os.cpu_count(),
            "one": {k: v for k, v in runs[1].items() if k != "weights"},
            "two": {k: v for k, v in runs[2].items() if k != "weights"},
            "wall_ratio_two_over_one": round(runs[2]["wall_s"] / runs[1]["wall_s"], 3),
            "train_ratio_two_over_one": round(runs[2]["train_s"] / runs[1]["train_s"], 3),
            "max_weight_difference": diff, "largest_weight": scale,
        }
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
