"""Figures specific to the layerwise report (the general ones live in :mod:`vsem_lens.report.plots`).

Every token string that reaches a figure goes through :func:`display_token`, which makes whitespace
visible and HTML-escapes it: plotly renders a subset of HTML in text and hover labels, so a token such
as ``<b>`` or ``<a href=...>`` must arrive as ``&lt;b&gt;`` to be shown literally (and harmlessly).

Example:
    >>> display_token("<b>\\n")
    '&lt;b&gt;↵'
"""

from __future__ import annotations

import html
import math
from typing import Any, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..core.tokens import display_token
from .plots import ISOTROPY_MEASURES

FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif"
READOUT_STYLE = {
    "lens": ("logit lens", "#6a3d9a"),
    "affinity": ("vocabulary affinity", "#1b9e77"),
    "tuned_lens": ("tuned lens", "#d95f02"),
}
MEASURE_COLORS = {"isoscore": "#1f77b4", "isoscore_star": "#17becf", "average_cosine": "#d62728",
                  "outlier_variance_share": "#7f7f7f"}
MEASURE_STYLE = {measure: (ISOTROPY_MEASURES[measure], color) for measure, color in MEASURE_COLORS.items()}


def style(fig: go.Figure, *, height: int | None = None, width: int | None = None) -> go.Figure:
    """Apply the report's look (white template, system fonts, compact margins) in place; returns ``fig``.

    Example:
        >>> style(go.Figure(), height=300).layout.height
        300
    """
    fig.update_layout(
        template="plotly_white",
        font={"family": FONT, "size": 12, "color": "#1f2328"},
        title={"font": {"size": 15}, "x": 0.01, "xanchor": "left"},
        margin={"l": 70, "r": 30, "t": 80, "b": 60},
        hoverlabel={"font": {"family": FONT, "size": 12}, "align": "left"},
    )
    if height is not None:
        fig.update_layout(height=height)
    if width is not None:
        fig.update_layout(width=width, autosize=False)
    return fig


# ---------------------------------------------------------------------------------- section 1


# Long because one heatmap carries cell text, colour scale, hover template and token axes that must agree.
#: What each readout's map shows: the top-1 column, the colour column and its label, the top-k columns.
MAP_READOUTS = {
    "affinity": {"top1": "affinity_top1", "colour": "affinity_final_cos", "colour_label": "cosine with<br>prediction",
                 "tokens": "affinity_top_tokens", "scores": "affinity_top_scores", "score_name": "cosine",
                 "title": "vocabulary affinity"},
    "lens": {"top1": "lens_top1", "colour": "lens_final_prob", "colour_label": "p(prediction)",
             "tokens": "lens_top_tokens", "scores": "lens_top_scores", "score_name": "logit",
             "title": "logit lens"},
}


