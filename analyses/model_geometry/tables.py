"""README blocks of the model-geometry study, rendered from coherence.csv, isotropy.csv and results.json
only (no model run). ``run.py`` calls :func:`render` after writing its outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from readme_blocks import fmt, markdown_table

SHOWN_LAYERS = (0, 5, 10, 15, 20, 25, 29)


def middle_layers(n_layers: int) -> range:
    """The middle two thirds of the stack: the layers the concept pages mean by 'middle'."""
    return range(n_layers // 6, n_layers - n_layers // 6)


def _coherence(summary: pd.DataFrame) -> str:
    columns = {
        "vectors": lambda r: {"semantic_basis": "semantic bases s_i", "unembedding": "unembedding columns u_i"}[r["which"]],
        "tokens": "n_vectors",
        "mean cos": "mean_cos",
        "mean abs cos": "mean_abs_cos",
        "median abs cos": "q50_abs_cos",
        "max abs cos": lambda r: fmt(float(r["max_abs_cos"])),
        "pair reaching the max": lambda r: "`" + str(r["max_pair_tokens"]).replace("|", "\\|").replace("`", "'") + "`",
    }
    return markdown_table(summary, columns, align="lrrrrrl")


def _isotropy(iso: pd.DataFrame) -> str:
    shown = iso[iso.layer.isin(SHOWN_LAYERS)].sort_values(["frame", "layer"], key=lambda c: c.map(str) if c.name == "frame" else c)
    columns = {
        "frame": "frame",
        "layer": lambda r: str(int(r["layer"])),
        "IsoScore": lambda r: fmt(r["isoscore"], 4),
        "IsoScore*": lambda r: fmt(r["isoscore_star"], 4),
        "average cosine": "average_cosine",
        "participation ratio": lambda r: fmt(r["participation_ratio"], 2),
        "top dimension (variance share)": lambda r: f"{int(r['top_dim'])} ({r['top_dim_share']:.1%})",
    }
    return markdown_table(shown, columns, align="lrrrrrr")


def _findings(iso: pd.DataFrame, summary: pd.DataFrame, meta: dict) -> str:
    n_layers = int(iso.layer.max()) + 1
    middle = middle_layers(n_layers)
    mid = iso[iso.layer.isin(middle)]
    raw, normed = mid[mid.frame == "raw"], mid[mid.frame == "final_norm"]
    top = raw.top_dim.mode().iloc[0]
    on_top = raw[raw.top_dim == top]
    coh = summary.set_index("which")
    return "\n".join(
        [
            f"- Middle layers ({middle.start}-{middle.stop - 1} of {n_layers}), `raw` frame: IsoScore below 0.002 in "
            f"{int((raw.isoscore < 0.002).sum())} of {len(raw)} layers (median {fmt(raw.isoscore.median(), 4)}, "
            f"largest {fmt(raw.isoscore.max(), 4)} at layer {int(raw.loc[raw.isoscore.idxmax(), 'layer'])}); the same "
            f"states after the model's final norm (`final_norm`): {fmt(normed.isoscore.min(), 4)}-"
            f"{fmt(normed.isoscore.max(), 4)} (median {fmt(normed.isoscore.median(), 4)}).",
            f"- Coordinate dimension {top} carries the most raw residual variance in {len(on_top)} of the "
            f"{len(raw)} middle layers, {on_top.top_dim_share.min():.1%}-{on_top.top_dim_share.max():.1%} of it.",
            f"- Mean |cos| over pairs of {int(coh.n_vectors['semantic_basis']):,} sampled tokens: "
            f"{fmt(coh.mean_abs_cos['semantic_basis'])} for the semantic bases against "
            f"{fmt(coh.mean_abs_cos['unembedding'])} for the unembedding columns.",
            f"- Corpus: {meta['n_texts']} texts cut to {meta['max_length']} tokens "
            f"({int(raw.n_tokens.iloc[0]):,} token states per layer); run time {meta['seconds']['total']} s.",
        ]
    )


def render(folder: Path) -> dict[str, str]:
    """``{block name: markdown}`` for the study's README, from its committed outputs."""
    folder = Path(folder)
    summary = pd.read_csv(folder / "coherence.csv")
    iso = pd.read_csv(folder / "isotropy.csv")
    meta = json.loads((folder / "results.json").read_text())
    return {
        "findings": _findings(iso, summary, meta),
        "coherence": _coherence(summary),
        "isotropy": _isotropy(iso),
    }
