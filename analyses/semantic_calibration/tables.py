"""README blocks of the semantic-calibration study, rendered from its committed outputs only
(results.json, seeds.csv, comparisons.csv; no model). ``run.py`` calls :func:`render` at the end and
tests/test_studies.py checks that the README's blocks equal a fresh rendering.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from readme_blocks import fmt, markdown_table  # noqa: E402

TASKS = ("sentiment", "topic", "question")
NAMES = {
    "zero-shot": "zero-shot (matmul logits)",
    "affinity": "affinity (cosine to label bases)",
    "cosine-knn": "cosine kNN",
    "knn-prompting": "kNN prompting (KP)",
    "probe": "logistic probe",
    "head:clustering": "**head: clustering** (default)",
    "head:clustering (matmul logits)": "head: clustering, matmul logits",
    "head:clustering (CA on vector)": "head: clustering, CA on vector",
    "head:clustering (no CA)": "head: clustering, no CA",
    "head:prototype": "head: prototype",
    "head:prototype (authors' loss: T=1, lr 1e-4)": "head: prototype, authors' loss",
    "icl": "ICL, 1 shot per class",
    "lora": "LoRA, 1 epoch",
    "ia3": "IA3, 1 epoch",
    "zero-shot (BOS)": "zero-shot (BOS)",
    "affinity (BOS)": "affinity (BOS)",
}
SHORT = {"head:clustering": "head", "head:clustering (matmul logits)": "matmul head", "cosine-knn": "cosine kNN",
         "knn-prompting": "KP", "probe": "probe", "icl": "ICL", "lora": "LoRA", "ia3": "IA3"}
ALPHA = 0.05


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell (``|`` escaped)."""
    return text.replace("|", "\\|")


def _name(row: dict) -> str:
    name = NAMES.get(row["method"], row["method"])
    if row["method"] in ("cosine-knn", "knn-prompting") and row.get("k") == row.get("k"):  # k is not NaN
        name += f" (k = {int(row['k'])})"
    return name


def _time(row: dict) -> str:
    text = fmt(row["wall_time_s"], 1)
    fit = row.get("fit_seconds")
    if fit is not None and fit == fit:
        text += f" (fit {fmt(fit, 1)})"
    return text


def _run_labels(runs: dict) -> dict[str, str]:
    """Short labels R1, R2, ... of the runs, in the order of ``results.json`` (listed in the setup block)."""
    return {run_id: f"R{i}" for i, run_id in enumerate(runs, start=1)}


def _results(rows: list[dict], runs: dict) -> str:
    labels = _run_labels(runs)
    return markdown_table(rows, {"task": "task", "method": _name, "accuracy": "accuracy", "macro-F1": "macro_f1",
                                 "wall time (s)": _time, "run": lambda r: labels[r["run"]]}, align="llrrrl")


def _means(rows: list[dict]) -> str:
    table = pd.DataFrame(rows)
    table = table[table.task.isin(TASKS)]
    means = table.groupby("method", sort=False)[["accuracy", "macro_f1", "wall_time_s"]].mean().reset_index()
    means["n_tasks"] = table.groupby("method", sort=False).size().values
    return markdown_table(means, {"method": lambda r: NAMES.get(r["method"], r["method"]), "tasks": "n_tasks",
                                  "mean accuracy": "accuracy", "mean macro-F1": "macro_f1",
                                  "mean wall time (s)": lambda r: fmt(r["wall_time_s"], 1)}, align="lrrrr")


def _seeds(seeds: pd.DataFrame, rows: list[dict]) -> str:
    seed42 = {(r["task"], r["method"]): r["accuracy"] for r in rows}
    out = []
    for (task, method), group in seeds.groupby(["task", "method"], sort=False):
        acc = group.accuracy
        out.append({
            "task": task, "method": NAMES.get(method, method),
            "seeds": f"{fmt(acc.mean())} +- {fmt(acc.std(ddof=1))}",
            "range": f"{fmt(acc.min())}-{fmt(acc.max())}",
            "val": group.val_accuracy.mean(), "seed 42": seed42.get((task, method)),
        })
    out.sort(key=lambda r: TASKS.index(r["task"]) if r["task"] in TASKS else 9)
    return markdown_table(out, {"task": "task", "method": "method", "test accuracy, seeds 1-5 (mean +- std)": "seeds",
                                "min-max": "range", "validation (mean)": "val", "seed 42": "seed 42"}, align="llrrrr")


