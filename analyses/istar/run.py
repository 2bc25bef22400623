"""Study: I-STAR fine-tuning of the embedded model; does lowering isotropy raise accuracy?

Rudman & Eickhoff (ICLR 2024) fine-tune with ``L = CE + lambda (1 - IsoScore*)`` and report that
*decreasing* isotropy (lambda < 0) improves downstream accuracy. Here, for SmolLM2-135M-Instruct:

- grid: the three shipped tasks x lambda in ``--lambdas`` (default -5, -1, 0, +1, +5) x ``--seeds``;
  zeta 0.2, C0 = covariance of the training prompts' token states of all 30 layers (refreshed each
  epoch), every block's ``resid_post`` regularised, full fine-tuning
  (:func:`vsem_lens.calibration.istar_finetune.istar_finetune`);
- CPU budget: ``--train-examples`` training prompts per task (a class-balanced subsample of the train
  split drawn once with seed 0, the same for every lambda and seed), one epoch, batch 8, lr
  ``--lr``, max_length 64; the seed changes the data order only. Test: the whole test split (120);
- per run: test accuracy and macro-F1, every test prediction (predictions.csv), and the isotropy of
  every layer's ``resid_post`` on held-back text (the first ``--n-heldout`` texts of the embedded corpus,
  cut to 64 tokens; IsoScore, IsoScore* with the scaled-identity C0, average cosine), also for the
  untuned model (isotropy.csv, layer ``-1`` rows are not used);
- statistics (no model): per task and seed, lambda vs lambda=0 on the same test examples (exact
  McNemar, paired-bootstrap 95% interval); over seeds, the mean difference with the seeds' range
  (comparisons.csv);
- the layerwise report of the tuned models (``--report-task``, seed ``--seeds[0]``, lambda -5, 0, +5 and
  the untuned model): ``build_report`` on the embedded corpus, the lens and affinity rows of the
  prediction-formation table (report_changes.csv).

Runs are resumable: a (task, lambda, seed) already in runs.csv is skipped, so an interrupted study
continues where it stopped. One torch thread (shared 2-core machine). Writes runs.csv,
predictions.csv, isotropy.csv, comparisons.csv, report_changes.csv and results.json, then re-renders
the README's blocks (tables.py).

Run:  python analyses/istar/run.py                       (about 2 min per run on one core; 30 runs)
      python analyses/istar/run.py --stages none         (statistics and README only)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
TASKS = ("sentiment", "topic", "question")
REPORT_LAMBDAS = (-5.0, 0.0, 5.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="runs,report,gradients", help="runs,report,gradients | none")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--lambdas", default="-5,-1,0,1,5")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--zeta", type=float, default=0.2)
    parser.add_argument("--train-examples", type=int, default=120)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--n-heldout", type=int, default=32)
    parser.add_argument("--report-task", default="sentiment")
    args = parser.parse_args()
    stages = set(args.stages.split(","))

    import pandas as pd

    sys.path[:0] = [str(HERE.parents[1]), str(HERE), str(HERE.parent)]
    import tables
    from readme_blocks import write_blocks

    meta_path = HERE / "results.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if stages - {"none"}:
        import torch

        torch.set_num_threads(1)
        meta.update(settings={k: v for k, v in vars(args).items() if k != "stages"}, torch_threads=1,
                    torch=torch.__version__, python=platform.python_version(), machine=platform.machine())
        _model_stages(args, stages, meta, meta_path)
    comparisons = tables.comparisons(pd.read_csv(HERE / "predictions.csv"))
    comparisons.to_csv(HERE / "comparisons.csv", index=False, float_format="%.6g")
    meta_path.write_text(json.dumps(meta, indent=2, default=str) + "\n")
    write_blocks(HERE / "README.md", tables.render(HERE))


def _subsample(task, n: int):
    """A class-balanced subsample of ``n`` training examples (seed 0), plus the untouched validation/test."""
    import torch

    train = [i for i, s in enumerate(task.splits) if s == "train"]
    by_class: dict = {}
    for i in train:
        by_class.setdefault(task.labels[i], []).append(i)
    g = torch.Generator().manual_seed(0)
    per_class = n // len(by_class)
    keep = []
    for label in sorted(by_class):
        members = by_class[label]
        keep += [members[j] for j in torch.randperm(len(members), generator=g)[:per_class].tolist()]
    keep = sorted(keep) + [i for i, s in enumerate(task.splits) if s != "train"]
    return task.subset(keep)


def _append(path: Path, frame) -> None:
    """Append rows to a CSV (header only when the file is new); each run's rows land as soon as it ends."""
    frame.to_csv(path, mode="a", header=not path.is_file(), index=False, float_format="%.6g")


