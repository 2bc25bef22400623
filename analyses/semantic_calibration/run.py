"""Study: semantic calibration heads vs baselines on the embedded tasks with the embedded model.

For each embedded task (sentiment, topic, question; train/validation/test from the shipped files) and
SmolLM2-135M-Instruct (no BOS, the library's default rule):

- heads on last-layer LM-head-input features of the zero-shot prompt (cached features):
  clustering (CA pooled over the prompt's tokens; the default), clustering with CA on the vector only,
  clustering without CA, the prototype (encoder/decoder + MSE) with our loss, and the prototype with the
  authors' loss settings (softmax over raw cosines = temperature 1, lr 1e-4);
- baselines: zero-shot matmul logits, zero-shot affinity (cosine to the label bases), kNN, logistic
  probe, 1-shot-per-class ICL, LoRA and IA3 (1 epoch over train, max_length 64, batch 8);
- diagnostics of the affinity gap (docs/concepts/affinity.md: ``cos(s_i, h) = u_i^T G^-1 h / (||G^-1 u_i|| ||h||)``):
  the same argmax with each ingredient switched on separately (per-token normalisation of the
  unembedding rows, whitening by ``G^-1``), the affinity after centring the features on the train
  mean, and the zero-shot readouts with BOS prepended.

Wall times include the forward passes of the features a method uses (see vsem_lens.calibration.baselines). All
runs use ONE torch thread: the machine is a shared 2-core box where two OpenMP threads per process
were 7-30x slower than one under contention (measured; see the README).

Writes results.csv, results.json and table.md next to this file.

Run:  python analyses/semantic_calibration/run.py                 (about 15-20 min on one core)
      python analyses/semantic_calibration/run.py --tasks topic --skip lora,ia3,icl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent

HEADS = {
    "head:clustering": dict(head="clustering", pool="tokens"),
    "head:clustering (CA on vector)": dict(head="clustering", pool="vector"),
    "head:clustering (no CA)": dict(head="clustering", channel_attention=False, pool="vector"),
    "head:prototype": dict(head="prototype", pool="vector"),
    # The paper trains 100 epochs; at lr 1e-4 validation accuracy can sit still for 20 epochs early on,
    # so this row runs all 100 epochs (keeping the best validation epoch) instead of stopping early.
    "head:prototype (authors' loss: T=1, lr 1e-4)": dict(
        head="prototype", pool="vector", temperature=1.0, learn_temperature=False, lr=1e-4, patience=None
    ),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="sentiment,topic,question")
    parser.add_argument("--skip", default="", help="comma list of methods to skip: icl,lora,ia3,bos")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(HERE))
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of (task, method) pairs not rerun from an existing results.json in --out "
                             "(total_seconds then adds up the runs)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")

    import torch
    import torch.nn.functional as F

    import vsem_lens as vl
    from vsem_lens.calibration import NeuralClusteringHead, classification_metrics
    from vsem_lens.calibration.features import extract_features
    from vsem_lens.calibration.finetune import finetune_baseline
    from vsem_lens.calibration.icl import icl_baseline
    from vsem_lens.calibration.knn import knn_baseline
    from vsem_lens.calibration.probe import probe_baseline
    from vsem_lens.calibration.shipped_tasks import embedded_task_names, load_task
    from vsem_lens.calibration.zero_shot import zero_shot_affinity, zero_shot_matmul

    torch.set_num_threads(args.threads)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    study_started = time.perf_counter()
    model = vl.load_model("embedded")
    basis = vl.SemanticBasis.from_model(model)
    rows: list[dict] = []
    diagnostics: dict[str, dict] = {}
    available = embedded_task_names()

    def add(task_name: str, result, family: str) -> None:
        row = {"task": task_name, "family": family, **result.as_row()}
        rows.append(row)
        print(f"  {row['method']:<48} acc {row['accuracy']:.3f}  F1 {row['macro_f1']:.3f}  {row['wall_time_s']:8.1f} s",
              flush=True)

    for name in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        if name not in available:
            print(f"task {name}: data file not installed, skipped", flush=True)
            continue
        task = load_task(name)
        splits = {s: task.split(s) for s in ("train", "validation", "test")}
        y = {s: t.y for s, t in splits.items()}
        print(f"task {name}: {task!r}", flush=True)
        feats = {s: extract_features(model, t, progress=False) for s, t in splits.items()}
        feature_seconds = {s: f.seconds for s, f in feats.items()}
        bases = basis.for_words(task.label_words)
        k = task.n_classes

        # -- baselines on features
        add(name, zero_shot_matmul(feats["test"], y["test"], k), "zero-shot")
        add(name, zero_shot_affinity(feats["test"], bases, y["test"]), "zero-shot")
        add(name, knn_baseline(feats["train"], y["train"], feats["validation"], y["validation"], feats["test"], y["test"], n_classes=k), "feature baseline")
        add(name, probe_baseline(feats["train"], y["train"], feats["validation"], y["validation"], feats["test"], y["test"], n_classes=k), "feature baseline")

        # -- heads
        for label, spec in HEADS.items():
            spec = dict(spec)
            pool = spec.pop("pool")
            started = time.perf_counter()
            head = NeuralClusteringHead(bases, classes=task.label_names, **spec)
            head.fit(feats["train"].head_input(pool), y["train"], feats["validation"].head_input(pool), y["validation"])
            pred = head.predict(feats["test"].head_input(pool))
            fit_seconds = time.perf_counter() - started
            metrics = classification_metrics(y["test"], pred, k)
            from vsem_lens.calibration import BaselineResult

            add(name, BaselineResult(
                label, metrics["accuracy"], metrics["macro_f1"], sum(feature_seconds.values()) + fit_seconds,
                {"fit_seconds": round(fit_seconds, 3), "best_epoch": head.best_epoch_, "epochs_run": len(head.history_),
                 "temperature": round(head.history_[head.best_epoch_]["temperature"], 4),
                 "val_accuracy": head.history_[head.best_epoch_]["val_accuracy"], "n_parameters": head.n_parameters()},
            ), "head")

        # -- prompted / fine-tuned baselines
        if "icl" not in skip:
            add(name, icl_baseline(model, task, shots=1, seed=42), "prompted")
        for method in ("lora", "ia3"):
            if method not in skip:
                add(name, finetune_baseline(model, task, method, epochs=1, max_length=64, batch_size=8, seed=42), "fine-tuned")

        # -- diagnostics of the affinity gap (no training)
        X = feats["test"].X.double()
        U = model.W_U.double().T[feats["test"].label_token_ids]          # [k, d] unembedding rows u_i
        S = bases.double()                                                # [k, d] semantic bases s_i = G^-1 u_i
        diag = {}

        def readout(label: str, scores: torch.Tensor) -> None:
            pred = scores.argmax(1)
            m = classification_metrics(y["test"], pred, k)
            diag[label] = {**m, "predicted_counts": torch.bincount(pred, minlength=k).tolist()}

        readout("matmul u.h (zero-shot logits)", X @ U.T)
        readout("normalised matmul u.h/|u|", X @ (U / U.norm(dim=1, keepdim=True)).T)
        readout("whitened s.h = u G^-1 h", X @ S.T)
        readout("affinity s.h/|s| (cosine)", X @ (S / S.norm(dim=1, keepdim=True)).T)
        centred = X - feats["train"].X.double().mean(0)
        readout("affinity of train-mean-centred h", F.normalize(centred, dim=1) @ F.normalize(S, dim=1).T)
        mean_dir = feats["train"].X.double().mean(0)
        diag["facts"] = {
            "norm_u": U.norm(dim=1).tolist(),
            "norm_s": S.norm(dim=1).tolist(),
            "cos_between_label_bases": (F.normalize(S, dim=1) @ F.normalize(S, dim=1).T).tolist(),
            "cos_mean_feature_to_bases": (F.normalize(S, dim=1) @ F.normalize(mean_dir, dim=0)).tolist(),
            "mean_feature_norm_ratio": float(mean_dir.norm() / X.norm(dim=1).mean()),
        }
        if "bos" not in skip:
            model.prepend_bos = True
            try:
                bos_feats = extract_features(model, splits["test"], progress=False)
            finally:
                model.prepend_bos = False
            for result in (zero_shot_matmul(bos_feats, y["test"], k), zero_shot_affinity(bos_feats, bases, y["test"])):
                result.method += " (BOS)"
                add(name, result, "zero-shot")
        diagnostics[name] = diag
        for label, d in diag.items():
            if label != "facts":
                print(f"    diag {label:<40} acc {d['accuracy']:.3f}  counts {d['predicted_counts']}", flush=True)

    import pandas as pd

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    previous_seconds = 0.0
    if args.merge and (out / "results.json").is_file():
        # Keep earlier rows of (task, method) pairs this run did not produce (e.g. rerun the heads with
        # --skip icl,lora,ia3,bos and keep the fine-tuning rows); diagnostics of rerun tasks are replaced.
        old = json.loads((out / "results.json").read_text())
        produced = {(row["task"], row["method"]) for row in rows}
        rows = [row for row in old["rows"] if (row["task"], row["method"]) not in produced] + rows
        diagnostics = {**old["diagnostics"], **diagnostics}
        previous_seconds = float(old["meta"].get("total_seconds", 0.0))
        order = {"sentiment": 0, "topic": 1, "question": 2}
        methods = list(dict.fromkeys(row["method"] for row in old["rows"] + rows))
        rows.sort(key=lambda row: (order.get(row["task"], 9), methods.index(row["method"])))
    table = pd.DataFrame(rows)
    table.to_csv(out / "results.csv", index=False)
    meta = {
        "model": model.name,
        "prepend_bos": False,
        "threads": args.threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs (shared)",
        "total_seconds": time.perf_counter() - study_started + previous_seconds,
        "date": time.strftime("%Y-%m-%d"),
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "diagnostics": diagnostics}, indent=2, default=str))
    lines = ["| task | method | accuracy | macro-F1 | wall time (s) |", "|---|---|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['task']} | {row['method']} | {row['accuracy']:.3f} | {row['macro_f1']:.3f} | {row['wall_time_s']:.1f} |")
    if rows:
        avg = table.groupby("method", sort=False)[["accuracy", "macro_f1", "wall_time_s"]].mean()
        lines += ["", "| method | mean accuracy | mean macro-F1 | mean wall time (s) |", "|---|---:|---:|---:|"]
        for method, r in avg.iterrows():
            lines.append(f"| {method} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {r['wall_time_s']:.1f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print(f"total {meta['total_seconds']:.0f} s; wrote {out / 'results.csv'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