def _verdict(row: dict) -> str:
    if row["p_value"] >= ALPHA:
        return "no significant difference"
    better = row["a"] if row["difference"] > 0 else row["b"]
    return f"**{SHORT.get(better, better)} better**"


def _comparisons(comp: pd.DataFrame) -> str:
    return markdown_table(comp, {
        "task": "task",
        "A vs B": lambda r: f"{SHORT.get(r['a'], r['a'])} vs {SHORT.get(r['b'], r['b'])}",
        "acc A": "accuracy_a", "acc B": "accuracy_b",
        "A - B [95% CI]": lambda r: f"{r['difference']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]",
        "only A / only B right": lambda r: f"{int(r['n_ab'])} / {int(r['n_ba'])}",
        "McNemar p": lambda r: f"{r['p_value']:.3g}",
        "verdict (p < 0.05)": _verdict,
    }, align="llrrrrrl")


def _paper(rows: list[dict], seeds: pd.DataFrame, summary: dict) -> str:
    paper = summary["paper"]
    table = pd.DataFrame(rows)
    table = table[table.task.isin(TASKS)]
    acc = {(r.task, r.method): r.accuracy for r in table.itertuples()}

    def here(method: str) -> dict:
        tasks = [t for t in TASKS if (t, method) in acc]
        mean = sum(acc[(t, method)] for t in tasks) / len(tasks) if tasks else None
        head = [acc[(t, "head:clustering")] for t in tasks if (t, "head:clustering") in acc]
        return {"here": mean, "tasks": ", ".join(tasks) or "n/a", "head": sum(head) / len(head) if head else None}

    seed_mean = seeds.groupby("method").accuracy.mean() if len(seeds) else pd.Series(dtype=float)
    n_seed_tasks = ", ".join(t for t in TASKS if t in set(seeds.task)) or "n/a"
    lines = [
        {"what": "ICL (1 shot per class here)", "paper": paper["icl"], **here("icl")},
        {"what": "kNN prompting (KP)", "paper": paper["knn-prompting"], **here("knn-prompting")},
        {"what": "VDS = the clustering head", "paper": paper["head:clustering"], **here("head:clustering")},
        {"what": "ablation: head with similarity (cosine) logits, seeds 1-5", "paper": paper["ablation_similarity"],
         "here": seed_mean.get("head:clustering"), "tasks": n_seed_tasks, "head": None},
        {"what": "ablation: head with matmul logits, seeds 1-5", "paper": paper["ablation_matmul"],
         "here": seed_mean.get("head:clustering (matmul logits)"), "tasks": n_seed_tasks, "head": None},
    ]
    return markdown_table(lines, {"accuracy": "what", "paper (8 tasks x 10 models)": "paper", "here (mean)": "here",
                                  "over the tasks": "tasks", "head (seed 42) on the same tasks": "head"},
                          align="lrrlr")


def _diagnostics(diagnostics: dict) -> str:
    labels = [label for label in diagnostics[TASKS[0]] if label != "facts"]
    out = [{"readout": _cell(label), **{t: diagnostics[t][label]["accuracy"] for t in TASKS if t in diagnostics}}
           for label in labels]
    return markdown_table(out, {"readout (argmax over the label tokens)": "readout",
                                **{t: t for t in TASKS if t in diagnostics}})


def _facts(rows: list[dict], diagnostics: dict) -> str:
    counts = {(r["task"], r["method"]): r.get("predicted_counts") for r in rows}
    out = []
    for task in TASKS:
        if task not in diagnostics:
            continue
        facts = diagnostics[task]["facts"]
        k = len(facts["norm_s"])
        off = [facts["cos_between_label_bases"][i][j] for i in range(k) for j in range(k) if i != j]
        out.append({
            "task": task,
            "affinity predictions per label": str(counts.get((task, "affinity"))),
            "norm of mean h / mean norm of h": facts["mean_feature_norm_ratio"],
            "cos(mean h, s_label) per label": ", ".join(fmt(c) for c in facts["cos_mean_feature_to_bases"]),
            "cos between label bases (min-max)": f"{fmt(min(off))}-{fmt(max(off))}",
            "norm of s_label (min-max)": f"{fmt(min(facts['norm_s']), 4)}-{fmt(max(facts['norm_s']), 4)}",
        })
    return markdown_table(out, {key: key for key in out[0]}, align="llrlrr")


