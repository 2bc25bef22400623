"""README blocks of the I-STAR study, rendered from runs.csv, predictions.csv, isotropy.csv,
comparisons.csv, report_changes.csv and results.json only (no model run). ``run.py`` calls
:func:`comparisons` and :func:`render` after writing its outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from readme_blocks import fmt, markdown_table

from vsem_lens.calibration.significance import compare_paired

N_RESAMPLES = 10_000
REPORT_LAYERS = (10, 20, 25, 29)


def _correct(preds: pd.DataFrame) -> pd.Series:
    return (preds.prediction == preds.label).astype(bool)


def _pooled_interval(diff: np.ndarray) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean per-example difference (examples resampled, seed 0)."""
    rng = np.random.default_rng(0)
    means = diff[rng.integers(0, len(diff), size=(N_RESAMPLES, len(diff)))].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def comparisons(preds: pd.DataFrame) -> pd.DataFrame:
    """lambda vs lambda=0 on the same test examples: per seed (McNemar, paired bootstrap) and pooled over
    seeds (``seed == 'all'``: the per-example correctness averaged over seeds, examples resampled)."""
    preds = preds[preds.seed >= 0].assign(correct=_correct)
    rows = []
    for task, by_task in preds.groupby("task", sort=False):
        base = by_task[by_task["lambda"] == 0]
        for weight in sorted(set(by_task["lambda"]) - {0.0}):
            diffs = []
            for seed, run in by_task[by_task["lambda"] == weight].groupby("seed"):
                ref = base[base.seed == seed].set_index("example").correct
                cur = run.set_index("example").correct.loc[ref.index]
                c = compare_paired(cur.to_numpy(), ref.to_numpy(), n_resamples=N_RESAMPLES, seed=0)
                rows.append({"task": task, "lambda": weight, "seed": str(seed), **c.as_dict()})
                diffs.append(cur.to_numpy(dtype=float) - ref.to_numpy(dtype=float))
            if diffs:
                per_example = np.mean(diffs, axis=0)
                low, high = _pooled_interval(per_example)
                rows.append({"task": task, "lambda": weight, "seed": "all", "n": len(per_example),
                             "difference": float(per_example.mean()), "ci_low": low, "ci_high": high,
                             "n_seeds": len(diffs)})
    return pd.DataFrame(rows)


def _runs(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "runs.csv")


def _settings(folder: Path) -> str:
    meta = json.loads((folder / "results.json").read_text())
    s = meta["settings"]
    runs = _runs(folder)
    trained = runs[runs.seed >= 0]
    lambdas = sorted(set(trained["lambda"]))
    grid = [w for w in lambdas if abs(w) <= 5]
    extra = [w for w in lambdas if abs(w) > 5]
    seeds = sorted(set(trained.seed))
    lines = [
        f"- model: SmolLM2-135M-Instruct (embedded), full fine-tuning, torch {meta.get('torch')}, {meta.get('torch_threads')} thread",
        f"- tasks: {', '.join(dict.fromkeys(trained.task))}; {s['train_examples']} training prompts per task "
        f"(class-balanced, seed 0), the whole test split; one epoch, batch 8, AdamW lr {s['lr']:g}, max_length 64, "
        "gradient clip 1.0",
        f"- regulariser: lambda in {{{', '.join(f'{w:+g}' for w in grid)}}}, zeta {s['zeta']}, all 30 blocks' resid_post, "
        "C0 = covariance of the training prompts' token states (refreshed each epoch)"
        + (f"; exploratory lambda {', '.join(f'{w:+g}' for w in extra)} on "
           f"{', '.join(dict.fromkeys(trained[trained['lambda'].isin(extra)].task))} (see 'How hard the penalty pulls')"
           if extra else ""),
        f"- seeds: {', '.join(str(int(x)) for x in seeds)} (data order); runs finished: {len(trained)}, "
        f"{int(trained.steps.median()) if len(trained) else 0} optimiser steps each; training time per run: "
        f"median {fmt(float(trained.train_seconds.median()), 0)} s, whole run median {fmt(float(trained.run_seconds.median()), 0)} s",
        f"- held-back text for isotropy: the first {s['n_heldout']} texts of the embedded corpus, cut to 64 tokens",
    ]
    return "\n".join(lines)


def _accuracy(folder: Path) -> str:
    runs = _runs(folder)
    comp = pd.read_csv(folder / "comparisons.csv")
    pooled = comp[comp.seed.astype(str) == "all"].set_index(["task", "lambda"])
    per_seed = comp[comp.seed.astype(str) != "all"]
    rows = []
    for task, by_task in runs.groupby("task", sort=False):
        untuned = by_task[by_task.seed == -1]
        if len(untuned):
            rows.append({"task": task, "lambda": "untuned", "acc": fmt(float(untuned.accuracy.iloc[0])),
                         "range": "", "diff": "", "ci": "", "p": ""})
        for weight, runs_w in by_task[by_task.seed >= 0].groupby("lambda"):
            row = {"task": task, "lambda": f"{weight:+g}", "acc": fmt(float(runs_w.accuracy.mean())),
                   "range": f"{fmt(float(runs_w.accuracy.min()))}-{fmt(float(runs_w.accuracy.max()))}",
                   "diff": "", "ci": "", "p": ""}
            if (task, weight) in pooled.index:
                p = pooled.loc[(task, weight)]
                ps = per_seed[(per_seed.task == task) & (per_seed["lambda"] == weight)].p_value
                row.update(diff=f"{p.difference:+.3f}", ci=f"[{p.ci_low:+.3f}, {p.ci_high:+.3f}]",
                           p=", ".join(fmt(float(v), 2) for v in ps))
            rows.append(row)
    return markdown_table(rows, {
        "task": "task", "lambda": "lambda", "test accuracy (mean over seeds)": "acc", "seed range": "range",
        "vs lambda 0": "diff", "95% CI (pooled)": "ci", "McNemar p per seed": "p",
    }, align="llrrrrr")


