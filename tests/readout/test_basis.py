"""Semantic basis: pseudoinverse, projector algebra, cosine identity, words, frames, persistence."""

from __future__ import annotations

import pytest
import torch

import vsem_lens as vl


def test_basis_is_pinv_and_projector(tiny_model):
    basis = vl.SemanticBasis.from_model(tiny_model, cache=False)
    W = tiny_model.W_U.double()
    S = basis.vectors.double()
    ref = torch.linalg.pinv(W)
    assert ((S - ref).norm() / ref.norm()) <= 1e-5
    assert torch.allclose(W @ S, torch.eye(W.shape[0], dtype=torch.float64), atol=1e-5)
    P = S @ W
    assert torch.allclose(P, P.T, atol=1e-6)
    assert torch.allclose(P @ P, P, atol=1e-5)
    assert abs(float(torch.trace(P)) - tiny_model.d_model) < 1e-4
    assert torch.allclose(basis.leverage(), torch.diagonal(P), atol=1e-6)


def test_pinv_by_gram_float64_exact():
    torch.manual_seed(0)
    W = torch.randn(16, 200, dtype=torch.float64)
    assert torch.allclose(vl.readout.pinv_by_gram(W), torch.linalg.pinv(W), atol=1e-12)
    with pytest.raises(vl.core.NumericalError, match="rank-deficient"):
        vl.readout.pinv_by_gram(torch.zeros(4, 10))


def test_cosine_identity(tiny_model):
    """cos(s_i, h) = u_i^T G^-1 h / (||G^-1 u_i|| ||h||) with U = W_U^T, G = U^T U (docs/concepts/affinity.md)."""
    basis = vl.SemanticBasis.from_model(tiny_model, cache=False)
    U = tiny_model.W_U.double().T
    G_inv = torch.linalg.inv(U.T @ U)
    torch.manual_seed(1)
    h = torch.randn(5, tiny_model.d_model, dtype=torch.float64)
    expected = (U @ G_inv @ h.T).T / ((U @ G_inv).norm(dim=1)[None, :] * h.norm(dim=1)[:, None])
    got = vl.vocab_affinity(h.float(), basis).double()
    live = U.norm(dim=1) > 0  # the padding row of a fresh Llama embedding is zero: affinity 0, not NaN
    assert (~live).any() and (got[:, ~live] == 0).all()
    assert torch.allclose(got[:, live], expected[:, live], atol=1e-5)
    brute = torch.nn.functional.cosine_similarity(h.float()[:, None, :], basis.vectors[None], dim=-1)
    assert torch.allclose(got.float(), brute, atol=1e-5)  # torch's cosine also gives 0 for a zero vector


def test_for_words_and_tokens(tiny_model, tiny_tokenizer):
    basis = vl.SemanticBasis.from_model(tiny_model, cache=False)
    ids = tiny_tokenizer(" cat", add_special_tokens=False)["input_ids"]
    with pytest.warns(UserWarning, match="tokens") if len(ids) > 1 else _nullcontext():
        vec = basis.for_words(["cat"])
    assert torch.equal(vec[0], basis.vectors[ids[-1]])
    with pytest.warns(UserWarning, match="last token"):
        basis.for_words(["supercalifragilistic"])
    with pytest.raises(vl.core.VocabularyError):
        basis.for_tokens([tiny_model.d_vocab + 5])
    with pytest.raises(vl.core.VocabularyError):
        basis.for_words([""])


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


def test_frames_project(tiny_model):
    basis = vl.SemanticBasis.from_model(tiny_model, cache=False)
    h = torch.randn(4, tiny_model.d_model)
    assert torch.allclose(basis.project(h, 1), tiny_model.final_norm(h))
    assert torch.equal(basis.with_frame("raw").project(h, 1), h)
    with pytest.raises(vl.core.InputError, match="unknown frame"):
        vl.SemanticBasis.from_model(tiny_model, frame="sideways", cache=False)
    with pytest.raises(vl.core.InputError, match="lens train"):
        vl.SemanticBasis.from_model(tiny_model, frame="tuned", cache=False)


def test_save_load_and_cache(tiny_model, tmp_path, tiny_tokenizer):
    basis = vl.SemanticBasis.from_model(tiny_model)
    again = vl.SemanticBasis.from_model(tiny_model)  # from the disk cache
    assert torch.equal(basis.vectors, again.vectors)
    basis.save(tmp_path / "b")
    loaded = vl.SemanticBasis.load(tmp_path / "b", model=tiny_model)
    assert torch.equal(loaded.vectors, basis.vectors) and loaded.frame == "final_norm"
    from conftest import make_tiny_hf

    other = vl.load_model((make_tiny_hf(tiny_tokenizer, seed=7), tiny_tokenizer))
    with pytest.raises(vl.core.ArtifactError, match="another model"):
        vl.SemanticBasis.load(tmp_path / "b", model=other)
    (tmp_path / "b" / "basis.safetensors").write_bytes(b"garbage")
    with pytest.raises(vl.core.ArtifactError):
        vl.SemanticBasis.load(tmp_path / "b")


@pytest.mark.embedded
def test_embedded_basis_matches_pinv(embedded):
    basis = vl.SemanticBasis.from_model(embedded)
    ref = torch.linalg.pinv(embedded.W_U.double())
    assert ((basis.vectors.double() - ref).norm() / ref.norm()) <= 1e-5
    assert abs(float(basis.leverage().sum()) - 576) < 1e-3


def _rewrite(path, edit):
    """Change the saved vectors in place (as a disk fault or a careless edit would), keeping the metadata."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "basis.safetensors"))
    edit(tensors["vectors"])
    save_file(tensors, str(path / "basis.safetensors"))


@pytest.mark.parametrize(
    "fault,message",
    [
        (lambda v: v[3].fill_(float("nan")), "non-finite"),
        (lambda v: v[3, 0].mul_(1.001), "digest"),  # finite, plausible, wrong
    ],
)
def test_a_corrupted_basis_is_refused_and_the_cache_rebuilt(tiny_model, tmp_path, fault, message):
    from vsem_lens.core.models import cache_dir

    fresh = vl.SemanticBasis.from_model(tiny_model, cache=False)
    saved = fresh.save(tmp_path / "b")
    _rewrite(saved, fault)
    with pytest.raises(vl.core.ArtifactError, match=message):
        vl.SemanticBasis.load(saved, model=tiny_model)

    vl.SemanticBasis.from_model(tiny_model)  # writes the cache entry
    (entry,) = [p for p in (cache_dir() / "bases").iterdir() if p.name.startswith(tiny_model.fingerprint)]
    _rewrite(entry, fault)
    with pytest.warns(UserWarning, match="rebuilding the cached semantic basis"):
        rebuilt = vl.SemanticBasis.from_model(tiny_model)
    assert torch.equal(rebuilt.vectors, fresh.vectors)
    assert torch.equal(vl.SemanticBasis.load(entry, model=tiny_model).vectors, fresh.vectors)  # the entry was rewritten


@pytest.mark.parametrize("word", ["🙂", "猫"])
def test_words_ending_in_a_byte_fragment_are_refused(tiny_model, word):
    basis = vl.SemanticBasis.from_model(tiny_model, cache=False)
    pieces = tiny_model.tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    assert "\ufffd" in tiny_model.tokenizer.decode([pieces[-1]])  # the premise: a byte token, not a character
    with pytest.raises(vl.core.VocabularyError, match="byte fragment"):
        basis.token_ids_for_words([word])