def _runtime(rows: list[dict], summary: dict, runs: dict) -> str:
    labels = _run_labels(runs)
    by = {(r["task"], r["method"]): r for r in rows}
    out = []
    for task in TASKS:
        head, lora, ia3 = by.get((task, "head:clustering")), by.get((task, "lora")), by.get((task, "ia3"))
        if head is None:
            continue
        out.append({
            "task": task, "fit": fmt(head["fit_seconds"], 1), "total": fmt(head["wall_time_s"], 1),
            "head run": labels[head["run"]],
            "lora": fmt(lora["wall_time_s"], 1) if lora else "n/a", "ia3": fmt(ia3["wall_time_s"], 1) if ia3 else "n/a",
            "ft run": ", ".join(sorted({labels[r["run"]] for r in (lora, ia3) if r})) or "n/a",
        })
    hours = summary["paper"]["runtime_hours"]
    ratio = hours["head:clustering"] / hours["lora"]
    table = markdown_table(out, {
        "task": "task", "head fit (s)": "fit", "head incl. features (s)": "total", "run": "head run",
        "LoRA, 1 epoch (s)": "lora", "IA3, 1 epoch (s)": "ia3", "run ": "ft run",
    }, align="lrrlrrl")
    return table + (f"\n\nPaper (Llama3-8B): VDS {fmt(hours['head:clustering'], 1)} h vs LoRA "
                    f"{fmt(hours['lora'], 1)} h, ratio {fmt(ratio, 2)}.")


def _setup(summary: dict, runs: dict, data_rows: list[dict], seeds: pd.DataFrame) -> str:
    lines = [f"- Summed wall time of the runs behind the committed outputs: {fmt(summary['total_seconds'], 0)} s "
             f"(one torch thread each, shared machine; some runs ran side by side). Paired bootstrap: {summary['n_resamples']:,} resamples, "
             f"seed {summary['bootstrap_seed']}; head seeds {', '.join(map(str, summary['seeds']))} besides 42."]
    labels = _run_labels(runs)
    for run_id, meta in runs.items():
        command = meta["command"] if meta["command"].startswith("(") else f"`run.py {meta['command']}`"
        rows = ", ".join(sorted({r["method"] for r in data_rows if r["run"] == run_id}))
        if len(seeds) and (seeds.run == run_id).any():
            rows = (rows + "; " if rows else "") + "seeds 1-5 of " + ", ".join(sorted(set(seeds[seeds.run == run_id].method)))
        lines.append(f"- {labels[run_id]}: run `{run_id}`, tasks {', '.join(meta['tasks'])}, {fmt(meta['seconds'], 0)} s, {command}, "
                     f"{meta['model']}, torch {meta['torch']}, Python {meta['python']}; rows: {rows}.")
    return "\n".join(lines)


def render(folder: Path) -> dict[str, str]:
    """``{block name: markdown}`` for the README, from the committed outputs in ``folder``."""
    folder = Path(folder)
    data = json.loads((folder / "results.json").read_text())
    rows, summary = data["rows"], data["summary"]
    seeds_file = folder / "seeds.csv"
    seeds = pd.read_csv(seeds_file) if seeds_file.stat().st_size > 1 else pd.DataFrame(
        columns=["task", "method", "seed", "accuracy", "val_accuracy"])
    comp = pd.read_csv(folder / "comparisons.csv")
    return {
        "setup": _setup(summary, data["runs"], rows, seeds),
        "results": _results(rows, data["runs"]),
        "means": _means(rows),
        "seeds": _seeds(seeds, rows),
        "comparisons": _comparisons(comp),
        "paper": _paper(rows, seeds, summary),
        "runtime": _runtime(rows, summary, data["runs"]),
        "diagnostics": _diagnostics(data["diagnostics"]),
        "facts": _facts(rows, data["diagnostics"]),
    }
