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


def test_probe_hover_values_are_escaped_and_complete(tiny_model):
    """The hover values (customdata) carry escaped token strings; the markup sits once in the template."""
    p = vl.probe(tiny_model, EVIL)
    table = p.to_frame()
    for readout in ("lens", "affinity"):
        heatmap = p.figure(0, readout).data[0]
        cells = heatmap.customdata.reshape(-1, heatmap.customdata.shape[-1])
        strings = [value for cell in cells for value in cell if isinstance(value, str)]
        assert strings and not any("<" in value or ">" in value for value in strings)
        assert any("&lt;" in value for value in strings)  # the <script> pieces are there, escaped
        assert heatmap.hovertemplate.count("<br>") >= 5 and "customdata" in heatmap.hovertemplate
        last = table[(table.layer == tiny_model.n_layers - 1)].sort_values("position")
        ranks = [int(c[-1]) for c in heatmap.customdata[-1]]  # logit-lens rank + 1 of the final prediction
        assert ranks == (last.lens_final_rank + 1).tolist()


def test_probe_bad_arguments(tiny_model):
    with pytest.raises(InputError, match="readouts"):
        vl.probe(tiny_model, "Hello", readouts=("logits",))
    p = vl.probe(tiny_model, "Hello world")
    with pytest.raises(InputError, match="out of range"):
        p.figure(3)
    assert "Probe(1 prompt(s)" in repr(p)


@pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed (apt-get install chromium)")
def test_probe_html_draws_every_heatmap_offline(tiny_model, tmp_path):
    """Two probes in one notebook page: plotly.js travels once, in the first output, and both draw.

    The page has an AMD ``define`` as the classic notebook's require.js does, which would swallow plotly's
    UMD export if the library were not wrapped.
    """
    first = vl.probe(tiny_model, [TINY_TEXTS[0], EVIL])._repr_html_()
    second = vl.probe(tiny_model, TINY_TEXTS[1], readouts=("lens",))._repr_html_()
    assert first.count('<script id="plotly-js"') == 1 and second.count('<script id="plotly-js"') == 0
    assert len(second) < len(first) / 20  # the second output is the figure data only
    amd = "<script>window.define=function(){};window.define.amd={};</script>"
    page = tmp_path / "notebook.html"
    page.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'><title>probe</title>" + amd + "</head><body>"
                    f"<div class='cell'>{first}</div><div class='cell'>{second}</div></body></html>", encoding="utf-8")
    result = render_report(page, tmp_path / "browser")
    assert len(result["figures"]) == 5, result["figures"]  # 2 prompts x 2 readouts, then 1 x 1
    assert all(item["svg"] > 0 and item["traces"] > 0 and not item["error"] for item in result["figures"])
    assert result["errors"] == [] and result["dialogs"] == 0
    assert [u for u in result["requests"] if not u.startswith(("file:", "data:", "blob:", "about:"))] == []


@pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed (apt-get install chromium)")
def test_probe_without_plotly_on_the_page_says_what_to_do(tiny_model, tmp_path):
    """A later output whose page lost plotly.js (first output cleared, page reloaded) explains itself."""
    vl.probe(tiny_model, "Hello")._repr_html_()  # the kernel has sent plotly.js
    later = vl.probe(tiny_model, "Hello world", readouts=("affinity",))._repr_html_()
    page = tmp_path / "reloaded.html"
    page.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>{later}</body></html>",
                    encoding="utf-8")
    result = render_report(page, tmp_path / "browser")
    assert len(result["figures"]) == 1 and result["figures"][0]["error"]
    assert "resend_plotly()" in result["figures"][0]["message"] and result["errors"] == []
    vl.report.resend_plotly()
    assert vl.probe(tiny_model, "Hello")._repr_html_().count('<script id="plotly-js"') == 1
