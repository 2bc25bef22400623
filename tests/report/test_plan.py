"""The corpus plan: texts longer than the context are cut, and the cut is announced with its counts."""

from __future__ import annotations

import warnings

import pytest
from conftest import TINY_TEXTS

from vsem_lens.report.plan import plan_corpus


def test_texts_cut_to_the_context_are_announced(tiny_model, tiny_tokenizer):
    long_texts = [" ".join(TINY_TEXTS * k) for k in (3, 5)]
    texts = [TINY_TEXTS[0], long_texts[0], TINY_TEXTS[1], long_texts[1]]
    lengths = [len(tiny_tokenizer(text)["input_ids"]) for text in texts]
    n_ctx = tiny_model.n_ctx
    assert [n > n_ctx for n in lengths] == [False, True, False, True]
    dropped = sum(n - n_ctx for n in lengths if n > n_ctx)
    with pytest.warns(UserWarning) as caught:
        plan = plan_corpus(tiny_model, texts, max_tokens=None, lens_tokens=8, batch_size=2, seed=0)
    assert [str(w.message) for w in caught] == [
        f"2 of 4 texts are longer than the model's context of {n_ctx} tokens and were cut to it: "
        f"{dropped:,} tokens dropped."
    ]
    assert (plan.n_truncated, plan.n_dropped) == (2, dropped)
    assert plan.n_tokens == sum(min(n, n_ctx) for n in lengths)


def test_only_used_texts_count(tiny_model):
    """A long text beyond the token budget is never read, so it is not reported as cut."""
    texts = [TINY_TEXTS[0], " ".join(TINY_TEXTS * 5)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = plan_corpus(tiny_model, texts, max_tokens=20, lens_tokens=4, batch_size=2, seed=0)
    assert (len(plan.texts), plan.n_truncated, plan.n_dropped) == (1, 0, 0)
