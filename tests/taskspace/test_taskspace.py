"""Task spaces: gradient similarity, FTGD (only masked parameters move), clustering and comparison."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_TEXTS, make_tiny_hf

from vsem_lens.core.errors import InputError
from vsem_lens.taskspace import ftgd as ts_ftgd
from vsem_lens.taskspace import gradients as ts_gradients
from vsem_lens.taskspace import matrix as ts_matrix
from vsem_lens.taskspace import parameters as ts_parameters
from vsem_lens.taskspace import similarity as ts_similarity
from vsem_lens.taskspace import transfer as ts_transfer
from vsem_lens.taskspace.pairs import MinimalPair

PAIRS = [
    MinimalPair("agr", "The cat sat.", "The cat sit."),
    MinimalPair("agr", "A dog is here.", "A dog are here."),
    MinimalPair("agr", "The cats sat.", "The cats sits."),
    MinimalPair("agr", "A dog sat.", "A dogs sat."),
    MinimalPair("npi", "No cat ever sat.", "The cat ever sat."),
    MinimalPair("npi", "She sold apples.", "She sell apples."),
    MinimalPair("npi", "No dog ever is.", "A dog ever is."),
    MinimalPair("npi", "Hello world.", "Hello worlds."),
    MinimalPair("num", "Two cats sat.", "Two cat sat."),
    MinimalPair("num", "One cat sat.", "One cats sat."),
    MinimalPair("num", "Three dogs sat.", "Three dog sat."),
    MinimalPair("num", "A melon is here.", "A melons is here."),
]


@pytest.fixture(scope="module")
def grads(tiny_model):
    relabelled = PAIRS + [MinimalPair("agr_again", p.good, p.bad) for p in PAIRS if p.phenomenon == "agr"]
    return ts_gradients.phenomenon_gradients(tiny_model, relabelled, batch_size=3)


@pytest.fixture(scope="module")
def plain_hf(tiny_tokenizer):
    """A fresh, unwrapped copy of the tiny model (same seed), eager attention like the bridge's."""
    hf = make_tiny_hf(tiny_tokenizer)
    hf.config._attn_implementation = "eager"
    return hf


def _state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in ts_parameters.model_parameters(model)}


def test_gradient_equals_plain_hf_autograd(plain_hf, tiny_tokenizer, tiny_model, grads):
    # Independent reference: mean margin of the "agr" pairs with the plain HF model, one sentence at a time.
    name = "model.layers.1.mlp.down_proj.weight"
    param = dict(plain_hf.named_parameters())[name]
    plain_hf.zero_grad()
    total = 0.0
    for pair in [p for p in PAIRS if p.phenomenon == "agr"]:
        for text, sign in ((pair.good, 1.0), (pair.bad, -1.0)):
            ids = torch.tensor([tiny_tokenizer(text)["input_ids"]])  # the model's rule: no BOS
            logp = torch.log_softmax(plain_hf(ids).logits[0, :-1], -1).gather(1, ids[0, 1:, None]).sum()
            total = total + sign * logp / 4
    total.backward()
    reference = param.grad.reshape(-1).clone()
    plain_hf.zero_grad(set_to_none=True)
    where = next(s for s in grads.slices if s.name == name)
    got = grads.vectors["agr"][where.start : where.stop]
    torch.testing.assert_close(got, reference, rtol=1e-3, atol=1e-6)
    # the model's requires_grad flags are restored and no gradient is left behind
    assert all(p.grad is None for p in tiny_model.bridge.parameters())


def test_similarity_with_itself_is_one(grads):
    sim = ts_similarity.gradient_similarity(grads, top_frac=0.05, chunk=1000)
    diag = sim[sim.phenomenon_a == sim.phenomenon_b]
    np.testing.assert_allclose(diag.cosine, 1.0, atol=1e-6)
    np.testing.assert_allclose(diag.jaccard.dropna(), 1.0)
    # the same pairs under another name give the same gradient
    same = sim[(sim.phenomenon_a == "agr") & (sim.phenomenon_b == "agr_again")]
    np.testing.assert_allclose(same.cosine, 1.0, atol=1e-6)
    scopes = set(sim.scope)
    assert {"overall", "embed", "block_0", "block_2", "final_norm"} <= scopes
    matrix = ts_matrix.task_space_matrix(sim, "cosine")
    assert list(matrix.index) == list(matrix.columns) == ["agr", "npi", "num", "agr_again"]
    assert np.allclose(matrix.to_numpy(), matrix.to_numpy().T)