def plot_affinity_map(
    df: pd.DataFrame, meta: dict[str, Any], *, frame: str = "final_norm", readout: str = "affinity"
) -> go.Figure:
    """Layer x position heatmap of one example text, for one readout.

    Cell text: the readout's top-1 token (``affinity``: by vocabulary affinity; ``lens``: by the logit
    lens); colour: the affinity (cosine) of the model's final prediction, or its logit-lens probability;
    hover: the readout's top-k tokens with scores, the other readout's top-1 and the ranks of the final
    prediction under both. The top row shows the model's prediction.

    Args:
        df: the rows of one example from the report's ``examples`` table (or a :class:`~vsem_lens.report.probe.Probe`).
        meta: ``{"index", "text", "n_tokens", "n_tokens_full"}`` of the example.
        frame: the readout frame (for the title).
        readout: ``"affinity"`` (default) or ``"lens"``.

    Example:
        >>> fig = plot_affinity_map(report.tables["examples"].query("example == 0"), meta)  # doctest: +SKIP
    """
    if readout not in MAP_READOUTS:
        raise ValueError(f"readout must be one of {', '.join(MAP_READOUTS)}, got {readout!r}")
    spec = MAP_READOUTS[readout]
    other = "lens" if readout == "affinity" else "affinity"
    layers = sorted(df["layer"].unique().tolist())
    positions = sorted(df["position"].unique().tolist())
    row_of = {layer: i for i, layer in enumerate(layers)}
    col_of = {pos: j for j, pos in enumerate(positions)}
    shape = (len(layers), len(positions))
    k = int(df[spec["tokens"]].map(len).max()) if len(df) else 0
    z = np.full(shape, np.nan)
    text = np.full(shape, "", dtype=object)
    # Hover values per cell; the markup lives once in the template (a 64-token prompt has ~2,000 cells).
    custom = np.full((*shape, 2 * k + 8), None, dtype=object)
    inputs = {}
    predictions = {}
    for row in df.to_dict("records"):
        i, j = row_of[row["layer"]], col_of[row["position"]]
        z[i, j] = row[spec["colour"]]
        text[i, j] = display_token(row[spec["top1"]], 7)
        inputs[row["position"]] = row["token"]
        predictions[row["position"]] = row["final_token"]
        top = [value for tok, score in zip(row[spec["tokens"]], row[spec["scores"]])
               for value in (display_token(tok, 24), round(float(score), 4))]
        custom[i, j] = [
            row["layer"], row["position"], display_token(row["token"], 24), *top, *[""] * (2 * k - len(top)),
            display_token(row[MAP_READOUTS[other]["top1"]], 24), display_token(row["final_token"], 24),
            round(float(row["affinity_final_cos"]), 4), int(row["affinity_final_rank"]) + 1,
            int(row["lens_final_rank"]) + 1,
        ]
    o = 3 + 2 * k  # first index after the top-k pairs
    hover = (
        "<b>layer %{customdata[0]}</b>, position %{customdata[1]}, input %{customdata[2]}<br>"
        f"<b>{spec['title']} top-{k}</b> ({spec['score_name']}):<br>"
        + "".join(f"&nbsp;&nbsp;%{{customdata[{3 + 2 * t}]}} &nbsp;%{{customdata[{4 + 2 * t}]:+.3f}}<br>"
                  for t in range(k))
        + f"<b>{MAP_READOUTS[other]['title']} top-1</b>: %{{customdata[{o}]}}<br>"
        f"<b>model's prediction</b>: %{{customdata[{o + 1}]}}<br>"
        f"&nbsp;&nbsp;cosine %{{customdata[{o + 2}]:+.3f}}, rank %{{customdata[{o + 3}]}} by affinity, "
        f"rank %{{customdata[{o + 4}]}} by logit lens<extra></extra>"
    )
    # Rows are plotted at 0..L-1 (row index, so non-contiguous layers get equal rows) and the model's
    # prediction as a text row at L; tick labels name them.
    rows = list(range(len(layers)))
    fig = go.Figure()
    fig.add_trace(
        go.Heatmap(
            x=positions,
            y=rows,
            z=z,
            text=text,
            texttemplate="%{text}",
            textfont={"size": 9},
            customdata=custom,
            hovertemplate=hover,
            colorscale="Viridis",
            colorbar={"title": {"text": spec["colour_label"], "side": "right"}, "thickness": 12},
            xgap=1,
            ygap=1,
            name=readout,
        )
    )
    fig.add_trace(
        go.Scatter(
            x=positions,
            y=[len(layers)] * len(positions),
            mode="text",
            text=[display_token(predictions[p], 7) for p in positions],
            textfont={"size": 9, "color": "#b02a37"},
            hovertext=[
                f"position {p}: after {display_token(inputs[p], 24)} the model predicts "
                f"<b>{display_token(predictions[p], 24)}</b>"
                for p in positions
            ],
            hovertemplate="%{hovertext}<extra></extra>",
            showlegend=False,
            name="prediction",
        )
    )
    shown = meta.get("n_tokens", len(positions))
    full = meta.get("n_tokens_full", shown)
    cut = f", first {shown} of {full} tokens" if full > shown else ""
    fig.update_layout(
        title={
            "text": f"Example {meta.get('index', 0) + 1}: top-1 token by {spec['title']} per layer "
            f"({frame} frame{cut})"
        },
        xaxis={
            "title": {"text": "input token (position)"},
            "tickmode": "array",
            "tickvals": positions,
            "ticktext": [display_token(inputs[p], 10) for p in positions],
            "tickangle": -60,
            "showgrid": False,
        },
        yaxis={
            "title": {"text": "layer (residual after block)"},
            "tickmode": "array",
            "tickvals": rows + [len(layers)],
            "ticktext": [str(layer) for layer in layers] + ["<b>prediction</b>"],
            "range": [-0.5, len(layers) + 0.5],
            "showgrid": False,
            "zeroline": False,
        },
    )
    width = max(640, 160 + 44 * len(positions))
    height = max(360, 170 + 19 * (len(layers) + 1))
    return style(fig, height=height, width=width).update_layout(margin={"b": 90})


