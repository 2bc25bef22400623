"""Residual capture: equality with HF hidden states, padding never leaks, sites and errors."""

from __future__ import annotations

import pytest
import torch

import vsem_lens as vl
from vsem_lens.core.capture import SITES

TEXTS = ["The capital of France is Paris.", "A cat", "def add(x, y): return x + y"]


def test_resid_post_equals_hf_hidden_states(tiny_model, tiny_hf):
    acts = vl.capture(tiny_model, TEXTS, batch_size=2)
    assert acts["resid_post"].shape[:2] == (3, len(acts.tokens))
    for doc, text in enumerate(TEXTS):
        toks = tiny_model.tokenize(text)
        with torch.no_grad():
            hidden = tiny_hf(toks.ids, output_hidden_states=True).hidden_states
        rows = torch.tensor((acts.tokens.doc == doc).to_numpy())
        for layer in range(3):
            if layer == 2:
                continue  # HF's last hidden state is post final norm; checked in test_models
            assert torch.allclose(acts["resid_post"][layer][rows], hidden[layer + 1][0], atol=1e-5)


def test_padding_never_appears(tiny_model):
    acts = vl.capture(tiny_model, TEXTS, batch_size=3)
    lengths = tiny_model.tokenize(TEXTS).lengths.tolist()
    assert len(acts.tokens) == sum(lengths)
    assert acts.tokens.groupby("doc").position.max().tolist() == [n - 1 for n in lengths]
    # Batched (padded) and one-by-one captures agree token for token.
    alone = torch.cat([vl.capture(tiny_model, t)["resid_post"] for t in TEXTS], dim=1)
    assert torch.allclose(acts["resid_post"], alone, atol=1e-5)


def test_all_sites_and_their_algebra(tiny_model):
    acts = vl.capture(tiny_model, TEXTS[:2], sites=SITES, layers=[0, 1])
    assert acts["embed"].shape[0] == 1
    pre, mid, post = acts["resid_pre"], acts["resid_mid"], acts["resid_post"]
    assert torch.allclose(pre[0], acts["embed"][0])
    assert torch.allclose(pre + acts["attn_out"], mid, atol=1e-5)
    assert torch.allclose(mid + acts["mlp_out"], post, atol=1e-5)
    assert torch.allclose(pre[1], post[0])
    assert acts.tokens.columns.tolist() == ["doc", "position", "token_id", "token"]


def test_iter_capture_streams_batches(tiny_model):
    batches = list(vl.iter_capture(tiny_model, TEXTS, batch_size=2, layers=[2], keep_logits=True))
    assert len(batches) == 2
    assert batches[1].doc_index.tolist()[0] == 2
    logits = batches[0].logits
    assert logits.shape == (batches[0].n_tokens, tiny_model.d_vocab)


def test_capture_stops_after_the_last_captured_layer(tiny_model):
    """Without keep_logits the forward ends at the last hook: later blocks and the unembedding never run,
    and the activations equal those of a full forward pass."""
    ran = []
    handles = [tiny_model.bridge.blocks[-1].register_forward_hook(lambda *a: ran.append("last block")),
               tiny_model.bridge.unembed.register_forward_hook(lambda *a: ran.append("unembed"))]
    try:
        early = next(vl.iter_capture(tiny_model, TEXTS, layers=[0], sites=("resid_pre", "resid_post")))
        assert ran == []
        full = next(vl.iter_capture(tiny_model, TEXTS, layers=[0], sites=("resid_pre", "resid_post"), keep_logits=True))
        assert ran == ["last block", "unembed"]
    finally:
        for handle in handles:
            handle.remove()
    for site in ("resid_pre", "resid_post"):
        assert torch.equal(early.acts[site], full.acts[site])


def test_capture_errors(tiny_model):
    with pytest.raises(vl.core.InputError, match="unknown site"):
        vl.capture(tiny_model, TEXTS, sites=("resid_everywhere",))
    with pytest.raises(vl.core.InputError, match="out of range"):
        vl.capture(tiny_model, TEXTS, layers=[3])
    with pytest.raises(vl.core.InputError, match="empty"):
        vl.capture(tiny_model, "")
    with pytest.raises(vl.core.InputError, match="no texts"):
        vl.capture(tiny_model, [])


def test_nan_activations_are_reported(tiny_tokenizer):
    from conftest import make_tiny_hf

    hf = make_tiny_hf(tiny_tokenizer, n_layers=2, seed=1)
    with torch.no_grad():
        hf.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    model = vl.load_model((hf, tiny_tokenizer))
    with pytest.raises(vl.core.NumericalError, match="NaN"):
        vl.capture(model, TEXTS)
    # The message names where the NaN entered (layer 1's MLP output), not the first site it checks.
    with pytest.raises(vl.core.NumericalError, match="layer 1, site 'mlp_out'"):
        vl.capture(model, TEXTS, sites=("resid_post", "resid_mid", "mlp_out"))


@pytest.mark.embedded
def test_embedded_resid_post_equals_hf(embedded):
    from transformers import AutoModelForCausalLM

    from vsem_lens.core.loading import embedded_model_dir

    plain = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), attn_implementation="eager").eval()
    text = "The quick brown fox jumps over the lazy dog."
    acts = vl.capture(embedded, text, layers=[0, 14, 28])
    with torch.no_grad():
        hidden = plain(embedded.tokenize(text).ids, output_hidden_states=True).hidden_states
    for i, layer in enumerate(acts.layers):
        assert (acts["resid_post"][i] - hidden[layer + 1][0]).abs().max() < 1e-3


def test_activations_summarise_themselves_with_token_strings(tiny_model):
    acts = vl.capture(tiny_model, ["The cat sat.", "A <script>alert(1)</script> test"], sites=("resid_post", "mlp_out"))
    text = repr(acts)
    assert "resid_post (3, " in text and "layers 0..2 (3)" in text and "'The'" in text
    page = acts._repr_html_()
    assert "<script" not in page and "&lt;" in page  # token strings are escaped
    assert "mlp_out" in page and page.count("<b>text ") == 2
    n_chips = page.count("title='id ")
    assert n_chips == len(acts.tokens)