def _top_set(values: torch.Tensor, frac: float) -> set[int]:
    v = np.abs(values.double().numpy())
    k = int(np.ceil(frac * v.size))
    return {int(i) for i in np.argsort(-v, kind="stable")[:k] if v[i] > 0}


def test_similarity_matches_direct_computation(grads):
    sim = ts_similarity.gradient_similarity(grads, top_frac=0.02, chunk=777)
    a, b = grads.vectors["agr"], grads.vectors["num"]
    row = sim[(sim.scope == "overall") & (sim.phenomenon_a == "agr") & (sim.phenomenon_b == "num")].iloc[0]
    assert row.cosine == pytest.approx(float(torch.nn.functional.cosine_similarity(a, b, dim=0)), abs=1e-5)
    # independent masks: the ceil(2%) largest |g| by a numpy sort (no ties in random float gradients)
    ma, mb = _top_set(a, 0.02), _top_set(b, 0.02)
    assert row.jaccard == pytest.approx(len(ma & mb) / len(ma | mb))
    assert row.mask_size_a == len(ma)
    # per block: top-k within the block
    block = [s for s in grads.slices if s.block == "block_1"]
    va = torch.cat([a[s.start : s.stop] for s in block])
    vb = torch.cat([b[s.start : s.stop] for s in block])
    brow = sim[(sim.scope == "block_1") & (sim.phenomenon_a == "agr") & (sim.phenomenon_b == "num")].iloc[0]
    assert brow.cosine == pytest.approx(float(torch.nn.functional.cosine_similarity(va, vb, dim=0)), abs=1e-5)
    ma, mb = _top_set(va, 0.02), _top_set(vb, 0.02)
    assert brow.jaccard == pytest.approx(len(ma & mb) / len(ma | mb))


def test_ftgd_touches_only_masked_parameters(tiny_model):
    before = _state(tiny_model)
    train = [p for p in PAIRS if p.phenomenon == "agr"]
    cfg = ts_ftgd.FTGDConfig(top_frac=0.02, steps=3, lr=1e-2, batch_size=2)
    result = ts_ftgd.ftgd_finetune(tiny_model, train, config=cfg)
    after = _state(result.model)
    assert result.n_updated == sum(int(m.sum()) for m in result.mask.values())
    assert 0 < result.n_updated <= int(np.ceil(0.02 * result.n_candidates)) + 10
    changed = 0
    for name, old in before.items():
        new = after[name]
        mask = result.mask.get(name, torch.zeros_like(old, dtype=torch.bool))
        assert torch.equal(new[~mask], old[~mask]), name
        changed += int((new[mask] != old[mask]).sum())
    assert changed > 0
    # the original model is untouched (FTGD tunes a copy)
    for name, old in _state(tiny_model).items():
        assert torch.equal(old, before[name])
    assert len(result.losses) == 3


def test_ftgd_transfer_equals_tuning_each_phenomenon_by_hand(tiny_model):
    before = _state(tiny_model)
    cfg = ts_ftgd.FTGDConfig(top_frac=0.05, steps=2, lr=1e-2, batch_size=2, objective="lm")
    res = ts_transfer.ftgd_transfer(tiny_model, PAIRS, n_train=2, n_eval=2, config=cfg, corpus=TINY_TEXTS[:3])
    m = res.matrix("delta_accuracy")
    assert list(m.index) == ["agr", "npi", "num"] and list(m.columns) == ["agr", "npi", "num", "all"]
    # the BOS rule is the model's (None -> False) and is recorded everywhere
    assert res.config.prepend_bos is False and res.meta["config"]["prepend_bos"] is False
    assert not res.transfer.prepend_bos.any() and not res.pairs.prepend_bos.any()
    # independent reference: split, tune a fresh copy on "npi", re-score the held-out pairs one by one
    train, test = ts_transfer.split_pairs(PAIRS, n_train=2, n_eval=2, seed=cfg.seed)
    tuned = ts_ftgd.ftgd_finetune(tiny_model, train["npi"], config=cfg).model
    rows = res.pairs[res.pairs.trained_on == "npi"]
    held_out = [p for group in test.values() for p in group]
    for row, pair in zip(rows.itertuples(), held_out):
        with torch.no_grad():
            after = float(ts_gradients.pair_margins(tuned, [pair])[0])
            original = float(ts_gradients.pair_margins(tiny_model, [pair])[0])
        assert row.margin_after == pytest.approx(after, abs=1e-4)
        assert row.margin_before == pytest.approx(original, abs=1e-4)
    npi_row = res.transfer[(res.transfer.trained_on == "npi") & (res.transfer.evaluated_on == "npi")].iloc[0]
    expect = rows[rows.evaluated_on == "npi"]
    assert npi_row.delta_margin == pytest.approx((expect.margin_after - expect.margin_before).mean(), abs=1e-6)
    ppl = ts_transfer.corpus_perplexity(tuned, TINY_TEXTS[:3], max_length=128)
    assert res.perplexity.set_index("trained_on").loc["npi", "perplexity_after"] == pytest.approx(ppl, rel=1e-5)
    for name, old in _state(tiny_model).items():  # the original model is untouched
        assert torch.equal(old, before[name])


