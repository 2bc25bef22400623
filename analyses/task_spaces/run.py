"""Study: linguistic task spaces of the embedded model (minimal pairs, gradient similarity, FTGD transfer).

SmolLM2-135M-Instruct, the shipped minimal pairs (9 phenomena x 200, seed 0). Every stage follows the
model's BOS rule (``load_model()``'s ``prepend_bos=False``: token ids as the HF tokenizer makes them, the
first token only context) and records it (a ``prepend_bos`` column in every CSV, ``bos_rule`` in
results.json). Stages (each writes its files as soon as it finishes, so a partial run leaves usable results):

- ``accuracy``: minimal-pair accuracy per phenomenon on the first ``--n-accuracy`` pairs of each
  phenomenon (Wilson 95% intervals) -> accuracy.csv
- ``accuracy_bos``: the same with BOS prepended (every word scored after ``<|im_start|>``) -> accuracy_bos.csv
- ``layers``: accuracy by layer through the logit lens (``final_norm``; ``tuned`` too with the tuned lens
  saved in ``--tuned-lens DIR``, or the one cached for the model) on the first ``--n-layers-pairs`` pairs
  -> by_layer.csv, onset.csv
- ``gradients``: gradient of each phenomenon's mean log-prob margin on its first ``--n-grad`` pairs
  (all 134.5M parameters, stored in bfloat16), cosine and top-1% mask Jaccard, overall and per block
  -> similarity.csv, block_norms.csv
- ``ftgd``: FTGD transfer matrix; per phenomenon a copy is tuned on ``--n-train`` pairs (disjoint from
  the ``--n-eval`` held-out pairs of every phenomenon), updating the top ``--top-frac`` parameters by
  gradient differential, ``--steps`` Adam steps of ``--batch`` pairs at ``--lr``, objective
  ``softplus(-margin)``; perplexity change on ``--n-corpus`` texts of the embedded corpus; the
  first-word probe (log p(first word | BOS) of the pairs that differ in their first word)
  -> transfer.csv, perplexity.csv, ftgd_training.csv, ftgd_pairs.csv, first_word.csv
- ``control``: the same with a random mask of the same size (seeds ``--control-seeds``) on
  ``--control-phenomena`` -> control_transfer.csv, control_perplexity.csv, control_training.csv,
  control_pairs.csv, control_first_word.csv (``--control-tag _s1`` writes control_<table>_s1.csv instead,
  so seeds can run in parallel processes; every run folds those files into control_<table>.csv)
- always (no model): paired statistics FTGD mask vs random mask -> control.csv, control_summary.json;
  comparison of the task spaces with a hypothesis matrix (FAMILIES below) -> comparison.csv; the README
  blocks (tables.py). Clustered heatmaps -> figures/*.html (self-contained, git-ignored).

One torch thread (shared 2-core box). ``--stages none`` redoes only the statistics and the README.
``accuracy_bos.csv`` and ``transfer_bos.csv`` (with BOS, from an earlier run; ``earlier_run_bos.json``) are
comparisons kept on purpose (see README, "Provenance").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: Our hypothesis, written before looking at the results: phenomena in the same family are similar.
FAMILIES = {
    "sv_agreement_relative_clause": "agreement",
    "sv_agreement_prepositional": "agreement",
    "det_noun_agreement": "agreement",
    "anaphor_agreement": "agreement",
    "npi_licensing": "quantification",
    "existential_quantifiers": "quantification",
    "irregular_past_participle": "verbs",
    "argument_structure": "verbs",
    "wh_island": "movement",
}


def hypothesis_matrix(names):
    import pandas as pd

    values = [[1.0 if FAMILIES.get(a) == FAMILIES.get(b) else 0.0 for b in names] for a in names]
    for i, a in enumerate(names):  # the two subject-verb agreement tasks are closest of all
        for j, b in enumerate(names):
            if a != b and a.startswith("sv_agreement") and b.startswith("sv_agreement"):
                values[i][j] = 2.0
    return pd.DataFrame(values, index=names, columns=names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="accuracy,accuracy_bos,layers,gradients,ftgd,control")
    parser.add_argument("--n-accuracy", type=int, default=200)
    parser.add_argument("--n-layers-pairs", type=int, default=24)
    parser.add_argument("--n-grad", type=int, default=24)
    parser.add_argument("--n-train", type=int, default=24)
    parser.add_argument("--n-eval", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--top-frac", type=float, default=0.01)
    parser.add_argument("--n-corpus", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ftgd-phenomena", default="all",
                        help="comma-separated phenomena to tune, in this order, or all (every phenomenon is evaluated)")
    parser.add_argument("--control-seeds", default="0,1,2", help="seeds of the random-mask control")
    parser.add_argument("--control-phenomena", default="all", help="comma-separated phenomena, or all")
    parser.add_argument("--control-tag", default="",
                        help="write control_<table><TAG>.csv (seeds run in parallel processes; merged by every run)")
    parser.add_argument("--tuned-lens", type=Path, default=None,
                        help="a saved tuned lens for the `tuned` curves of the layers stage (default: the cached one)")
    args = parser.parse_args()
    stages = set(args.stages.split(","))  # "none": only redo the statistics and the README

    import pandas as pd

    sys.path.insert(0, str(HERE.parents[1]))
    sys.path.insert(0, str(HERE.parent))
    sys.path.insert(0, str(HERE))
    import tables
    from readme_blocks import write_blocks

    started = time.time()
    meta_path = HERE / "results.json"
    # Stages may run in separate processes; each merges its own keys into results.json when saving.
    recorded = dict(vars(args))
    if args.tuned_lens is not None:  # the cache folder of this machine, written portably
        from vsem_lens.core.models import cache_dir

        recorded["tuned_lens"] = str(args.tuned_lens).replace(str(cache_dir()), "$VSEM_LENS_CACHE")
    meta: dict = {f"args[{args.stages}]": recorded, "torch_threads": 1}
    seconds: dict = {}

    def save_meta():
        merged = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        merged.update(meta)
        merged.setdefault("seconds", {}).update(seconds)
        meta_path.write_text(json.dumps(merged, indent=2, default=str) + "\n")

    def log(msg):
        print(f"[{time.time() - started:6.0f} s] {msg}", flush=True)

    if stages - {"none"}:
        _model_stages(args, stages, meta, seconds, save_meta, log)
    _merge_control()
    _statistics(log)
    names = list(pd.read_csv(HERE / "accuracy.csv").phenomenon.drop_duplicates().loc[lambda s: s != "all"])
    _comparison(names, log)
    seconds["total_last_run"] = round(time.time() - started)
    save_meta()
    write_blocks(HERE / "README.md", tables.render(HERE))


def _model_stages(args, stages, meta, seconds, save_meta, log) -> None:
    """Every stage that needs the model (see the module docstring)."""
    import torch

    import vsem_lens as vl
    from vsem_lens import taskspace as ts
    from vsem_lens.core.models import cache_dir

    torch.set_num_threads(1)
    figures = HERE / "figures"
    figures.mkdir(exist_ok=True)
    model = vl.load_model()
    meta["model"] = model.name
    tok = model.tokenizer
    meta["bos_rule"] = {"prepend_bos": model.prepend_bos, "bos_token": tok.bos_token, "bos_token_id": tok.bos_token_id,
                        "note": "every stage follows the model's rule; accuracy_bos.csv overrides it with prepend_bos=True"}
    pairs = ts.load_minimal_pairs()
    groups: dict = {}
    for p in pairs:
        groups.setdefault(p.phenomenon, []).append(p)

    def first(n):
        return [p for g in groups.values() for p in g[:n]]

    def timed(name, fn):
        t = time.time()
        fn()
        seconds[name] = round(time.time() - t)
        save_meta()

    if "accuracy" in stages:
        def accuracy():
            acc = ts.minimal_pair_accuracy(model, first(args.n_accuracy), batch_size=32)
            acc.to_csv(HERE / "accuracy.csv", index=False, float_format="%.4f")
            log("accuracy (model's BOS rule)\n" + acc.round(3).to_string())
        timed("accuracy", accuracy)

    if "accuracy_bos" in stages:  # the same pairs with BOS prepended: every word scored
        def accuracy_bos():
            acc = ts.minimal_pair_accuracy(model, first(args.n_accuracy), batch_size=32, prepend_bos=True)
            acc.to_csv(HERE / "accuracy_bos.csv", index=False, float_format="%.4f")
            log("accuracy with BOS\n" + acc.round(3).to_string())
        timed("accuracy_bos", accuracy_bos)

    if "layers" in stages:
        def layers():
            import pandas as pd

            frames: list = ["final_norm"]
            tuned = _tuned_lens(model, args.tuned_lens)
            if tuned is not None:
                frames.append(tuned)
                where = str(args.tuned_lens or "cache").replace(str(cache_dir()), "$VSEM_LENS_CACHE")
                meta["tuned_frame"] = {"lens": where, "training": tuned.config.to_dict(),
                                       "summary": tuned.metadata.get("summary", {})}
            else:
                meta["tuned_frame"] = "skipped: no tuned lens is cached for the model (train one with `vsem-lens lens train`)"
            tabs = [ts.minimal_pair_accuracy_by_layer(model, first(args.n_layers_pairs), frame=f, batch_size=32)
                    for f in frames]
            labels = [getattr(f, "frame", f) for f in frames]
            by_layer = pd.concat(tabs, ignore_index=True)
            by_layer.to_csv(HERE / "by_layer.csv", index=False, float_format="%.4f")
            onset = pd.concat([ts.preference_onset(tab).assign(frame=f, prepend_bos=model.prepend_bos)
                               for f, tab in zip(labels, tabs)], ignore_index=True)
            onset.to_csv(HERE / "onset.csv", index=False, float_format="%.4f")
            log("onset\n" + onset.round(3).to_string())
        timed("layers", layers)

    if "gradients" in stages:
        def gradients():
            grads = ts.phenomenon_gradients(model, first(args.n_grad), batch_size=8, dtype=torch.bfloat16)
            sim = ts.gradient_similarity(grads, top_frac=args.top_frac)
            sim.to_csv(HERE / "similarity.csv", index=False, float_format="%.5f")
            grads.block_norms().to_csv(HERE / "block_norms.csv", index=False, float_format="%.6g")
            meta["n_params"] = grads.n_params
            meta["gradients"] = grads.meta
            for value in ("cosine", "jaccard"):
                m = ts.task_space_matrix(sim, value)
                log(f"{value}\n" + m.round(3).to_string())
                ts.plot_task_space(m, title=f"gradient {value} (overall, top {args.top_frac:.0%} masks)",
                                   value_label=value).write_html(figures / f"gradient_{value}.html")
        timed("gradients", gradients)

    if "ftgd" in stages:
        timed("ftgd", lambda: _ftgd(model, pairs, args, meta, log, figures))

    if "control" in stages:
        timed("control", lambda: _control(model, pairs, args, meta, log))


def _first_word_probe(model):
    """log p(first word | BOS) of the held-out pairs that differ in their first word (NPI licensing).

    The study scores sentences without BOS (the model's rule), so the tuning objective never contains
    this term; the probe measures whether tuning moved it anyway.
    """
    from vsem_lens.taskspace.minimal_pairs import text_logprobs

    def probe(m, eval_pairs):
        chosen = [p for p in eval_pairs if p.critical == 0]
        if not chosen:
            return []
        import torch

        with torch.no_grad():
            lp_good, _ = text_logprobs(m, [p.good for p in chosen], prepend_bos=True)
            lp_bad, _ = text_logprobs(m, [p.bad for p in chosen], prepend_bos=True)
        return [{"evaluated_on": p.phenomenon, "pair": i, "good": p.good.split()[0], "bad": p.bad.split()[0],
                 "logp_first_good": float(lp_good[i, 0]), "logp_first_bad": float(lp_bad[i, 0]),
                 "prepend_bos_probe": True}
                for i, p in enumerate(chosen)]

    return probe


def _transfer_setup(model, pairs, args, *, mask="gradient", mask_seed=0, phenomena=None):
    from vsem_lens import taskspace as ts
    from vsem_lens.taskspace.transfer import split_pairs

    cfg = ts.FTGDConfig(top_frac=args.top_frac, steps=args.steps, lr=args.lr, batch_size=args.batch,
                        objective="margin", seed=args.seed, mask=mask, mask_seed=mask_seed)
    _, test = split_pairs(pairs, n_train=args.n_train, n_eval=args.n_eval, seed=args.seed)
    eval_pairs = [p for group in test.values() for p in group]
    probe = _first_word_probe(model)
    return cfg, (lambda m: probe(m, eval_pairs))


def _ftgd(model, pairs, args, meta, log, figures) -> None:
    from vsem_lens import taskspace as ts

    cfg, probe = _transfer_setup(model, pairs, args)

    def save(res):  # after every tuned phenomenon, so a partial run leaves usable results
        res.transfer.to_csv(HERE / "transfer.csv", index=False, float_format="%.4f")
        res.perplexity.assign(prepend_bos=cfg.prepend_bos if cfg.prepend_bos is not None else model.prepend_bos).to_csv(
            HERE / "perplexity.csv", index=False, float_format="%.4f")
        res.training.to_csv(HERE / "ftgd_training.csv", index=False, float_format="%.4f")
        res.pairs.to_csv(HERE / "ftgd_pairs.csv", index=False, float_format="%.4f")
        res.probes.to_csv(HERE / "first_word.csv", index=False, float_format="%.4f")
        log(f"ftgd: tuned on {res.training.trained_on.iloc[-1]}")

    tune = None if args.ftgd_phenomena == "all" else args.ftgd_phenomena.split(",")
    res = ts.ftgd_transfer(model, pairs, n_train=args.n_train, n_eval=args.n_eval, config=cfg, tune=tune,
                           n_corpus=args.n_corpus, corpus_max_length=64, progress=False, callback=save, probe=probe)
    meta["ftgd"] = res.meta
    for value in ("delta_accuracy", "delta_margin"):
        m = res.matrix(value).drop(columns="all")
        log(f"{value}\n" + m.round(3).to_string())
        ts.plot_task_space(m, title=f"FTGD transfer: {value} (row: tuned on, column: evaluated on)",
                           value_label=value).write_html(figures / f"ftgd_{value}.html")


def _control(model, pairs, args, meta, log) -> None:
    """FTGD with random masks of the same size: one transfer run per seed, appended to the control files."""
    import pandas as pd

    from vsem_lens import taskspace as ts

    seeds = [int(s) for s in args.control_seeds.split(",")]
    phenomena = None if args.control_phenomena == "all" else args.control_phenomena.split(",")
    out: dict = {"transfer": [], "perplexity": [], "training": [], "pairs": [], "first_word": []}
    meta["control"] = {"seeds": seeds, "phenomena": phenomena or "all", "runs": {}}
    files = {k: HERE / f"control_{k}{args.control_tag}.csv" for k in out}
    for seed in seeds:
        cfg, probe = _transfer_setup(model, pairs, args, mask="random", mask_seed=seed)
        done: dict = {}

        def save(res, seed=seed, done=done):
            done.update(transfer=res.transfer, perplexity=res.perplexity, training=res.training, pairs=res.pairs,
                        first_word=res.probes)
            for key, frames in out.items():
                table = pd.concat(frames + [done[key].assign(mask_seed=seed)], ignore_index=True)
                table.to_csv(files[key], index=False, float_format="%.4f")
            log(f"control seed {seed}: tuned on {res.training.trained_on.iloc[-1]}")

        res = ts.ftgd_transfer(model, pairs, n_train=args.n_train, n_eval=args.n_eval, config=cfg, tune=phenomena,
                               n_corpus=args.n_corpus, corpus_max_length=64, progress=False, callback=save, probe=probe)
        for key in out:
            out[key].append(done[key].assign(mask_seed=seed))
        meta["control"]["runs"][seed] = res.meta


def _merge_control() -> None:
    """Fold control files of seeds run in parallel processes (``--control-tag``) into control_<table>.csv.

    Idempotent: a seed's rows come from its tagged file when one exists, else from control_<table>.csv.
    """
    import pandas as pd

    for table in ("transfer", "perplexity", "training", "pairs", "first_word"):
        tagged = sorted(HERE.glob(f"control_{table}_*.csv"))
        tagged = [path for path in tagged if path.stem[len(f"control_{table}_"):].startswith("s")]
        if not tagged:
            continue
        parts = [pd.read_csv(path) for path in tagged]
        seeds = set().union(*(set(part.mask_seed) for part in parts))
        main = HERE / f"control_{table}.csv"
        if main.is_file():
            old = pd.read_csv(main)
            parts.insert(0, old[~old.mask_seed.isin(seeds)])
        pd.concat(parts, ignore_index=True).sort_values("mask_seed", kind="stable").to_csv(
            main, index=False, float_format="%.4f")


def _statistics(log) -> None:
    """FTGD mask vs random mask of the same size, paired, from the committed pair-level files."""
    import numpy as np
    import pandas as pd
    from scipy import stats

    if not (HERE / "ftgd_pairs.csv").is_file() or not (HERE / "control_pairs.csv").is_file():
        return
    task = pd.read_csv(HERE / "ftgd_pairs.csv").assign(delta=lambda d: d.margin_after - d.margin_before)
    rand = pd.read_csv(HERE / "control_pairs.csv").assign(delta=lambda d: d.margin_after - d.margin_before)
    key = ["trained_on", "evaluated_on", "pair"]
    rand_mean = rand.groupby(key, sort=False).delta.mean().rename("delta_random")
    per_seed = rand.groupby(["trained_on", "evaluated_on", "mask_seed"], sort=False).delta.mean()
    both = task.set_index(key)[["delta"]].join(rand_mean, how="inner").reset_index()
    rng = np.random.default_rng(0)

    def summary(group, label, trained_on):
        diff = (group.delta - group.delta_random).to_numpy()
        boots = rng.choice(diff, size=(10000, diff.size), replace=True).mean(axis=1)
        p = stats.wilcoxon(diff).pvalue if diff.size >= 5 and np.any(diff != 0) else float("nan")
        return {"trained_on": trained_on, "scope": label, "n_pairs": int(diff.size),
                "delta_task_mask": group.delta.mean(), "delta_random_mask": group.delta_random.mean(),
                "difference": diff.mean(), "ci_low": np.quantile(boots, 0.025), "ci_high": np.quantile(boots, 0.975),
                "wilcoxon_p": p}

    rows = []
    for name, group in both.groupby("trained_on", sort=False):
        own = group[group.evaluated_on == name]
        other = group[group.evaluated_on != name]
        rows.append(summary(own, "same phenomenon", name))
        rows.append(summary(other, "other phenomena", name))
        seeds = per_seed.xs(name, level="trained_on")
        rows[-2]["random_seed_min"] = seeds.xs(name, level="evaluated_on").min()
        rows[-2]["random_seed_max"] = seeds.xs(name, level="evaluated_on").max()
        off = seeds.drop(name, level="evaluated_on").groupby(level="mask_seed").mean()
        rows[-1]["random_seed_min"], rows[-1]["random_seed_max"] = off.min(), off.max()
    table = pd.DataFrame(rows)
    table["prepend_bos"] = bool(task.prepend_bos.iloc[0])
    table.to_csv(HERE / "control.csv", index=False, float_format="%.4f")
    log("FTGD vs random mask\n" + table.round(3).to_string())
    # cell level: the 9x9 mean deltas, task mask vs random mask (paired over cells)
    cells = both.groupby(["trained_on", "evaluated_on"], sort=False)[["delta", "delta_random"]].mean().reset_index()
    cells.to_csv(HERE / "control_cells.csv", index=False, float_format="%.4f")
    summary_json = {}
    for label, sub in (("diagonal", cells[cells.trained_on == cells.evaluated_on]),
                       ("off_diagonal", cells[cells.trained_on != cells.evaluated_on])):
        diff = (sub.delta - sub.delta_random).to_numpy()
        boots = rng.choice(diff, size=(10000, diff.size), replace=True).mean(axis=1)
        summary_json[label] = {
            "n_cells": int(diff.size), "mean_task_mask": float(sub.delta.mean()),
            "mean_random_mask": float(sub.delta_random.mean()), "mean_difference": float(diff.mean()),
            "ci_low": float(np.quantile(boots, 0.025)), "ci_high": float(np.quantile(boots, 0.975)),
            "wilcoxon_p": float(stats.wilcoxon(diff).pvalue) if diff.size >= 5 else None,
            "positive_task_mask": float((sub.delta > 0).mean()), "positive_random_mask": float((sub.delta_random > 0).mean()),
        }
    (HERE / "control_summary.json").write_text(json.dumps(summary_json, indent=2) + "\n")


def _comparison(names, log) -> None:
    """Task spaces vs the hypothesis matrix (and the two task spaces vs each other) -> comparison.csv."""
    import pandas as pd

    from vsem_lens import taskspace as ts

    rows = []
    hyp = hypothesis_matrix(names)
    sim = pd.read_csv(HERE / "similarity.csv") if (HERE / "similarity.csv").is_file() else None
    if sim is not None:
        for value in ("cosine", "jaccard"):
            m = ts.task_space_matrix(sim, value)
            rows.append({"task_space": f"gradient_{value}", **ts.compare_with_hypothesis(m, hyp, n_permutations=999),
                         "prepend_bos": bool(sim.prepend_bos.iloc[0])})
    # the transfer matrix enters only when every phenomenon was tuned (a partial run is not a task space)
    tr = pd.read_csv(HERE / "transfer.csv") if (HERE / "transfer.csv").is_file() else None
    if tr is not None and set(tr.trained_on) != set(names):
        log(f"comparison: transfer.csv tunes {tr.trained_on.nunique()} of {len(names)} phenomena; not used")
        tr = None
    if tr is not None:
        for value in ("delta_margin", "delta_accuracy"):
            m = ts.task_space_matrix(tr, value, scope=None).drop(columns="all")
            m = m.loc[:, list(m.index)]
            rows.append({"task_space": f"ftgd_{value}", **ts.compare_with_hypothesis(m, hyp, n_permutations=999),
                         "prepend_bos": bool(tr.prepend_bos.iloc[0])})
        if sim is not None and bool(sim.prepend_bos.iloc[0]) == bool(tr.prepend_bos.iloc[0]):  # same BOS rule only
            g = ts.task_space_matrix(sim, "cosine")
            m = ts.task_space_matrix(tr, "delta_margin", scope=None).drop(columns="all")
            rows.append({"task_space": "ftgd_delta_margin_vs_gradient_cosine",
                         **ts.compare_with_hypothesis(m.loc[:, list(m.index)], g, n_permutations=999),
                         "prepend_bos": bool(tr.prepend_bos.iloc[0])})
    if rows:
        comp = pd.DataFrame(rows)
        comp.to_csv(HERE / "comparison.csv", index=False, float_format="%.4f")
        log("comparison\n" + comp.round(3).to_string())


def _tuned_lens(model, path):
    """The tuned lens saved in ``path``, else the one cached for ``model`` (``None`` without either)."""
    from vsem_lens.lenses.tuned import TunedLens, find_cached_tuned_lens

    return TunedLens.load(path, model=model) if path is not None else find_cached_tuned_lens(model)


if __name__ == "__main__":
    main()
