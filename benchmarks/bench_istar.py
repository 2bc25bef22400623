"""Benchmark one I-STAR training step against one plain cross-entropy step on the same batch.

The anchor is plain CE fine-tuning written as cheaply as Hugging Face allows: the embedded model's
decoder (SDPA attention), its final hidden state at the last prompt token times the LM head's rows of
the label tokens (no full-vocabulary logits), cross-entropy, backward, AdamW step. Ours is one step of :func:`vsem_lens.calibration.istar_finetune.istar_finetune`'s loop: the
forward through the TransformerLens bridge with every block's ``resid_post`` kept by the hooks (with
gradients), CE + ``lambda * (1 - IsoScore*)`` over all 30 layers' states pooled (zeta 0.2, C0 from the
training split), backward, AdamW step. A third side runs our loop with ``lambda = 0`` (no penalty), to
separate the cost of the hooks from the cost of the penalty.

Batch: 8 sentiment training prompts (max_length 64), full fine-tuning. Each side runs in its own
process (peak memory is per process), single-threaded by default, with one warm-up step; the
median of ``--steps`` steps is reported with the peak RSS growth during the steps (optimizer state
included: it is allocated in the warm-up step, before the measurement starts, for every side). Also
reported: the time to compute C0 over the training split (once per epoch), per training step.
Target: I-STAR step <= 1.3x the CE step.

    nice -n 5 python benchmarks/bench_istar.py [--steps 5] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

from _measure import PeakRSS  # noqa: E402

SIDES = ("hf_ce", "istar", "istar_lambda0")


def measure(side: str, steps: int, threads: int) -> dict:
    """One side's median step time and peak RSS growth (run in a fresh process)."""
    import torch
    import torch.nn.functional as F

    import vsem_lens as vl
    from vsem_lens.calibration.features import build_prompts, label_token_ids
    from vsem_lens.calibration.istar_finetune import IStarConfig, istar_loss, trainable_copy, training_covariance

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = vl.load_model("embedded")
    task = vl.calibration.load_task("sentiment")
    train = task.split("train")
    prompts, _ = build_prompts(model, task.template, train.texts, max_length=64)
    label_ids = label_token_ids(model, task.label_words)
    batch, y = prompts[:8], train.y[:8]
    extra: dict = {}
    if side == "hf_ce":
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(vl.core.loading.embedded_model_dir(), attn_implementation="sdpa").train()
        tokens = model.tokenize(batch)
        del model
        opt = torch.optim.AdamW(hf.parameters(), lr=1e-5, weight_decay=0.0)

        def step():  # the cheapest plain CE: no full-vocabulary logits, only the label tokens' rows
            hidden = hf.model(input_ids=tokens.ids, attention_mask=tokens.mask).last_hidden_state
            last = tokens.mask.sum(dim=1) - 1
            logits = hidden[torch.arange(len(batch)), last] @ hf.lm_head.weight[label_ids].T
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    else:
        weight = -5.0 if side == "istar" else 0.0
        config = IStarConfig(weight=weight, zeta=0.2).checked(model.n_layers)
        tuned = trainable_copy(model, config)
        del model
        layers = list(range(tuned.n_layers))
        c0 = None
        if weight != 0:
            began = time.perf_counter()
            c0 = training_covariance(tuned, prompts, layers)
            extra["c0_seconds"] = round(time.perf_counter() - began, 2)
            extra["c0_seconds_per_step"] = round(extra["c0_seconds"] / -(-len(prompts) // 8), 3)
        params = [p for p in tuned.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
        tokens = tuned.tokenize(batch)
        tuned.train()

        def step():
            parts = istar_loss(tuned, tokens, y, label_ids, config, c0)
            opt.zero_grad(set_to_none=True)
            parts["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, float("inf"))  # the loop measures the norm every step
            opt.step()

    step()  # warm-up: pages the weights in, allocates the optimizer state
    times = []
    with PeakRSS() as peak:
        for _ in range(steps):
            began = time.perf_counter()
            step()
            times.append(time.perf_counter() - began)
    return {"side": side, "median_s": round(statistics.median(times), 4), "times_s": [round(t, 4) for t in times],
            "peak_rss_growth_mib": round(peak.extra_mib, 1), "tokens": int(tokens.mask.sum()), **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--side", choices=SIDES, default=None, help=argparse.SUPPRESS)  # internal: one side
    args = parser.parse_args()
    if args.side:
        print(json.dumps(measure(args.side, args.steps, args.threads)))
        return
    results = {}
    for side in SIDES:
        cmd = [sys.executable, __file__, "--side", side, "--steps", str(args.steps), "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[side] = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps(results[side]), flush=True)
    ce, istar, zero = (results[s] for s in SIDES)
    summary = {
        "istar_vs_ce_time": round(istar["median_s"] / ce["median_s"], 3),
        "istar_lambda0_vs_ce_time": round(zero["median_s"] / ce["median_s"], 3),
        "istar_with_c0_amortised_vs_ce_time": round((istar["median_s"] + istar["c0_seconds_per_step"]) / ce["median_s"], 3),
        "istar_vs_ce_peak_memory": round(istar["peak_rss_growth_mib"] / max(ce["peak_rss_growth_mib"], 1.0), 3),
        "threads": args.threads, "steps": args.steps,
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"sides": results, "summary": summary}, f, indent=2)


if __name__ == "__main__":
    main()
