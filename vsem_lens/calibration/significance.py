"""Paired statistics for two classifiers scored on the same test examples.

Both functions take two boolean arrays of per-example correctness, ``a[i]`` (method A got example
``i`` right) and ``b[i]`` (method B did), over the *same* examples in the same order:

- :func:`mcnemar_exact`: the exact (binomial) McNemar test. Only the discordant examples carry
  information about which method is better: ``n_ab`` = A right and B wrong, ``n_ba`` = A wrong and B
  right. Under the null hypothesis (equal accuracy) each discordant example is equally likely to fall
  either way, so ``n_ab ~ Binomial(n_ab + n_ba, 1/2)`` and the two-sided p-value is
  ``min(1, 2 P(X <= min(n_ab, n_ba)))`` (1 when there are no discordant examples). It equals
  ``scipy.stats.binomtest(n_ab, n_ab + n_ba, 0.5).pvalue``; computed here with exact integer
  arithmetic.
- :func:`paired_bootstrap`: a percentile bootstrap interval for the accuracy difference
  ``acc(A) - acc(B)``: ``n_resamples`` (default 10,000) resamples of the example indices with
  replacement, the *same* indices for both methods (that is what makes it paired), from a NumPy
  generator seeded with ``seed`` (default 0), so the interval is reproducible.

:func:`compare_paired` returns both as one :class:`PairedComparison`.

Example:
    >>> a = [True] * 8 + [False] * 2
    >>> b = [True] * 3 + [False] * 7
    >>> round(mcnemar_exact(a, b), 4)            # 5 discordant examples, all for A
    0.0625
    >>> low, high = paired_bootstrap(a, b, n_resamples=2000)
    >>> low > 0 and high <= 1
    True
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from math import comb
from typing import Any

import numpy as np

from ..core.errors import InputError, check_int, check_positive_int

N_RESAMPLES = 10_000


def _correctness(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    """Two equal-length, non-empty 1-D boolean arrays (0/1 integers are accepted)."""
    out = []
    for name, value in (("a", a), ("b", b)):
        arr = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)
        if arr.ndim != 1 or arr.size == 0:
            raise InputError(f"{name} must be a non-empty 1-D array of per-example correctness, got shape {arr.shape}.")
        if arr.dtype != bool:
            if not np.isin(arr, (0, 1)).all():
                raise InputError(f"{name} must hold booleans (or 0/1) per example, got values {np.unique(arr)[:5]}.")
            arr = arr.astype(bool)
        out.append(arr)
    if out[0].shape != out[1].shape:
        raise InputError(f"a and b must score the same examples: {out[0].size} vs {out[1].size} entries.")
    return out[0], out[1]


def discordant_counts(a: Any, b: Any) -> tuple[int, int]:
    """``(n_ab, n_ba)``: examples only A got right, examples only B got right.

    Example:
        >>> discordant_counts([True, True, False], [False, True, True])
        (1, 1)
    """
    a, b = _correctness(a, b)
    return int((a & ~b).sum()), int((~a & b).sum())


def mcnemar_exact(a: Any, b: Any) -> float:
    """Two-sided exact McNemar p-value of ``acc(A) == acc(B)`` (see the module docstring).

    Example:
        >>> mcnemar_exact([True, False], [True, False])   # no discordant example
        1.0
    """
    n_ab, n_ba = discordant_counts(a, b)
    n = n_ab + n_ba
    if n == 0:
        return 1.0
    tail = sum(comb(n, i) for i in range(min(n_ab, n_ba) + 1))  # exact integers; 2^n below too
    return min(1.0, 2 * tail / 2**n)


def paired_bootstrap(
    a: Any, b: Any, *, n_resamples: int = N_RESAMPLES, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``acc(A) - acc(B)`` resampling examples (paired).

    Example:
        >>> paired_bootstrap([True, True], [True, True])
        (0.0, 0.0)
    """
    a, b = _correctness(a, b)
    check_positive_int(n_resamples, "n_resamples")
    check_int(seed, "seed", minimum=0)
    if not 0.0 < float(level) < 1.0:
        raise InputError(f"level must be in (0, 1), got {level}.")
    diff = a.astype(np.float64) - b.astype(np.float64)  # per example: +1, 0 or -1
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples, dtype=np.float64)
    chunk = max(1, 2_000_000 // diff.size)  # at most ~2M indices (16 MB) at a time
    for start in range(0, n_resamples, chunk):
        stop = min(n_resamples, start + chunk)
        idx = rng.integers(0, diff.size, size=(stop - start, diff.size))
        means[start:stop] = diff[idx].mean(axis=1)
    alpha = (1.0 - float(level)) / 2
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


@dataclass
class PairedComparison:
    """Accuracies of A and B on the same examples, their difference, McNemar and a bootstrap interval.

    Example:
        >>> compare_paired([True, False], [False, False]).as_dict()["n_ab"]
        1
    """

    n: int
    accuracy_a: float
    accuracy_b: float
    difference: float
    ci_low: float
    ci_high: float
    n_ab: int
    n_ba: int
    p_value: float
    n_resamples: int
    seed: int

    def as_dict(self) -> dict:
        """The fields as a plain dict (JSON-able)."""
        return asdict(self)

    def significant(self, alpha: float = 0.05) -> bool:
        """Whether McNemar rejects equal accuracy at ``alpha``."""
        return self.p_value < alpha


def compare_paired(a: Any, b: Any, *, n_resamples: int = N_RESAMPLES, seed: int = 0) -> PairedComparison:
    """Paired comparison of two classifiers' per-example correctness (A minus B).

    Example:
        >>> c = compare_paired([True] * 8 + [False] * 2, [True] * 3 + [False] * 7, n_resamples=1000)
        >>> c.difference, c.n_ab, c.n_ba
        (0.5, 5, 0)
    """
    a_arr, b_arr = _correctness(a, b)
    n_ab, n_ba = discordant_counts(a_arr, b_arr)
    low, high = paired_bootstrap(a_arr, b_arr, n_resamples=n_resamples, seed=seed)
    acc_a, acc_b = float(a_arr.mean()), float(b_arr.mean())
    return PairedComparison(
        n=int(a_arr.size), accuracy_a=acc_a, accuracy_b=acc_b, difference=acc_a - acc_b, ci_low=low, ci_high=high,
        n_ab=n_ab, n_ba=n_ba, p_value=mcnemar_exact(a_arr, b_arr), n_resamples=int(n_resamples), seed=int(seed),
    )


__all__ = ["N_RESAMPLES", "PairedComparison", "compare_paired", "discordant_counts", "mcnemar_exact", "paired_bootstrap"]
