"""Each plot function returns a plotly Figure with the expected traces, titled axes and no external URL."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import pytest
from conftest import TINY_TEXTS

import vsem_lens as vl
from vsem_lens.core.errors import InputError
from vsem_lens.geometry import affinity_sparsity_by_layer, basis_coherence, decomposition_by_layer
from vsem_lens.geometry.isotropy import isotropy_by_layer
from vsem_lens.report import plots

TEXTS = TINY_TEXTS[:3]


@pytest.fixture(scope="module")
def tables(tiny_model):
    basis = vl.SemanticBasis.from_model(tiny_model, cache=False)
    return {
        "iso": isotropy_by_layer(tiny_model, TEXTS, sites=("resid_post", "mlp_out"), k_outliers=3),
        "dec": decomposition_by_layer(tiny_model, TEXTS),
        "coh": basis_coherence(basis, sample=64, bins=20, n_extremes=4),
        "sparsity": affinity_sparsity_by_layer(tiny_model, TEXTS, k=3, basis=basis),
    }


def _check(fig, n_traces):
    assert isinstance(fig, go.Figure)
    assert len(fig.data) == n_traces
    assert fig.layout.title.text
    axes = fig.to_dict()["layout"]
    x_titles = [v.get("title", {}).get("text") for k, v in axes.items() if k.startswith("xaxis")]
    y_titles = [v.get("title", {}).get("text") for k, v in axes.items() if k.startswith("yaxis")]
    assert any(x_titles) and y_titles and all(y_titles)
    assert all(t.hovertemplate for t in fig.data)
    assert "http" not in fig.to_json()


def test_isotropy_plots(tables):
    iso = tables["iso"]
    groups = 3  # resid_post raw, resid_post final_norm, mlp_out raw
    fig = plots.plot_isotropy_by_layer(iso)
    _check(fig, 4 * groups)
    assert len(fig.layout.updatemenus[0].buttons) == groups
    assert sum(bool(t.visible) for t in fig.data) == 4
    _check(plots.plot_isotropy_by_layer(iso[(iso.frame == "raw") & (iso.site == "resid_post")]), 4)
    fig = plots.plot_outlier_dimensions(iso)
    _check(fig, groups)
    assert fig.data[0].type == "heatmap"


def test_component_plots(tables):
    dec = tables["dec"]
    fig = plots.plot_components_by_layer(dec)
    _check(fig, 4)
    assert [t.name for t in fig.data] == ["embed", "attn", "mlp", "remainder"]
    totals = sum(pd.Series(t.y, index=t.x) for t in fig.data)
    assert (totals - 1).abs().max() < 1e-6  # spim totals per kind still sum to 1
    _check(plots.plot_components_by_layer(dec, "cos_mean"), 4)
    fig = plots.plot_components_by_layer(dec, "norm_ratio_mean", view="components")
    _check(fig, 1)
    assert fig.data[0].y[0] == "embed" and fig.data[0].y[-1] == "remainder"
    with pytest.raises(InputError, match="lacks columns"):
        plots.plot_components_by_layer(dec, "nope")
    with pytest.raises(InputError, match="view"):
        plots.plot_components_by_layer(dec, view="stacked")


def test_coherence_plots(tables):
    coh = tables["coh"]
    _check(plots.plot_coherence_histogram(coh), 2)
    _check(plots.plot_coherence_histogram(coh.as_dict()), 2)
    fig = plots.plot_leverage(coh)
    _check(fig, 3)
    assert len(fig.data[0].x) <= 2000


def test_sparsity_plot(tables):
    _check(plots.plot_affinity_sparsity(tables["sparsity"]), 5)


def test_bad_inputs():
    with pytest.raises(InputError, match="DataFrame"):
        plots.plot_isotropy_by_layer({"layer": [0]})
    with pytest.raises(InputError, match="lacks columns"):
        plots.plot_affinity_sparsity(pd.DataFrame({"layer": [0]}))
    with pytest.raises(InputError, match="BasisCoherence"):
        plots.plot_leverage(3)


def test_leverage_hovers_escape_vocabulary_tokens():
    """Tokens such as <jupyter_start> must show literally in plotly hovers, not vanish as markup."""
    tokens = ["<jupyter_start>", "<b>", " Paris", "a&b", "x"] * 3
    leverage = pd.DataFrame({"token_id": range(15), "token": tokens, "leverage": [i / 15 for i in range(15)]})
    order = leverage.sort_values("leverage", ascending=False)
    extremes = pd.concat([order.head(3).assign(end="high"), order.tail(3).assign(end="low")])
    extremes["rank"] = list(range(3)) * 2
    fig = plots.plot_leverage({"leverage": leverage, "leverage_extremes": extremes, "d_model": 4})
    hovers = [str(cell) for trace in fig.data if trace.customdata is not None for cell in trace.customdata[:, 0]]
    assert "'&lt;jupyter_start&gt;'" in hovers and "'&lt;b&gt;'" in hovers and "'a&amp;b'" in hovers
    assert not any("<" in text or ">" in text for text in hovers)
