"""Disentanglement: basis coherence, residual decomposition and affinity sparsity vs brute force."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_TEXTS

import vsem_lens as vl
from vsem_lens.core.errors import ArtifactError, InputError
from vsem_lens.geometry import (
    affinity_sparsity_by_layer,
    basis_coherence,
    decomposition_by_layer,
    pairwise_cosine_stats,
)
from vsem_lens.lenses.base import Lens
from vsem_lens.lenses.tuned import TunedLens


@pytest.fixture(scope="module")
def tiny_basis(tiny_model):
    return vl.SemanticBasis.from_model(tiny_model, cache=False)


@pytest.fixture(scope="module")
def tiny_decomposition(tiny_model):
    return decomposition_by_layer(tiny_model, TINY_TEXTS, batch_size=4, token_chunk=7)


# ------------------------------------------------------------------------------ component view


def test_components_sum_to_residual_and_spim_to_one(tiny_model, tiny_decomposition):
    dec = tiny_decomposition
    assert list(dec.groupby("layer").size()) == [4, 6, 8]  # embed + 2 (l + 1) + remainder
    assert dec.reconstruction_error.max() <= 1e-5
    assert dec.reconstruction_rel_error.max() <= 1e-6
    spim_sums = dec.groupby("layer").spim_mean.sum()
    assert (spim_sums - 1.0).abs().max() <= 1e-6
    rem = dec[dec.kind == "remainder"]
    assert rem.spim_mean.abs().max() <= 1e-6 and rem.norm_ratio_mean.max() <= 1e-6
    assert set(dec.kind) == {"embed", "attn", "mlp", "remainder"}
    assert dec.query("component == 'mlp_1'").component_layer.unique().tolist() == [1]
    assert dec.query("component == 'embed'").component_layer.unique().tolist() == [-1]


def test_indicators_match_brute_force(tiny_model, tiny_decomposition):
    acts = vl.capture(tiny_model, TINY_TEXTS, sites=("embed", "attn_out", "mlp_out", "resid_post"))
    comps = {"embed": acts["embed"][0].double()}
    for j in range(tiny_model.n_layers):
        comps[f"attn_{j}"] = acts["attn_out"][j].double()
        comps[f"mlp_{j}"] = acts["mlp_out"][j].double()
    for layer in range(tiny_model.n_layers):
        e = acts["resid_post"][layer].double()
        names = ["embed"] + [f"{k}_{j}" for j in range(layer + 1) for k in ("attn", "mlp")]
        parts = {name: comps[name] for name in names}
        parts["remainder"] = e - sum(parts.values())
        for name, x in parts.items():
            row = tiny_decomposition.query("layer == @layer and component == @name").iloc[0]
            dots = (x * e).sum(-1)
            ref = {
                "spim": dots / (e * e).sum(-1),
                "cos": torch.nn.functional.cosine_similarity(x, e, dim=-1),
                "dist": (x - e).norm(dim=-1),
                "norm_ratio": x.norm(dim=-1) / e.norm(dim=-1),
            }
            for stat, values in ref.items():
                # The remainder is float rounding: its cosine is noise, compare only its tiny magnitudes.
                if name == "remainder" and stat == "cos":
                    continue
                assert row[f"{stat}_mean"] == pytest.approx(float(values.mean()), rel=1e-9, abs=1e-12), (name, stat)
                assert row[f"{stat}_std"] == pytest.approx(float(values.std()), rel=1e-6, abs=1e-10), (name, stat)
            assert row.n_tokens == e.shape[0]


def test_decomposition_layers_subset_and_errors(tiny_model, tiny_decomposition):
    sub = decomposition_by_layer(tiny_model, TINY_TEXTS, layers=[-2], batch_size=6)
    ref = tiny_decomposition[tiny_decomposition.layer == 1].reset_index(drop=True)
    assert sub.component.tolist() == ref.component.tolist()
    assert (sub.spim_mean - ref.spim_mean).abs().max() <= 1e-10
    with pytest.raises(InputError, match="out of range"):
        decomposition_by_layer(tiny_model, TINY_TEXTS, layers=[5])
    with pytest.raises(InputError, match="token_chunk"):
        decomposition_by_layer(tiny_model, TINY_TEXTS, token_chunk=0)


# ------------------------------------------------------------------------------ basis view


def test_basis_coherence_deterministic_and_brute_force(tiny_model, tiny_basis):
    a = basis_coherence(tiny_basis, sample=150, seed=3, bins=40)
    b = basis_coherence(tiny_basis, sample=150, seed=3, bins=40, chunk=17)
    c = basis_coherence(tiny_basis, sample=150, seed=4, bins=40)
    assert torch.equal(a.sample_ids, b.sample_ids) and not torch.equal(a.sample_ids, c.sample_ids)
    assert a.histogram["count"].tolist() == b.histogram["count"].tolist()
    sources = {"semantic_basis": tiny_basis.vectors, "unembedding": tiny_model.W_U.T}
    n = 150
    for which, vectors in sources.items():
        x = vectors[a.sample_ids].double()
        cos = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(x, dim=1).T
        upper = cos[torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)]
        row = a.summary.set_index("which").loc[which]
        row_b = b.summary.set_index("which").loc[which]
        assert row.n_pairs == n * (n - 1) // 2 == a.histogram.query("which == @which")["count"].sum()
        assert row.max_abs_cos == pytest.approx(float(upper.abs().max()), abs=1e-12)
        assert row.max_abs_cos == pytest.approx(row_b.max_abs_cos, abs=1e-12)
        assert row.mean_abs_cos == pytest.approx(float(upper.abs().mean()), abs=1e-12)
        assert row.mean_cos == pytest.approx(float(upper.mean()), abs=1e-12)
        i, j = (a.sample_ids.tolist().index(t) for t in row.max_pair_ids)
        assert abs(float(cos[i, j])) == pytest.approx(row.max_abs_cos, abs=1e-12)
        for q in (0.5, 0.9, 0.99):
            assert row[f"q{str(q)[2:]:0<2}_abs_cos"] == pytest.approx(float(upper.abs().quantile(q)), abs=2e-3)


def test_leverage_sums_to_d_model(tiny_model, tiny_basis):
    coh = basis_coherence(tiny_basis, sample=10_000, n_extremes=5)
    assert coh.summary.n_vectors.tolist() == [tiny_model.d_vocab] * 2  # sample capped at the vocabulary
    assert coh.leverage.leverage.sum() == pytest.approx(tiny_model.d_model, rel=1e-9)
    assert len(coh.leverage) == tiny_model.d_vocab
    assert coh.leverage.leverage.between(0, 1 + 1e-9).all()
    high = coh.leverage_extremes.query("end == 'high'").leverage
    low = coh.leverage_extremes.query("end == 'low'").leverage
    assert high.is_monotonic_decreasing and low.is_monotonic_increasing
    assert high.iloc[0] == coh.leverage.leverage.max() and low.iloc[0] == coh.leverage.leverage.min()
    assert coh["meta"]["leverage_sum"] == pytest.approx(tiny_model.d_model)


def test_basis_coherence_errors(tiny_model, tiny_basis):
    with pytest.raises(InputError, match="sample"):
        basis_coherence(tiny_basis, sample=1)
    with pytest.raises(InputError, match="SemanticBasis"):
        basis_coherence(tiny_model.W_U)
    with pytest.raises(ArtifactError, match="model"):
        basis_coherence(vl.SemanticBasis(tiny_basis.vectors))
    assert pairwise_cosine_stats(torch.eye(3))["max_abs_cos"] == 0.0


# ------------------------------------------------------------------------------ affinity sparsity


class Tilted(Lens):
    """A custom, layer-dependent frame: the final norm, then a per-layer rotation and stretch."""

    frame = "tilted"

    def __init__(self, model):
        self.model = model
        gen = torch.Generator().manual_seed(3)
        d = model.d_model
        self.maps = [torch.linalg.qr(torch.randn(d, d, generator=gen))[0] * (1 + layer) for layer in range(model.n_layers)]

    def forward(self, h, layer):
        return self.model.final_norm(h) @ self.maps[layer]


def random_tuned_lens(model):
    gen = torch.Generator().manual_seed(4)
    n_tr, d = model.n_layers - 1, model.d_model
    return TunedLens(model, 0.3 * torch.randn(n_tr, d, d, generator=gen), 0.3 * torch.randn(n_tr, d, generator=gen))


@pytest.mark.parametrize("frame", ["final_norm", "raw", "tilted", "tuned"])
def test_affinity_sparsity_matches_brute_force(tiny_model, tiny_basis, frame):
    k = 4
    frame_lens = {"tilted": Tilted, "tuned": random_tuned_lens}.get(frame, lambda model: None)(tiny_model)
    basis = tiny_basis if frame_lens is not None else tiny_basis.with_frame(frame)
    df = affinity_sparsity_by_layer(
        tiny_model, TINY_TEXTS, frame=frame_lens or frame, k=k, basis=basis, batch_size=4, token_chunk=9
    )
    assert len(df) == 2 * tiny_model.n_layers
    resid = vl.capture(tiny_model, TINY_TEXTS)["resid_post"]
    for layer in range(tiny_model.n_layers):
        with torch.no_grad():
            if frame_lens is not None:  # transform the states by hand
                h = frame_lens(resid[layer], layer)
            else:
                h = resid[layer] if frame == "raw" else tiny_model.final_norm(resid[layer])
        h = h.double()
        aff = torch.nn.functional.normalize(h, dim=-1) @ torch.nn.functional.normalize(
            tiny_basis.vectors.double(), dim=-1
        ).T
        lens = h @ tiny_model.W_U.double() + tiny_model.b_U.double()
        for readout, scores in (("affinity", aff), ("lens", lens)):
            row = df.query("layer == @layer and readout == @readout").iloc[0]
            logp = torch.log_softmax(scores, -1)
            entropy = -(logp.exp() * logp).sum(-1) / math.log(2)
            mass = logp.exp().topk(k, -1).values.sum(-1)
            assert row.entropy_bits_mean == pytest.approx(float(entropy.mean()), abs=1e-4)
            assert row.entropy_bits_std == pytest.approx(float(entropy.std()), abs=1e-4)
            assert row.topk_mass_mean == pytest.approx(float(mass.mean()), abs=1e-5)
            assert row.top1_prob_mean == pytest.approx(float(logp.exp().max(-1).values.mean()), abs=1e-5)
            assert row.entropy_bits_mean <= row.max_entropy_bits + 1e-6
            if readout == "affinity":
                assert row.top1_cosine_mean == pytest.approx(float(aff.max(-1).values.mean()), abs=1e-5)
            else:
                assert math.isnan(row.top1_cosine_mean)
            assert row.frame == frame and row.n_tokens == h.shape[0]


def test_affinity_sparsity_errors(tiny_model, tiny_basis):
    with pytest.raises(InputError, match="k must"):
        affinity_sparsity_by_layer(tiny_model, TINY_TEXTS, k=0, basis=tiny_basis)
    with pytest.raises(InputError, match="unknown frame"):
        affinity_sparsity_by_layer(tiny_model, TINY_TEXTS, frame="normed", basis=tiny_basis)
    with pytest.raises(InputError, match="out of range"):
        affinity_sparsity_by_layer(tiny_model, TINY_TEXTS, layers=[9], basis=tiny_basis)


# ------------------------------------------------------------------------------ embedded model


@pytest.mark.embedded
def test_embedded_decomposition_reconstructs_residual(embedded):
    texts = ["The capital of France is Paris.", "A cat sat on the mat and looked at the dog."]
    dec = decomposition_by_layer(embedded, texts)
    assert dec.layer.nunique() == embedded.n_layers
    # Measured max ||sum of components - resid_post|| / ||resid_post|| per token: ~1e-6 (float32
    # rounding of 61 summed terms; residual norms reach ~2.5e4 on SmolLM2), so 1e-5 leaves 10x margin.
    assert dec.reconstruction_rel_error.max() <= 1e-5
    assert (dec.groupby("layer").spim_mean.sum() - 1).abs().max() <= 1e-6
