"""Average pairwise cosine similarity, in memory (:func:`average_cosine`) and streamed
(:class:`CosineAccumulator`).

A common anisotropy measure, but it measures the mean direction rather than isotropy: a cloud can have
average cosine 0 and IsoScore near 0. Report it next to :func:`~vsem_lens.geometry.metrics.isoscore`.

Example:
    >>> import torch
    >>> round(average_cosine(torch.tensor([[1., 0.], [0., 1.]])), 6)
    0.0
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float, Shaped
from torch import Tensor

from ..core.distributed import all_reduce_sum
from ..core.errors import ArtifactError, InputError, NumericalError, check_positive_int
from ..core.stats import Stat, select_points
from .metrics import CHUNK_ROWS, point_cloud


class CosineAccumulator(Stat):
    """Streaming, mergeable sum of unit vectors for :func:`average_cosine` (a
    :class:`~vsem_lens.core.stats.Stat`).

    Keeps ``count`` and ``total = sum_i x_i / ||x_i||`` in float64; the mean pairwise cosine of all
    points seen is ``(||total||^2 - count) / (count (count - 1))`` (:meth:`result`).

    Example:
        >>> x = torch.randn(100, 8)
        >>> acc = CosineAccumulator(8).update(x[:40]).merge(CosineAccumulator(8).update(x[40:]))
        >>> abs(average_cosine(acc) - average_cosine(x)) < 1e-12
        True
    """

    def __init__(self, dim: int, *, device: Any = None) -> None:
        self.dim = check_positive_int(dim, "CosineAccumulator(dim=...)")
        self.count = 0
        self.total = torch.zeros(dim, dtype=torch.float64, device=device)

    def update(
        self, x: Float[Tensor, "*batch dim"], mask: Shaped[Tensor, "*batch"] | None = None
    ) -> CosineAccumulator:
        """Add the points of ``x`` [..., dim] where ``mask`` is True/1; returns ``self``.

        Example:
            >>> CosineAccumulator(2).update(torch.tensor([[3., 4.], [1., 0.]])).total.tolist()
            [1.6, 0.8]
        """
        x = select_points(x, mask, self.dim, who="CosineAccumulator.update")
        x = x.to(device=self.total.device, dtype=torch.float64)
        if x.shape[0] == 0:
            return self
        norms = torch.linalg.vector_norm(x, dim=1)
        if not bool(torch.isfinite(norms).all()):
            raise NumericalError("points contain NaN or inf; mask them out or fix the activations.")
        if not bool((norms > 0).all()):
            raise InputError(
                f"{int((norms == 0).sum())} zero vector(s): cosine similarity is undefined for them; "
                "mask them out (padding is often all zeros)."
            )
        self.total += (x / norms[:, None]).sum(dim=0)
        self.count += x.shape[0]
        return self

    def merge(self, other: CosineAccumulator) -> CosineAccumulator:
        """Fold another accumulator in place (exact); returns ``self``.

        Example:
            >>> a = CosineAccumulator(2).update(torch.ones(2, 2))
            >>> a.merge(a.copy()).count
            4
        """
        if not isinstance(other, CosineAccumulator) or other.dim != self.dim:
            raise InputError("can only merge a CosineAccumulator of the same dimension.")
        self.total += other.total.to(self.total.device)
        self.count += other.count
        return self

    def __add__(self, other: CosineAccumulator) -> CosineAccumulator:
        if not isinstance(other, CosineAccumulator):
            return NotImplemented
        return self.copy().merge(other)

    def copy(self) -> CosineAccumulator:
        """An independent copy.

        Example:
            >>> CosineAccumulator(3).copy().count
            0
        """
        new = CosineAccumulator(self.dim, device=self.total.device)
        new.count, new.total = self.count, self.total.clone()
        return new

    def result(self) -> float:
        """Mean cosine similarity over all ordered pairs of distinct points.

        Example:
            >>> CosineAccumulator(2).update(torch.tensor([[1., 0.], [0., 2.]])).result()
            0.0
        """
        if self.count < 2:
            raise InputError(f"average cosine needs at least 2 points, got {self.count}.")
        n = self.count
        return float((self.total @ self.total - n) / (n * (n - 1)))

    def all_reduce(self, env: Any) -> None:
        """Sum the counts and unit-vector sums of every ``torch.distributed`` rank in place.

        Example:
            >>> from vsem_lens.core.distributed import SINGLE
            >>> acc = CosineAccumulator(2).update(torch.ones(3, 2))
            >>> acc.all_reduce(SINGLE); acc.count
            3
        """
        packed = torch.cat([torch.tensor([float(self.count)], dtype=torch.float64, device=self.total.device),
                            self.total])
        packed = all_reduce_sum(packed, env)
        self.count, self.total = int(round(float(packed[0]))), packed[1:].clone()

    def empty_like(self) -> CosineAccumulator:
        """A fresh, empty accumulator of the same width and device.

        Example:
            >>> CosineAccumulator(3).empty_like().count
            0
        """
        return CosineAccumulator(self.dim, device=self.total.device)

    def state_dict(self) -> dict[str, Any]:
        """``dim``, ``count`` and ``total`` (a copy), for checkpoints.

        Example:
            >>> sorted(CosineAccumulator(2).state_dict())
            ['count', 'dim', 'total']
        """
        return {"dim": self.dim, "count": self.count, "total": self.total.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (same width).

        Example:
            >>> acc = CosineAccumulator(2); acc.load_state_dict(CosineAccumulator(2).update(torch.ones(2, 2)).state_dict())
            >>> acc.count
            2
        """
        try:
            dim, count, total = int(state["dim"]), int(state["count"]), state["total"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"not a CosineAccumulator state dict ({exc!r}); build it with state_dict().") from None
        if dim != self.dim or tuple(total.shape) != (self.dim,):
            raise ArtifactError(f"the saved CosineAccumulator has width {dim}, this one {self.dim}.")
        self.count, self.total = count, total.to(device=self.total.device, dtype=torch.float64).clone()


def average_cosine(
    x: Float[Tensor, "n_points dim"] | CosineAccumulator, *, max_points: int | None = None, seed: int = 0
) -> float:
    """Mean cosine similarity of distinct pairs: the common (but flawed) anisotropy measure.

    Exact and O(N d): ``sum_{i != j} cos(x_i, x_j) = ||sum_i x_i / ||x_i|| ||^2 - N``, so no N x N
    matrix. High values mean the points share a common direction (often just a large mean), which is
    not the same as using few dimensions; report it next to :func:`isoscore`, not instead of it.

    Args:
        x: points [N, dim] or a :class:`CosineAccumulator` (streamed form).
        max_points: if set and N is larger, use a random subset of this many points (for comparison
            with studies that subsample); by default all points are used, since the cost is linear.
        seed: seed of that subset.

    Example:
        >>> round(average_cosine(torch.tensor([[1., 0.], [0., 1.], [1., 1.]])), 6)   # (0 + 2 * 0.7071) / 3
        0.471405
    """
    if isinstance(x, CosineAccumulator):
        return x.result()
    x = point_cloud(x)
    if max_points is not None:
        if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 2:
            raise InputError(f"max_points must be an integer >= 2 or None, got {max_points!r}.")
        if x.shape[0] > max_points:
            gen = torch.Generator().manual_seed(seed)
            x = x[torch.randperm(x.shape[0], generator=gen)[:max_points].to(x.device)]
    acc = CosineAccumulator(x.shape[1], device=x.device)
    for start in range(0, x.shape[0], CHUNK_ROWS):
        acc.update(x[start : start + CHUNK_ROWS])
    return acc.result()

