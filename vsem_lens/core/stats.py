"""The streaming protocol (:class:`Stat`) and the exact arithmetic every streamed statistic shares.

:func:`chan_combine` is the pairwise update of Chan, Golub & LeVeque (1979) for (count, mean, centred sum
of squares) summaries; :class:`RunningScalars` applies it to many scalar streams at once. Vector
streams with a covariance live in :mod:`vsem_lens.core.moments`.

Example:
    >>> r = RunningScalars((1,)); r.update(torch.tensor([[1.0, 2.0, 3.0]]))
    >>> r.result()["std"].item()
    1.0
"""

from __future__ import annotations

import abc
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from .distributed import all_gather_objects, all_reduce_moments
from .errors import InputError


def select_points(
    x: Any, mask: Any, dim: int, *, who: str
) -> Float[Tensor, "n dim"]:
    """The points of ``x`` [..., dim] where ``mask`` [...] is True/1, flattened to [n, dim] and detached.

    Shared validation of the streaming accumulators: a clear :class:`InputError` for a wrong width,
    complex values, or a mask that is not boolean/0-1 or does not match ``x``'s leading shape.

    Example:
        >>> select_points(torch.ones(2, 3, 4), torch.tensor([[1, 0, 1], [0, 0, 1]]), 4, who="demo").shape
        torch.Size([3, 4])
    """
    x = as_tensor(x, "x")
    if x.ndim == 0 or x.shape[-1] != dim:
        raise InputError(
            f"{who} expected points of shape [..., {dim}], got {tuple(x.shape)}; "
            f"pass activations whose last dimension is {dim}."
        )
    if x.dtype.is_complex:
        raise InputError(f"{who} needs real-valued points, got dtype {x.dtype}.")
    if mask is not None:
        mask = as_tensor(mask, "mask")
        if tuple(mask.shape) != tuple(x.shape[:-1]):
            raise InputError(
                f"mask shape {tuple(mask.shape)} does not match the leading shape of x "
                f"{tuple(x.shape[:-1])}; give one mask entry per point."
            )
        if mask.dtype != torch.bool:
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise InputError("mask must be boolean or contain only 0 and 1 (1 = keep the point).")
            mask = mask != 0
        x = x[mask.to(x.device)]  # boolean indexing flattens the leading dims
    return x.detach().reshape(-1, dim)  # statistics are not differentiable


