"""Benchmark: neural clustering head (features cached) vs LoRA fine-tuning on the same task (CPU).

Anchor: "calibration head vs LoRA / IA3 on the same task: accuracy and wall time". Both sides
use the embedded SmolLM2-135M-Instruct, the same zero-shot prompt, the same train/validation/test split
(sentiment when its data file is installed, else topic) and report test accuracy:

- head: the default clustering head on last-layer prompt features. Its time is reported twice:
  training only (features already in the cache, the usual situation when you iterate on heads) and
  including the one-off feature extraction (forward passes over train + validation + test);
- LoRA: r 8 on q_proj/v_proj of a fresh HF copy, 1 epoch over train, batch 8, max_length 64, CE over the
  label-token logits (vsem_lens.calibration.finetune.finetune_baseline); time = copy + training + test inference.

Target: at least LoRA's accuracy in at most 1/20 of its time. One torch thread (shared 2-core machine).

Run:  python benchmarks/bench_calibration.py            (about 2-3 minutes)
      python benchmarks/bench_calibration.py --task topic --method ia3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default=None, help="sentiment (default when installed) | topic | question")
    parser.add_argument("--method", default="lora", choices=["lora", "ia3"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")

    import torch

    import vsem_lens as vl
    from vsem_lens.calibration import NeuralClusteringHead, classification_metrics
    from vsem_lens.calibration.features import extract_features
    from vsem_lens.calibration.finetune import finetune_baseline
    from vsem_lens.calibration.shipped_tasks import embedded_task_names, load_task

    torch.set_num_threads(args.threads)
    name = args.task or ("sentiment" if "sentiment" in embedded_task_names() else "topic")
    model = vl.load_model("embedded")
    task = load_task(name)
    splits = {s: task.split(s) for s in ("train", "validation", "test")}
    feats = {s: extract_features(model, t, progress=False) for s, t in splits.items()}  # cached after the first run
    feature_seconds = sum(f.seconds for f in feats.values())
    bases = vl.SemanticBasis.from_model(model).for_words(task.label_words)

    started = time.perf_counter()
    head = NeuralClusteringHead(bases, classes=task.label_names)
    head.fit(feats["train"].head_input(), splits["train"].y, feats["validation"].head_input(), splits["validation"].y)
    pred = head.predict(feats["test"].head_input())
    head_seconds = time.perf_counter() - started
    head_metrics = classification_metrics(splits["test"].y, pred, task.n_classes)

    tuned = finetune_baseline(model, task, args.method, epochs=1, max_length=64, batch_size=8, seed=42)

    report = {
        "task": name,
        "n_train": len(splits["train"]),
        "n_test": len(splits["test"]),
        "threads": args.threads,
        "head": {**head_metrics, "train_seconds_features_cached": head_seconds,
                 "seconds_including_features": head_seconds + feature_seconds,
                 "epochs_run": len(head.history_), "best_epoch": head.best_epoch_},
        args.method: {"accuracy": tuned.accuracy, "macro_f1": tuned.macro_f1, "seconds": tuned.wall_time_s,
                      "train_seconds": tuned.details["train_seconds"], "trainable_params": tuned.details["trainable_params"]},
        "time_ratio_head_cached_over_finetune": head_seconds / tuned.wall_time_s,
        "time_ratio_head_with_features_over_finetune": (head_seconds + feature_seconds) / tuned.wall_time_s,
    }
    report["target_met"] = bool(
        head_metrics["accuracy"] >= tuned.accuracy and report["time_ratio_head_cached_over_finetune"] <= 1 / 20
    )
    print(json.dumps(report, indent=2))
    print(
        f"\n{name}: head acc {head_metrics['accuracy']:.3f} in {head_seconds:.1f} s (features cached; "
        f"{head_seconds + feature_seconds:.1f} s with extraction) vs {args.method} acc {tuned.accuracy:.3f} in "
        f"{tuned.wall_time_s:.1f} s -> time ratio 1/{tuned.wall_time_s / head_seconds:.0f} "
        f"(1/{tuned.wall_time_s / (head_seconds + feature_seconds):.1f} with extraction); target met: {report['target_met']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
