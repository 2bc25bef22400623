"""Paired statistics: exact McNemar against scipy and a hand count, the paired bootstrap against a hand loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import binomtest

import vsem_lens as vl
from vsem_lens.calibration.significance import (
    compare_paired,
    discordant_counts,
    mcnemar_exact,
    paired_bootstrap,
)


def test_mcnemar_hand_computed_case():
    # A right / B wrong on 6 examples, the reverse on 1, both right on 10, both wrong on 3.
    a = [True] * 6 + [False] * 1 + [True] * 10 + [False] * 3
    b = [False] * 6 + [True] * 1 + [True] * 10 + [False] * 3
    assert discordant_counts(a, b) == (6, 1)
    # P(X <= 1 | n=7, 1/2) = (1 + 7) / 128, doubled: 16/128 = 0.125
    assert mcnemar_exact(a, b) == pytest.approx(0.125, abs=1e-15)
    assert mcnemar_exact(b, a) == pytest.approx(0.125, abs=1e-15)  # symmetric
    assert mcnemar_exact([True, False], [True, False]) == 1.0  # no discordant pair
    assert mcnemar_exact([True] * 3, [False] * 3) == pytest.approx(0.25)  # 2 * (1/8)


@pytest.mark.parametrize("seed", range(6))
def test_mcnemar_equals_scipy_binomtest(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 400))
    a = rng.random(n) < rng.uniform(0.5, 0.95)
    b = rng.random(n) < rng.uniform(0.5, 0.95)
    n_ab, n_ba = int((a & ~b).sum()), int((~a & b).sum())
    expected = binomtest(n_ab, n_ab + n_ba, 0.5).pvalue if n_ab + n_ba else 1.0
    assert mcnemar_exact(a, b) == pytest.approx(expected, rel=1e-12, abs=1e-300)
    assert mcnemar_exact(torch.tensor(a), torch.tensor(b.astype(int))) == pytest.approx(expected, rel=1e-12)


def test_paired_bootstrap_equals_a_hand_loop_and_is_seeded():
    rng = np.random.default_rng(7)
    a = rng.random(50) < 0.8
    b = rng.random(50) < 0.6
    low, high = paired_bootstrap(a, b, n_resamples=500, seed=3)
    # the same resamples drawn one at a time, differences of the two accuracies on each
    gen = np.random.default_rng(3)
    idx = gen.integers(0, 50, size=(500, 50))
    diffs = [a[i].mean() - b[i].mean() for i in idx]
    assert (low, high) == pytest.approx(tuple(np.quantile(diffs, [0.025, 0.975])), abs=1e-12)
    assert paired_bootstrap(a, b, n_resamples=500, seed=3) == (low, high)
    assert low <= a.mean() - b.mean() <= high


def test_paired_bootstrap_interval_excludes_zero_only_for_a_real_gap():
    a = np.array([True] * 90 + [False] * 10)
    better = a.copy()
    worse = np.array([True] * 60 + [False] * 40)
    assert paired_bootstrap(a, better) == (0.0, 0.0)  # identical predictions: no uncertainty
    low, high = paired_bootstrap(a, worse)
    assert 0 < low < 0.3 < high < 0.45
    assert mcnemar_exact(a, worse) < 1e-6


def test_compare_paired_and_bad_inputs():
    c = compare_paired([True] * 8 + [False] * 2, [True] * 3 + [False] * 7, n_resamples=1000, seed=1)
    assert (c.n, c.accuracy_a, c.accuracy_b, c.n_ab, c.n_ba) == (10, 0.8, 0.3, 5, 0)
    assert c.difference == pytest.approx(0.5) and c.p_value == pytest.approx(2 / 32)
    assert not c.significant() and c.significant(alpha=0.1)
    assert c.as_dict()["n_resamples"] == 1000
    with pytest.raises(vl.core.InputError, match="same examples"):
        mcnemar_exact([True, False], [True])
    with pytest.raises(vl.core.InputError, match="booleans"):
        mcnemar_exact([0, 2], [1, 1])
    with pytest.raises(vl.core.InputError, match="1-D"):
        paired_bootstrap([], [])
    with pytest.raises(vl.core.InputError, match="n_resamples"):
        paired_bootstrap([True], [False], n_resamples=0)
