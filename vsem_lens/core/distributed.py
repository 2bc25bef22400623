"""Small helpers on top of ``torch.distributed`` for multi-process runs (launch with ``torchrun``).

Nothing here schedules work: ``torchrun`` starts one process per rank, :func:`init_distributed`
joins them into a process group (``gloo`` on CPU, ``nccl`` on CUDA), :func:`shard` gives each rank
its share of a list deterministically, and the ``all_reduce_*`` / ``all_gather_objects`` helpers
combine the mergeable streaming states of the ranks (each state's ``all_reduce(env)``) with
collective operations.

How states are combined (exactly, with no raw second moments):

- sums and counts (agreement counts, sums of unit vectors, token counts): one ``all_reduce(SUM)``;
- maxima (reconstruction errors): ``all_reduce(MAX)``;
- means and centred scatter (``Moments``, ``IsotropyState``, the running scalars of the lens and
  decomposition statistics): the k-way form of Chan et al.'s pairwise update. With rank r holding
  ``(n_r, mu_r, M2_r)``, two ``all_reduce(SUM)`` calls give ``n = sum n_r``,
  ``mu = sum n_r mu_r / n`` and ``M2 = sum_r [M2_r + n_r (mu_r - mu)(mu_r - mu)^T]``; every rank
  re-centres on the global mean before the sum, so nothing cancels and memory stays one state;
- small per-rank samples (the values kept for quantiles): ``all_gather_object`` (a few MB).

Example (two CPU processes)::

    $ torchrun --standalone --nproc_per_node=2 -m vsem_lens.cli report --distributed --out rep

    >>> env = init_distributed()                       # doctest: +SKIP
    >>> mine = shard(list(range(10)), env)             # doctest: +SKIP
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import InputError

T = TypeVar("T")

#: Environment variables torchrun sets in every worker.
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in a (possibly single-process) run.

    Attributes:
        rank: global rank (0 writes the outputs).
        world_size: number of processes.
        local_rank: rank on this node (selects the GPU with ``nccl``).
        backend: ``gloo``, ``nccl`` or ``None`` (no process group: a single process).
        device: the device collective tensors live on (``cpu`` for gloo, ``cuda:local_rank`` for nccl).

    Example:
        >>> SINGLE.is_main, SINGLE.world_size
        (True, 1)
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the rank that writes reports and logs)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """True when a process group with more than one rank is in use."""
        return self.backend is not None and self.world_size > 1


#: The single-process environment (no collectives).
SINGLE = DistEnv()


def torchrun_env(environ: dict[str, str] | None = None) -> DistEnv | None:
    """The rank layout torchrun announced through the environment, or ``None`` outside torchrun.

    Example:
        >>> torchrun_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}).rank
        1
        >>> torchrun_env({}) is None
        True
    """
    environ = os.environ if environ is None else environ
    if "RANK" not in environ or "WORLD_SIZE" not in environ:
        return None
    try:
        rank, world = int(environ["RANK"]), int(environ["WORLD_SIZE"])
        local = int(environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise InputError("RANK / WORLD_SIZE / LOCAL_RANK must be integers (as torchrun sets them).") from None
    if world < 1 or not 0 <= rank < world:
        raise InputError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}.")
    return DistEnv(rank=rank, world_size=world, local_rank=local)


def init_distributed(
    backend: str | None = None, *, device: str | torch.device | None = None, timeout_s: float = 1800.0
) -> DistEnv:
    """Join the torchrun process group (idempotent) and return this process's :class:`DistEnv`.

    Args:
        backend: ``gloo`` or ``nccl``; default ``nccl`` when ``device`` is CUDA, else ``gloo``.
        device: the device this rank computes on (``cuda`` becomes ``cuda:LOCAL_RANK``).
        timeout_s: collective timeout (a slow rank must finish its shard within it).

    Outside torchrun (no ``RANK``/``WORLD_SIZE``) this returns :data:`SINGLE`: the code runs as one
    process and every collective helper is a no-op, so the same script works both ways.

    Raises:
        InputError: an unknown backend, or ``nccl`` without CUDA.

    Example:
        >>> init_distributed() if "RANK" not in os.environ else None
        DistEnv(rank=0, world_size=1, local_rank=0, backend=None, device='cpu')
    """
    env = torchrun_env()
    if env is None:
        return SINGLE
    cuda = device is not None and torch.device(device).type == "cuda"
    backend = backend or ("nccl" if cuda else "gloo")
    if backend not in ("gloo", "nccl"):
        raise InputError(f"unknown torch.distributed backend {backend!r}; use gloo (CPU) or nccl (CUDA).")
    if backend == "nccl" and not torch.cuda.is_available():
        raise InputError("the nccl backend needs CUDA; on CPU use gloo.")
    coll_device = f"cuda:{env.local_rank}" if backend == "nccl" else "cpu"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    elif dist.get_backend() != backend:
        backend = str(dist.get_backend())
    return DistEnv(env.rank, env.world_size, env.local_rank, backend, coll_device)


def resolve_env(distributed: "DistEnv | bool | None", *, device: str | torch.device, command: str) -> DistEnv:
    """The :class:`DistEnv` behind a ``distributed=`` argument of the Python API.

    ``False``/``None`` -> :data:`SINGLE`; a :class:`DistEnv` -> itself; ``True`` -> join the torchrun
    process group (:func:`init_distributed` on ``device``). ``command`` names the CLI command for the
    error message.

    Raises:
        InputError: ``True`` outside torchrun (no ``RANK``/``WORLD_SIZE``), or a :class:`DistEnv` of
            several ranks without a process group (each rank would silently see only its share).

    Example:
        >>> resolve_env(False, device="cpu", command="report") is SINGLE
        True
    """
    if isinstance(distributed, DistEnv):
        if distributed.world_size > 1 and not distributed.active:
            raise InputError(
                f"distributed={distributed} has {distributed.world_size} ranks but no process group; "
                "get the environment from vsem_lens.core.distributed.init_distributed() inside torchrun."
            )
        return distributed
    if not distributed:
        return SINGLE
    if torchrun_env() is None:
        raise InputError(
            f"distributed=True (--distributed) needs torchrun: launch with `torchrun --nproc_per_node=N -m "
            f"vsem_lens.cli {command} --distributed ...` (RANK and WORLD_SIZE are not set)."
        )
    return init_distributed(device=device)


def rank_device(env: DistEnv, device: str | torch.device) -> str:
    """The compute device of this rank: ``cuda`` -> ``cuda:LOCAL_RANK`` with several ranks; else unchanged.

    ``env`` may be the layout :func:`torchrun_env` announces, before the process group exists.

    Example:
        >>> rank_device(DistEnv(1, 2, 1, "nccl", "cuda:1"), "cuda")
        'cuda:1'
    """
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and env.world_size > 1:
        return f"cuda:{env.local_rank}"
    return str(device)


def shard(items: Sequence[T], env: DistEnv) -> list[T]:
    """This rank's items: ``items[rank::world_size]`` (round-robin, deterministic).

    Round-robin keeps the load balanced when ``items`` is sorted by cost (the report's batches are
    length-sorted), and every item is processed exactly once by exactly one rank, so merged states
    equal a single process's up to float64 rounding.

    Example:
        >>> shard(list(range(7)), DistEnv(1, 3))
        [1, 4]
    """
    return list(items[env.rank :: env.world_size])


# ---------------------------------------------------------------------------------- collectives


def _all_reduce(t: Tensor, env: DistEnv, op: str) -> Tensor:
    """``all_reduce`` with ``ReduceOp.<op>`` into a copy on the collective device, returned on ``t``'s."""
    if not env.active:
        return t

    buf = t.detach().to(env.device).clone().contiguous()
    dist.all_reduce(buf, op=getattr(dist.ReduceOp, op))
    return buf.to(t.device)


