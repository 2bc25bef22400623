"""Vocabulary affinity and the logit lens per layer, against brute-force references."""

from __future__ import annotations

import math

import pytest
import torch

import vsem_lens as vl

TEXTS = ["The capital of France is Paris.", "A cat sat on the mat", "Numbers like 12"]


def brute_force(model, basis, texts, frame_lens, k):
    """Reference: dense per-layer log-softmax, float64 KL, argsort ranks."""
    acts = vl.capture(model, texts)
    W, b = model.W_U.double(), model.b_U.double()
    final = model.final_norm(acts["resid_post"][-1]).double() @ W + b
    logp = torch.log_softmax(final, -1)
    target = final.argmax(-1)
    out = {}
    for layer in range(model.n_layers):
        h = frame_lens(acts["resid_post"][layer], layer).double()
        lens = h @ W + b
        aff = torch.nn.functional.cosine_similarity(h[:, None, :], basis.vectors.double()[None], dim=-1)
        for name, scores in (("lens", lens), ("affinity", aff)):
            logq = torch.log_softmax(scores, -1)
            kl = (logp.exp() * (logp - logq)).sum(-1) / math.log(2)
            rank = (scores > scores.gather(1, target[:, None])).sum(-1)
            top = scores.topk(k, -1).indices
            prob = logq.gather(1, target[:, None]).squeeze(1).exp()
            out[(name, layer)] = (kl, rank, top, prob)
    return acts, out


@pytest.mark.parametrize("frame", ["final_norm", "raw"])
def test_layerwise_affinity_matches_brute_force(tiny_model, frame):
    basis = vl.SemanticBasis.from_model(tiny_model, frame=frame, cache=False)
    df = vl.layerwise_affinity(tiny_model, TEXTS, frame=frame, k=3, basis=basis, batch_size=2)
    acts, ref = brute_force(tiny_model, basis, TEXTS, basis.lens, 3)
    n_tok = len(acts.tokens)
    assert len(df) == n_tok * tiny_model.n_layers
    assert (df.frame == frame).all()
    vocab = vl.readout.affinity.vocabulary_strings(tiny_model)
    for layer in range(tiny_model.n_layers):
        rows = df[df.layer == layer].sort_values(["text", "position"])
        assert rows.position.tolist() == acts.tokens.position.tolist()
        for name in ("lens", "affinity"):
            kl, rank, top, prob = ref[(name, layer)]
            assert torch.allclose(torch.tensor(rows[f"{name}_kl_bits"].to_numpy()).double(), kl, atol=2e-4, rtol=1e-4)
            assert rows[f"{name}_final_rank"].tolist() == rank.tolist()
            assert torch.allclose(torch.tensor(rows[f"{name}_final_prob"].to_numpy()).double(), prob, atol=1e-5)
            assert rows[f"{name}_top1"].tolist() == [vocab[i] for i in top[:, 0].tolist()]
    last = df[df.layer == tiny_model.n_layers - 1]
    if frame == "final_norm":
        assert (last.lens_final_rank == 0).all()
        assert last.lens_kl_bits.abs().max() < 1e-4
        assert (last.lens_top1 == last.final_token).all()


def test_chunking_and_batching_do_not_change_results(tiny_model):
    basis = vl.SemanticBasis.from_model(tiny_model, cache=False)
    a = list(vl.iter_layer_readouts(tiny_model, TEXTS, basis=basis, batch_size=3))
    b = list(vl.iter_layer_readouts(tiny_model, TEXTS, basis=basis, batch_size=1, max_rows=2))
    for name in ("lens", "affinity"):
        for key in ("kl_bits", "final_rank", "top_ids"):
            left = a[0].readouts[name][key]
            right = torch.cat([batch.readouts[name][key] for batch in b], dim=1)
            assert torch.allclose(left.double(), right.double(), atol=1e-5), (name, key)


def test_vocab_affinity_and_logit_lens_functions(tiny_model):
    basis = vl.SemanticBasis.from_model(tiny_model, cache=False)
    h = torch.randn(2, 4, tiny_model.d_model)
    aff = vl.vocab_affinity(h, basis)
    assert aff.shape == (2, 4, tiny_model.d_vocab) and aff.abs().max() <= 1 + 1e-5
    assert torch.equal(vl.vocab_affinity(torch.zeros(1, tiny_model.d_model), basis), torch.zeros(1, tiny_model.d_vocab))
    lens = vl.logit_lens(h, tiny_model)
    assert torch.allclose(lens, tiny_model.final_norm(h) @ tiny_model.W_U + tiny_model.b_U)
    with pytest.raises(vl.core.InputError, match="width"):
        vl.vocab_affinity(torch.randn(3, 5), basis)


def test_affinity_errors(tiny_model):
    with pytest.raises(vl.core.InputError, match="out of range"):
        vl.layerwise_affinity(tiny_model, TEXTS, layers=[7])
    with pytest.raises(vl.core.InputError, match="unknown frame"):
        vl.layerwise_affinity(tiny_model, TEXTS, frame="diagonal")
    with pytest.raises(vl.core.InputError, match="k must be"):
        vl.layerwise_affinity(tiny_model, TEXTS, k=0)
    with pytest.raises(vl.core.InputError, match="empty"):
        vl.layerwise_affinity(tiny_model, [""])


@pytest.mark.embedded
def test_embedded_paris_emerges_late(embedded):
    df = vl.layerwise_affinity(embedded, "The capital of France is", k=5)
    last_pos = df[df.position == df.position.max()]
    final = last_pos[last_pos.layer == 29].iloc[0]
    assert final.final_token == " Paris" and final.lens_top1 == " Paris"
    assert final.lens_kl_bits < 1e-2
    early = last_pos[last_pos.layer < 10]
    assert (early.lens_final_rank > 0).all()  # the prediction is not formed in the first layers
    assert last_pos[last_pos.layer == 29].affinity_top1.iloc[0] == " Paris"


def test_readout_kernel_on_a_selection(tiny_model):
    basis = vl.SemanticBasis.from_model(tiny_model, cache=False)
    readout = vl.readout.ReadoutKernel.for_model(tiny_model, basis=basis, k=2)
    batch = next(vl.iter_capture(tiny_model, TEXTS, layers=readout.capture_layers, batch_size=3))
    full = readout.read_batch(batch)
    select = torch.arange(batch.n_tokens) % 3 == 0
    part = readout.read_batch(batch, select)
    for name in ("lens", "affinity"):
        for key, value in part.readouts[name].items():
            assert torch.allclose(value.double(), full.readouts[name][key][:, select].double(), atol=1e-5), (name, key)
    none = readout.read_batch(batch, torch.zeros(batch.n_tokens, dtype=torch.bool))
    assert none.final_ids.shape == (0,) and none.readouts["affinity"]["top_ids"].shape == (tiny_model.n_layers, 0, 2)
    assert set(none.readouts["lens"]) == set(full.readouts["lens"])
