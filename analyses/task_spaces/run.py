"""Study: linguistic task spaces of the embedded model (minimal pairs, gradient similarity, FTGD transfer).

SmolLM2-135M-Instruct, the shipped minimal pairs (9 phenomena x 200, seed 0), BOS prepended for
scoring (the default of vsem_lens.minimal_pair_accuracy). Stages (each writes its files as soon as it
finishes, so a partial run leaves usable results):

- ``accuracy``: minimal-pair accuracy per phenomenon on the first ``--n-accuracy`` pairs of each
  phenomenon (Wilson 95% intervals) -> accuracy.csv
- ``accuracy_nobos``: the same without BOS (the first token is then only context) -> accuracy_no_bos.csv
- ``layers``: accuracy by layer through the logit lens (``final_norm``; ``tuned`` too with the tuned lens
  saved in ``--tuned-lens DIR``, or the one cached for the model) on the first ``--n-layers-pairs`` pairs
  -> by_layer.csv, onset.csv
- ``gradients``: gradient of each phenomenon's mean log-prob margin on its first ``--n-grad`` pairs
  (all 134.5M parameters, stored in bfloat16), cosine and top-1% mask Jaccard, overall and per block
  -> similarity.csv, block_norms.csv
- ``ftgd``: FTGD transfer matrix; per phenomenon a copy is tuned on ``--n-train`` pairs (disjoint from
  the ``--n-eval`` held-out pairs of every phenomenon), updating the top ``--top-frac`` parameters by
  gradient differential, ``--steps`` Adam steps of ``--batch`` pairs at ``--lr``, objective
  ``softplus(-margin)``; perplexity change on ``--n-corpus`` texts of the embedded corpus
  -> transfer.csv, perplexity.csv, ftgd_training.csv
- comparison of the task spaces with a hypothesis matrix (HYPOTHESIS below) -> comparison.csv;
  clustered heatmaps -> figures/*.html (self-contained, git-ignored).

One torch thread (shared 2-core box). Run:  python analyses/task_spaces/run.py   (~25 min on one core)
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
    parser.add_argument("--stages", default="accuracy,layers,gradients,ftgd")
    parser.add_argument("--n-accuracy", type=int, default=100)
    parser.add_argument("--n-layers-pairs", type=int, default=12)
    parser.add_argument("--n-grad", type=int, default=24)
    parser.add_argument("--n-train", type=int, default=16)
    parser.add_argument("--n-eval", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--top-frac", type=float, default=0.01)
    parser.add_argument("--n-corpus", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tuned-lens", type=Path, default=None,
                        help="a saved tuned lens for the `tuned` curves of the layers stage (default: the cached one)")
    args = parser.parse_args()
    stages = set(args.stages.split(","))  # "none": only redo the comparison from the saved files

    import pandas as pd
    import torch

    sys.path.insert(0, str(HERE.parents[1]))
    import vsem_lens as vl
    from vsem_lens import taskspace as mp
    from vsem_lens import taskspace as ts
    from vsem_lens.core.models import cache_dir

    torch.set_num_threads(1)
    started = time.time()
    figures = HERE / "figures"
    figures.mkdir(exist_ok=True)
    meta_path = HERE / "results.json"
    # Stages may run in separate processes; each merges its own keys into results.json when saving.
    meta = {"model": None, f"args[{args.stages}]": vars(args), "torch_threads": 1}
    seconds: dict = {}

    def save_meta():
        merged = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        merged.update(meta)
        merged.setdefault("seconds", {}).update(seconds)
        meta_path.write_text(json.dumps(merged, indent=2, default=str) + "\n")

    def log(msg):
        print(f"[{time.time() - started:6.0f} s] {msg}", flush=True)

    model = vl.load_model()
    meta["model"] = model.name
    pairs = mp.load_minimal_pairs()
    groups = {}
    for p in pairs:
        groups.setdefault(p.phenomenon, []).append(p)
    names = list(groups)

    def first(n):
        return [p for g in groups.values() for p in g[:n]]

    if "accuracy" in stages:
        t = time.time()
        acc = mp.minimal_pair_accuracy(model, first(args.n_accuracy), batch_size=32)
        acc.to_csv(HERE / "accuracy.csv", index=False, float_format="%.4f")
        seconds["accuracy"] = round(time.time() - t)
        save_meta()
        log("accuracy\n" + acc.round(3).to_string())

    if "accuracy_nobos" in stages:  # the same pairs scored without BOS (first token only context)
        t = time.time()
        acc = mp.minimal_pair_accuracy(model, first(args.n_accuracy), batch_size=32, prepend_bos=False)
        acc.to_csv(HERE / "accuracy_no_bos.csv", index=False, float_format="%.4f")
        seconds["accuracy_nobos"] = round(time.time() - t)
        save_meta()
        log("accuracy without BOS\n" + acc.round(3).to_string())

    if "layers" in stages:
        t = time.time()
        frames: list = ["final_norm"]
        tuned = _tuned_lens(model, args.tuned_lens)
        if tuned is not None:
            frames.append(tuned)
            where = str(args.tuned_lens or "cache").replace(str(cache_dir()), "$VSEM_LENS_CACHE")
            meta["tuned_frame"] = {"lens": where, "training": tuned.config.to_dict(),
                                   "summary": tuned.metadata.get("summary", {})}
        else:
            meta["tuned_frame"] = "skipped: no tuned lens is cached for the model (train one with `vsem-lens lens train`)"
        tables = [
            mp.minimal_pair_accuracy_by_layer(model, first(args.n_layers_pairs), frame=f, batch_size=32) for f in frames
        ]
        frames = [getattr(f, "frame", f) for f in frames]
        by_layer = pd.concat(tables, ignore_index=True)
        by_layer.to_csv(HERE / "by_layer.csv", index=False, float_format="%.4f")
        onset = pd.concat(
            [mp.preference_onset(tab).assign(frame=f) for f, tab in zip(frames, tables)], ignore_index=True
        )
        onset.to_csv(HERE / "onset.csv", index=False, float_format="%.4f")
        seconds["layers"] = round(time.time() - t)
        save_meta()
        log("onset\n" + onset.round(3).to_string())
        import plotly.express as px

        fig = px.line(by_layer, x="layer", y="accuracy", color="phenomenon", line_dash="frame",
                      title="minimal-pair accuracy by layer (logit lens)")
        fig.write_html(figures / "accuracy_by_layer.html")

    if "gradients" in stages:
        t = time.time()
        grads = ts.phenomenon_gradients(model, first(args.n_grad), batch_size=8, dtype=torch.bfloat16)
        log("gradients done")
        sim = ts.gradient_similarity(grads, top_frac=args.top_frac)
        sim.to_csv(HERE / "similarity.csv", index=False, float_format="%.5f")
        grads.block_norms().to_csv(HERE / "block_norms.csv", index=False, float_format="%.6g")
        seconds["gradients"] = round(time.time() - t)
        meta["n_params"] = grads.n_params
        save_meta()
        for value in ("cosine", "jaccard"):
            m = ts.task_space_matrix(sim, value)
            log(f"{value}\n" + m.round(3).to_string())
            ts.plot_task_space(m, title=f"gradient {value} (overall, top {args.top_frac:.0%} masks)",
                               value_label=value).write_html(figures / f"gradient_{value}.html")
        del grads

    if "ftgd" in stages:
        t = time.time()
        cfg = ts.FTGDConfig(top_frac=args.top_frac, steps=args.steps, lr=args.lr, batch_size=args.batch,
                            objective="margin", seed=args.seed)

        def save(res):  # after every tuned phenomenon, so a partial run leaves usable results
            res.transfer.to_csv(HERE / "transfer.csv", index=False, float_format="%.4f")
            res.perplexity.to_csv(HERE / "perplexity.csv", index=False, float_format="%.4f")
            res.training.to_csv(HERE / "ftgd_training.csv", index=False, float_format="%.4f")
            log(f"ftgd: tuned on {res.training.trained_on.iloc[-1]}")

        res = ts.ftgd_transfer(model, pairs, n_train=args.n_train, n_eval=args.n_eval, config=cfg,
                               n_corpus=args.n_corpus, corpus_max_length=64, progress=False, callback=save)
        seconds["ftgd"] = round(time.time() - t)
        meta["ftgd"] = res.meta
        save_meta()
        for value in ("delta_accuracy", "delta_margin"):
            m = res.matrix(value).drop(columns="all")
            log(f"{value}\n" + m.round(3).to_string())
            ts.plot_task_space(m, title=f"FTGD transfer: {value} (row: tuned on, column: evaluated on)",
                               value_label=value).write_html(figures / f"ftgd_{value}.html")
        log("perplexity\n" + res.perplexity.round(3).to_string())

    # comparison with the hypothesis, from whatever results exist
    rows = []
    hyp = hypothesis_matrix(names)
    if (HERE / "similarity.csv").is_file():
        sim = pd.read_csv(HERE / "similarity.csv")
        for value in ("cosine", "jaccard"):
            m = ts.task_space_matrix(sim, value)
            rows.append({"task_space": f"gradient_{value}", **ts.compare_with_hypothesis(m, hyp, n_permutations=999)})
    if (HERE / "transfer.csv").is_file():
        tr = pd.read_csv(HERE / "transfer.csv")
        for value in ("delta_margin", "delta_accuracy"):
            m = ts.task_space_matrix(tr, value, scope=None).drop(columns="all")
            m = m.loc[:, list(m.index)]  # a partial run: only the phenomena tuned so far
            rows.append({"task_space": f"ftgd_{value}", **ts.compare_with_hypothesis(m, hyp, n_permutations=999)})
        if (HERE / "similarity.csv").is_file():
            g = ts.task_space_matrix(sim, "cosine")
            m = ts.task_space_matrix(tr, "delta_margin", scope=None).drop(columns="all")
            rows.append({"task_space": "ftgd_delta_margin_vs_gradient_cosine",
                         **ts.compare_with_hypothesis(m.loc[:, list(m.index)], g, n_permutations=999)})
    if rows:
        comp = pd.DataFrame(rows)
        comp.to_csv(HERE / "comparison.csv", index=False, float_format="%.4f")
        log("comparison\n" + comp.round(3).to_string())
    seconds["total_last_run"] = round(time.time() - started)
    save_meta()


def _tuned_lens(model, path):
    """The tuned lens saved in ``path``, else the one cached for ``model`` (``None`` without either)."""
    from vsem_lens.lenses.tuned import TunedLens, find_cached_tuned_lens

    return TunedLens.load(path, model=model) if path is not None else find_cached_tuned_lens(model)


if __name__ == "__main__":
    main()