# ---------------------------------------------------------------------------------- section 2


def _band(fig: go.Figure, x: Any, low: Any, high: Any, color: str, group: str, row: int, col: int) -> None:
    r, g, b = (int(color[i : i + 2], 16) for i in (1, 3, 5))
    fig.add_trace(
        go.Scatter(
            x=list(x) + list(x)[::-1],
            y=list(high) + list(low)[::-1],
            fill="toself",
            fillcolor=f"rgba({r},{g},{b},0.16)",
            line={"width": 0},
            hoverinfo="skip",
            showlegend=False,
            legendgroup=group,
            name=f"{group} IQR",
        ),
        row=row,
        col=col,
    )


# Long because four linked panels (rank, agreement, probability, KL) share readout styles and bands.
def plot_prediction_formation(
    df: pd.DataFrame, *, d_vocab: int | None = None, show_untempered: bool = False
) -> go.Figure:
    """When does the prediction form: rank, agreement, probability and KL per layer and readout.

    Four panels sharing the layer axis: rank of the model's final top-1 token in the readout
    (1-based, median with an interquartile band, log scale); fraction of tokens whose readout top-1
    is that token; its probability under the readout (mean, interquartile band, log scale);
    KL(final || readout) in bits (mean, interquartile band).

    Vocabulary affinity's probability and KL (a softmax over cosines with no temperature, the paper's
    definition) are left out of the two lower panels unless ``show_untempered``: over a whole
    vocabulary that softmax is nearly uniform, so they sit at ~1/V and ~log2 V - H(final) on every
    layer and say nothing about the layer (docs/concepts/affinity.md; a fitted temperature,
    :mod:`vsem_lens.readout.temperature`, gives them a scale). Its rank and agreement are shown.

    Example:
        >>> fig = plot_prediction_formation(report.tables["prediction_formation"])  # doctest: +SKIP
    """
    fig = make_subplots(
        rows=2,
        cols=2,
        shared_xaxes=True,
        horizontal_spacing=0.09,
        vertical_spacing=0.12,
        subplot_titles=(
            "rank of the final top-1 token (1 = agrees)",
            "top-1 agreement with the model",
            "probability of the final top-1 token",
            "KL(final || readout), bits",
        ),
    )
    readouts = [r for r in READOUT_STYLE if r in set(df["readout"])]
    for name in readouts:
        label, color = READOUT_STYLE[name]
        sub = df[df["readout"] == name].sort_values("layer")
        x = sub["layer"].tolist()
        custom = np.stack(
            [sub["rank_q25"] + 1, sub["rank_q75"] + 1, sub["rank_mean"] + 1, sub["n_tokens"]], axis=1
        )
        _band(fig, x, sub["rank_q25"] + 1, sub["rank_q75"] + 1, color, label, 1, 1)
        fig.add_trace(
            go.Scatter(
                x=x, y=sub["rank_median"] + 1, mode="lines+markers", name=label, legendgroup=label,
                line={"color": color, "width": 2}, marker={"size": 5}, customdata=custom,
                hovertemplate=(
                    f"<b>{label}</b>, layer %{{x}}<br>median rank %{{y:.0f}}<br>IQR %{{customdata[0]:.0f}}"
                    "–%{customdata[1]:.0f}<br>mean rank %{customdata[2]:.1f}<br>tokens %{customdata[3]}<extra></extra>"
                ),
            ),
            row=1, col=1,
        )
        fig.add_trace(
            go.Scatter(
                x=x, y=sub["top1_agreement"], mode="lines+markers", name=label, legendgroup=label,
                showlegend=False, line={"color": color, "width": 2}, marker={"size": 5},
                hovertemplate=f"<b>{label}</b>, layer %{{x}}<br>top-1 agreement %{{y:.1%}}<extra></extra>",
            ),
            row=1, col=2,
        )
        for row, col, stat, fmt, what in ((2, 1, "prob", ".3f", "probability"), (2, 2, "kl_bits", ".2f", "KL bits")):
            if name == "affinity" and not show_untempered:
                continue
            _band(fig, x, sub[f"{stat}_q25"], sub[f"{stat}_q75"], color, label, row, col)
            custom = np.stack([sub[f"{stat}_median"], sub[f"{stat}_q25"], sub[f"{stat}_q75"], sub[f"{stat}_std"]], axis=1)
            fig.add_trace(
                go.Scatter(
                    x=x, y=sub[f"{stat}_mean"], mode="lines+markers", name=label, legendgroup=label,
                    showlegend=False, line={"color": color, "width": 2}, marker={"size": 5}, customdata=custom,
                    hovertemplate=(
                        f"<b>{label}</b>, layer %{{x}}<br>mean {what} %{{y:{fmt}}} (std %{{customdata[3]:{fmt}}})"
                        f"<br>median %{{customdata[0]:{fmt}}}, IQR %{{customdata[1]:{fmt}}}–%{{customdata[2]:{fmt}}}"
                        "<extra></extra>"
                    ),
                ),
                row=row, col=col,
            )
    top = math.log10(max(2, d_vocab or float(df["rank_q75"].max() + 1)))
    fig.update_yaxes(type="log", dtick=1, range=[-0.05, top + 0.05], title_text="rank (log scale)", row=1, col=1)
    fig.update_yaxes(range=[0, 1.02], tickformat=".0%", title_text="share of tokens", row=1, col=2)
    fig.update_yaxes(range=[0, 1.02], title_text="probability", row=2, col=1)
    fig.update_yaxes(title_text="bits", rangemode="tozero", row=2, col=2)
    fig.update_xaxes(title_text="layer", row=2, col=1)
    fig.update_xaxes(title_text="layer", row=2, col=2)
    n = int(df["n_tokens"].max()) if len(df) else 0
    frame = df["frame"].iloc[0] if len(df) else ""
    fig.update_layout(
        title=f"When does the prediction form? Readouts of {n:,} sampled tokens ({frame} frame)",
        legend={"orientation": "h", "x": 0.0, "y": -0.1, "yanchor": "top"},
        hovermode="closest",
    )
    return style(fig, height=720)


