"""Tests of vsem_lens.core.moments.Moments and the Stat protocol of vsem_lens.core.stats: exact merging, masking, stability, persistence, errors."""

from __future__ import annotations

import os

import pytest
import torch

from vsem_lens.core.errors import ArtifactError, InputError, NumericalError
from vsem_lens.core.moments import Moments
from vsem_lens.core.stats import RunningScalars, Stat


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _two_pass_cov(x: torch.Tensor) -> torch.Tensor:
    """Float64 reference: centre on the exact mean, then one matmul."""
    x = x.double()
    xc = x - x.mean(0)
    return xc.T @ xc / (x.shape[0] - 1)


def test_sharded_merge_equals_one_pass_and_torch_cov():
    x = torch.randn(3000, 24, generator=_gen(), dtype=torch.float64) * 3 + 5
    x_before = x.clone()
    one = Moments(24).update(x)
    assert torch.equal(x, x_before)  # the caller's float64 tensor is not centred in place
    # uneven shards, merged in a tree, as workers would
    cuts = [0, 1, 17, 900, 901, 2500, 3000]
    shards = [Moments(24).update(x[a:b]) for a, b in zip(cuts, cuts[1:])]
    merged = (shards[0] + shards[1]).merge(shards[2] + shards[3]).merge(shards[4] + shards[5])
    assert merged.count == one.count == 3000
    assert torch.allclose(merged.mean, one.mean, rtol=0, atol=1e-10)
    assert torch.allclose(merged.cov(), one.cov(), rtol=0, atol=1e-10)
    assert torch.allclose(one.cov(), torch.cov(x.T), rtol=0, atol=1e-10)
    assert torch.allclose(one.var(), x.var(0), rtol=0, atol=1e-10)
    assert torch.allclose(one.cov(ddof=0), torch.cov(x.T, correction=0), rtol=0, atol=1e-10)


def test_update_accepts_leading_dims_and_float32():
    x = torch.randn(4, 7, 5, generator=_gen(1))
    m = Moments(5).update(x)
    assert m.count == 28 and m.mean.dtype == torch.float64
    assert torch.allclose(m.cov(), _two_pass_cov(x.reshape(-1, 5)), atol=1e-12)


def test_masked_points_are_excluded():
    x = torch.randn(3, 6, 4, generator=_gen(2), dtype=torch.float64)
    mask = torch.rand(3, 6, generator=_gen(3)) > 0.4
    x_poisoned = x.clone()
    x_poisoned[~mask] = float("nan")  # masked-out points must never be read
    for m_arg in (mask, mask.long(), mask.float()):
        m = Moments(4).update(x_poisoned, m_arg)
        ref = Moments(4).update(x[mask])
        assert m.count == int(mask.sum())
        assert torch.allclose(m.mean, ref.mean, atol=1e-14)
        assert torch.allclose(m.cov(), torch.cov(x[mask].T), atol=1e-12)


def test_all_masked_and_empty_batches_are_noops():
    m = Moments(3).update(torch.randn(5, 3, generator=_gen()))
    before = m.state_dict()
    m.update(torch.randn(2, 4, 3), torch.zeros(2, 4, dtype=torch.bool))
    m.update(torch.empty(0, 3))
    m.merge(Moments(3))
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_large_mean_is_stable():
    # Residual streams: means ~1e3, spread ~1e-1. A naive sum-of-squares loses ~all digits here.
    x = 1e3 + 1e-1 * torch.randn(20_000, 16, generator=_gen(4), dtype=torch.float64)
    x[:, 3] += 400.0  # an outlier dimension with an even larger mean
    m = Moments(16)
    for chunk in x.split(4096):
        m.update(chunk)
    ref = _two_pass_cov(x)
    assert torch.allclose(m.mean, x.mean(0), rtol=1e-14, atol=0)
    assert (m.cov() - ref).abs().max() / ref.abs().max() < 1e-10
    naive = (x.T @ x - x.shape[0] * torch.outer(x.mean(0), x.mean(0))) / (x.shape[0] - 1)
    assert (naive - ref).abs().max() / ref.abs().max() > 1e-8  # why the Chan update matters (~1e-6 here)


def test_large_mean_float32_input():
    x32 = (1e3 + 1e-1 * torch.randn(10_000, 8, generator=_gen(5))).float()
    m = Moments(8)
    for chunk in x32.split(1000):
        m.update(chunk)
    ref = _two_pass_cov(x32)  # same float32 values, exact float64 arithmetic
    assert (m.cov() - ref).abs().max() / ref.abs().max() < 1e-10


