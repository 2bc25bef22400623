"""The affinity temperature, against independent float64 fits (scipy) and planted temperatures."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

import vsem_lens as vl
from vsem_lens.core.errors import InputError, VsemLensError
from vsem_lens.readout.temperature import (
    affinity_kl_at,
    fit_affinity_temperature,
    fit_temperature,
    solve_inverse_temperature,
)

TEXTS = ["The capital of France is Paris.", "A cat sat on the mat", "Numbers like 12 and 13"]


def scipy_fit(scores: np.ndarray, logp: np.ndarray) -> tuple[float, float]:
    """Reference: mean KL(p || softmax(s / T)) in nats, minimised over log T by a bounded scalar search."""
    p = np.exp(logp)

    def mean_kl(log_t: float) -> float:
        z = scores / math.exp(log_t)
        logq = z - logsumexp(z, axis=1, keepdims=True)
        return float(np.mean(np.sum(p * (logp - logq), axis=1)))

    res = minimize_scalar(mean_kl, bounds=(math.log(1e-4), math.log(1e4)), method="bounded",
                          options={"xatol": 1e-10})
    return math.exp(res.x), res.fun


def grid_fit(scores: np.ndarray, logp: np.ndarray) -> float:
    """Reference 2: brute-force grid over T (hand loop), refined once around the best point."""
    p = np.exp(logp)
    best = None
    for grid in (np.exp(np.linspace(math.log(1e-3), math.log(1e3), 2001)),):
        for t in grid:
            z = scores / t
            kl = np.mean(np.sum(p * (logp - (z - logsumexp(z, axis=1, keepdims=True))), axis=1))
            if best is None or kl < best[1]:
                best = (t, kl)
    return best[0]


def test_fit_matches_scipy_and_grid_in_float64():
    rng = np.random.default_rng(0)
    scores = rng.uniform(-1, 1, size=(40, 30))
    target_logits = 6 * scores + rng.normal(size=(40, 30))  # related to the scores, but not a tempered copy
    logp = target_logits - logsumexp(target_logits, axis=1, keepdims=True)
    fit = fit_temperature(torch.tensor(scores), torch.tensor(np.exp(logp)))
    t_ref, kl_ref = scipy_fit(scores, logp)
    assert fit.temperature.dtype == torch.float64
    assert float(fit.temperature[0]) == pytest.approx(t_ref, rel=1e-6)
    assert float(fit.kl_bits[0]) == pytest.approx(kl_ref / math.log(2), rel=1e-9)
    assert float(fit.temperature[0]) == pytest.approx(grid_fit(scores, logp), rel=4e-3)  # grid step 0.35%
    # untempered: T = 1, computed by hand
    logq = scores - logsumexp(scores, axis=1, keepdims=True)
    kl1 = np.mean(np.sum(np.exp(logp) * (logp - logq), axis=1)) / math.log(2)
    assert float(fit.kl_bits_untempered[0]) == pytest.approx(kl1, rel=1e-9)
    assert fit.iterations < 20 and fit.at_bound == []


def test_groups_are_fitted_independently():
    rng = np.random.default_rng(1)
    scores = rng.uniform(-1, 1, size=(25, 3, 12))
    logits = rng.normal(size=(25, 12)) * 3
    logp = logits - logsumexp(logits, axis=1, keepdims=True)
    scores[:, 1] = logits * 0.05  # group 1: a planted temperature
    fit = fit_temperature(torch.tensor(scores), torch.tensor(logp), log_target=True)
    for g in range(3):
        assert float(fit.temperature[g]) == pytest.approx(scipy_fit(scores[:, g], logp)[0], rel=1e-6)
    assert float(fit.temperature[1]) == pytest.approx(0.05, rel=1e-8)


@pytest.mark.parametrize("t0", [0.01, 0.3, 1.0, 7.0])
def test_recovers_a_planted_temperature(t0):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 50, generator=gen, dtype=torch.float64) * 2
    fit = fit_temperature(logits * t0, torch.softmax(logits, -1))
    assert float(fit.temperature[0]) == pytest.approx(t0, rel=1e-7)
    assert float(fit.kl_bits[0]) < 1e-10


def test_float32_scores_give_the_float64_fit():
    gen = torch.Generator().manual_seed(4)
    scores = torch.rand(30, 200, generator=gen) * 2 - 1
    logits = scores.double() * 20 + torch.randn(30, 200, generator=gen, dtype=torch.float64)
    p = torch.softmax(logits, -1)
    fit32 = fit_temperature(scores, p.float())
    t_ref, _ = scipy_fit(scores.double().numpy(), torch.log_softmax(logits, -1).numpy())
    assert float(fit32.temperature[0]) == pytest.approx(t_ref, rel=1e-4)


@pytest.mark.parametrize(
    ("scores", "target", "match"),
    [
        (torch.empty(0, 5), torch.empty(0, 5), "empty"),
        (torch.tensor([[0.0, float("nan")]]), torch.tensor([[0.5, 0.5]]), "NaN or infinite"),
        (torch.tensor([[0.0, float("inf")]]), torch.tensor([[0.5, 0.5]]), "NaN or infinite"),
        (torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, float("nan")]]), "NaN or infinite"),
        (torch.tensor([[0.0, 1.0]]), torch.tensor([[0.7, 0.7]]), "sum to 1"),
        (torch.tensor([[0.0, 1.0]]), torch.tensor([[1.5, -0.5]]), "negative"),
        (torch.tensor([[0.0, 1.0]]), torch.tensor([[0.2, 0.3, 0.5]]), "shape"),
        (torch.zeros(2), torch.tensor([0.5, 0.5]), "must be"),
    ],
)
def test_bad_input_raises(scores, target, match):
    with pytest.raises(InputError, match=match) as info:
        fit_temperature(scores, target)
    assert isinstance(info.value, VsemLensError)


def test_solver_handles_an_optimum_far_from_the_start():
    # f(beta) = (log beta - log 5000)^2 is convex in log beta; Newton on beta with the bracket finds it
    target = math.log(5000.0)

    def objective(beta):
        u = beta.log()
        return (u - target) ** 2, 2 * (u - target) / beta, (2 - 2 * (u - target)) / beta**2

    beta, *_ = solve_inverse_temperature(objective, 1)
    assert float(beta[0]) == pytest.approx(5000.0, rel=1e-5)


@torch.no_grad()
def brute_force_affinity(model, basis, texts):
    """Dense per-layer cosines (float64) and the model's final log-probabilities (float64)."""
    acts = vl.capture(model, texts)
    W, b = model.W_U.double(), model.b_U.double()
    logp = torch.log_softmax(model.final_norm(acts["resid_post"][-1]).double() @ W + b, -1)
    cos = []
    for layer in range(model.n_layers):
        h = basis.lens(acts["resid_post"][layer], layer).double()
        cos.append(torch.nn.functional.cosine_similarity(h[:, None, :], basis.vectors.double()[None], dim=-1))
    return cos, logp, torch.tensor(acts.tokens["doc"].to_numpy())