# ---------------------------------------------------------------------------------- section 3


def plot_isotropy_overview(df: pd.DataFrame) -> go.Figure:
    """Isotropy per layer side by side in the raw and final-norm frames, plus the participation ratio.

    Top: IsoScore, IsoScore*, average cosine and the top-k outlier variance share, one panel per frame.
    Bottom: participation ratio (effective number of dimensions) of both frames.

    Example:
        >>> fig = plot_isotropy_overview(isotropy_by_layer(model, corpus))  # doctest: +SKIP
    """
    df = df[df["site"] == "resid_post"] if "site" in df else df
    frames = [f for f in ("raw", "final_norm") if f in set(df["frame"])]
    titles = {"raw": "raw residual", "final_norm": "after the final norm"}
    fig = make_subplots(
        rows=2,
        cols=2,
        specs=[[{}, {}], [{"colspan": 2}, None]],
        row_heights=[0.6, 0.4],
        vertical_spacing=0.14,
        horizontal_spacing=0.08,
        subplot_titles=[titles[f] for f in frames] + [""] * (2 - len(frames)) + ["participation ratio (effective dimensions)"],
    )
    k = df.attrs.get("k_outliers", "k")
    for c, frame in enumerate(frames, start=1):
        sub = df[df["frame"] == frame].sort_values("layer")
        dims = [", ".join(map(str, d[:3])) for d in sub["outlier_dims"]]
        for measure, (label, color) in MEASURE_STYLE.items():
            if measure == "outlier_variance_share":
                label = f"variance share of top-{k} dims"
            fig.add_trace(
                go.Scatter(
                    x=sub["layer"], y=sub[measure], mode="lines+markers", name=label, legendgroup=measure,
                    showlegend=c == 1, line={"color": color, "width": 2}, marker={"size": 4},
                    customdata=np.stack([sub["participation_ratio"], np.asarray(dims, dtype=object)], axis=1),
                    hovertemplate=(
                        f"<b>{label}</b> ({titles[frame]})<br>layer %{{x}}: %{{y:.4f}}<br>"
                        "participation ratio %{customdata[0]:.1f}<br>top dims %{customdata[1]}<extra></extra>"
                    ),
                ),
                row=1, col=c,
            )
        fig.update_yaxes(title_text="score" if c == 1 else None, range=[-0.02, 1.02], row=1, col=c)
        fig.update_xaxes(title_text="layer", row=1, col=c)
    dash = {"raw": "solid", "final_norm": "dash"}
    for frame in frames:
        sub = df[df["frame"] == frame].sort_values("layer")
        fig.add_trace(
            go.Scatter(
                x=sub["layer"], y=sub["participation_ratio"], mode="lines+markers",
                name=f"participation ratio, {titles[frame]}", line={"color": "#444", "dash": dash[frame], "width": 2},
                marker={"size": 4},
                hovertemplate=f"{titles[frame]}<br>layer %{{x}}<br>participation ratio %{{y:.2f}}<extra></extra>",
            ),
            row=2, col=1,
        )
    fig.update_yaxes(title_text="dimensions", rangemode="tozero", row=2, col=1)
    fig.update_xaxes(title_text="layer", row=2, col=1)
    n = int(df["n_tokens"].max()) if len(df) else 0
    fig.update_layout(
        title=f"Isotropy of the residual stream by layer ({n:,} tokens)",
        legend={"orientation": "h", "x": 0.0, "y": -0.12, "yanchor": "top"},
    )
    return style(fig, height=760)


