"""Study: semantic calibration heads vs baselines on the embedded tasks with the embedded model.

For each embedded task (sentiment, topic, question; train/validation/test from the shipped files) and
SmolLM2-135M-Instruct (no BOS, the library's default rule):

- heads on last-layer LM-head-input features of the zero-shot prompt (cached features):
  clustering (CA pooled over the prompt's tokens; the default), clustering with CA on the vector only,
  clustering without CA, the prototype (encoder/decoder + MSE) with our loss, and the prototype with the
  authors' loss settings (softmax over raw cosines = temperature 1, lr 1e-4);
  the clustering head with matmul (dot-product) logits instead of cosine logits (the paper's
  similarity-vs-matmul ablation); every clustering variant, the prototype and the matmul head are also
  refitted with seeds 1-5 on the same features (seeds.csv);
- baselines: zero-shot matmul logits, zero-shot affinity (cosine to the label bases), cosine kNN on the
  features, kNN prompting (Xu et al. 2023: KL kNN over next-token distributions), logistic probe,
  1-shot-per-class ICL, LoRA and IA3 (1 epoch over train, max_length 64, batch 8);
- paired statistics on the test set (vsem_lens.calibration.significance): exact McNemar p-values and
  paired-bootstrap 95% intervals of accuracy differences for the key comparisons (comparisons.csv);
- diagnostics of the affinity gap (docs/concepts/affinity.md: ``cos(s_i, h) = u_i^T G^-1 h / (||G^-1 u_i|| ||h||)``):
  the same argmax with each ingredient switched on separately (per-token normalisation of the
  unembedding rows, whitening by ``G^-1``), the affinity after centring the features on the train
  mean, and the zero-shot readouts with BOS prepended.

Wall times include the forward passes of the features a method uses (see vsem_lens.calibration.baselines). All
runs use ONE torch thread: the machine is a shared 2-core box where two OpenMP threads per process
were 7-30x slower than one under contention (measured; see the README).

Writes results.csv, results.json (rows, run metadata per row, diagnostics), predictions.csv (every
test prediction of every row: the paired tests can be recomputed), seeds.csv, comparisons.csv and
table.md next to this file, then renders the README's blocks (tables.py).

Run:  python analyses/semantic_calibration/run.py                 (about 30-40 min on one core)
      python analyses/semantic_calibration/run.py --tasks topic --skip lora,ia3,icl,kp --merge
"""

from __future__ import annotations

import argparse
import datetime
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
    # The paper's similarity-vs-matmul ablation: the default head with dot-product logits (same
    # features, seeds and temperature settings; only the class score changes).
    "head:clustering (matmul logits)": dict(head="clustering", pool="tokens", similarity="matmul"),
    "head:clustering (CA on vector)": dict(head="clustering", pool="vector"),
    "head:clustering (no CA)": dict(head="clustering", channel_attention=False, pool="vector"),
    "head:prototype": dict(head="prototype", pool="vector"),
    # The paper trains 100 epochs; at lr 1e-4 validation accuracy can sit still for 20 epochs early on,
    # so this row runs all 100 epochs (keeping the best validation epoch) instead of stopping early.
    "head:prototype (authors' loss: T=1, lr 1e-4)": dict(
        head="prototype", pool="vector", temperature=1.0, learn_temperature=False, lr=1e-4, patience=None
    ),
}
# Refitted with these seeds too (the table rows above use seed 42); the authors'-loss row (100 epochs) is not.
SEEDS = (1, 2, 3, 4, 5)
SEED_VARIANTS = [label for label in HEADS if label.startswith("head:clustering")]
# kNN prompting's datastore: a seeded class-balanced subsample of this many training prompts (the authors
# used 128 training examples in all; every one of the 360 would double the cost of the biggest baseline).
KP_ANCHORS = 128
# Paired comparisons (method A, method B) per task; A - B.
COMPARISONS = [
    ("head:clustering", "cosine-knn"),
    ("head:clustering", "knn-prompting"),
    ("head:clustering", "probe"),
    ("head:clustering", "icl"),
    ("head:clustering", "lora"),
    ("head:clustering", "ia3"),
    ("head:clustering", "head:clustering (matmul logits)"),
    ("cosine-knn", "icl"),
    ("knn-prompting", "icl"),
    ("knn-prompting", "cosine-knn"),
]
# Gu et al. (paper v6): averages over eight tasks and ten models, the Llama3-8B row, the
# similarity-vs-matmul ablation (after calibration) and the runtimes (hours) of VDS and LoRA.
PAPER = {"icl": 0.437, "knn-prompting": 0.614, "head:clustering": 0.767,
         "ablation_similarity": 0.781, "ablation_matmul": 0.782,
         "llama3_8b": {"lora": 0.346, "icl": 0.636, "knn-prompting": 0.754, "head:clustering": 0.781, "ia3": 0.850},
         "runtime_hours": {"head:clustering": 2.1, "lora": 3.5}}
