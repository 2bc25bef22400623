"""Vocabulary scores that speak tokens: tensor semantics kept, top-k decoded, tables and HTML escaped."""

from __future__ import annotations

import copy
import io
import pickle

import torch

import vsem_lens as vl
from vsem_lens.readout import TopTokens, VocabScores


def _scores(tiny_model, n=4):
    basis = vl.SemanticBasis.from_model(tiny_model, cache=False)
    h = torch.randn(n, tiny_model.d_model, generator=torch.Generator().manual_seed(0))
    return h, basis, vl.vocab_affinity(h, basis)


def test_scores_keep_tensor_semantics(tiny_model):
    h, basis, aff = _scores(tiny_model)
    plain = torch.nn.functional.normalize(h, dim=-1) @ torch.nn.functional.normalize(basis.vectors.float(), dim=-1).T
    assert isinstance(aff, VocabScores) and isinstance(aff, torch.Tensor)
    assert torch.allclose(aff.as_tensor(), plain, atol=1e-6) and type(aff.as_tensor()) is torch.Tensor
    # arithmetic and reductions give plain tensors; indexing and conversions keep the vocabulary
    assert type(aff * 2) is torch.Tensor and type(aff.softmax(-1)) is torch.Tensor and type(aff.sum()) is torch.Tensor
    assert type(aff[:, :5]) is torch.Tensor and type(aff[:, 3]) is torch.Tensor
    for kept in (aff[-1], aff[1:], aff.double(), aff.detach(), aff.clone(), aff.to("cpu")):
        assert isinstance(kept, VocabScores) and kept.model is tiny_model and kept.kind == "affinity"
    # torch.topk and a topk over another axis are torch's own results
    assert type(torch.topk(aff, 3)) is torch.return_types.topk
    assert type(aff.topk(2, dim=0)) is torch.return_types.topk
    # a deep copy keeps the vocabulary; a pickle (and torch.save) is the plain tensor, without the model
    twin = copy.deepcopy(aff)
    assert isinstance(twin, VocabScores) and twin.model is tiny_model and torch.equal(twin, aff)
    assert twin.data_ptr() != aff.data_ptr()
    loaded = pickle.loads(pickle.dumps(aff))
    assert type(loaded) is torch.Tensor and torch.equal(loaded, aff.as_tensor())
    buffer = io.BytesIO()
    torch.save(aff, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=True), aff.as_tensor())


def test_topk_unpacks_like_torch_and_decodes_tokens(tiny_model):
    _, _, aff = _scores(tiny_model)
    top = aff.topk(3)
    ref = aff.as_tensor().topk(3)
    values, ids = top  # unpacks like torch.topk
    assert isinstance(top, TopTokens) and torch.equal(values, ref.values) and torch.equal(ids, ref.indices)
    assert torch.equal(top.values, ref.values) and torch.equal(top.indices, ref.indices)
    vocab = vl.readout.vocabulary_strings(tiny_model)
    df = top.to_frame()
    assert list(df.columns) == ["position", "rank", "token", "id", "score"] and len(df) == 4 * 3
    for row in df.itertuples():
        assert row.id == int(ref.indices[row.position, row.rank])
        assert row.token == vocab[row.id] == tiny_model.token_strings([row.id])[0]
        assert abs(row.score - float(ref.values[row.position, row.rank])) < 1e-6
    assert top.tokens == [[vocab[i] for i in r] for r in ref.indices.tolist()]
    one = aff[-1].topk(2).to_frame()  # one position: no position column
    assert list(one.columns) == ["rank", "token", "id", "score"] and one.id.tolist() == ref.indices[-1, :2].tolist()
    deep = VocabScores.wrap(torch.randn(2, 3, tiny_model.d_vocab), tiny_model, "lens").topk(2).to_frame()
    assert list(deep.columns[:3]) == ["dim_0", "position", "rank"] and len(deep) == 2 * 3 * 2


def test_logit_lens_scores_speak_tokens(tiny_model):
    h = torch.randn(3, tiny_model.d_model)
    lens = vl.logit_lens(h, tiny_model)
    assert isinstance(lens, VocabScores) and lens.kind == "lens"
    assert torch.allclose(lens.as_tensor(), tiny_model.final_norm(h) @ tiny_model.W_U + tiny_model.b_U)
    assert lens[-1].topk(1).to_frame().id.tolist() == [int(lens.as_tensor()[-1].argmax())]


def test_scores_without_a_model_show_ids(tiny_model):
    scores = VocabScores.wrap(torch.tensor([[0.1, 0.9, 0.5]]), None, "affinity")
    df = scores.topk(2).to_frame()
    assert df.token.tolist() == [None, None] and df.id.tolist() == [1, 2]
    assert "#1" in scores._repr_html_()


def test_scores_html_escapes_tokens(tiny_model):
    evil = '<script>alert(1)</script>'
    vocab = list(vl.readout.vocabulary_strings(tiny_model))
    scores = VocabScores.wrap(torch.zeros(2, tiny_model.d_vocab), tiny_model, "affinity")
    scores[:, 7] = 1.0  # the top token of every position is id 7
    tiny_model._vocabulary_strings = vocab[:7] + [evil] + vocab[8:]
    try:
        for page in (scores._repr_html_(), scores.topk(2)._repr_html_()):
            assert "<script>" not in page and "&lt;script&gt;" in page
        assert scores.topk(1).to_frame().token.tolist() == [evil, evil]  # the table keeps the real string
    finally:
        tiny_model._vocabulary_strings = vocab