# ---------------------------------------------------------------------------------- section 5


def total_seconds(timings: dict[str, float]) -> float:
    """Wall time of a run from its stage timings: the ``total ...`` entries plus the model load (or,
    without a total, the sum of the stages).

    Example:
        >>> total_seconds({"load_model": 2.0, "capture": 5.0, "total (build_report)": 9.0})
        11.0
    """
    totals = [seconds for stage, seconds in timings.items() if stage.startswith("total")]
    if not totals:
        return float(sum(timings.values()))
    return float(sum(totals) + timings.get("load_model", 0.0))


def plot_timings(df: pd.DataFrame, *, peak_rss: float | None = None) -> go.Figure:
    """Horizontal bars: wall time per stage (the total is in the title).

    Example:
        >>> plot_timings(pd.DataFrame({"stage": ["a", "b"], "seconds": [1.0, 2.0]})).data[0].type
        'bar'
    """
    parts = df[~df["stage"].str.startswith("total")]
    total = total_seconds(dict(zip(df["stage"], df["seconds"])))
    fig = go.Figure(
        go.Bar(
            x=parts["seconds"],
            y=[html.escape(s, quote=False) for s in parts["stage"]],
            orientation="h",
            marker={"color": "#3b5bdb"},
            text=[f"{s:.1f} s" for s in parts["seconds"]],
            textposition="auto",
            hovertemplate="%{y}: %{x:.2f} s<extra></extra>",
        )
    )
    memory = f", peak memory {peak_rss:,.0f} MiB" if peak_rss else ""
    fig.update_layout(
        title=f"Time per stage (total {total:.1f} s{memory})",
        xaxis_title="seconds",
        yaxis={"autorange": "reversed", "title": {"text": "stage"}},
    )
    return style(fig, height=max(260, 90 + 30 * len(parts)))


def side_by_side(
    left: go.Figure,
    right: go.Figure,
    *,
    title: str,
    subtitles: Sequence[str] = ("", ""),
    y_titles: Sequence[str] = ("", ""),
    height: int = 440,
) -> go.Figure:
    """Two single-panel figures as one figure with two panels (traces copied; legend shown once).

    Traces with the same name share a legend entry (the right panel's are hidden from the legend).

    Example:
        >>> fig = side_by_side(go.Figure(go.Scatter(y=[1])), go.Figure(go.Scatter(y=[2])), title="t")
        >>> len(fig.data)
        2
    """
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.08, subplot_titles=tuple(subtitles))
    for col, source in ((1, left), (2, right)):
        for trace in source.data:
            trace = go.Figure(trace).data[0]  # a copy
            trace.legendgroup = trace.name
            trace.showlegend = col == 1
            fig.add_trace(trace, row=1, col=col)
        x_title = source.layout.xaxis.title.text if source.layout.xaxis.title else None
        fig.update_xaxes(title_text=x_title, row=1, col=col)
        fig.update_yaxes(title_text=y_titles[col - 1], row=1, col=col)
    fig.update_layout(title=title, legend={"orientation": "h", "x": 0.0, "y": -0.2, "yanchor": "top"})
    return style(fig, height=height)