def _iso_summary(folder: Path) -> pd.DataFrame:
    """Mean over layers of each isotropy measure, per (task, lambda), averaged over seeds; untuned separately."""
    iso = pd.read_csv(folder / "isotropy.csv")
    per_run = iso.groupby(["task", "lambda", "seed"], dropna=False)[["isoscore", "isoscore_star", "average_cosine"]].mean()
    return per_run.groupby(["task", "lambda"], dropna=False).mean().reset_index()


def _isotropy(folder: Path) -> str:
    summary = _iso_summary(folder)
    untuned = summary[summary.task == "untuned"].iloc[0]
    rows = [{"task": "all", "lambda": "untuned", **untuned.to_dict()}]
    for _, r in summary[summary.task != "untuned"].iterrows():
        rows.append({**r.to_dict(), "lambda": f"{r['lambda']:+g}"})
    return markdown_table(rows, {
        "task": "task", "lambda": "lambda",
        "IsoScore (mean over layers)": lambda r: fmt(r["isoscore"], 4),
        "IsoScore*": lambda r: fmt(r["isoscore_star"], 4),
        "average cosine": lambda r: fmt(r["average_cosine"], 3),
    }, align="llrrr")


#: Held-back IsoScore changes smaller than this (relative to lambda 0) count as "unchanged".
ISO_TOLERANCE = 0.01


def _verdict(folder: Path) -> str:
    summary = _iso_summary(folder).set_index(["task", "lambda"])
    comp = pd.read_csv(folder / "comparisons.csv")
    pooled = comp[comp.seed.astype(str) == "all"]
    per_seed = comp[comp.seed.astype(str) != "all"]
    lines, supported, tested = [], 0, 0
    for _, r in pooled[pooled["lambda"] < 0].iterrows():
        task, weight = r.task, r["lambda"]
        iso, iso0 = summary.loc[(task, weight), "isoscore"], summary.loc[(task, 0.0), "isoscore"]
        change = iso / iso0 - 1
        lower = change < -ISO_TOLERANCE
        iso_text = "lower" if lower else "higher" if change > ISO_TOLERANCE else f"unchanged within {ISO_TOLERANCE:.0%}"
        seeds = per_seed[(per_seed.task == task) & (per_seed["lambda"] == weight)]
        up, down = r.ci_low > 0, r.ci_high < 0
        tested += 1
        supported += int(lower and up)
        if (seeds.n_ab == 0).all() and (seeds.n_ba == 0).all():
            acc = "identical test predictions to lambda 0"
        else:
            acc = (f"{r.difference:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}] over {int(r.n_seeds)} seed(s): "
                   + ("higher (interval above 0)" if up else "lower (interval below 0)" if down else
                      "no significant difference (interval includes 0)"))
        lines.append(f"- {task}, lambda {weight:+g}: held-back IsoScore {fmt(iso, 4)} vs {fmt(iso0, 4)} at lambda 0 "
                     f"({change:+.1%}, {iso_text}); accuracy: {acc}.")
    lines.append(f"- The paper's claim (isotropy down and accuracy up) holds in {supported} of {tested} "
                 "(task, negative lambda) cells here.")
    return "\n".join(lines)


def _report(folder: Path) -> str:
    path = folder / "report_changes.csv"
    if not path.is_file():
        return "_not run yet_"
    table = pd.read_csv(path)
    shown = table[table.layer.isin(REPORT_LAYERS)]
    rows = []
    for (model, readout), group in shown.groupby(["model", "readout"], sort=False):
        g = group.set_index("layer")
        rows.append({"model": model, "readout": readout,
                     **{f"r{layer}": f"{fmt(float(g.loc[layer, 'rank_median']), 0)} / {fmt(float(g.loc[layer, 'top1_agreement']), 3)}"
                        for layer in REPORT_LAYERS}})
    return markdown_table(rows, {"model": "model", "readout": "readout",
                                 **{f"layer {layer}": f"r{layer}" for layer in REPORT_LAYERS}}, align="ll" + "r" * len(REPORT_LAYERS))


def _gradients(folder: Path) -> str:
    path = folder / "gradient_norms.csv"
    if not path.is_file():
        return "_not run yet_"
    return markdown_table(pd.read_csv(path), {
        "task": "task", "batch IsoScore*": lambda r: f"{r['batch_isoscore_star']:.2e}",
        "CE gradient norm": lambda r: fmt(r["ce_grad_norm"], 2),
        "penalty gradient norm (lambda 1)": lambda r: f"{r['penalty_grad_norm_lambda1']:.2e}",
        "lambda where the two are equal": lambda r: f"{r['lambda_equal_norms']:,.0f}",
    }, align="lrrrr")


def render(folder: Path) -> dict[str, str]:
    """``{block name: markdown}`` for README.md, from the committed outputs in ``folder``."""
    folder = Path(folder)
    return {
        "settings": _settings(folder),
        "accuracy": _accuracy(folder),
        "isotropy": _isotropy(folder),
        "gradients": _gradients(folder),
        "verdict": _verdict(folder),
        "report": _report(folder),
    }
