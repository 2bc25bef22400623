"""Tests of vsem_lens.geometry.metrics, .istar and .cosine: exact oracles, invariances, the PyPI isoscore package, I-STAR gradients."""

from __future__ import annotations

import importlib
import itertools
import math
import warnings

import pytest
import torch

from vsem_lens.core.errors import InputError, NumericalError
from vsem_lens.core.moments import Moments
from vsem_lens.geometry import (
    CosineAccumulator,
    average_cosine,
    isoscore,
    isoscore_star,
    istar_penalty,
    outlier_dimensions,
    participation_ratio,
    reference_covariance,
)

F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rotation(n: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=_gen(seed), dtype=F64))
    return q


def _anisotropic(n_points: int, dim: int, seed: int = 0) -> torch.Tensor:
    """A rotated, shifted cloud with a spread of variances (and a large-mean outlier dimension)."""
    g = _gen(seed)
    scales = torch.logspace(-1, 1, dim, dtype=F64)
    x = torch.randn(n_points, dim, generator=g, dtype=F64) * scales
    x = x @ _rotation(dim, seed + 1)
    x[:, 0] += 100.0
    return x


def _factorial(k: int, n: int) -> torch.Tensor:
    """2^k corners of the +-1 cube in the first k of n coordinates, plus the centre point.

    Mean 0 and sample covariance (ddof=1) exactly diag(1,..,1, 0,..,0): sum of squares 2^k over N-1 = 2^k.
    """
    corners = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=k)), dtype=F64)
    x = torch.zeros(2**k + 1, n, dtype=F64)
    x[1:, :k] = corners
    return x


# ------------------------------------------------------------------------------ IsoScore oracles


def test_isotropic_gaussian_is_close_to_one():
    x = torch.randn(50_000, 16, generator=_gen(), dtype=F64)
    assert isoscore(x) > 0.995


def test_rank_one_is_zero():
    t = torch.randn(300, 1, generator=_gen(), dtype=F64)
    direction = torch.randn(1, 12, generator=_gen(1), dtype=F64)
    assert abs(isoscore(t * direction + 3.0)) < 1e-12


@pytest.mark.parametrize("k,n", [(1, 5), (2, 5), (3, 8), (5, 5), (4, 10), (6, 7)])
def test_k_equal_eigenvalues(k, n):
    x = _factorial(k, n)
    assert torch.equal(torch.cov(x.T), torch.diag(torch.tensor([1.0] * k + [0.0] * (n - k), dtype=F64)))
    expected = (k - 1) / (n - 1)
    assert isoscore(x) == pytest.approx(expected, abs=1e-12)
    assert isoscore(x @ _rotation(n, k)) == pytest.approx(expected, abs=1e-12)


def test_diag_4_1_is_8_over_17():
    x = torch.tensor([[2.0, 1.0], [2.0, -1.0], [-2.0, 1.0], [-2.0, -1.0], [0.0, 0.0]], dtype=F64)
    assert torch.equal(torch.cov(x.T), torch.tensor([[4.0, 0.0], [0.0, 1.0]], dtype=F64))
    assert isoscore(x) == pytest.approx(8 / 17, abs=1e-14)
    assert participation_ratio(x) == pytest.approx(25 / 17, abs=1e-14)


def test_invariance_to_rotation_translation_scale():
    x = _anisotropic(400, 10)
    ref = isoscore(x)
    assert isoscore(x @ _rotation(10, 7)) == pytest.approx(ref, abs=1e-10)
    assert isoscore(x + torch.randn(10, generator=_gen(3), dtype=F64) * 1e3) == pytest.approx(ref, abs=1e-10)
    assert isoscore(x * 37.5) == pytest.approx(ref, abs=1e-10)
    assert isoscore(x * 1e-4) == pytest.approx(ref, abs=1e-10)


def test_points_and_moments_give_the_same_value():
    x = _anisotropic(1000, 12, seed=3)
    m = Moments(12)
    for chunk in x.split(97):
        m.update(chunk.float())  # streamed float32 chunks, as activations arrive
    assert isoscore(m) == pytest.approx(isoscore(x.float()), abs=1e-12)
    assert isoscore(x) == pytest.approx(isoscore(Moments(12).update(x)), abs=1e-12)
    assert participation_ratio(m) == pytest.approx(participation_ratio(x.float()), abs=1e-10)
    star = float(isoscore_star(x.float(), zeta=0.3))
    assert float(isoscore_star(m, zeta=0.3)) == pytest.approx(star, abs=1e-10)


def test_isoscore_star_zeta_zero_is_isoscore_and_zeta_one_is_c0():
    x = _anisotropic(200, 8, seed=4)
    assert float(isoscore_star(x, zeta=0.0)) == pytest.approx(isoscore(x), abs=1e-12)
    assert float(isoscore_star(x, zeta=1.0)) == pytest.approx(1.0, abs=1e-12)  # c0 = I is isotropic


# ------------------------------------------------------------------------------ the PyPI package

