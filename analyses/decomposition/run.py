"""Study: residual-decomposition indicators by layer vs per-layer logit-lens quality (embedded model).

For SmolLM2-135M-Instruct and a genre-balanced slice of the embedded corpus (every k-th text, truncated
to ``--max-length`` tokens, the library's tokenisation rule: no BOS):

1. component indicators per layer (Mickus & Vazquez 2023; ``vsem_lens.decomposition_by_layer``):
   spim (share of the residual, sums to 1), cosine and norm ratio of each component with the residual
   ``resid_post``; summarised per layer as the embedding's indicators, the summed spim of all attention
   / all MLP outputs so far, and the indicators of the layer's own MLP and attention output;
2. lens quality per layer: mean KL(final || logit lens) in bits over all tokens (``final_norm`` frame,
   ``vsem_lens.iter_layer_readouts``) and the top-1 agreement with the final layer;
3. correlation across layers 0..L-2 (the last layer's KL is 0 by construction) between each indicator
   and the KL: Spearman and Pearson, with two 95% bootstrap intervals (2000 resamples): over texts
   (per-layer means recomputed from resampled texts: corpus sampling noise) and over layers
   (resampling the (indicator, KL) points: which layers happen to be included; layers are
   autocorrelated, so this interval is optimistic).

Everything is computed per text (one decomposition per text), so the text bootstrap needs no second pass.
One torch thread (the box is a shared 2-core machine; two threads were several times slower).

Writes results.csv (per layer), correlations.csv, results.json next to this file.
Run:  python analyses/decomposition/run.py            (~5 min on one core; results.json has the time)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-texts", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--robustness-only", action="store_true", help="recompute robustness.csv from results.csv")
    args = parser.parse_args()
    if args.robustness_only:
        robustness()
        return

    import numpy as np
    import pandas as pd
    import torch
    from scipy.stats import pearsonr, spearmanr

    sys.path.insert(0, str(HERE.parents[1]))
    import vsem_lens as vl

    torch.set_num_threads(1)
    started = time.time()
    model = vl.load_model()
    corpus = vl.load_corpus("default")
    step = max(1, len(corpus) // args.n_texts)
    texts = corpus[::step][: args.n_texts]
    L = model.n_layers

    # 1. per-text decomposition -> per (text, layer) indicators
    rows = []
    for t, text in enumerate(texts):
        dec = vl.geometry.decomposition_by_layer(model, [text], max_length=args.max_length)
        for layer, g in dec.groupby("layer"):
            n = int(g.n_tokens.iloc[0])
            own_mlp = g[g.component == f"mlp_{layer}"].iloc[0]
            own_attn = g[g.component == f"attn_{layer}"].iloc[0]
            emb = g[g.component == "embed"].iloc[0]
            rows.append(
                {
                    "text": t,
                    "layer": int(layer),
                    "n_tokens": n,
                    "spim_embed": emb.spim_mean,
                    "cos_embed": emb.cos_mean,
                    "norm_ratio_embed": emb.norm_ratio_mean,
                    "spim_attn_total": g[g.kind == "attn"].spim_mean.sum(),
                    "spim_mlp_total": g[g.kind == "mlp"].spim_mean.sum(),
                    "spim_own_mlp": own_mlp.spim_mean,
                    "cos_own_mlp": own_mlp.cos_mean,
                    "norm_ratio_own_mlp": own_mlp.norm_ratio_mean,
                    "spim_own_attn": own_attn.spim_mean,
                    "cos_own_attn": own_attn.cos_mean,
                    "norm_ratio_own_attn": own_attn.norm_ratio_mean,
                    "max_norm_ratio": g[g.kind != "remainder"].norm_ratio_mean.max(),
                    "reconstruction_rel_error": g.reconstruction_rel_error.iloc[0],
                }
            )
        print(f"decomposition {t + 1}/{len(texts)}  {time.time() - started:.0f} s", flush=True)
    per_text = pd.DataFrame(rows)
    t_dec = time.time() - started

    # 2. lens quality per (text, layer): sums of KL and top-1 agreement over tokens
    kl_sum = np.zeros((len(texts), L))
    agree_sum = np.zeros((len(texts), L))
    n_tok = np.zeros(len(texts))
    for out in vl.iter_layer_readouts(
        model, texts, frame="final_norm", readouts=("lens",), k=1, batch_size=4, max_length=args.max_length
    ):
        doc = out.doc_index.numpy()
        kl = out.readouts["lens"]["kl_bits"].double().numpy()  # [L, T]
        agree = (out.readouts["lens"]["final_rank"] == 0).double().numpy()
        for li, layer in enumerate(out.layers):
            np.add.at(kl_sum[:, layer], doc, kl[li])
            np.add.at(agree_sum[:, layer], doc, agree[li])
        np.add.at(n_tok, doc, 1)
    t_kl = time.time() - started - t_dec
    lens = pd.DataFrame(
        [{"text": t, "layer": l, "kl_sum": kl_sum[t, l], "agree_sum": agree_sum[t, l]} for t in range(len(texts)) for l in range(L)]
    )
    per_text = per_text.merge(lens, on=["text", "layer"])
    assert np.allclose(per_text.groupby("text").n_tokens.first().to_numpy(), n_tok)

    indicators = [c for c in per_text.columns if c not in ("text", "layer", "n_tokens", "kl_sum", "agree_sum", "reconstruction_rel_error")]

    def layer_means(df: pd.DataFrame) -> pd.DataFrame:
        w = df.n_tokens
        agg = {c: (df[c] * w).groupby(df.layer).sum() / w.groupby(df.layer).sum() for c in indicators}
        agg["kl_bits"] = df.kl_sum.groupby(df.layer).sum() / w.groupby(df.layer).sum()
        agg["top1_agreement"] = df.agree_sum.groupby(df.layer).sum() / w.groupby(df.layer).sum()
        return pd.DataFrame(agg)

    by_layer = layer_means(per_text)
    by_layer["reconstruction_rel_error"] = per_text.groupby("layer").reconstruction_rel_error.max()
    by_layer.index.name = "layer"
    by_layer.reset_index().to_csv(HERE / "results.csv", index=False, float_format="%.6g")

    # 3. correlations across layers 0..L-2 with bootstrap intervals
    rng = np.random.default_rng(args.seed)
    keep = by_layer.index < L - 1
    text_ids = per_text.text.unique()
    groups = {t: g for t, g in per_text.groupby("text")}
    boot_tables = []
    for _ in range(args.bootstrap):
        sample = rng.choice(text_ids, size=len(text_ids), replace=True)
        df = pd.concat([groups[t] for t in sample], ignore_index=True)
        boot_tables.append(layer_means(df)[lambda d: d.index < L - 1])
    corr_rows = []
    for c in indicators + ["top1_agreement"]:
        x = by_layer.loc[keep, c].to_numpy()
        y = by_layer.loc[keep, "kl_bits"].to_numpy()
        for name, fn in (("spearman", lambda a, b: spearmanr(a, b).statistic), ("pearson", lambda a, b: pearsonr(a, b).statistic)):
            est = float(fn(x, y))
            by_text = np.array([fn(b[c].to_numpy(), b["kl_bits"].to_numpy()) for b in boot_tables])
            by_layers = []
            for _ in range(args.bootstrap):
                idx = rng.integers(0, len(x), len(x))
                if np.ptp(x[idx]) > 0 and np.ptp(y[idx]) > 0:
                    by_layers.append(fn(x[idx], y[idx]))
            by_layers = np.array(by_layers)
            corr_rows.append(
                {
                    "indicator": c,
                    "method": name,
                    "r": est,
                    "ci_texts_low": float(np.nanpercentile(by_text, 2.5)),
                    "ci_texts_high": float(np.nanpercentile(by_text, 97.5)),
                    "ci_layers_low": float(np.nanpercentile(by_layers, 2.5)),
                    "ci_layers_high": float(np.nanpercentile(by_layers, 97.5)),
                }
            )
    corr = pd.DataFrame(corr_rows)
    corr.to_csv(HERE / "correlations.csv", index=False, float_format="%.4f")
    meta = {
        "model": model.name,
        "corpus_texts": len(corpus),
        "text_step": step,
        "n_texts": len(texts),
        "n_tokens": int(n_tok.sum()),
        "max_length": args.max_length,
        "frame": "final_norm",
        "layers_correlated": f"0..{L - 2}",
        "bootstrap": args.bootstrap,
        "seed": args.seed,
        "seconds": {"decomposition": round(t_dec), "lens_kl": round(t_kl), "total": round(time.time() - started)},
        "torch_threads": torch.get_num_threads(),
    }
    (HERE / "results.json").write_text(json.dumps(meta, indent=2) + "\n")
    pd.set_option("display.width", 200)
    print(by_layer.round(3).to_string())
    print(corr.round(3).to_string())
    print(json.dumps(meta, indent=2))
    robustness()


def robustness() -> None:
    """Depth confound checks from results.csv: every indicator trends with depth, and so does the KL.

    Per indicator: Spearman over layers 0..22 only (before the late KL drop), Spearman of the
    layer-to-layer differences, and the partial Spearman correlation controlling for the layer index
    (ranks residualised on the layer's rank), each with its two-sided p-value. Writes robustness.csv
    and re-renders the README's blocks.
    """
    import numpy as np
    import pandas as pd
    from scipy.stats import pearsonr, rankdata, spearmanr
    from scipy.stats import t as student_t

    d = pd.read_csv(HERE / "results.csv")
    d = d[d.layer < d.layer.max()]
    rows = []
    rl = rankdata(d.layer)

    def residual(v):
        return v - np.polyval(np.polyfit(rl, v, 1), rl)

    def partial(x, y):
        # Pearson of rank residuals; one degree of freedom fewer for the layer regressed out.
        r = pearsonr(residual(rankdata(x)), residual(rankdata(y))).statistic
        dof = len(x) - 3
        return r, float(2 * student_t.sf(abs(r) * np.sqrt(dof / max(1e-300, 1 - r * r)), dof))

    early = d.layer <= 22
    for c in [c for c in d.columns if c not in ("layer", "kl_bits", "reconstruction_rel_error")]:
        checks = {
            "spearman_all": spearmanr(d[c], d.kl_bits),
            "spearman_layers_0_22": spearmanr(d[c][early], d.kl_bits[early]),
            "spearman_differences": spearmanr(np.diff(d[c]), np.diff(d.kl_bits)),
        }
        row = {"indicator": c}
        for name, result in checks.items():
            row[name], row[f"p_{name}"] = result.statistic, result.pvalue
        row["partial_spearman_given_layer"], row["p_partial_spearman_given_layer"] = partial(d[c], d.kl_bits)
        rows.append(row)
    out = pd.DataFrame(rows)
    out.to_csv(HERE / "robustness.csv", index=False, float_format="%.4g")
    print(out.round(3).to_string())
    sys.path[:0] = [str(HERE), str(HERE.parent)]
    import tables
    from readme_blocks import write_blocks

    write_blocks(HERE / "README.md", tables.render(HERE))


if __name__ == "__main__":
    main()