def chan_combine(
    n_a: Tensor | int, mean_a: Tensor, m2_a: Tensor, n_b: Tensor | int, mean_b: Tensor, m2_b: Tensor, *,
    outer: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Combine two (count, mean, centred sum of squares) summaries exactly (Chan, Golub & LeVeque).

    ``n = n_a + n_b``, ``mean = mean_a + delta n_b / n`` and ``m2 = m2_a + m2_b + delta delta^T n_a n_b / n``
    with ``delta = mean_b - mean_a``. Counts have the stream shape ``S`` (or are numbers); means are
    ``S`` (scalar streams) or ``S + [d]`` with scatters ``S + [d, d]`` (``outer=True``). Streams that are
    empty on both sides stay as they are. Returns new tensors ``(n, mean, m2)`` (``n`` in float64).

    Example:
        >>> n, mean, m2 = chan_combine(2, torch.tensor(1.0), torch.tensor(2.0), 2, torch.tensor(3.0), torch.tensor(2.0))
        >>> n.item(), mean.item(), m2.item()          # the summaries of [0, 2] and [2, 4]
        (4.0, 2.0, 8.0)
    """
    n_a = torch.as_tensor(n_a, dtype=torch.float64, device=mean_a.device)
    n_b = torch.as_tensor(n_b, dtype=torch.float64, device=mean_a.device)
    n = n_a + n_b
    safe = n.clamp_min(1.0)
    w_b, w_ab = (n_b / safe).to(mean_a.dtype), (n_a * n_b / safe).to(mean_a.dtype)
    delta = mean_b - mean_a
    if outer:
        mean = mean_a + delta * w_b.unsqueeze(-1)
        m2 = m2_a + m2_b + delta.unsqueeze(-1) * delta.unsqueeze(-2) * w_ab.reshape(*w_ab.shape, 1, 1)
    else:
        mean = mean_a + delta * w_b
        m2 = m2_a + m2_b + delta.square() * w_ab
    return n, mean, m2



class Stat(abc.ABC):
    """A statistic accumulated over a stream of batches: the protocol every corpus-wide state follows.

    Modelled on baukit's ``runningstats.Stat``. A stat is fed with :meth:`update`, combined with another
    stat over a disjoint part of the stream with :meth:`merge` (or across ``torch.distributed`` ranks with
    :meth:`all_reduce`), checkpointed with :meth:`state_dict` / :meth:`load_state_dict`, and read with
    :meth:`result`. Because every state speaks these five verbs, a long run (``vsem-lens report``)
    checkpoints, resumes and reduces a list of stats without knowing what each one computes.

    Example:
        >>> stats = [RunningScalars((1,)), RunningScalars((2,))]
        >>> stats[0].update(torch.tensor([[1.0, 3.0]])); stats[1].update(torch.ones(2, 4))
        >>> saved = [s.state_dict() for s in stats]
        >>> fresh = [RunningScalars((1,)), RunningScalars((2,))]
        >>> for stat, state in zip(fresh, saved): stat.load_state_dict(state)
        >>> fresh[0].result()["mean"].item(), fresh[1].result()["count"].tolist()
        (2.0, [4.0, 4.0])
    """

    @abc.abstractmethod
    def update(self, *args: Any, **kwargs: Any) -> Any:
        """Fold one batch of the stream into the state."""

    @abc.abstractmethod
    def merge(self, other: Any) -> Any:
        """Fold ``other`` (the same statistic over another part of the stream) into ``self``; return ``self``."""

    def all_reduce(self, env: Any) -> None:
        """Combine the states of every ``torch.distributed`` rank in place, so every rank holds the total.

        The default gathers every rank's :meth:`state_dict` and merges them in rank order; states with
        large tensors override it with a tensor reduction.
        """
        states = all_gather_objects(self.state_dict(), env)
        if len(states) <= 1:
            return
        total = None
        for state in states:
            part = self.empty_like()
            part.load_state_dict(state)
            total = part if total is None else total.merge(part)
        self.load_state_dict(total.state_dict())

    def empty_like(self) -> Stat:
        """A fresh, empty stat of the same configuration (used by the default :meth:`all_reduce`)."""
        raise NotImplementedError(f"{type(self).__name__} overrides all_reduce instead of providing empty_like")

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The state as plain tensors and Python values (for checkpoints and gathering)."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output into this (identically configured) stat."""

    @abc.abstractmethod
    def result(self, *args: Any, **kwargs: Any) -> Any:
        """The finished statistic."""


class RunningScalars(Stat):
    """Count, mean and centred sum of squares of many scalar streams at once (Chan et al. update).

    Every stream of shape ``shape`` gets values along a trailing token axis; mean and std are exact
    under any batching (no raw sum of squares, so no cancellation), and the state merges across
    processes (:meth:`all_reduce`) and checkpoints (:meth:`state_dict`).

    Example:
        >>> r = RunningScalars((2,)); r.update(torch.tensor([[1., 2., 3.], [0., 0., 4.]]))
        >>> r.mean.tolist(), r.std()[0].item()
        ([2.0, 1.3333333333333333], 1.0)
    """

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.count = torch.zeros(shape, dtype=torch.float64)
        self.mean = torch.zeros(shape, dtype=torch.float64)
        self.m2 = torch.zeros(shape, dtype=torch.float64)

    def update(self, values: Tensor, where: Any = Ellipsis) -> None:
        """Fold ``values`` [..., token] into streams ``where`` (an index into the stream shape)."""
        n_b = values.shape[-1]
        if n_b == 0:
            return
        values = values.to(torch.float64)
        mean_b = values.mean(dim=-1)
        m2_b = (values - mean_b.unsqueeze(-1)).square().sum(dim=-1)
        self.count[where], self.mean[where], self.m2[where] = chan_combine(
            self.count[where], self.mean[where], self.m2[where], n_b, mean_b, m2_b
        )

    def merge(self, other: RunningScalars) -> RunningScalars:
        """Fold the streams of ``other`` (same shape) into these ones (exact Chan update); returns ``self``."""
        if not isinstance(other, RunningScalars) or other.count.shape != self.count.shape:
            raise InputError("RunningScalars.merge expects another RunningScalars of the same shape.")
        self.count, self.mean, self.m2 = chan_combine(
            self.count, self.mean, self.m2, other.count, other.mean, other.m2
        )
        return self

    def result(self) -> dict[str, Tensor]:
        """``count``, ``mean`` and sample ``std`` of every stream."""
        return {"count": self.count.clone(), "mean": self.mean.clone(), "std": self.std()}

    def std(self) -> Tensor:
        """Sample standard deviation (ddof=1); NaN where fewer than 2 values were seen."""
        return torch.where(self.count > 1, (self.m2 / (self.count - 1).clamp_min(1)).sqrt(), float("nan"))

    def state_dict(self) -> dict[str, Tensor]:
        """``count``, ``mean`` and ``m2`` (copies), for checkpoints."""
        return {"count": self.count.clone(), "mean": self.mean.clone(), "m2": self.m2.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`state_dict` output."""
        self.count, self.mean, self.m2 = (state[name].clone() for name in ("count", "mean", "m2"))

    def all_reduce(self, env: Any) -> None:
        """Combine the streams of every ``torch.distributed`` rank in place (exact Chan update)."""
        self.count, self.mean, self.m2 = all_reduce_moments(self.count, self.mean, self.m2, env)


def as_tensor(x: Any, name: str) -> Tensor:
    """Accept tensors and array-likes; anything else is an InputError, not a torch traceback."""
    if isinstance(x, Tensor):
        return x
    try:
        return torch.as_tensor(x)
    except Exception:
        raise InputError(f"{name} must be a torch.Tensor (or array-like), got {type(x).__name__}.") from None