@pytest.fixture(scope="module")
def iso_pkg():
    """The PyPI ``isoscore`` package (a pinned test dependency): missing means a broken set-up, so no skip."""
    return importlib.import_module("IsoScore.IsoScore")


CLOUDS = [(500, 20, 0), (10, 50, 1), (2000, 7, 2), (30, 30, 3), (5, 64, 4)]  # includes N < n


@pytest.mark.parametrize("n_points,dim,seed", CLOUDS)
def test_isoscore_matches_package(iso_pkg, n_points, dim, seed):
    x = _anisotropic(n_points, dim, seed)
    # The package takes points as [num_samples, dim] (rows are points), like us.
    theirs = float(iso_pkg.IsoScore(x.numpy()))
    assert isoscore(x) == pytest.approx(theirs, abs=1e-6)


@pytest.mark.parametrize("n_points,dim,seed", CLOUDS)
def test_remaining_gap_to_package_is_its_float32_constants(n_points, dim, seed):
    # The package computes sqrt(n) from an int64 tensor, i.e. in float32, hence its ~1e-8 offsets.
    # Its own eigenvalue formula carried out fully in float64 agrees with our closed form to rounding.
    x = _anisotropic(n_points, dim, seed)
    lam = torch.linalg.svdvals(torch.cov(x.T))
    n = torch.tensor(float(dim), dtype=F64)
    l_hat = lam * torch.sqrt(n) / torch.linalg.vector_norm(lam)
    defect = torch.linalg.vector_norm(l_hat - 1) / torch.sqrt(2 * (n - torch.sqrt(n)))
    paper = ((n - defect**2 * (n - torch.sqrt(n))) ** 2 - n) / (n * (n - 1))
    assert isoscore(x) == pytest.approx(float(paper), abs=1e-12)


@pytest.mark.parametrize("n_points,dim,seed", CLOUDS)
@pytest.mark.parametrize("zeta", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_isoscore_star_matches_package(iso_pkg, n_points, dim, seed, zeta):
    x = _anisotropic(n_points, dim, seed)
    a = torch.randn(dim, dim, generator=_gen(seed + 10), dtype=F64)
    diag = torch.diag(torch.rand(dim, generator=_gen(seed), dtype=F64))
    for c0 in (torch.eye(dim, dtype=F64), a @ a.T / dim, diag):
        theirs = float(iso_pkg.IsoScore_star(x.numpy(), c0, zeta))
        assert float(isoscore_star(x, zeta=zeta, c0=c0)) == pytest.approx(theirs, abs=1e-6)


def test_isoscore_star_default_c0_is_identity(iso_pkg):
    x = _anisotropic(40, 16, seed=5)
    eye = torch.eye(16, dtype=F64)
    assert float(isoscore_star(x, zeta=0.2)) == float(isoscore_star(x, zeta=0.2, c0=eye))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = float(iso_pkg.IsoScore_star(x, eye, 0.2))
    assert float(isoscore_star(x, zeta=0.2)) == pytest.approx(theirs, abs=1e-6)


# ------------------------------------------------------------------------------ I-STAR


def test_istar_penalty_gradient_is_finite_and_respects_mask():
    hs = torch.randn(3, 2, 6, 16, generator=_gen(), dtype=torch.float32) * torch.logspace(0, 1, 16)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    hs_poisoned = hs.clone()
    hs_poisoned[:, 1, 4:] = 1e6  # padding must not matter
    hs_poisoned.requires_grad_()
    loss = istar_penalty(hs_poisoned, mask, zeta=0.2, weight=-5.0)
    loss.backward()
    grad = hs_poisoned.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert torch.equal(grad[:, 1, 4:], torch.zeros_like(grad[:, 1, 4:]))
    pooled = hs[:, mask.bool()].reshape(-1, 16)
    expected = -5.0 * (1 - float(isoscore_star(pooled, zeta=0.2)))
    assert float(loss.detach()) == pytest.approx(expected, abs=1e-10)
    # a list of per-layer tensors gives the same value
    as_list = istar_penalty(list(hs.unbind(0)), mask.bool(), zeta=0.2, weight=-5.0)
    assert float(as_list) == pytest.approx(float(loss.detach()), abs=1e-10)


@pytest.mark.parametrize("weight", [1.0, -1.0])
def test_one_gradient_step_moves_isoscore_with_the_sign_of_weight(weight):
    x0 = torch.randn(256, 16, generator=_gen(1), dtype=F64) * torch.logspace(0, 1, 16, dtype=F64)
    x = x0.clone().requires_grad_()
    istar_penalty(x[None, None], None, zeta=0.2, weight=weight).backward()
    x1 = x0 - 100.0 * x.grad
    change = isoscore(x1) - isoscore(x0)
    assert change * weight > 1e-4


def test_reference_covariance_streams_masked_batches():
    g = _gen(2)
    a, b = torch.randn(3, 5, 8, generator=g, dtype=F64), torch.randn(2, 4, 8, generator=g, dtype=F64)
    mask_b = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    c0 = reference_covariance(iter([a, (b, mask_b)]))
    expected = torch.cov(torch.cat([a.reshape(-1, 8), b[mask_b]]).T)
    assert torch.allclose(c0, expected, atol=1e-12)
    assert float(isoscore_star(a.reshape(-1, 8), zeta=0.5, c0=c0)) > 0.5


# ------------------------------------------------------------------------------ companions


def _brute_average_cosine(x: torch.Tensor) -> float:
    u = x / x.norm(dim=1, keepdim=True)
    sims = u @ u.T
    n = x.shape[0]
    return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))


