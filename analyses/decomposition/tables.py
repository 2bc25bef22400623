"""README blocks of the decomposition study, rendered from results.csv, correlations.csv, robustness.csv
and results.json only (no model run). ``run.py`` calls :func:`render` after writing its outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from readme_blocks import markdown_table

SHOWN_LAYERS = (0, 1, 5, 10, 15, 20, 24, 27, 28, 29)
CHECKS = {
    "spearman_layers_0_22": "layers 0-22 only",
    "spearman_differences": "layer-to-layer differences",
    "partial_spearman_given_layer": "partial Spearman given the layer",
}
LABELS = {
    "spim_embed": "spim embed",
    "cos_embed": "cos embed",
    "norm_ratio_embed": "norm ratio embed",
    "spim_attn_total": "spim attn (all)",
    "spim_mlp_total": "spim MLP (all)",
    "spim_own_mlp": "spim own MLP",
    "cos_own_mlp": "cos own MLP",
    "norm_ratio_own_mlp": "norm ratio own MLP",
    "spim_own_attn": "spim own attn",
    "cos_own_attn": "cos own attn",
    "norm_ratio_own_attn": "norm ratio own attn",
    "max_norm_ratio": "max norm ratio",
    "top1_agreement": "top-1 agreement",
}


def _signed(value: float, digits: int = 2) -> str:
    return f"{value:+.{digits}f}"


def _p_value(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p {p:.3f}"


def _setup(meta: dict, layers: pd.DataFrame) -> str:
    return (
        f"- texts: every {meta['text_step']}th text of the embedded corpus ({meta['corpus_texts']} texts, all genres), "
        f"{meta['n_texts']} texts cut to {meta['max_length']} tokens, {meta['n_tokens']:,} tokens in all;\n"
        f"- the remainder (sum of the components minus the residual) is at most "
        f"{layers.reconstruction_rel_error.max():.1e} of `||e||` (`reconstruction_rel_error`, max over layers and texts);\n"
        f"- bootstrap: {meta['bootstrap']:,} resamples, seed {meta['seed']}; run time {meta['seconds']['total']} s "
        f"({meta['torch_threads']} torch threads)."
    )


def _layers(layers: pd.DataFrame) -> str:
    shown = layers[layers.layer.isin(SHOWN_LAYERS)]
    columns = {
        "layer": lambda r: str(int(r["layer"])),
        "spim embed": "spim_embed",
        "cos embed": "cos_embed",
        "norm ratio embed": "norm_ratio_embed",
        "spim attn (all)": "spim_attn_total",
        "spim MLP (all)": "spim_mlp_total",
        "spim own MLP": "spim_own_mlp",
        "cos own attn": "cos_own_attn",
        "KL bits": lambda r: f"{r['kl_bits']:.1f}",
        "top-1 agree": lambda r: f"{r['top1_agreement']:.2f}",
    }
    return markdown_table(shown, columns, align="r" * len(columns))


def _findings(layers: pd.DataFrame) -> str:
    by = layers.set_index("layer")
    last = int(by.index.max())
    middle = by.loc[1 : last - 6]
    late = by.loc[last - 5 :]
    worst = int(by.kl_bits.iloc[:-1].idxmax())
    attn_peak = int(by.spim_attn_total.idxmax())
    below_half = by.index[by.top1_agreement >= 0.5]
    return "\n".join(
        [
            f"- **The embedding is almost invisible in the residual.** After block 0 the embedding's norm is "
            f"{by.norm_ratio_embed[0]:.1%} of the residual's and falls to {by.norm_ratio_embed[last]:.1%} by layer {last}; "
            f"its spim stays within [{by.spim_embed.min():.3f}, {by.spim_embed.max():.3f}]. Block 0's MLP output alone makes up "
            f"{by.spim_own_mlp[0]:.1%} of the residual after block 0 (spim {by.spim_own_mlp[0]:.3f}, norm ratio "
            f"{by.norm_ratio_own_mlp[0]:.3f}): SmolLM2's first MLP overwrites the token embedding with a much larger vector.",
            f"- **MLP outputs carry most of the residual**: the summed MLP spim is {middle.spim_mlp_total.min():.2f}-"
            f"{middle.spim_mlp_total.max():.2f} for layers 1-{last - 6} and {late.spim_mlp_total.min():.2f}-"
            f"{late.spim_mlp_total.max():.2f} in the last six layers, where attention outputs reach "
            f"{by.spim_attn_total.max():.0%} (layer {attn_peak}).",
            f"- **The logit lens is very poor in the middle of this small model**: KL is {by.kl_bits[0]:.1f} bits at layer 0, "
            f"peaks at {by.kl_bits[worst]:.1f} bits at layer {worst}, and falls to {by.kl_bits[last - 6]:.1f} at layer "
            f"{last - 6} and {by.kl_bits[last - 1]:.1f} at layer {last - 1}; top-1 agreement with the final layer first "
            f"reaches 0.5 at layer {int(below_half.min())}.",
        ]
    )


def _correlations(corr: pd.DataFrame) -> str:
    wide = corr.pivot(index="indicator", columns="method")
    order = wide[("r", "spearman")].abs().sort_values(ascending=False).index

    def cell(method: str):
        def text(row: dict) -> str:
            name = row["indicator"]
            r = wide.loc[name, ("r", method)]
            lo_t, hi_t = wide.loc[name, ("ci_texts_low", method)], wide.loc[name, ("ci_texts_high", method)]
            lo_l, hi_l = wide.loc[name, ("ci_layers_low", method)], wide.loc[name, ("ci_layers_high", method)]
            return f"{_signed(r)} [{_signed(lo_t)}, {_signed(hi_t)}] [{_signed(lo_l)}, {_signed(hi_l)}]"

        return text

    rows = [{"indicator": name} for name in order]
    columns = {
        "indicator": lambda r: LABELS[r["indicator"]],
        "Spearman [texts CI] [layers CI]": cell("spearman"),
        "Pearson [texts CI] [layers CI]": cell("pearson"),
    }
    return markdown_table(rows, columns, align="lll")


def _relation(layers: pd.DataFrame, corr: pd.DataFrame) -> str:
    by = layers.set_index("layer")
    r = corr.set_index(["indicator", "method"]).r
    first_positive = int(by.index[(by.cos_embed > 0) & (by.index > 0)].min())
    return (
        "The clearest relation: **the lens is good where the residual turns back towards the token embedding** "
        f"(Spearman {_signed(r['cos_embed', 'spearman'])}, Pearson {_signed(r['cos_embed', 'pearson'])}). "
        "The cosine between the residual and the current token's embedding is slightly negative through the "
        f"middle layers (mean {by.cos_embed.loc[10:18].mean():+.3f} over layers 10-18) and positive from layer "
        f"{first_positive} on. SmolLM2 ties its embeddings, so this is the residual moving towards the "
        "unembedding row of the *input* token. Layers where attention outputs make up more of the residual also "
        f"have better lenses (Spearman {_signed(r['spim_attn_total', 'spearman'])})."
    )


def _robustness(robust: pd.DataFrame) -> str:
    robust = robust.reindex(robust.spearman_all.abs().sort_values(ascending=False).index)

    def check(name: str):
        return lambda r: f"{_signed(r[name])} ({_p_value(r['p_' + name])})"

    columns = {"indicator": lambda r: LABELS[r["indicator"]], "Spearman, all layers": check("spearman_all")}
    columns.update({label: check(name) for name, label in CHECKS.items()})
    table = markdown_table(robust, columns, align="lrrrr")

    def keeps(row: pd.Series, significant: bool) -> bool:
        sign = row["spearman_all"] > 0
        return all((row[c] > 0) == sign and (not significant or row["p_" + c] < 0.05) for c in CHECKS)

    rows = [row for _, row in robust.iterrows()]
    same_sign = [LABELS[row["indicator"]] for row in rows if keeps(row, False)]
    significant = [LABELS[row["indicator"]] for row in rows if keeps(row, True)]
    return (
        table
        + "\n\nSame sign as over all layers in all three checks: "
        + ", ".join(same_sign)
        + ".\nSame sign **and** p < 0.05 in all three checks (no correction for the "
        + f"{len(robust)} indicators): "
        + (", ".join(significant) or "none")
        + "."
    )


def render(folder: Path) -> dict[str, str]:
    """``{block name: markdown}`` for the study's README, from its committed outputs."""
    folder = Path(folder)
    layers = pd.read_csv(folder / "results.csv")
    meta = json.loads((folder / "results.json").read_text())
    corr = pd.read_csv(folder / "correlations.csv")
    return {
        "setup": _setup(meta, layers),
        "layers": _layers(layers),
        "findings": _findings(layers),
        "correlations": _correlations(corr),
        "relation": _relation(layers, corr),
        "robustness": _robustness(pd.read_csv(folder / "robustness.csv")),
    }