def all_reduce_sum(t: Tensor, env: DistEnv) -> Tensor:
    """Element-wise sum over ranks (a new tensor on ``t``'s device; ``t`` itself outside a group).

    Example:
        >>> all_reduce_sum(torch.ones(2), SINGLE).tolist()
        [1.0, 1.0]
    """
    return _all_reduce(t, env, "SUM")


def all_reduce_max(t: Tensor, env: DistEnv) -> Tensor:
    """Element-wise maximum over ranks.

    Example:
        >>> all_reduce_max(torch.tensor([3.0]), SINGLE).item()
        3.0
    """
    return _all_reduce(t, env, "MAX")


def all_reduce_moments(
    count: Tensor, mean: Tensor, m2: Tensor, env: DistEnv, *, outer: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Combine per-rank (count, mean, centred scatter) of many streams into the global ones (float64).

    ``count`` has the stream shape ``S``; ``mean`` is ``S`` (scalar streams, ``outer=False``) or
    ``S + [d]`` with ``m2`` ``S + [d, d]`` (vector streams, ``outer=True``). Every rank receives the
    result. Streams with no data on any rank keep count 0 and mean 0.

    Example:
        >>> c, m, s = all_reduce_moments(torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([0.5]), SINGLE)
        >>> c.item(), m.item(), s.item()
        (2.0, 1.0, 0.5)
    """
    if not env.active:
        return count, mean, m2
    n_r = count.to(torch.float64)
    mean64 = mean.to(torch.float64)
    expand = n_r.reshape(*n_r.shape, *([1] * (mean64.ndim - n_r.ndim)))
    # n and n*mu travel in one buffer: two collectives in all, the second for the re-centred scatter.
    packed = all_reduce_sum(torch.cat([n_r.reshape(-1), (mean64 * expand).reshape(-1)]), env)
    n = packed[: n_r.numel()].reshape(n_r.shape)
    n_exp = n.reshape(expand.shape).clamp_min(1.0)
    mu = packed[n_r.numel():].reshape(mean64.shape) / n_exp
    delta = mean64 - mu
    if outer:
        shift = (delta.unsqueeze(-1) * delta.unsqueeze(-2)) * expand.unsqueeze(-1)
    else:
        shift = delta.square() * expand
    total = all_reduce_sum(m2.to(torch.float64) + shift, env)
    return n.to(count.dtype), mu, total


def all_gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's ``obj`` (picklable, small) in rank order, on every rank.

    Example:
        >>> all_gather_objects({"a": 1}, SINGLE)
        [{'a': 1}]
    """
    if not env.active:
        return [obj]

    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    """Wait for every rank (no-op in a single process)."""
    if env.active:

        dist.barrier()


def destroy(env: DistEnv) -> None:
    """Leave the process group (call at the very end of a torchrun worker).

    Objects in reference cycles that hold the group (a ``DistributedDataParallel`` wrapper) are
    collected first: freed during interpreter exit instead, they make gloo abort the process.
    """
    if env.active:

        if dist.is_initialized():
            gc.collect()
            dist.destroy_process_group()
