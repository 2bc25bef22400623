"""Benchmark tuned-lens training throughput against its compute floor on the embedded model (CPU).

Training one step on T tokens needs at least: one forward of the model over the T tokens (to capture
every layer's residual) and, per layer, the lens logits over the full vocabulary (one [T, d] x [d, V]
unembedding) -- the *floor* measured here. The real step also needs the backward matmul through the
unembedding (``(q - p) W_U^T``, the same size again) plus the softmax / KL passes over [T, V], so about
2x the floor is the best an exact full-vocabulary trainer can do. Reported: tokens/s of a training step
(median of steps after the first, from ``TunedLens.fit``'s own per-step timing) in float32 and with
bfloat16 vocabulary matmuls, the floor in float32 and bfloat16, and the ratios, all in one run.

Run:  python benchmarks/bench_tuned_lens.py [--tokens 256] [--steps 4] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from _measure import PeakRSS, corpus_texts, interleaved_medians, token_batch  # noqa: E402


def step_seconds(vl, model, texts, tokens, steps, dtype):
    """Per-step wall times of TunedLens.fit (capture + loss + backward + update), first step dropped."""
    from vsem_lens.lenses.tuned import TunedLens

    times: list[float] = []
    last = [0.0]

    def record(step, info):
        times.append(info["seconds"] - last[0])
        last[0] = info["seconds"]

    with PeakRSS() as rss:
        TunedLens.fit(model, texts, steps=steps, tokens_per_step=tokens, unembed_dtype=dtype, progress=False,
                      callback=record)
    return statistics.median(times[1:] if len(times) > 1 else times), rss.extra_mib


def floor_fn(model, ids, dtype):
    """A plain forward over the tokens + one full unembedding of every layer's residual."""
    from vsem_lens.core.models import Tokens

    W = model.W_U.to(dtype)
    mask = torch.ones_like(ids)
    toks = Tokens(ids, mask)
    n_layers = model.n_layers

    # Stand-in residuals of the captured shape (matmul cost does not depend on the values).
    resid = torch.randn(n_layers, ids.numel(), model.d_model).to(dtype)

    def run():
        model.forward(toks)
        for layer in range(n_layers):
            for start in range(0, resid.shape[1], 256):
                _ = resid[layer, start : start + 256] @ W

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256, help="tokens per step (default 256)")
    parser.add_argument("--steps", type=int, default=4, help="training steps per measurement (default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="floor repeats (default 3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's; 1 is steadier on a CPU shared with other jobs)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import vsem_lens as vl

    started = time.perf_counter()
    model = vl.load_model("embedded")
    print(f"model {model.name}: {model.n_layers} layers, d_model {model.d_model}, d_vocab {model.d_vocab}; "
          f"torch threads {torch.get_num_threads()}; loaded in {time.perf_counter() - started:.1f} s")
    texts = corpus_texts(400)
    ids = token_batch(model.tokenizer, 1, args.tokens)
    T = args.tokens

    floors = interleaved_medians(
        {"float32": floor_fn(model, ids, torch.float32), "bfloat16": floor_fn(model, ids, torch.bfloat16)},
        repeats=args.repeats,
    )
    results = {}
    for dtype in ("float32", "bfloat16"):
        seconds, extra = step_seconds(vl, model, texts, T, args.steps, dtype)
        results[dtype] = (seconds, extra)

    print(f"\nTuned-lens training step on {T} tokens ({model.n_layers - 1} translators, full vocabulary):")
    print(f"{'':38s} {'s/step':>8s} {'tokens/s':>9s} {'x floor fp32':>13s} {'x floor bf16':>13s} {'peak +MiB':>10s}")
    for name, seconds in (("floor: forward + 30 unembeddings fp32", floors["float32"]),
                          ("floor: forward + 30 unembeddings bf16", floors["bfloat16"])):
        print(f"{name:38s} {seconds:8.2f} {T / seconds:9.1f} {seconds / floors['float32']:13.2f} "
              f"{seconds / floors['bfloat16']:13.2f} {'':>10s}")
    for dtype, (seconds, extra) in results.items():
        name = f"training step, {dtype} unembedding"
        print(f"{name:38s} {seconds:8.2f} {T / seconds:9.1f} {seconds / floors['float32']:13.2f} "
              f"{seconds / floors['bfloat16']:13.2f} {extra:10.0f}")
    print("\nAn exact trainer needs >= ~2x its own floor (the backward matmul through W_U is as large as the "
          "forward one).")


if __name__ == "__main__":
    main()