N_RESAMPLES = 10_000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="sentiment,topic,question")
    parser.add_argument("--skip", default="", help="comma list of stages to skip: base (zero-shot, affinity, cosine kNN, probe, heads, "
                             "diagnostics),seeds,icl,kp,lora,ia3,bos")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(HERE))
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of (task, method) pairs not rerun from an existing results.json in --out "
                             "(total_seconds then adds up the runs)")
    parser.add_argument("--combine", default="",
                        help="comma list of folders written by other runs (--out): merge their outputs into --out "
                             "(later folders win for the same task and method) and render; no model is run")
    args = parser.parse_args()
    if args.combine:
        return combine(Path(args.out), [Path(f) for f in args.combine.split(",") if f.strip()])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")

    import torch
    import torch.nn.functional as F

    import vsem_lens as vl
    from vsem_lens.calibration import BaselineResult, NeuralClusteringHead, classification_metrics
    from vsem_lens.calibration.cosine_knn import cosine_knn_baseline
    from vsem_lens.calibration.features import extract_features
    from vsem_lens.calibration.finetune import finetune_baseline
    from vsem_lens.calibration.icl import icl_baseline
    from vsem_lens.calibration.knn_prompting import knn_prompting_baseline
    from vsem_lens.calibration.probe import probe_baseline
    from vsem_lens.calibration.shipped_tasks import embedded_task_names, load_task
    from vsem_lens.calibration.zero_shot import zero_shot_affinity, zero_shot_matmul

    torch.set_num_threads(args.threads)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    study_started = time.perf_counter()
    model = vl.load_model("embedded")
    basis = vl.SemanticBasis.from_model(model)
    rows: list[dict] = []
    predictions: list[dict] = []
    seed_rows: list[dict] = []
    diagnostics: dict[str, dict] = {}
    available = embedded_task_names()
    run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    def add(task_name: str, result, family: str, y_test) -> None:
        row = {"task": task_name, "family": family, "run": run_id, **result.as_row()}
        rows.append(row)
        for i, (label, pred) in enumerate(zip(y_test.tolist(), result.predictions.tolist())):
            predictions.append({"task": task_name, "method": row["method"], "index": i, "label": label,
                                "prediction": pred})
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

        # -- heads (seed 42 in the main table; seeds 1-5 in seeds.csv)
        def fit_head(label: str, seed: int):
            spec = dict(HEADS[label])
            pool = spec.pop("pool")
            started = time.perf_counter()
            head = NeuralClusteringHead(bases, classes=task.label_names, seed=seed, **spec)
            head.fit(feats["train"].head_input(pool), y["train"], feats["validation"].head_input(pool), y["validation"])
            pred = head.predict(feats["test"].head_input(pool))
            return head, pred, time.perf_counter() - started

        yt = y["test"]
        if "base" not in skip:  # zero-shot, affinity, cosine kNN, probe, the heads (seed 42), diagnostics
            # -- baselines on features
            add(name, zero_shot_matmul(feats["test"], yt, k), "zero-shot", yt)
            add(name, zero_shot_affinity(feats["test"], bases, yt), "zero-shot", yt)
            add(name, cosine_knn_baseline(feats["train"], y["train"], feats["validation"], y["validation"], feats["test"], yt, n_classes=k), "feature baseline", yt)
            add(name, probe_baseline(feats["train"], y["train"], feats["validation"], y["validation"], feats["test"], yt, n_classes=k), "feature baseline", yt)

            for label in HEADS:
                head, pred, fit_seconds = fit_head(label, 42)
                metrics = classification_metrics(yt, pred, k)
                add(name, BaselineResult(
                    label, metrics["accuracy"], metrics["macro_f1"], sum(feature_seconds.values()) + fit_seconds,
                    {"fit_seconds": round(fit_seconds, 3), "best_epoch": head.best_epoch_, "epochs_run": len(head.history_),
                     "temperature": round(head.history_[head.best_epoch_]["temperature"], 4),
                     "val_accuracy": head.history_[head.best_epoch_]["val_accuracy"], "n_parameters": head.n_parameters()},
                    pred,
                ), "head", yt)
        if "seeds" not in skip:
            for label in SEED_VARIANTS:
                for seed in SEEDS:
                    head, pred, fit_seconds = fit_head(label, seed)
                    seed_rows.append({
                        "task": name, "method": label, "seed": seed, "run": run_id,
                        "accuracy": classification_metrics(yt, pred, k)["accuracy"],
                        "val_accuracy": head.history_[head.best_epoch_]["val_accuracy"],
                        "best_epoch": head.best_epoch_, "fit_seconds": round(fit_seconds, 3),
                    })
                print(f"  seeds {label:<42} acc " + " ".join(f"{r['accuracy']:.3f}" for r in seed_rows[-len(SEEDS):]), flush=True)

        # -- prompted / fine-tuned baselines
        if "icl" not in skip:
            add(name, icl_baseline(model, task, shots=1, seed=42), "prompted", yt)
        if "kp" not in skip:
            add(name, knn_prompting_baseline(model, task, shots=1, seed=42, max_anchors=KP_ANCHORS), "prompted", yt)
        for method in ("lora", "ia3"):
            if method not in skip:
                add(name, finetune_baseline(model, task, method, epochs=1, max_length=64, batch_size=8, seed=42), "fine-tuned", yt)

        if "base" not in skip:
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
            for result in (zero_shot_matmul(bos_feats, yt, k), zero_shot_affinity(bos_feats, bases, yt)):
                result.method += " (BOS)"
                add(name, result, "zero-shot", yt)
        if "base" not in skip:
            diagnostics[name] = diag
            for label, d in diag.items():
                if label != "facts":
                    print(f"    diag {label:<40} acc {d['accuracy']:.3f}  counts {d['predicted_counts']}", flush=True)

    meta = {
        "model": model.name,
        "prepend_bos": False,
        "threads": args.threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs (shared)",
        "seconds": round(time.perf_counter() - study_started, 1),
        "tasks": [t.strip() for t in args.tasks.split(",") if t.strip()],
        "skip": sorted(skip),
        "command": " ".join(sys.argv[1:]),
    }
    bundle = {"rows": rows, "predictions": predictions, "seeds": seed_rows, "diagnostics": diagnostics,
              "runs": {run_id: meta}}
    out = Path(args.out)
    if args.merge and (out / "results.json").is_file():
        bundle = merge(read_outputs(out), bundle)
    write_outputs(out, bundle)
    return 0


