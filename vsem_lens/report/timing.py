"""Stage timings and memory of a report run: a small accumulating timer, the timings table, peak RSS.

Example:
    >>> timer = StageTimer()
    >>> with timer.stage("tokenize"):
    ...     pass
    >>> list(timer.seconds)
    ['tokenize']
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from typing import Iterator

import pandas as pd


class StageTimer:
    """Wall time per named stage, accumulated over repeated entries (e.g. once per batch).

    Example:
        >>> timer = StageTimer()
        >>> for _ in range(3):
        ...     with timer.stage("capture"):
        ...         pass
        >>> timer.seconds["capture"] >= 0
        True
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def declare(self, *names: str) -> None:
        """List stages (at zero seconds) so they appear, in this order, even if never entered.

        Example:
            >>> timer = StageTimer(); timer.declare("a", "b"); timer.seconds
            {'a': 0.0, 'b': 0.0}
        """
        for name in names:
            self.seconds.setdefault(name, 0.0)

    def add(self, name: str, seconds: float) -> None:
        """Add ``seconds`` to stage ``name``.

        Example:
            >>> timer = StageTimer(); timer.add("pass overhead", 1.5); timer.seconds
            {'pass overhead': 1.5}
        """
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the ``with`` block into stage ``name`` (also when it raises).

        Example:
            >>> timer = StageTimer()
            >>> with timer.stage("figures"):
            ...     pass
        """
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def total(self, names: list[str] | tuple[str, ...]) -> float:
        """Sum of the seconds of ``names`` (stages never entered count as zero).

        Example:
            >>> timer = StageTimer(); timer.add("a", 1.0); timer.total(("a", "b"))
            1.0
        """
        return sum(self.seconds.get(name, 0.0) for name in names)

    def rounded(self) -> dict[str, float]:
        """The timings in milliseconds precision, in stage order.

        Example:
            >>> timer = StageTimer(); timer.add("a", 1.23456); timer.rounded()
            {'a': 1.235}
        """
        return {name: round(value, 3) for name, value in self.seconds.items()}


def timings_table(timings: dict[str, float]) -> pd.DataFrame:
    """The ``timings`` table of a report: one row per stage.

    Example:
        >>> timings_table({"basis": 0.5}).to_dict("records")
        [{'stage': 'basis', 'seconds': 0.5}]
    """
    return pd.DataFrame({"stage": list(timings), "seconds": [float(v) for v in timings.values()]})


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB.

    Example:
        >>> peak_rss_mib() > 0
        True
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)