def test_random_mask_control_has_the_ftgd_size_and_is_seeded(tiny_model):
    n = ts_ftgd.mask_size(tiny_model, 0.05)
    total = sum(p.numel() for _, p in ts_parameters.model_parameters(tiny_model))
    assert n == int(np.ceil(0.05 * total))
    a = ts_ftgd.random_mask(tiny_model, n, seed=1)
    b = ts_ftgd.random_mask(tiny_model, n, seed=1)
    c = ts_ftgd.random_mask(tiny_model, n, seed=2)
    assert sum(int(m.sum()) for m in a.values()) == n
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k not in c or not torch.equal(a[k], c[k]) for k in a)
    # spread over the model, not concentrated: every tensor with >= 200 entries gets some
    big = [name for name, p in ts_parameters.model_parameters(tiny_model) if p.numel() >= 200]
    assert all(name in a for name in big)
    # FTGD with mask="random" tunes exactly that mask, and only it
    train = [p for p in PAIRS if p.phenomenon == "agr"]
    cfg = ts_ftgd.FTGDConfig(top_frac=0.05, steps=2, lr=1e-2, batch_size=2, mask="random", mask_seed=1)
    result = ts_ftgd.ftgd_finetune(tiny_model, train, config=cfg)
    assert result.mask.keys() == a.keys() and all(torch.equal(result.mask[k], a[k]) for k in a)
    assert result.n_updated == n
    after = _state(result.model)
    for name, old in _state(tiny_model).items():
        mask = a.get(name, torch.zeros_like(old, dtype=torch.bool))
        assert torch.equal(after[name][~mask], old[~mask]), name
    # the gradient mask of the same fraction has (about) the same size
    grad_mask = ts_ftgd.ftgd_mask(tiny_model, train, top_frac=0.05)
    assert abs(sum(int(m.sum()) for m in grad_mask.values()) - n) <= 5
    with pytest.raises(InputError, match="mask must be one of"):
        ts_ftgd.FTGDConfig(mask="shuffled").check()
    with pytest.raises(InputError, match="more than"):
        ts_ftgd.random_mask(tiny_model, total + 1)


def test_transfer_tune_subset_probe_and_bos_override(tiny_model):
    cfg = ts_ftgd.FTGDConfig(top_frac=0.05, steps=1, lr=1e-2, batch_size=2, mask="random", prepend_bos=True)
    calls = []

    def probe(m):
        calls.append(m is tiny_model)
        return [{"value": 1.0}]

    res = ts_transfer.ftgd_transfer(tiny_model, PAIRS, n_train=2, n_eval=2, config=cfg, corpus=TINY_TEXTS[:2],
                                    tune=["npi"], probe=probe)
    assert list(res.training.trained_on) == ["npi"] and set(res.transfer.evaluated_on) == {"agr", "npi", "num", "all"}
    assert calls == [True, False] and list(res.probes.trained_on) == [None, "npi"]
    assert res.transfer.prepend_bos.all() and res.meta["config"]["mask"] == "random"
    assert list(res.training["mask"]) == ["random"]
    with pytest.raises(InputError, match="tune names"):
        ts_transfer.ftgd_transfer(tiny_model, PAIRS, n_train=2, n_eval=2, config=cfg, corpus=TINY_TEXTS[:2],
                                  tune=["islands"])


