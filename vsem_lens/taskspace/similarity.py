"""Gradient similarity between phenomena: the cosine of their gradient differentials and the Jaccard
overlap of their top-k% masks (the ``top_frac`` largest ``|grad|``; entries with zero gradient never
count), overall and per block (``embed``, ``block_0`` ... ``block_{L-1}``, ``final_norm``, ``unembed``
when untied). Per-block masks take the top-k% *within* the block (so every block has a comparable mask);
the overall mask takes the top-k% of all parameters. Similarity and masks are computed block by block
in chunks.

Example:
    >>> sim = gradient_similarity(grads, top_frac=0.01)                    # doctest: +SKIP
    >>> task_space_matrix(sim, "cosine")                                   # doctest: +SKIP
"""

from __future__ import annotations

import math

import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..core.errors import InputError
from .gradients import TaskGradients


def _kth_largest_abs(values: Tensor, k: int) -> float:
    """The k-th largest ``|value|`` (float32 working copy)."""
    a = values.float().abs().reshape(-1)
    return float(torch.kthvalue(a, a.numel() - k + 1).values)


def top_mask(values: Float[Tensor, "..."], top_frac: float) -> Bool[Tensor, "..."]:
    """Boolean mask of the ``top_frac`` largest ``|values|`` (ties at the threshold included; zeros never).

    Example:
        >>> top_mask(torch.tensor([0.1, -3.0, 2.0, 0.0]), 0.5).tolist()
        [False, True, True, False]
    """
    check_top_frac(top_frac)
    k = max(1, int(math.ceil(top_frac * values.numel())))
    threshold = _kth_largest_abs(values, k)
    a = values.abs()
    return (a >= threshold) & (a > 0)


def check_top_frac(top_frac: float) -> None:
    """Raise :class:`InputError` unless ``top_frac`` is a fraction in (0, 1].

    Example:
        >>> check_top_frac(0.01)
    """
    if isinstance(top_frac, bool) or not isinstance(top_frac, (int, float)) or not 0 < top_frac <= 1:
        raise InputError(f"top_frac must be a fraction in (0, 1], got {top_frac!r}.")


def gradient_similarity(
    grads: TaskGradients, *, top_frac: float = 0.01, chunk: int = 1 << 22
) -> pd.DataFrame:
    """Pairwise cosine of gradients and Jaccard overlap of top-k% masks, overall and per block.

    Returns:
        Tidy rows ``scope, phenomenon_a, phenomenon_b, cosine, jaccard, mask_size_a, mask_size_b,
        intersection`` for every ordered pair (diagonal included; ``scope`` is ``overall`` or a block
        label), plus ``prepend_bos`` (the BOS rule of the gradients) when ``grads.meta`` records it.
        Use :func:`task_space_matrix` for a square matrix.

    Example:
        >>> sim = gradient_similarity(grads, top_frac=0.01)                          # doctest: +SKIP
        >>> task_space_matrix(sim, "jaccard", scope="block_10").round(2)             # doctest: +SKIP
    """
    check_top_frac(top_frac)
    names = grads.phenomena
    if not names:
        raise InputError("the TaskGradients object has no phenomena.")
    P = len(names)
    blocks = grads.blocks()
    n_total = grads.n_params
    k_total = max(1, int(math.ceil(top_frac * n_total)))
    overall_thr = torch.tensor([_kth_largest_abs(grads.vectors[n], k_total) for n in names])
    scopes = ["overall"] + list(blocks)
    dots = {s: torch.zeros(P, P, dtype=torch.float64) for s in scopes}
    inter = {s: torch.zeros(P, P, dtype=torch.float64) for s in scopes}
    for block, slices in blocks.items():
        n_block = sum(s.stop - s.start for s in slices)
        k_block = max(1, int(math.ceil(top_frac * n_block)))
        block_vec = {
            n: torch.cat([grads.vectors[n][s.start : s.stop] for s in slices]) if len(slices) > 1
            else grads.vectors[n][slices[0].start : slices[0].stop]
            for n in names
        }
        block_thr = torch.tensor([_kth_largest_abs(block_vec[n], k_block) for n in names])
        for start in range(0, n_block, chunk):
            G = torch.stack([block_vec[n][start : start + chunk].float() for n in names])  # [P, c]
            dots[block] += (G @ G.T).double()  # float32 products of bfloat16 gradients, float64 sums
            A = G.abs()
            for scope, thr in ((block, block_thr), ("overall", overall_thr)):
                M = ((A >= thr.unsqueeze(1)) & (A > 0)).float()
                inter[scope] += (M @ M.T).double()
        dots["overall"] += dots[block]
    rows = []
    for scope in scopes:
        norms = dots[scope].diagonal().sqrt()
        sizes = inter[scope].diagonal()
        for i, a in enumerate(names):
            for j, b in enumerate(names):
                denom = float(norms[i] * norms[j])
                union = float(sizes[i] + sizes[j] - inter[scope][i, j])
                rows.append(
                    {
                        "scope": scope,
                        "phenomenon_a": a,
                        "phenomenon_b": b,
                        "cosine": float(dots[scope][i, j]) / denom if denom > 0 else math.nan,
                        "jaccard": float(inter[scope][i, j]) / union if union > 0 else math.nan,
                        "mask_size_a": int(sizes[i]),
                        "mask_size_b": int(sizes[j]),
                        "intersection": int(inter[scope][i, j]),
                    }
                )
    out = pd.DataFrame(rows)
    if "prepend_bos" in grads.meta:
        out["prepend_bos"] = grads.meta["prepend_bos"]
    out.attrs["top_frac"] = top_frac
    return out


__all__ = ["check_top_frac", "gradient_similarity", "top_mask"]