def test_average_cosine_matches_brute_force():
    for seed, shift in [(0, 0.0), (1, 3.0), (2, -0.5)]:
        x = torch.randn(60, 9, generator=_gen(seed), dtype=F64) + shift
        assert average_cosine(x) == pytest.approx(_brute_average_cosine(x), abs=1e-12)
        acc = CosineAccumulator(9).update(x[:25]) + CosineAccumulator(9).update(x[25:])
        assert average_cosine(acc) == pytest.approx(_brute_average_cosine(x), abs=1e-12)
    # masked streaming and subsampling
    x = torch.randn(4, 10, 6, generator=_gen(3), dtype=F64) + 1.0
    mask = torch.rand(4, 10, generator=_gen(4)) > 0.3
    streamed = CosineAccumulator(6).update(x, mask).result()
    assert streamed == pytest.approx(_brute_average_cosine(x[mask]), abs=1e-12)
    flat = x.reshape(-1, 6)
    idx = torch.randperm(40, generator=_gen(9))[:15]
    subset = average_cosine(flat, max_points=15, seed=9)
    assert subset == pytest.approx(_brute_average_cosine(flat[idx]), abs=1e-12)


def test_average_cosine_is_not_isotropy():
    # A shifted isotropic cloud: IsoScore ~1, average cosine ~1 ("anisotropic" by the flawed measure).
    x = torch.randn(5000, 8, generator=_gen(), dtype=F64) + 20.0
    assert isoscore(x) > 0.99 and average_cosine(x) > 0.99


def test_participation_ratio_matches_eigenvalues():
    x = _anisotropic(300, 12, seed=6)
    lam = torch.linalg.eigvalsh(torch.cov(x.T))
    assert participation_ratio(x) == pytest.approx(float(lam.sum() ** 2 / (lam**2).sum()), rel=1e-12)
    assert isoscore(x) == pytest.approx((participation_ratio(x) - 1) / 11, abs=1e-12)


def test_outlier_dimensions():
    scales = torch.ones(10, dtype=F64)
    scales[7], scales[2] = 20.0, 5.0
    x = torch.randn(4000, 10, generator=_gen(), dtype=F64) * scales + 300.0
    idx, share = outlier_dimensions(Moments(10).update(x), k=2)
    assert idx.tolist() == [7, 2]
    var = x.var(0)
    assert torch.allclose(share, var[[7, 2]] / var.sum(), atol=1e-12)
    assert share[0] > 0.9


# ------------------------------------------------------------------------------ errors


def test_bad_input_errors():
    x = torch.randn(10, 4, generator=_gen())
    with pytest.raises(InputError, match="n_points, dim"):
        isoscore(torch.randn(2, 3, 4))
    with pytest.raises(InputError, match="at least 2"):
        isoscore(torch.randn(1, 4))
    with pytest.raises(InputError, match="zero variance"):
        isoscore(torch.ones(5, 4))
    with pytest.raises(InputError, match="2 dimensions"):
        isoscore(torch.randn(5, 1))
    with pytest.raises(NumericalError):
        isoscore(torch.tensor([[1.0, float("nan")], [0.0, 1.0], [2.0, 2.0]]))
    with pytest.raises(InputError, match="zeta"):
        isoscore_star(x, zeta=1.5)
    with pytest.raises(InputError, match=r"\[4, 4\]"):
        isoscore_star(x, zeta=0.2, c0=torch.eye(3))
    with pytest.raises(InputError, match=r"\[4, 4\]"):
        isoscore_star(x, zeta=0.0, c0=torch.eye(3))
    with pytest.raises(InputError, match="mask shape"):
        istar_penalty(torch.randn(2, 3, 5, 4), torch.ones(3, 4), zeta=0.2, weight=1.0)
    with pytest.raises(InputError, match="layer, batch, pos, dim"):
        istar_penalty(torch.randn(3, 5, 4), None, zeta=0.2, weight=1.0)
    with pytest.raises(InputError, match="same shape"):
        istar_penalty([torch.randn(2, 3, 4), torch.randn(2, 2, 4)], None, zeta=0.2, weight=1.0)
    with pytest.raises(InputError, match="keeps 1"):
        istar_penalty(torch.randn(1, 2, 3, 4), torch.tensor([[1, 0, 0], [0, 0, 0]]), zeta=0.2, weight=1.0)
    with pytest.raises(InputError, match="no batches"):
        reference_covariance([])
    with pytest.raises(InputError, match="zero vector"):
        average_cosine(torch.cat([x, torch.zeros(1, 4)]))
    with pytest.raises(InputError, match="k must be"):
        outlier_dimensions(x, k=5)
    assert not math.isnan(isoscore(x))
