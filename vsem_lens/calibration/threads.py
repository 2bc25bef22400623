"""Torch thread control for the small training loops of calibration (heads, probes, kNN).

Example:
    >>> with torch_threads(1):
    ...     torch.get_num_threads()
    1
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (``None`` leaves it alone).

    Small-matrix training loops are much faster on one thread on a busy CPU: on the shared 2-core
    machine, 20 epochs of the head took 1.0 s on one thread and 30 s on two (OpenMP threads spinning
    against other processes).

    Example:
        >>> with torch_threads(1):
        ...     torch.get_num_threads()
        1
    """
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


__all__ = ["torch_threads"]