def read_outputs(folder: Path) -> dict:
    """The committed outputs of a run folder as a bundle (rows, predictions, seeds, diagnostics, runs)."""
    import pandas as pd

    data = json.loads((folder / "results.json").read_text())
    def read(name: str) -> list[dict]:
        path = folder / name
        return pd.read_csv(path).to_dict("records") if path.is_file() and path.stat().st_size > 1 else []

    return {"rows": data["rows"], "predictions": read("predictions.csv"), "seeds": read("seeds.csv"),
            "diagnostics": data["diagnostics"], "runs": data.get("runs", {})}


def merge(old: dict, new: dict) -> dict:
    """``new`` on top of ``old``: rows, predictions and seed rows of the (task, method) pairs ``new``
    produced replace ``old``'s; each row keeps the id of the run that made it."""
    produced = {(row["task"], row["method"]) for row in new["rows"]}
    reseeded = {(row["task"], row["method"]) for row in new["seeds"]}
    return {
        "rows": [r for r in old["rows"] if (r["task"], r["method"]) not in produced] + new["rows"],
        "predictions": [p for p in old["predictions"] if (p["task"], p["method"]) not in produced] + new["predictions"],
        "seeds": [r for r in old["seeds"] if (r["task"], r["method"]) not in reseeded] + new["seeds"],
        "diagnostics": {**old["diagnostics"], **new["diagnostics"]},
        "runs": {**old["runs"], **new["runs"]},
    }


