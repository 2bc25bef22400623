"""Plotly figures of the analysis tables: one function per picture, each returning a ``go.Figure``.

Every figure has titled axes and hover text, and references no external URL (embed it with
``fig.to_html(include_plotlyjs=True)`` for a self-contained file). Inputs are the tidy tables of
:func:`~vsem_lens.geometry.isotropy.isotropy_by_layer`, :func:`~vsem_lens.geometry.decomposition.decomposition_by_layer`,
:func:`~vsem_lens.geometry.sparsity.affinity_sparsity_by_layer` and the
:class:`~vsem_lens.geometry.coherence.BasisCoherence` of :func:`~vsem_lens.geometry.coherence.basis_coherence`.
When a table holds several (site, frame) groups, a dropdown switches between them.

Example:
    >>> fig = plot_isotropy_by_layer(isotropy_by_layer(model, corpus))  # doctest: +SKIP
    >>> fig.write_html("isotropy.html", include_plotlyjs=True)            # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..core.errors import InputError
from ..core.tokens import quoted_token

ISOTROPY_MEASURES = {
    "isoscore": "IsoScore",
    "isoscore_star": "IsoScore*",
    "average_cosine": "average cosine",
    "outlier_variance_share": "variance share of top-k dims",
}
KIND_ORDER = ("embed", "attn", "mlp", "remainder")
KIND_COLORS = {"embed": "#7f7f7f", "attn": "#1f77b4", "mlp": "#ff7f0e", "remainder": "#d62728"}
WHICH_LABELS = {"semantic_basis": "semantic basis (pinv W_U)", "unembedding": "unembedding (W_U columns)"}


def _require(df: Any, columns: Sequence[str], what: str) -> pd.DataFrame:
    if not isinstance(df, pd.DataFrame):
        raise InputError(f"{what} expects a pandas DataFrame, got {type(df).__name__}.")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(f"{what}: the table lacks columns {missing}; pass the output of the matching analysis.")
    if df.empty:
        raise InputError(f"{what}: the table is empty.")
    return df


def _groups(df: pd.DataFrame) -> list[tuple[tuple[str, str], pd.DataFrame]]:
    """(site, frame) groups in table order."""
    keys = list(dict.fromkeys(zip(df["site"], df["frame"])))
    return [((s, f), df[(df["site"] == s) & (df["frame"] == f)].sort_values("layer")) for s, f in keys]


def _dropdown(fig: go.Figure, labels: list[str], traces_per_group: int) -> None:
    """Add a dropdown showing one group of consecutive traces at a time (no-op for one group)."""
    if len(labels) < 2:
        return
    n = len(labels) * traces_per_group
    buttons = []
    for g, label in enumerate(labels):
        visible = [g * traces_per_group <= i < (g + 1) * traces_per_group for i in range(n)]
        buttons.append({"label": label, "method": "update", "args": [{"visible": visible}]})
    fig.update_layout(
        updatemenus=[{"buttons": buttons, "direction": "down", "x": 1.0, "xanchor": "right", "y": 1.15, "yanchor": "top"}]
    )


def plot_isotropy_by_layer(df: pd.DataFrame) -> go.Figure:
    """Isotropy measures per layer: one line per measure, a dropdown per (site, frame).

    Lines: IsoScore, IsoScore*, average cosine and the variance share of the top-k outlier dimensions
    (all on a [0, 1]-like scale); hover adds the participation ratio, token count and outlier dims.

    Example:
        >>> fig = plot_isotropy_by_layer(isotropy_by_layer(model, corpus))  # doctest: +SKIP
        >>> len(fig.data)   # 4 measures x (site, frame) groups               # doctest: +SKIP
        8
    """
    df = _require(df, ["layer", "site", "frame", "n_tokens", *ISOTROPY_MEASURES, "participation_ratio"],
                  "plot_isotropy_by_layer")
    fig = go.Figure()
    groups = _groups(df)
    for g, ((site, frame), sub) in enumerate(groups):
        dims = sub["outlier_dims"].astype(str) if "outlier_dims" in sub else [""] * len(sub)
        custom = np.stack([sub["participation_ratio"].to_numpy(), sub["n_tokens"].to_numpy(), np.asarray(dims, dtype=object)], axis=1)
        for measure, label in ISOTROPY_MEASURES.items():
            fig.add_trace(
                go.Scatter(
                    x=sub["layer"],
                    y=sub[measure],
                    mode="lines+markers",
                    name=label,
                    legendgroup=label,
                    visible=g == 0,
                    customdata=custom,
                    hovertemplate=(
                        f"<b>{label}</b> ({site}, {frame})<br>layer %{{x}}<br>value %{{y:.4f}}<br>"
                        "participation ratio %{customdata[0]:.1f}<br>tokens %{customdata[1]}<br>"
                        "outlier dims %{customdata[2]}<extra></extra>"
                    ),
                )
            )
    site, frame = groups[0][0]
    k = df.attrs.get("k_outliers", "k")
    fig.update_layout(
        title=f"Isotropy by layer ({site}, {frame} frame; top-{k} outlier dims)" if len(groups) == 1
        else "Isotropy by layer (choose site / frame)",
        xaxis_title="layer",
        yaxis_title="score",
        hovermode="closest",
    )
    _dropdown(fig, [f"{s} / {f}" for (s, f), _ in groups], len(ISOTROPY_MEASURES))
    return fig


def plot_outlier_dimensions(df: pd.DataFrame) -> go.Figure:
    """Heatmap of the outlier dimensions per layer: variance share of each top-k dimension.

    Rows are the coordinate dimensions that are among the top k at any layer; cells are empty where a
    dimension is not in that layer's top k. One heatmap per (site, frame), chosen by a dropdown.

    Example:
        >>> plot_outlier_dimensions(isotropy_by_layer(model, corpus)).data[0].type  # doctest: +SKIP
        'heatmap'
    """
    df = _require(df, ["layer", "site", "frame", "outlier_dims"], "plot_outlier_dimensions")
    fig = go.Figure()
    groups = _groups(df)
    for g, ((site, frame), sub) in enumerate(groups):
        layers = sub["layer"].tolist()
        dims = sorted({int(d) for row in sub["outlier_dims"] for d in row})
        z = np.full((len(dims), len(layers)), np.nan)
        row_of = {d: i for i, d in enumerate(dims)}
        shares = sub["outlier_shares"].tolist() if "outlier_shares" in sub else [[1.0] * len(r) for r in sub["outlier_dims"]]
        for j, (row_dims, row_shares) in enumerate(zip(sub["outlier_dims"], shares)):
            for d, s in zip(row_dims, row_shares):
                z[row_of[int(d)], j] = s
        fig.add_trace(
            go.Heatmap(
                x=layers,
                y=[f"dim {d}" for d in dims],
                z=z,
                colorscale="Viridis",
                colorbar={"title": "variance share"},
                visible=g == 0,
                name=f"{site} / {frame}",
                hovertemplate=f"{site}, {frame}<br>layer %{{x}}<br>%{{y}}<br>variance share %{{z:.3f}}<extra></extra>",
            )
        )
    fig.update_layout(
        title="Outlier dimensions by layer (share of total variance, top-k per layer)",
        xaxis_title="layer",
        yaxis_title="coordinate dimension",
    )
    _dropdown(fig, [f"{s} / {f}" for (s, f), _ in groups], 1)
    return fig


def _component_order(components: Sequence[str]) -> list[str]:
    def key(name: str) -> tuple[int, int, int]:
        if name == "embed":
            return (0, -1, 0)
        if name == "remainder":
            return (2, 0, 0)
        kind, _, j = name.partition("_")
        return (1, int(j) if j.isdigit() else 0, 0 if kind == "attn" else 1)

    return sorted(set(components), key=key)


def plot_components_by_layer(
    df: pd.DataFrame, measure: str = "spim_mean", *, view: str = "kinds"
) -> go.Figure:
    """Contribution of the residual's components per layer (Mickus & Vazquez indicators).

    ``view="kinds"`` (default): one line per component kind (embedding, attention, MLP, remainder);
    for ``spim_*`` the components of a kind are summed (spim is additive: the lines then sum to 1),
    for the other measures they are averaged over the kind's components. ``view="components"``: a
    heatmap of every component (rows, in residual order) by layer.

    Args:
        df: output of :func:`~vsem_lens.geometry.decomposition.decomposition_by_layer`.
        measure: a numeric column, e.g. ``spim_mean``, ``cos_mean``, ``dist_mean``, ``norm_ratio_mean``.
        view: ``kinds`` or ``components``.

    Example:
        >>> fig = plot_components_by_layer(dec, "spim_mean")                    # doctest: +SKIP
        >>> [t.name for t in fig.data]                                          # doctest: +SKIP
        ['embed', 'attn', 'mlp', 'remainder']
    """
    df = _require(df, ["layer", "component", "kind", measure], "plot_components_by_layer")
    if not pd.api.types.is_numeric_dtype(df[measure]):
        raise InputError(f"measure {measure!r} is not a numeric column; try 'spim_mean' or 'cos_mean'.")
    if view not in ("kinds", "components"):
        raise InputError(f"view must be 'kinds' or 'components', got {view!r}.")
    fig = go.Figure()
    additive = measure.startswith("spim")
    if view == "kinds":
        how = "sum" if additive else "mean"
        agg = df.groupby(["layer", "kind"], sort=True).agg(value=(measure, how), n=("component", "size")).reset_index()
        for kind in [k for k in KIND_ORDER if k in set(agg["kind"])]:
            sub = agg[agg["kind"] == kind]
            fig.add_trace(
                go.Scatter(
                    x=sub["layer"],
                    y=sub["value"],
                    mode="lines+markers",
                    name=kind,
                    line={"color": KIND_COLORS.get(kind)},
                    customdata=sub["n"],
                    hovertemplate=(
                        f"<b>{kind}</b><br>layer %{{x}}<br>{how} of {measure} %{{y:.4g}}"
                        "<br>over %{customdata} component(s)<extra></extra>"
                    ),
                )
            )
        y_title = f"{measure} ({'sum' if additive else 'mean'} over the kind's components)"
    else:
        order = _component_order(df["component"])
        table = df.pivot_table(index="component", columns="layer", values=measure, aggfunc="first").reindex(order)
        fig.add_trace(
            go.Heatmap(
                x=table.columns.tolist(),
                y=table.index.tolist(),
                z=table.to_numpy(),
                colorscale="RdBu" if additive or measure.startswith("cos") else "Viridis",
                zmid=0.0 if additive or measure.startswith("cos") else None,
                colorbar={"title": measure},
                hovertemplate=f"layer %{{x}}<br>%{{y}}<br>{measure} %{{z:.4g}}<extra></extra>",
            )
        )
        y_title = "component"
    fig.update_layout(
        title=f"Residual decomposition by layer: {measure}",
        xaxis_title="layer (residual after block)",
        yaxis_title=y_title,
    )
    return fig


def _coherence_tables(coherence: Any) -> dict[str, Any]:
    if isinstance(coherence, dict):
        return coherence
    if hasattr(coherence, "as_dict"):
        return coherence.as_dict()
    raise InputError(f"expected a BasisCoherence (from basis_coherence) or its as_dict(), got {type(coherence).__name__}.")


def plot_coherence_histogram(coherence: Any) -> go.Figure:
    """Distribution of pairwise cosines: semantic basis vs unembedding columns (same sampled tokens).

    Example:
        >>> plot_coherence_histogram(basis_coherence(basis)).data[0].name  # doctest: +SKIP
    """
    tables = _coherence_tables(coherence)
    hist = _require(tables.get("histogram"), ["which", "bin_center", "bin_left", "bin_right", "count", "fraction"],
                    "plot_coherence_histogram")
    summary = tables.get("summary")
    fig = go.Figure()
    for which in dict.fromkeys(hist["which"]):
        sub = hist[hist["which"] == which]
        label = WHICH_LABELS.get(which, which)
        if isinstance(summary, pd.DataFrame) and which in set(summary["which"]):
            s = summary[summary["which"] == which].iloc[0]
            label += f": mean |cos| {s['mean_abs_cos']:.3f}, max |cos| {s['max_abs_cos']:.3f}"
        fig.add_trace(
            go.Bar(
                x=sub["bin_center"],
                y=sub["fraction"],
                name=label,
                opacity=0.6,
                customdata=np.stack([sub["bin_left"], sub["bin_right"], sub["count"]], axis=1),
                hovertemplate=(
                    f"{which}<br>cos in [%{{customdata[0]:.3f}}, %{{customdata[1]:.3f}})<br>"
                    "fraction %{y:.4f}<br>pairs %{customdata[2]:.0f}<extra></extra>"
                ),
            )
        )
    n = int(summary["n_vectors"].iloc[0]) if isinstance(summary, pd.DataFrame) and len(summary) else None
    fig.update_layout(
        title="Pairwise cosines of a token sample" + (f" ({n} tokens)" if n else ""),
        xaxis_title="cosine similarity",
        yaxis_title="fraction of pairs",
        barmode="overlay",
        bargap=0.0,
        legend={"x": 0.01, "y": 0.99},
    )
    return fig


def plot_leverage(coherence: Any, *, max_points: int = 2000) -> go.Figure:
    """Leverage ``P_ii`` of every token, sorted, with the tokens at both extremes marked.

    The sorted curve is thinned to about ``max_points`` points (it is smooth) to keep the figure small;
    the extremes are drawn in full with their token strings on hover. The dashed line is the mean
    leverage d_model / d_vocab.

    Example:
        >>> len(plot_leverage(basis_coherence(basis)).data)  # doctest: +SKIP
        3
    """
    tables = _coherence_tables(coherence)
    lev = _require(tables.get("leverage"), ["token_id", "token", "leverage"], "plot_leverage")
    ext = tables.get("leverage_extremes")
    order = np.argsort(-lev["leverage"].to_numpy(), kind="stable")
    sorted_lev = lev.iloc[order].reset_index(drop=True)
    n = len(sorted_lev)
    keep = np.unique(np.linspace(0, n - 1, min(n, max_points)).round().astype(int))
    thin = sorted_lev.iloc[keep]
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=keep,
            y=thin["leverage"],
            mode="lines",
            name="all tokens (sorted)",
            customdata=np.stack([thin["token"].map(quoted_token), thin["token_id"]], axis=1),
            hovertemplate="rank %{x}<br>token %{customdata[0]} (id %{customdata[1]})<br>leverage %{y:.4g}<extra></extra>",
        )
    )
    if isinstance(ext, pd.DataFrame) and not ext.empty:
        for end, symbol in (("high", "triangle-up"), ("low", "triangle-down")):
            sub = ext[ext["end"] == end]
            x = sub["rank"].to_numpy() if end == "high" else n - 1 - sub["rank"].to_numpy()
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=sub["leverage"],
                    mode="markers",
                    marker={"symbol": symbol, "size": 8},
                    name=f"{end}est leverage",
                    customdata=np.stack([sub["token"].map(quoted_token), sub["token_id"]], axis=1),
                    hovertemplate="%{customdata[0]} (id %{customdata[1]})<br>leverage %{y:.4g}<extra></extra>",
                )
            )
    meta = tables.get("meta", {}) or {}
    mean = meta.get("mean_leverage")
    if mean:
        fig.add_hline(y=mean, line_dash="dash", annotation_text=f"mean d/V = {mean:.3g}")
    fig.update_layout(
        title="Token leverage P_ii of the semantic-basis projector (sums to d_model)",
        xaxis_title="token rank (by leverage)",
        yaxis_title="leverage P_ii",
    )
    return fig


def plot_affinity_sparsity(df: pd.DataFrame) -> go.Figure:
    """Concentration of the vocabulary readout per layer: entropy, top-k mass and top-1 cosine.

    Three stacked panels sharing the layer axis: softmax entropy in bits (affinity and logit lens,
    dotted line at the maximum log2 V), probability mass of the top k, and the top-1 cosine of the
    vocabulary affinity; error bars are the standard deviation over tokens.

    Example:
        >>> len(plot_affinity_sparsity(affinity_sparsity_by_layer(model, corpus)).data)  # doctest: +SKIP
        5
    """
    cols = ["layer", "readout", "entropy_bits_mean", "entropy_bits_std", "topk_mass_mean", "topk_mass_std",
            "top1_cosine_mean", "top1_cosine_std"]
    df = _require(df, cols, "plot_affinity_sparsity")
    k = int(df["k"].iloc[0]) if "k" in df else None
    frame = df["frame"].iloc[0] if "frame" in df else ""
    fig = make_subplots(
        rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.06,
        subplot_titles=("softmax entropy (bits)", f"top-{k if k else 'k'} probability mass", "top-1 cosine (affinity)"),
    )
    colors = {"affinity": "#2ca02c", "lens": "#9467bd"}
    labels = {"affinity": "vocabulary affinity", "lens": "logit lens"}
    for readout in [r for r in ("affinity", "lens") if r in set(df["readout"])]:
        sub = df[df["readout"] == readout].sort_values("layer")
        for row, key in ((1, "entropy_bits"), (2, "topk_mass")):
            fig.add_trace(
                go.Scatter(
                    x=sub["layer"], y=sub[f"{key}_mean"],
                    error_y={"type": "data", "array": sub[f"{key}_std"], "visible": True, "thickness": 1},
                    mode="lines+markers", name=labels[readout], legendgroup=readout, showlegend=row == 1,
                    line={"color": colors[readout]},
                    hovertemplate=f"{labels[readout]}<br>layer %{{x}}<br>{key} %{{y:.4g}}<extra></extra>",
                ),
                row=row, col=1,
            )
        if readout == "affinity":
            fig.add_trace(
                go.Scatter(
                    x=sub["layer"], y=sub["top1_cosine_mean"],
                    error_y={"type": "data", "array": sub["top1_cosine_std"], "visible": True, "thickness": 1},
                    mode="lines+markers", name="top-1 cosine", legendgroup=readout, showlegend=False,
                    line={"color": colors[readout]},
                    hovertemplate="affinity<br>layer %{x}<br>top-1 cosine %{y:.4f}<extra></extra>",
                ),
                row=3, col=1,
            )
    if "max_entropy_bits" in df:
        fig.add_hline(y=float(df["max_entropy_bits"].iloc[0]), line_dash="dot", row=1, col=1,
                      annotation_text="log2 V (uniform)")
    fig.update_yaxes(title_text="bits", row=1, col=1)
    fig.update_yaxes(title_text="probability", row=2, col=1)
    fig.update_yaxes(title_text="cosine", row=3, col=1)
    fig.update_xaxes(title_text="layer", row=3, col=1)
    fig.update_layout(title=f"Vocabulary readout concentration by layer ({frame} frame)", height=750)
    return fig
