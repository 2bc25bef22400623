"""LensAggregator: the report's corpus statistics of readouts, as a streaming, mergeable Stat."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_TEXTS

import vsem_lens as vl
from vsem_lens.core.capture import iter_capture
from vsem_lens.core.stats import Stat
from vsem_lens.readout import LensAggregator, ReadoutKernel


def test_kernel_chunking_and_aggregator_statistics(tiny_model):
    """Chunked readouts equal unchunked ones; LensAggregator's update/result equals statistics recomputed
    from the kernel's per-token readouts."""
    basis = vl.SemanticBasis.from_model(tiny_model, cache=False)
    reference = ReadoutKernel.for_model(tiny_model, basis=basis, k=4)
    engine = ReadoutKernel.for_model(tiny_model, basis=basis, k=4, max_rows=7)  # several chunks per batch
    agg = LensAggregator(tiny_model, basis, max_rows=5, quantile_capacity=10_000)
    refs = []
    for batch in iter_capture(tiny_model, TINY_TEXTS, batch_size=4):
        ref = reference.read_batch(batch)
        out = engine.read_batch(batch)
        assert torch.equal(out.final_ids, ref.final_ids)
        for name in ("lens", "affinity"):
            for key in ("top_ids", "final_rank"):
                assert torch.equal(out.readouts[name][key], ref.readouts[name][key]), (name, key)
            for key in ("top_scores", "final_prob", "final_score", "kl_bits"):
                torch.testing.assert_close(out.readouts[name][key], ref.readouts[name][key], atol=2e-5, rtol=1e-4)
        agg.update(batch.acts["resid_post"], batch.layers)
        refs.append(ref)
    table = agg.result(frame="final_norm")
    for name in ("lens", "affinity"):
        rank = torch.cat([r.readouts[name]["final_rank"] for r in refs], dim=1).double()
        prob = torch.cat([r.readouts[name]["final_prob"] for r in refs], dim=1).double()
        kl = torch.cat([r.readouts[name]["kl_bits"] for r in refs], dim=1).double()
        sub = table[table.readout == name].sort_values("layer")
        assert (sub["n_tokens"] == rank.shape[1]).all()
        assert sub["rank_median"].tolist() == rank.quantile(0.5, dim=1).tolist()
        assert sub["top1_agreement"].tolist() == pytest.approx((rank == 0).double().mean(1).tolist())
        assert sub["rank_mean"].tolist() == pytest.approx(rank.mean(1).tolist())
        assert sub["prob_mean"].tolist() == pytest.approx(prob.mean(1).tolist(), abs=1e-6)
        assert sub["prob_std"].tolist() == pytest.approx(prob.std(1).tolist(), abs=1e-6)
        assert sub["kl_bits_mean"].tolist() == pytest.approx(kl.mean(1).tolist(), abs=1e-5)
        assert sub["kl_bits_q75"].tolist() == pytest.approx(kl.quantile(0.75, dim=1).tolist(), abs=1e-5)



def test_aggregator_is_a_mergeable_checkpointable_stat(tiny_model):
    """Two aggregators over halves of the corpus, merged (one through a state_dict round-trip), give the
    statistics of one aggregator over everything."""
    basis = vl.SemanticBasis.from_model(tiny_model, cache=False)
    make = lambda: LensAggregator(tiny_model, basis, max_rows=5, quantile_capacity=10_000)  # noqa: E731
    whole, first, second = make(), make(), make()
    assert isinstance(whole, Stat)
    batches = list(iter_capture(tiny_model, TINY_TEXTS, batch_size=2))
    for i, batch in enumerate(batches):
        whole.update(batch.acts["resid_post"], batch.layers)
        (first if i < len(batches) // 2 else second).update(batch.acts["resid_post"], batch.layers)
    second.flush()
    restored = make()
    restored.load_state_dict(second.state_dict())
    first.flush()
    merged = first.merge(restored)
    a, b = whole.result(frame="final_norm"), merged.result(frame="final_norm")
    assert a["n_tokens"].tolist() == b["n_tokens"].tolist()
    for column in ("rank_mean", "top1_agreement", "prob_mean", "prob_std", "kl_bits_mean", "kl_bits_median",
                   "final_cos_mean"):
        assert a[column].tolist() == pytest.approx(b[column].tolist(), abs=1e-6, nan_ok=True), column
