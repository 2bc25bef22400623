"""Gradient differentials of minimal-pair phenomena (Weber et al., ACL 2024).

For phenomenon ``t`` with pairs ``(g_i, b_i)`` the objective is the mean log-probability margin

    m_t(theta) = 1/n sum_i [log p(g_i) - log p(b_i)]

(sentence log-probabilities as in :func:`~vsem_lens.taskspace.minimal_pairs.minimal_pair_accuracy`) and its
gradient ``grad_t = d m_t / d theta`` is the *gradient differential*: grammatical minus ungrammatical.
:func:`phenomenon_gradients` keeps one flat gradient vector per phenomenon (``n_params`` values in
``dtype``; 0.54 GB in float32 for SmolLM2-135M, so pass ``dtype=torch.bfloat16`` for many phenomena);
:mod:`vsem_lens.taskspace.similarity` compares them.

Example:
    >>> grads = phenomenon_gradients(model, load_minimal_pairs(), max_pairs=40)  # doctest: +SKIP
    >>> grads.block_norms().head()                                             # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..core.errors import InputError, NumericalError, check_positive_int
from ..core.models import HookedModel
from .minimal_pairs import text_logprobs
from .pairs import MinimalPair, check_pairs
from .parameters import OnlyGradFor, ParamSlice, model_parameters, param_block


def pair_margins(
    model: HookedModel, pairs: Sequence[MinimalPair], *, prepend_bos: bool | None = None
) -> Float[Tensor, " pair"]:
    """Differentiable log-probability margins ``log p(good) - log p(bad)`` of a batch of pairs.

    Runs under the caller's grad mode (wrap in ``torch.no_grad()`` for evaluation). ``prepend_bos``:
    ``None`` follows the model's rule (see :mod:`~vsem_lens.taskspace.minimal_pairs`).

    Example:
        >>> pair_margins(model, pairs[:4]).shape  # doctest: +SKIP
        torch.Size([4])
    """
    lp, _ = text_logprobs(model, [p.good for p in pairs] + [p.bad for p in pairs], prepend_bos=prepend_bos)
    logp = lp.sum(dim=1)
    n = len(pairs)
    return logp[:n] - logp[n:]


def group_by_phenomenon(
    pairs: Sequence[MinimalPair], phenomena: Sequence[str] | None = None
) -> dict[str, list[MinimalPair]]:
    """The pairs of each phenomenon (first-seen order), restricted to ``phenomena`` when given.

    Example:
        >>> list(group_by_phenomenon([MinimalPair("npi", "a b", "a c")]))
        ['npi']
    """
    groups: dict[str, list[MinimalPair]] = {}
    for pair in pairs:
        groups.setdefault(pair.phenomenon, []).append(pair)
    if phenomena is None:
        return groups
    missing = [p for p in phenomena if p not in groups]
    if missing:
        raise InputError(f"phenomena {missing} have no pairs; the pairs cover {sorted(groups)}.")
    return {p: groups[p] for p in phenomena}


def margin_gradient(
    model: HookedModel,
    params: list[tuple[str, torch.nn.Parameter]],
    pairs: Sequence[MinimalPair],
    *,
    batch_size: int,
    prepend_bos: bool | None,
    dtype: torch.dtype,
) -> Float[Tensor, " n_params"]:
    """Flat gradient of the mean margin over ``pairs`` w.r.t. ``params`` (accumulated over batches).

    Example:
        >>> margin_gradient(model, model_parameters(model), pairs, batch_size=8, prepend_bos=True,
        ...                 dtype=torch.float32).shape  # doctest: +SKIP
        torch.Size([134515008])
    """
    chosen = [p for _, p in params]
    with OnlyGradFor(model, chosen), torch.enable_grad():
        for start in range(0, len(pairs), batch_size):
            batch = pairs[start : start + batch_size]
            margins = pair_margins(model, batch, prepend_bos=prepend_bos)
            (margins.sum() / len(pairs)).backward()
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype) for p in chosen]
        )
    if not torch.isfinite(flat.float()).all():
        raise NumericalError("the margin gradient has NaN/inf entries; check the model's dtype and weights.")
    return flat


# ------------------------------------------------------------------------------ gradient similarity
@dataclass
class TaskGradients:
    """Per-phenomenon gradients of the mean log-probability margin, as flat vectors.

    Attributes:
        vectors: phenomenon -> flat gradient [n_params] (in :attr:`slices` order).
        slices: where each parameter sits in the flat vectors (with its block label).
        n_pairs: pairs used per phenomenon.
        meta: model name, ``prepend_bos`` (the BOS rule used), include filter, dtype.

    Example:
        >>> grads = phenomenon_gradients(model, load_minimal_pairs())   # doctest: +SKIP
        >>> grads.phenomena[:2], grads.n_params                          # doctest: +SKIP
    """

    vectors: dict[str, Tensor]
    slices: list[ParamSlice]
    n_pairs: dict[str, int]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def phenomena(self) -> list[str]:
        """Phenomena in computation order."""
        return list(self.vectors)

    @property
    def n_params(self) -> int:
        """Length of each gradient vector."""
        return self.slices[-1].stop if self.slices else 0

    def blocks(self) -> dict[str, list[ParamSlice]]:
        """Block label -> the parameter slices in that block (model order)."""
        out: dict[str, list[ParamSlice]] = {}
        for s in self.slices:
            out.setdefault(s.block, []).append(s)
        return out

    def block_norms(self) -> pd.DataFrame:
        """L2 norm of each phenomenon's gradient per block (``phenomenon, block, grad_norm``, and
        ``prepend_bos`` when :attr:`meta` records the BOS rule).
        """
        rows = []
        for name, vec in self.vectors.items():
            for block, slices in self.blocks().items():
                sq = sum(float(vec[s.start : s.stop].float().square().sum()) for s in slices)
                rows.append({"phenomenon": name, "block": block, "grad_norm": math.sqrt(sq)})
        out = pd.DataFrame(rows)
        if "prepend_bos" in self.meta:
            out["prepend_bos"] = self.meta["prepend_bos"]
        return out


def phenomenon_gradients(
    model: HookedModel,
    pairs: Sequence[MinimalPair],
    *,
    phenomena: Sequence[str] | None = None,
    max_pairs: int | None = 50,
    include: str | None = None,
    batch_size: int = 16,
    prepend_bos: bool | None = None,
    dtype: torch.dtype = torch.float32,
) -> TaskGradients:
    """Gradient of each phenomenon's mean log-probability margin w.r.t. the model's parameters.

    Args:
        model: a :class:`~vsem_lens.core.models.HookedModel` (its weights are not changed; ``requires_grad``
            flags are restored afterwards).
        pairs: minimal pairs of several phenomena.
        phenomena: which phenomena (default: all in ``pairs``, in order of appearance).
        max_pairs: use the first ``max_pairs`` pairs of each phenomenon (``None``: all).
        include: regex on clean parameter names (e.g. ``r"layers\\.\\d+\\.mlp"``); default all.
        batch_size: pairs per forward/backward pass (the gradient is summed over batches).
        prepend_bos: ``None`` follows the model's rule (recorded in ``meta``); see
            :mod:`~vsem_lens.taskspace.minimal_pairs`.
        dtype: storage dtype of the vectors (``torch.bfloat16`` halves the memory).

    Example:
        >>> grads = phenomenon_gradients(model, pairs, max_pairs=40, dtype=torch.bfloat16)  # doctest: +SKIP
        >>> grads.vectors["npi_licensing"].shape                                           # doctest: +SKIP
        torch.Size([134515008])
    """
    pairs = check_pairs(pairs)
    if max_pairs is not None:
        check_positive_int(max_pairs, "max_pairs")
    check_positive_int(batch_size, "batch_size")
    prepend_bos = model.resolve_bos(prepend_bos)
    params = model_parameters(model, include)
    slices, offset = [], 0
    for name, p in params:
        slices.append(ParamSlice(name, param_block(name), offset, offset + p.numel(), tuple(p.shape)))
        offset += p.numel()
    vectors, counts = {}, {}
    for name, group in group_by_phenomenon(pairs, phenomena).items():
        used = group if max_pairs is None else group[:max_pairs]
        vectors[name] = margin_gradient(model, params, used, batch_size=batch_size, prepend_bos=prepend_bos, dtype=dtype)
        counts[name] = len(used)
    meta = {"model": model.name, "prepend_bos": prepend_bos, "include": include, "dtype": str(dtype)}
    return TaskGradients(vectors=vectors, slices=slices, n_pairs=counts, meta=meta)


__all__ = ["TaskGradients", "group_by_phenomenon", "margin_gradient", "pair_margins", "phenomenon_gradients"]
