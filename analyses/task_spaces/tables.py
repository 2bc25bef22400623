"""README blocks of the task-spaces study, rendered from its committed outputs only (no model).

``render(folder)`` reads the CSV/JSON files that ``run.py`` writes and returns the markdown of every
block between ``<!-- begin NAME -->`` and ``<!-- end NAME -->`` in README.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from readme_blocks import fmt, markdown_table  # noqa: E402

SHORT = {
    "sv_agreement_relative_clause": "sv_rc",
    "sv_agreement_prepositional": "sv_pp",
    "det_noun_agreement": "det_noun",
    "anaphor_agreement": "anaphor",
    "npi_licensing": "npi",
    "irregular_past_participle": "irr.part",
    "argument_structure": "arg.str",
    "wh_island": "wh_isl",
    "existential_quantifiers": "ex.quant",
    "all": "all",
}
LAYERS = [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 29]


def _p(value) -> str:
    """A p-value: three decimals, or scientific notation below 0.001."""
    if value is None or np.isnan(value):
        return "n/a"
    if value == 0:
        return "< 1e-15"  # below double precision of the normal approximation
    return f"{value:.3f}" if value >= 0.001 else f"{value:.1e}"


def _rule(table: pd.DataFrame) -> str:
    values = set(table["prepend_bos"].astype(str).str.lower())
    return {"true": "with BOS", "false": "the model's rule (no BOS)"}.get(values.pop(), "mixed") if len(values) == 1 else "mixed"


def _names(folder: Path) -> list[str]:
    acc = pd.read_csv(folder / "accuracy.csv")
    return [n for n in acc.phenomenon if n != "all"]


def _accuracy(folder: Path) -> str:
    acc = pd.read_csv(folder / "accuracy.csv")
    rows = [{**r, "name": f"**{r['phenomenon']}**" if r["phenomenon"] == "all" else r["phenomenon"]}
            for r in acc.to_dict("records")]
    table = markdown_table(rows, {
        "phenomenon": "name",
        "accuracy": lambda r: fmt(r["accuracy"]),
        "95% CI": lambda r: f"{fmt(r['accuracy_ci_low'])}-{fmt(r['accuracy_ci_high'])}",
        "mean margin": lambda r: fmt(r["mean_margin"], 2),
        "ties": "n_ties",
    }, align="lrlrr")
    return f"BOS rule: {_rule(acc)}; {int(acc.n_pairs.iloc[0])} pairs per phenomenon.\n\n{table}"


def _bos(folder: Path) -> str:
    acc = pd.read_csv(folder / "accuracy.csv").set_index("phenomenon")
    bos = pd.read_csv(folder / "accuracy_bos.csv").set_index("phenomenon")
    rows = []
    for name in acc.index:
        a, b = acc.loc[name], bos.loc[name]
        apart = a.accuracy_ci_high < b.accuracy_ci_low or b.accuracy_ci_high < a.accuracy_ci_low
        rows.append({"name": name, "a": a.accuracy, "b": b.accuracy, "d": a.accuracy - b.accuracy,
                     "ci_a": f"{fmt(a.accuracy_ci_low)}-{fmt(a.accuracy_ci_high)}",
                     "ci_b": f"{fmt(b.accuracy_ci_low)}-{fmt(b.accuracy_ci_high)}", "apart": "yes" if apart else "no"})
    table = markdown_table(rows, {
        "phenomenon": "name", f"{_rule(acc.reset_index())}": "a", "95% CI": "ci_a",
        f"{_rule(bos.reset_index())}": "b", "95% CI ": "ci_b", "difference": lambda r: f"{r['d']:+.3f}",
        "intervals disjoint": "apart",
    }, align="lrlrlrl")
    return table


def _layers(folder: Path) -> str:
    by = pd.read_csv(folder / "by_layer.csv")
    pooled = by[by.phenomenon == "all"]
    rows = []
    for frame, group in pooled.groupby("frame", sort=False):
        acc = group.set_index("layer").accuracy
        rows.append({"label": f"all phenomena, `{frame}`", **{str(layer): fmt(acc.get(layer), 2) for layer in LAYERS}})
    table = markdown_table(rows, {"layer": "label", **{str(layer): str(layer) for layer in LAYERS}}, align="l" + "r" * len(LAYERS))
    n = int(pooled.n_pairs.iloc[0])
    return f"BOS rule: {_rule(by)}; {n} pairs pooled ({n // (len(SHORT) - 1)} per phenomenon).\n\n{table}"


def _layers_mean(folder: Path) -> str:
    by = pd.read_csv(folder / "by_layer.csv")
    mid = by[(by.layer >= 6) & (by.layer <= 24)]
    names = list(dict.fromkeys(by.phenomenon))
    rows = []
    for frame, group in mid.groupby("frame", sort=False):
        means = group.groupby("phenomenon").accuracy.mean()
        rows.append({"frame": f"`{frame}`", **{n: fmt(means[n], 2) for n in names}})
    return markdown_table(rows, {"": "frame", **{SHORT.get(n, n): n for n in names}}, align="l" + "r" * len(names))


def _onset(folder: Path) -> str:
    onset = pd.read_csv(folder / "onset.csv")
    names = [n for n in dict.fromkeys(onset.phenomenon)]
    rows = []
    for frame, group in onset.groupby("frame", sort=False):
        g = group.set_index("phenomenon")
        rows.append({"frame": f"`{frame}`", **{n: "none" if np.isnan(g.loc[n, "onset_layer"]) else str(int(g.loc[n, "onset_layer"]))
                                              for n in names}})
    return markdown_table(rows, {"onset layer": "frame", **{SHORT.get(n, n): n for n in names}}, align="l" + "r" * len(names))


def _gradient_file(folder: Path, stem: str) -> pd.DataFrame:
    return pd.read_csv(folder / f"{stem}.csv")


def _matrix(table: pd.DataFrame, value: str, names: list[str], a: str, b: str) -> pd.DataFrame:
    m = table.pivot(index=a, columns=b, values=value)
    rows = [n for n in names if n in m.index]
    return m.loc[rows, [n for n in names if n in m.columns]]


def _cosine(folder: Path) -> str:
    sim = _gradient_file(folder, "similarity")
    names = _names(folder)
    m = _matrix(sim[sim.scope == "overall"], "cosine", names, "phenomenon_a", "phenomenon_b")
    rows = []
    for i, a in enumerate(names):
        cells = {b: ("1" if a == b else fmt(m.loc[a, b], 2)) if j >= i else "" for j, b in enumerate(names)}
        rows.append({"name": a, **cells})
    table = markdown_table(rows, {"": "name", **{SHORT[n]: n for n in names}}, align="l" + "r" * len(names))
    return f"BOS rule: {_rule(sim)}.\n\n{table}"


def _gradient_numbers(folder: Path) -> str:
    sim = _gradient_file(folder, "similarity")
    norms = _gradient_file(folder, "block_norms")
    sv = ("sv_agreement_relative_clause", "sv_agreement_prepositional")
    off = sim[sim.phenomenon_a < sim.phenomenon_b]
    overall = off[off.scope == "overall"]
    is_sv = overall.phenomenon_a.isin(sv) & overall.phenomenon_b.isin(sv)
    sv_row, others = overall[is_sv].iloc[0], overall[~is_sv]
    blocks = off[(off.scope.str.startswith("block_")) & off.phenomenon_a.isin(sv) & off.phenomenon_b.isin(sv)]
    blocks = blocks.assign(index=blocks.scope.str.slice(6).astype(int)).sort_values("index")
    early = blocks[blocks["index"] <= 20]
    best = blocks.loc[blocks.cosine.idxmax()]
    share = norms.assign(sq=norms.grad_norm**2)
    share = share.assign(frac=share.sq / share.groupby("phenomenon").sq.transform("sum"))
    frac = share.groupby("block").frac.mean()
    lines = [
        f"- BOS rule of these gradients: {_rule(sim)}",
        f"- subject-verb agreement pair: cosine {fmt(sv_row.cosine, 2)} overall; in blocks 0-20 from "
        f"{fmt(early.cosine.min(), 2)} to {fmt(early.cosine.max(), 2)} (median {fmt(early.cosine.median(), 2)}), "
        f"highest {fmt(best.cosine, 2)} in {best.scope}",
        f"- the {len(others)} other pairs: mean cosine {fmt(others.cosine.mean(), 2)}, from {fmt(others.cosine.min(), 2)} "
        f"to {fmt(others.cosine.max(), 2)}",
        f"- top-1% mask Jaccard: {fmt(sv_row.jaccard, 2)} for the subject-verb pair, {fmt(others.jaccard.min(), 2)}-"
        f"{fmt(others.jaccard.max(), 2)} for the others; random 1% masks would give about "
        f"{fmt(0.01 / (2 - 0.01), 3)}",
        f"- share of the squared gradient norm (mean over phenomena): block_0 {fmt(frac.get('block_0', np.nan), 2)}, "
        f"embedding {fmt(frac.get('embed', np.nan), 2)}",
    ]
    return "\n".join(lines)


def _transfer(folder: Path, name: str = "transfer.csv") -> str:
    tr = pd.read_csv(folder / name)
    names = _names(folder)
    m = _matrix(tr, "delta_margin", names, "trained_on", "evaluated_on")
    rows = []
    for a in m.index:
        rows.append({"name": a, **{b: f"**{m.loc[a, b]:.1f}**" if a == b else f"{m.loc[a, b]:.1f}" for b in m.columns}})
    table = markdown_table(rows, {"tuned on \\ eval": "name", **{SHORT[n]: n for n in m.columns}}, align="l" + "r" * len(m.columns))
    return f"BOS rule: {_rule(tr)}; {len(m.index)} of {len(names)} phenomena tuned.\n\n{table}"


def _ftgd_numbers(folder: Path) -> str:
    tr = pd.read_csv(folder / "transfer.csv")
    tr = tr[tr.evaluated_on != "all"]
    ppl = pd.read_csv(folder / "perplexity.csv")
    training = pd.read_csv(folder / "ftgd_training.csv")
    diag = tr[tr.trained_on == tr.evaluated_on]
    off = tr[tr.trained_on != tr.evaluated_on]
    lo, hi = diag.loc[diag.delta_margin.idxmin()], diag.loc[diag.delta_margin.idxmax()]
    gains = ", ".join(f"{SHORT[r.trained_on]} {r.delta_accuracy:+.2f} ({r.accuracy_before:.2f} before)"
                      for r in diag.itertuples())
    worst = ppl.loc[ppl.relative_change.idxmax()]
    lines = [
        f"- same phenomenon (diagonal): mean margin change {diag.delta_margin.mean():+.1f} nats, from "
        f"{lo.delta_margin:+.1f} ({SHORT[lo.trained_on]}) to {hi.delta_margin:+.1f} ({SHORT[hi.trained_on]})",
        f"- accuracy change on the diagonal: {gains}",
        f"- other phenomena: mean margin change {off.delta_margin.mean():+.2f} nats, positive in "
        f"{(off.delta_margin > 0).mean():.0%} of {len(off)} cells",
        f"- training loss: first step {fmt(training.loss_first.min(), 2)}-{fmt(training.loss_first.max(), 2)}, last step "
        f"{fmt(training.loss_last.min(), 2)}-{fmt(training.loss_last.max(), 2)}; {int(training.n_updated.min()):,}-"
        f"{int(training.n_updated.max()):,} parameters updated",
        f"- corpus perplexity {fmt(ppl.perplexity_before.iloc[0], 2)} before; relative change "
        f"{ppl.relative_change.min():+.1%} to {ppl.relative_change.max():+.1%} (largest after {SHORT[worst.trained_on]}: "
        f"{fmt(worst.perplexity_after, 2)})",
    ]
    return "\n".join(lines)


def _control(folder: Path) -> str:
    if not (folder / "control.csv").is_file():
        return "Not run."
    ctl = pd.read_csv(folder / "control.csv")
    training = pd.read_csv(folder / "control_training.csv")
    table = markdown_table(ctl, {
        "tuned on": lambda r: SHORT[r["trained_on"]],
        "evaluated on": "scope",
        "held-out pairs": "n_pairs",
        "FTGD mask": lambda r: f"{r['delta_task_mask']:+.2f}",
        "random mask (mean of seeds)": lambda r: f"{r['delta_random_mask']:+.2f}",
        "random, seed range": lambda r: f"{r['random_seed_min']:+.2f} to {r['random_seed_max']:+.2f}",
        "difference": lambda r: f"{r['difference']:+.2f}",
        "95% bootstrap CI": lambda r: f"{r['ci_low']:+.2f} to {r['ci_high']:+.2f}",
        "Wilcoxon p": lambda r: _p(r["wilcoxon_p"]),
    }, align="llrrrrrrr")
    seeds = sorted(training.mask_seed.unique())
    return (f"Mean margin change (nats) on held-out pairs; random masks: seeds {', '.join(map(str, seeds))}, "
            f"{int(training.n_updated.min()):,}-{int(training.n_updated.max()):,} parameters each. BOS rule: {_rule(ctl)}.\n\n"
            f"{table}")


def _control_summary(folder: Path) -> str:
    path = folder / "control_summary.json"
    if not path.is_file():
        return "Not run."
    data = json.loads(path.read_text())
    lines = []
    for label, d in data.items():
        lines.append(
            f"- {label.replace('_', '-')} cells ({d['n_cells']}): FTGD mask {d['mean_task_mask']:+.2f}, random mask "
            f"{d['mean_random_mask']:+.2f} nats; difference {d['mean_difference']:+.2f} (95% bootstrap CI "
            f"{d['ci_low']:+.2f} to {d['ci_high']:+.2f}, Wilcoxon p = {_p(d['wilcoxon_p'])}); "
            f"positive in {d['positive_task_mask']:.0%} vs {d['positive_random_mask']:.0%} of cells"
        )
    return "\n".join(lines)


def _first_word(folder: Path) -> str:
    frames = []
    for name, label in (("first_word.csv", "FTGD mask"), ("control_first_word.csv", "random mask")):
        if (folder / name).is_file():
            frames.append(pd.read_csv(folder / name).assign(mask=label))
    if not frames:
        return "Not run."
    fw = pd.concat(frames, ignore_index=True)
    fw["trained_on"] = fw.trained_on.fillna("(original model)")
    fw["gap"] = fw.logp_first_good - fw.logp_first_bad
    base = fw[(fw["mask"] == "FTGD mask") & (fw.trained_on == "(original model)")].set_index("pair").gap
    rows = []
    for (mask, trained), g in fw.groupby(["mask", "trained_on"], sort=False):
        if trained == "(original model)" and mask == "random mask":
            continue
        change = g.gap.to_numpy() - base.loc[g.pair].to_numpy()
        seeds = g.groupby("mask_seed").gap.mean() if "mask_seed" in g and g.mask_seed.notna().any() else None
        rows.append({"mask": "" if trained == "(original model)" else mask, "trained": SHORT.get(trained, trained),
                     "n": g.pair.nunique(), "good": g.logp_first_good.mean(), "bad": g.logp_first_bad.mean(),
                     "gap": g.gap.mean(), "change": change.mean(),
                     "seeds": "" if seeds is None else f"{seeds.min():+.2f} to {seeds.max():+.2f}"})
    return markdown_table(rows, {
        "mask": "mask", "tuned on": "trained", "pairs": "n",
        "log p(good first word given BOS)": lambda r: fmt(r["good"], 2),
        "log p(bad first word given BOS)": lambda r: fmt(r["bad"], 2),
        "gap good - bad (nats)": lambda r: f"{r['gap']:+.2f}",
        "change vs original": lambda r: "" if r["trained"] == "(original model)" else f"{r['change']:+.2f}",
        "gap, seed range": "seeds",
    }, align="llrrrrrr")


def _comparison(folder: Path) -> str:
    comp = pd.read_csv(folder / "comparison.csv")
    labels = {
        "gradient_cosine": "gradient cosine", "gradient_jaccard": "gradient mask Jaccard",
        "ftgd_delta_margin": "FTGD transfer, margin change", "ftgd_delta_accuracy": "FTGD transfer, accuracy change",
        "ftgd_delta_margin_vs_gradient_cosine": "FTGD margin transfer vs gradient cosine",
    }
    return markdown_table(comp, {
        "task space": lambda r: labels.get(r["task_space"], r["task_space"]),
        "BOS": lambda r: "with BOS" if r["prepend_bos"] else "model's rule (no BOS)",
        "cells": "n_cells",
        "Spearman": lambda r: fmt(r["spearman"], 2),
        "Pearson": lambda r: fmt(r["pearson"], 2),
        "Mantel p": lambda r: fmt(r["mantel_p"], 3),
    })


def _settings(folder: Path) -> str:
    meta = json.loads((folder / "results.json").read_text()) if (folder / "results.json").is_file() else {}
    earlier = json.loads((folder / "earlier_run_bos.json").read_text())
    rule = meta.get("bos_rule", {})
    lines = [f"- BOS rule of this run: prepend_bos={rule.get('prepend_bos')} (the model's; SmolLM2's BOS token "
             f"is `{rule.get('bos_token')}`, id {rule.get('bos_token_id')})"]
    seconds = meta.get("seconds", {})
    for key, value in meta.items():
        if key.startswith("args[") and key != "args[none]":  # "none": statistics only, no model stage
            stage = key[5:-1]
            args = ", ".join(f"{k}={v}" for k, v in value.items() if k != "stages")
            times = ", ".join(f"{s} {seconds[s]} s" for s in stage.split(",") if s in seconds)
            lines.append(f"- stage `{stage}`: {args}; wall time {times or 'not recorded'}")
    for key, value in meta.items():
        if key.endswith("_process"):
            lines.append(f"- {key}: " + "; ".join(f"{k}: {v}" for k, v in value.items()))
    old = earlier.get("seconds", {})
    lines.append("- earlier run (minimal pairs defaulted to BOS), wall times: "
                 + ", ".join(f"{k} {v} s" for k, v in old.items()) + " (`earlier_run_bos.json`)")
    return "\n".join(lines)


def render(folder: Path) -> dict[str, str]:
    """``{block name: markdown}`` for README.md, from the committed outputs in ``folder``."""
    folder = Path(folder)
    return {
        "settings": _settings(folder),
        "accuracy": _accuracy(folder),
        "bos": _bos(folder),
        "layers": _layers(folder),
        "layers_mean": _layers_mean(folder),
        "onset": _onset(folder),
        "cosine": _cosine(folder),
        "gradient_numbers": _gradient_numbers(folder),
        "transfer": _transfer(folder),
        "transfer_bos": _transfer(folder, "transfer_bos.csv"),
        "ftgd_numbers": _ftgd_numbers(folder),
        "control": _control(folder),
        "control_summary": _control_summary(folder),
        "first_word": _first_word(folder),
        "comparison": _comparison(folder),
    }