def write_outputs(out: Path, bundle: dict) -> None:
    """Write results.csv/json, predictions.csv, seeds.csv, comparisons.csv and table.md; render the README."""
    import pandas as pd

    from vsem_lens.calibration.significance import compare_paired

    out.mkdir(parents=True, exist_ok=True)
    rows, seed_rows = list(bundle["rows"]), list(bundle["seeds"])
    order = {"sentiment": 0, "topic": 1, "question": 2}
    canonical = ["zero-shot", "affinity", "cosine-knn", "knn-prompting", "probe", *HEADS, "icl", "lora", "ia3",
                 "zero-shot (BOS)", "affinity (BOS)"]
    methods = list(dict.fromkeys(canonical + [row["method"] for row in rows]))
    rows.sort(key=lambda row: (order.get(row["task"], 9), methods.index(row["method"])))
    seed_rows.sort(key=lambda r: (order.get(r["task"], 9), methods.index(r["method"]) if r["method"] in methods else 99, r["seed"]))
    used = {row["run"] for row in rows} | {row["run"] for row in seed_rows}
    runs = {key: value for key, value in bundle["runs"].items() if key in used}

    # Paired statistics from the stored predictions (so they can be recomputed from predictions.csv alone).
    pred_table = pd.DataFrame(bundle["predictions"], columns=["task", "method", "index", "label", "prediction"])
    pred_table["order"] = pred_table.task.map(order)
    pred_table = pred_table.sort_values(["order", "task", "method", "index"]).drop(columns="order")
    comparisons = []
    for task_name in sorted({row["task"] for row in rows}, key=lambda t: order.get(t, 9)):
        per = pred_table[pred_table.task == task_name]
        correct = {m: (g.prediction.to_numpy() == g.label.to_numpy()) for m, g in per.groupby("method")}
        for a, b in COMPARISONS:
            if a in correct and b in correct:
                c = compare_paired(correct[a], correct[b], n_resamples=N_RESAMPLES, seed=0)
                comparisons.append({"task": task_name, "a": a, "b": b, **c.as_dict()})

    pd.DataFrame(rows).to_csv(out / "results.csv", index=False)
    pred_table.to_csv(out / "predictions.csv", index=False)
    pd.DataFrame(seed_rows).to_csv(out / "seeds.csv", index=False)
    pd.DataFrame(comparisons).to_csv(out / "comparisons.csv", index=False)
    summary = {
        "total_seconds": round(sum(run["seconds"] for run in runs.values()), 1),
        "seeds": list(SEEDS),
        "n_resamples": N_RESAMPLES,
        "bootstrap_seed": 0,
        "paper": PAPER,
    }
    (out / "results.json").write_text(json.dumps(
        {"summary": summary, "runs": runs, "rows": rows, "diagnostics": bundle["diagnostics"]}, indent=2, default=str))
    table = pd.DataFrame(rows)
    lines = ["| task | method | accuracy | macro-F1 | wall time (s) |", "|---|---|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['task']} | {row['method']} | {row['accuracy']:.3f} | {row['macro_f1']:.3f} | {row['wall_time_s']:.1f} |")
    if rows:
        avg = table.groupby("method", sort=False)[["accuracy", "macro_f1", "wall_time_s"]].mean()
        lines += ["", "| method | mean accuracy | mean macro-F1 | mean wall time (s) |", "|---|---:|---:|---:|"]
        for method, r in avg.iterrows():
            lines.append(f"| {method} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {r['wall_time_s']:.1f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    if out.resolve() == HERE:
        sys.path.insert(0, str(HERE.parent))
        sys.path.insert(0, str(HERE))
        import tables
        from readme_blocks import write_blocks

        write_blocks(HERE / "README.md", tables.render(HERE))
    print(f"all runs {summary['total_seconds']:.0f} s; wrote {out}", flush=True)


def combine(out: Path, folders: list[Path]) -> int:
    """Merge the outputs of runs made in other folders (e.g. tasks run side by side) into ``out``."""
    bundle = read_outputs(out) if (out / "results.json").is_file() else None
    for folder in folders:
        new = read_outputs(folder)
        bundle = new if bundle is None else merge(bundle, new)
    write_outputs(out, bundle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