def _model_stages(args, stages, meta, meta_path) -> None:
    import pandas as pd

    import vsem_lens as vl
    from vsem_lens.calibration.istar_finetune import IStarConfig, evaluate_labels, istar_finetune
    from vsem_lens.core.models import cache_dir

    model = vl.load_model()
    report_seed = int(args.seeds.split(",")[0])

    def saved_dir(weight: float) -> Path:
        return cache_dir() / "analyses" / "istar" / f"{args.report_task}-seed{report_seed}-lambda{weight:+g}"

    heldout = vl.load_corpus("default")[: args.n_heldout]

    def isotropy(m, **keys):
        iso = vl.geometry.isotropy_by_layer(m, heldout, frames="raw", max_length=64)
        cols = ["layer", "isoscore", "isoscore_star", "average_cosine"]
        return iso[cols].assign(**keys)[[*keys, *cols]]

    runs_path, preds_path, iso_path = HERE / "runs.csv", HERE / "predictions.csv", HERE / "isotropy.csv"
    done, untuned_done = set(), set()
    if runs_path.is_file():
        runs = pd.read_csv(runs_path)
        done = set(zip(runs.task, runs["lambda"].astype(float), runs.seed))
        untuned_done = set(runs.query("seed == -1").task)
    tasks = {name: _subsample(vl.calibration.load_task(name), args.train_examples) for name in args.tasks.split(",")}
    if "runs" in stages:
        if not iso_path.is_file():  # the untuned model, once
            _append(iso_path, isotropy(model, task="untuned", **{"lambda": float("nan")}, seed=-1))
        for name, task in tasks.items():
            if name not in untuned_done:  # the untuned model's readout: lambda NaN, seed -1
                before = evaluate_labels(model, task, max_length=64, method="untuned")
                _append(runs_path, pd.DataFrame([{"task": name, "lambda": float("nan"), "seed": -1,
                                                  "accuracy": before.accuracy, "macro_f1": before.macro_f1,
                                                  "steps": 0, "train_seconds": 0.0,
                                                  "final_isoscore_star_batch": float("nan"), "run_seconds": 0.0}]))
                _append(preds_path, _predictions(name, float("nan"), -1, task, before))
            for seed in (int(s) for s in args.seeds.split(",")):
                for weight in (float(w) for w in args.lambdas.split(",")):
                    if (name, weight, seed) in done:
                        continue
                    began = time.time()
                    config = IStarConfig(weight=weight, zeta=args.zeta, lr=args.lr, seed=seed, max_length=64)
                    result = istar_finetune(model, task, config, progress=False)
                    if name == args.report_task and seed == report_seed and weight in REPORT_LAMBDAS:
                        result.save(saved_dir(weight))  # for the report stage (outside the repository)
                    _append(preds_path, _predictions(name, weight, seed, task, result.test))
                    _append(iso_path, isotropy(result.model, task=name, **{"lambda": weight}, seed=seed))
                    _append(runs_path, pd.DataFrame([{
                        "task": name, "lambda": weight, "seed": seed, "accuracy": result.test.accuracy,
                        "macro_f1": result.test.macro_f1, "steps": result.meta["steps"],
                        "train_seconds": result.meta["train_seconds"],
                        "final_isoscore_star_batch": float(result.history.isoscore_star.iloc[-1]),
                        "run_seconds": round(time.time() - began, 1),
                    }]))
                    print(f"{name} lambda {weight:+g} seed {seed}: accuracy {result.test.accuracy:.3f} "
                          f"({time.time() - began:.0f} s)", flush=True)
    if "gradients" in stages:
        _gradient_norms(model, tasks, args).to_csv(HERE / "gradient_norms.csv", index=False, float_format="%.6g")
    if "report" in stages:
        seed = report_seed
        task = tasks[args.report_task]
        corpus = vl.load_corpus("default")
        rows = []
        for weight in (None, *REPORT_LAMBDAS):
            began = time.time()
            if weight is None:
                tuned = model
            elif (saved_dir(weight) / "model").is_dir():  # what `vsem-lens report --model DIR` reads
                tuned = vl.load_model(saved_dir(weight) / "model")
            else:
                tuned = istar_finetune(model, task, IStarConfig(weight=weight, zeta=args.zeta, lr=args.lr, seed=seed,
                                                                max_length=64), progress=False).model
            report = vl.build_report(tuned, corpus)
            table = report.tables["prediction_formation"]
            rows.append(table[["readout", "layer", "rank_median", "top1_agreement", "kl_bits_mean"]].assign(
                model="untuned" if weight is None else f"lambda {weight:+g}", task=args.report_task, seed=seed))
            print(f"report {rows[-1].model.iloc[0]}: {time.time() - began:.0f} s", flush=True)
        pd.concat(rows).to_csv(HERE / "report_changes.csv", index=False, float_format="%.6g")