def test_fit_affinity_temperature_matches_a_dense_float64_fit(tiny_model):
    basis = vl.SemanticBasis.from_model(tiny_model, cache=False)
    fit = fit_affinity_temperature(tiny_model, TEXTS, basis=basis, batch_size=2)
    cos, logp, _ = brute_force_affinity(tiny_model, basis, TEXTS)
    assert fit.layers == list(range(tiny_model.n_layers))
    assert fit.n_tokens == logp.shape[0]
    for layer in range(tiny_model.n_layers):
        t_ref, kl_ref = scipy_fit(cos[layer].numpy(), logp.numpy())
        assert float(fit.temperature[layer]) == pytest.approx(t_ref, rel=1e-3)
        assert float(fit.kl_bits[layer]) == pytest.approx(kl_ref / math.log(2), rel=1e-4, abs=1e-5)
    assert (fit.kl_bits <= fit.kl_bits_untempered + 1e-9).all()


def test_affinity_kl_at_matches_dense_kl_and_the_untempered_readout(tiny_model):
    basis = vl.SemanticBasis.from_model(tiny_model, cache=False)
    temps = torch.tensor([0.05, 0.2, 1.0], dtype=torch.float64)[: tiny_model.n_layers]
    kl, doc = affinity_kl_at(tiny_model, TEXTS, temps, basis=basis, batch_size=2)
    cos, logp, doc_ref = brute_force_affinity(tiny_model, basis, TEXTS)
    assert kl.shape == (tiny_model.n_layers, logp.shape[0])
    assert doc.tolist() == doc_ref.tolist()
    p = logp.exp()
    for layer in range(tiny_model.n_layers):
        logq = torch.log_softmax(cos[layer] / temps[layer], -1)
        ref = (p * (logp - logq)).sum(-1) / math.log(2)
        assert torch.allclose(kl[layer], ref, rtol=1e-4, atol=1e-5)
    ones, _ = affinity_kl_at(tiny_model, TEXTS, [1.0] * tiny_model.n_layers, basis=basis)
    df = vl.layerwise_affinity(tiny_model, TEXTS, basis=basis, k=1)
    per_layer = df.groupby("layer").affinity_kl_bits.mean().to_numpy()
    assert np.allclose(ones.mean(1).numpy(), per_layer, rtol=1e-4, atol=1e-6)


def test_model_level_bad_input(tiny_model):
    basis = vl.SemanticBasis.from_model(tiny_model, cache=False)
    with pytest.raises(InputError, match="empty"):
        fit_affinity_temperature(tiny_model, [], basis=basis)
    with pytest.raises(InputError, match="one temperature per layer"):
        affinity_kl_at(tiny_model, TEXTS, [1.0], basis=basis)
    with pytest.raises(InputError, match="positive"):
        affinity_kl_at(tiny_model, TEXTS, [1.0, -1.0, 1.0][: tiny_model.n_layers], basis=basis)
    with pytest.raises(InputError, match="NaN"):
        affinity_kl_at(tiny_model, TEXTS, [1.0, float("nan"), 1.0][: tiny_model.n_layers], basis=basis)
