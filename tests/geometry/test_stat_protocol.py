"""Every streaming state of vsem_lens.geometry follows the core.stats.Stat protocol: a stream split in two
and merged equals one pass, state_dict round-trips, and all_reduce outside a process group is a no-op."""

from __future__ import annotations

import pickle

import pandas as pd
import pytest
import torch
from conftest import TINY_TEXTS

import vsem_lens as vl
from vsem_lens.core.distributed import SINGLE
from vsem_lens.core.errors import ArtifactError
from vsem_lens.core.stats import Stat
from vsem_lens.geometry import (
    DECOMPOSITION_SITES,
    CosineAccumulator,
    DecompositionAccumulator,
    IsotropyState,
)


def _cosine(model):
    return CosineAccumulator(model.d_model)


def _isotropy(model):
    return IsotropyState.for_model(model, sites=("resid_post", "mlp_out"), layers=[0, 2])


def _decomposition(model):
    return DecompositionAccumulator(model.n_layers, [1, 2], token_chunk=5)


def _feed(stat, batch):
    if isinstance(stat, CosineAccumulator):
        return stat.update(batch.acts["resid_post"][-1])
    return stat.update(batch)


def _equal(a, b, tol=1e-10):
    if isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=tol, atol=tol)
    else:
        assert a == pytest.approx(b, rel=tol, abs=tol)


FACTORIES = {"cosine": _cosine, "isotropy": _isotropy, "decomposition": _decomposition}


@pytest.fixture(scope="module")
def batches(tiny_model):
    sites = tuple(dict.fromkeys(("resid_post", "mlp_out", *DECOMPOSITION_SITES)))
    out = list(vl.iter_capture(tiny_model, TINY_TEXTS, sites=sites, layers=[0, 1, 2], batch_size=2))
    assert len(out) >= 3
    return out


@pytest.mark.parametrize("kind", FACTORIES)
def test_split_stream_merged_equals_one_pass(tiny_model, batches, kind):
    make = FACTORIES[kind]
    whole, first, second = make(tiny_model), make(tiny_model), make(tiny_model)
    assert isinstance(whole, Stat)
    for i, batch in enumerate(batches):
        _feed(whole, batch)
        _feed(first if i < len(batches) // 2 else second, batch)
    _equal(first.merge(second).result(), whole.result())


@pytest.mark.parametrize("kind", FACTORIES)
def test_state_dict_round_trip(tiny_model, batches, kind):
    make = FACTORIES[kind]
    stat = make(tiny_model)
    for batch in batches:
        _feed(stat, batch)
    fresh = make(tiny_model)
    fresh.load_state_dict(pickle.loads(pickle.dumps(stat.state_dict())))
    _equal(fresh.result(), stat.result(), tol=0)
    # The restored state keeps streaming like the original.
    _feed(fresh, batches[0])
    _feed(stat, batches[0])
    _equal(fresh.result(), stat.result(), tol=0)


@pytest.mark.parametrize("kind", FACTORIES)
def test_all_reduce_single_process_is_a_no_op(tiny_model, batches, kind):
    make = FACTORIES[kind]
    stat = make(tiny_model)
    for batch in batches[:2]:
        _feed(stat, batch)
    before = stat.result()
    stat.all_reduce(SINGLE)
    _equal(stat.result(), before, tol=0)


def test_isotropy_state_dict_without_copy_shares_the_tensors(tiny_model, batches):
    state = _isotropy(tiny_model)
    _feed(state, batches[0])
    live = state.state_dict(clone=False)
    assert live["m2"] is state.m2 and live["count"] is state.count
    assert state.state_dict()["m2"] is not state.m2


def test_cosine_accumulator_load_rejects_another_width():
    acc = CosineAccumulator(3).update(torch.ones(2, 3))
    with pytest.raises(ArtifactError, match="width"):
        CosineAccumulator(4).load_state_dict(acc.state_dict())
