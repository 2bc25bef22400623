"""vl.probe: the table equals layerwise_affinity, any frame works, the HTML draws offline in Chromium."""

from __future__ import annotations

import pytest
import torch
from _cdp import find_chromium, render_report
from conftest import TINY_TEXTS

import vsem_lens as vl
from vsem_lens.core.errors import InputError
from vsem_lens.lenses.base import Lens

EVIL = 'A <script>alert(1)</script> "><img src=x onerror=alert(1)> token'
COLUMNS = ["layer", "position", "token", "final_token", "lens_top1", "affinity_top1", "lens_final_rank",
           "affinity_final_rank"]


class Sheared(Lens):
    """A user's own lens: a fixed linear map of every residual."""

    frame = "sheared"

    def forward(self, h, layer):
        return h + 0.5 * torch.roll(h, 1, dims=-1)


@pytest.mark.parametrize("frame", ["final_norm", "raw", Sheared()], ids=["final_norm", "raw", "custom-lens"])
def test_probe_table_equals_layerwise_affinity(tiny_model, frame):
    text = TINY_TEXTS[0]
    ours = vl.probe(tiny_model, text, frame=frame).to_frame()
    ref = vl.layerwise_affinity(tiny_model, text, frame=frame)
    merged = ours[COLUMNS].merge(ref[COLUMNS], on=["layer", "position"], suffixes=("", "_ref"))
    assert len(merged) == len(ours) == len(ref) == tiny_model.n_layers * len(tiny_model.token_ids([text])[0])
    for column in COLUMNS[2:]:
        assert (merged[column] == merged[f"{column}_ref"]).all(), column
    assert torch.allclose(torch.tensor(ours["lens_final_prob"].to_numpy()),
                          torch.tensor(ref["lens_final_prob"].to_numpy()), atol=1e-5)


def test_probe_with_a_tuned_lens(tiny_model):
    lens = vl.TunedLens.fit(tiny_model, TINY_TEXTS, steps=2, tokens_per_step=32, progress=False)
    p = vl.probe(tiny_model, TINY_TEXTS[1], frame=lens, readouts=("affinity",))
    assert p.frame == "tuned" and p.readouts == ("affinity",)
    ref = vl.layerwise_affinity(tiny_model, TINY_TEXTS[1], frame=lens)
    assert p.to_frame().sort_values(["layer", "position"]).affinity_top1.tolist() == ref.affinity_top1.tolist()


def test_probe_bad_arguments(tiny_model):
    with pytest.raises(InputError, match="readouts"):
        vl.probe(tiny_model, "Hello", readouts=("logits",))
    p = vl.probe(tiny_model, "Hello world")
    with pytest.raises(InputError, match="out of range"):
        p.figure(3)
    assert "Probe(1 prompt(s)" in repr(p)


@pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed (apt-get install chromium)")
def test_probe_html_draws_every_heatmap_offline(tiny_model, tmp_path):
    p = vl.probe(tiny_model, [TINY_TEXTS[0], EVIL])
    fragment = p._repr_html_()
    assert fragment.count('<script id="plotly-js"') == 1  # plotly.js once per probe, not per figure
    page = tmp_path / "notebook.html"
    page.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'><title>probe</title></head><body>"
                    f"<div class='cell'>{fragment}</div></body></html>", encoding="utf-8")
    result = render_report(page, tmp_path / "browser")
    assert len(result["figures"]) == 4, result["figures"]  # 2 prompts x 2 readouts
    assert all(item["svg"] > 0 and item["traces"] > 0 and not item["error"] for item in result["figures"])
    assert result["errors"] == [] and result["dialogs"] == 0
    assert [u for u in result["requests"] if not u.startswith(("file:", "data:", "blob:", "about:"))] == []