def _gradient_norms(model, tasks, args):
    """How hard the penalty pulls: on the first training batch of each task (untuned model, C0 from the
    training prompts), the gradient norm over all weights of the CE alone and of ``1 - IsoScore*`` alone
    (lambda = 1), and the lambda at which the two are equal."""
    import pandas as pd
    import torch

    from vsem_lens.calibration.features import build_prompts, label_token_ids
    from vsem_lens.calibration.istar_finetune import IStarConfig, istar_loss, trainable_copy, training_covariance

    rows = []
    copy = trainable_copy(model, IStarConfig())
    params = [p for p in copy.parameters() if p.requires_grad]
    layers = list(range(model.n_layers))
    for name, task in tasks.items():
        train = task.split("train")
        prompts, _ = build_prompts(copy, task.template, train.texts, max_length=64)
        c0 = training_covariance(copy, prompts, layers)
        tokens, y, ids = copy.tokenize(prompts[:8]), train.y[:8], label_token_ids(copy, task.label_words)
        norms = {}
        for weight in (0.0, 1.0):
            parts = istar_loss(copy, tokens, y, ids, IStarConfig(weight=weight, zeta=args.zeta).checked(model.n_layers), c0)
            grads = torch.autograd.grad(parts["loss"], params, allow_unused=True)
            norms[weight] = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]
            iso = float(parts["isoscore_star"])
        ce = float(torch.sqrt(sum((g.double() ** 2).sum() for g in norms[0.0])))
        penalty = float(torch.sqrt(sum(((a - b).double() ** 2).sum() for a, b in zip(norms[1.0], norms[0.0]))))
        rows.append({"task": name, "batch_isoscore_star": iso, "ce_grad_norm": ce, "penalty_grad_norm_lambda1": penalty,
                     "lambda_equal_norms": ce / penalty})
        print(f"{name}: CE gradient {ce:.3g}, penalty gradient at lambda 1 {penalty:.3g}, IsoScore* {iso:.3g}", flush=True)
    return pd.DataFrame(rows)


def _predictions(name, weight, seed, task, result):
    import pandas as pd

    test = task.split("test")
    return pd.DataFrame({"task": name, "lambda": weight, "seed": seed, "example": range(len(test)),
                         "label": test.y.tolist(), "prediction": result.predictions.tolist()})


if __name__ == "__main__":
    main()
