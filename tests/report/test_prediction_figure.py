"""The prediction-formation figure leaves affinity's untempered probability and KL out by default."""

from __future__ import annotations

import pandas as pd

from vsem_lens.report.figures import plot_prediction_formation


def _table() -> pd.DataFrame:
    rows = []
    for readout in ("lens", "affinity"):
        for layer in range(3):
            row = {"readout": readout, "layer": layer, "frame": "final_norm", "n_tokens": 10,
                   "top1_agreement": 0.1 * layer}
            for stat in ("rank", "prob", "kl_bits"):
                for key in ("mean", "median", "q25", "q75", "std"):
                    row[f"{stat}_{key}"] = float(layer + 1)
            rows.append(row)
    return pd.DataFrame(rows)


def _traces_by_panel(fig, label):
    """(x axis, y axis) of the line traces named ``label``."""
    return {(t.xaxis, t.yaxis) for t in fig.data if t.name == label and t.mode == "lines+markers"}


def test_affinity_probability_and_kl_hidden_unless_asked():
    default = plot_prediction_formation(_table(), d_vocab=100)
    shown = plot_prediction_formation(_table(), d_vocab=100, show_untempered=True)
    lens_panels = _traces_by_panel(default, "logit lens")
    assert len(lens_panels) == 4
    assert _traces_by_panel(default, "vocabulary affinity") == {("x", "y"), ("x2", "y2")}  # rank, agreement
    assert _traces_by_panel(shown, "vocabulary affinity") == lens_panels