def test_gradients_follow_the_bos_rule_and_record_it(plain_hf, tiny_tokenizer, tiny_model):
    name = "model.layers.1.mlp.down_proj.weight"
    param = dict(plain_hf.named_parameters())[name]
    agr = [p for p in PAIRS if p.phenomenon == "agr"][:2]
    grads = ts_gradients.phenomenon_gradients(tiny_model, agr, prepend_bos=True, include=r"layers\.1\.mlp\.down")
    assert grads.meta["prepend_bos"] is True
    assert grads.block_norms().prepend_bos.all()
    assert ts_similarity.gradient_similarity(grads).prepend_bos.all()
    plain_hf.zero_grad()
    total = 0.0
    for pair in agr:
        for text, sign in ((pair.good, 1.0), (pair.bad, -1.0)):
            ids = torch.tensor([[tiny_tokenizer.bos_token_id] + tiny_tokenizer(text)["input_ids"]])
            logp = torch.log_softmax(plain_hf(ids).logits[0, :-1], -1).gather(1, ids[0, 1:, None]).sum()
            total = total + sign * logp / 2
    total.backward()
    reference = param.grad.reshape(-1).clone()
    plain_hf.zero_grad(set_to_none=True)
    torch.testing.assert_close(grads.vectors["agr"], reference, rtol=1e-3, atol=1e-6)


def test_ftgd_config_is_validated(tiny_model):
    with pytest.raises(InputError, match="objective"):
        ts_ftgd.ftgd_finetune(tiny_model, PAIRS[:2], config=ts_ftgd.FTGDConfig(objective="dpo"))
    with pytest.raises(InputError, match="top_frac"):
        ts_similarity.gradient_similarity(ts_gradients.TaskGradients({}, [], {}), top_frac=0)
    with pytest.raises(InputError, match="no pairs"):
        ts_gradients.phenomenon_gradients(tiny_model, PAIRS, phenomena=["islands"])
    with pytest.raises(InputError, match="no parameters match"):
        ts_parameters.model_parameters(tiny_model, include="nothing_like_this")


def test_clustering_plot_and_hypothesis():
    names = ["a", "b", "c", "d"]
    sim = pd.DataFrame(
        [[1, 0.9, 0.1, 0.0], [0.9, 1, 0.2, 0.1], [0.1, 0.2, 1, 0.8], [0.0, 0.1, 0.8, 1]], index=names, columns=names
    )
    order = ts_matrix.cluster_order(sim.loc[["a", "c", "b", "d"], ["a", "c", "b", "d"]])
    assert {frozenset(order[:2]), frozenset(order[2:])} == {frozenset("ab"), frozenset("cd")}
    fig = ts_matrix.plot_task_space(sim, title="t")
    assert list(fig.data[0].x) == ts_matrix.cluster_order(sim)  # the heatmap is drawn in clustered order
    assert {frozenset(fig.data[0].x[:2]), frozenset(fig.data[0].x[2:])} == {frozenset("ab"), frozenset("cd")}
    same = ts_matrix.compare_with_hypothesis(sim, sim, n_permutations=50)
    assert same["spearman"] == pytest.approx(1.0) and same["pearson"] == pytest.approx(1.0)
    assert same["n_cells"] == 6 and 0 < same["mantel_p"] <= 1
    flipped = ts_matrix.compare_with_hypothesis(sim, 1 - sim, n_permutations=0)
    assert flipped["spearman"] == pytest.approx(-1.0)
    # asymmetric transfer matrices are symmetrised; a dict of dicts works as the hypothesis
    family = {"a": 0, "b": 0, "c": 1, "d": 1}
    hyp = {a: {b: float(family[a] == family[b]) for b in names} for a in names}
    assert ts_matrix.compare_with_hypothesis(sim + np.triu(np.ones((4, 4)), 1) * 0.01, hyp, n_permutations=0)["n_cells"] == 6
    with pytest.raises(InputError, match="at least 3"):
        ts_matrix.compare_with_hypothesis(sim, pd.DataFrame(1.0, index=["a", "x"], columns=["a", "x"]))