def test_copy_and_add_do_not_alias():
    a = Moments(2).update(torch.ones(3, 2))
    b = a.copy()
    c = a + b
    b.update(torch.zeros(5, 2))
    assert a.count == 3 and b.count == 8 and c.count == 6
    assert torch.equal(a.mean, torch.ones(2, dtype=torch.float64))


def test_state_dict_round_trip():
    a = Moments(6).update(torch.randn(50, 6, generator=_gen(6)))
    b = Moments.from_state_dict(a.state_dict())
    assert b.count == a.count and torch.equal(b.mean, a.mean) and torch.equal(b.m2, a.m2)
    with pytest.raises(ArtifactError):
        Moments.from_state_dict({"mean": torch.zeros(3)})
    with pytest.raises(ArtifactError):
        Moments.from_state_dict({"count": torch.tensor(2), "mean": torch.zeros(3), "m2": torch.zeros(2, 2)})


def test_save_load_round_trip(tmp_path):
    a = Moments(6).update(torch.randn(50, 6, generator=_gen(7)))
    path = tmp_path / "moments.safetensors"
    a.save(path)
    b = Moments.load(path)
    assert b.count == 50 and torch.equal(b.mean, a.mean) and torch.equal(b.m2, a.m2)
    assert os.listdir(tmp_path) == ["moments.safetensors"]  # no temp file left behind
    a.update(torch.randn(5, 6, generator=_gen(8))).save(str(path))  # overwrite in place
    assert Moments.load(str(path)).count == 55


def test_load_errors(tmp_path):
    with pytest.raises(ArtifactError, match="no Moments file"):
        Moments.load(tmp_path / "missing.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    with pytest.raises(ArtifactError, match="corrupt"):
        Moments.load(corrupt)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(ArtifactError, match="not a saved Moments"):
        Moments.load(other)
    with pytest.raises(ArtifactError, match="cannot write"):
        Moments(2).save(tmp_path / "no" / "such" / "dir" / "m.safetensors")


def test_bad_input_errors():
    m = Moments(4)
    with pytest.raises(InputError, match=r"\[\.\.\., 4\]"):
        m.update(torch.zeros(3, 5))
    with pytest.raises(InputError, match="mask shape"):
        m.update(torch.zeros(3, 4), torch.ones(4))
    with pytest.raises(InputError, match="only 0 and 1"):
        m.update(torch.zeros(3, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(InputError):
        m.update("not a tensor")
    with pytest.raises(InputError):
        Moments(0)
    with pytest.raises(InputError, match="merge"):
        m.merge(Moments(3))
    x = torch.zeros(3, 4)
    x[1, 2] = float("inf")
    with pytest.raises(NumericalError, match="1 point"):
        m.update(x)
    assert m.count == 0  # a rejected batch leaves the statistics untouched
    with pytest.raises(InputError, match="more than 1"):
        Moments(4).update(torch.zeros(1, 4)).cov()
    with pytest.raises(InputError):
        Moments(4).var()


# ---------------------------------------------------------------- the Stat protocol


def _stream(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, generator=g, dtype=torch.float64) * 5 + 100 for n in (4, 1, 7, 3)]


def test_running_scalars_merge_equals_one_pass():
    batches = [b.T for b in _stream()]  # [3 streams, tokens]
    whole = RunningScalars((3,))
    for b in batches:
        whole.update(b)
    left, right = RunningScalars((3,)), RunningScalars((3,))
    for b in batches[:2]:
        left.update(b)
    for b in batches[2:]:
        right.update(b)
    merged = left.merge(right).result()
    reference = torch.cat(batches, dim=1)
    torch.testing.assert_close(merged["mean"], reference.mean(dim=1))
    torch.testing.assert_close(merged["std"], reference.std(dim=1))
    assert merged["count"].tolist() == [15.0, 15.0, 15.0]
    torch.testing.assert_close(whole.result()["std"], merged["std"])


def test_moments_load_state_dict_round_trip_and_result():
    a = Moments(3)
    for b in _stream():
        a.update(b)
    b = Moments(3)
    b.load_state_dict(a.state_dict())
    result = b.result()
    reference = torch.cat(_stream())
    assert result["count"] == 15
    torch.testing.assert_close(result["cov"], torch.cov(reference.T))
    with pytest.raises(ArtifactError):
        Moments(2).load_state_dict(a.state_dict())


@pytest.mark.parametrize("make", [lambda: RunningScalars((3,)), lambda: Moments(3)])
def test_core_stats_follow_the_protocol(make):
    stat = make()
    assert isinstance(stat, Stat)
    for method in ("update", "merge", "all_reduce", "state_dict", "load_state_dict", "result"):
        assert callable(getattr(stat, method))
    with pytest.raises(TypeError):
        Stat()  # abstract
