"""FTGD: fine-tuning via gradient differentials (Weber et al., ACL 2024).

A *copy* of the model is fine-tuned on the training pairs of one phenomenon, updating only the
``top_frac`` parameters with the largest ``|grad_t|`` (computed once, on the training pairs, before
tuning); all other parameters stay bit-identical (their gradients are zeroed; Adam with zero
gradient and zero state makes no update; no weight decay). The transfer study built on it is
:mod:`vsem_lens.taskspace.transfer`.

Choices not fixed by the paper (which does not publish these details), all in :class:`FTGDConfig`:
the objective (default ``"margin"``: ``softplus(-margin)``, i.e. the logistic loss on the pair's
log-probability margin; ``"lm"``: next-token loss on the grammatical sentences only), Adam without
weight decay, ``lr`` 1e-4, a budget of ``steps`` optimiser steps of ``batch_size`` pairs drawn in a
seeded order, and the mask fraction ``top_frac`` (default 1% of the selected parameters).

**Control.** ``FTGDConfig(mask="random", mask_seed=s)`` tunes a :func:`random_mask` of the same size
instead (the same number of parameters, drawn uniformly among the candidates with seed ``s``), with
everything else unchanged: the baseline that says how much of a transfer is due to *which* parameters
the gradient differential picked rather than to tuning any 1% of the model on the pairs.

**BOS.** ``FTGDConfig.prepend_bos=None`` follows the model's rule (see
:mod:`~vsem_lens.taskspace.minimal_pairs`); :func:`ftgd_finetune` records the rule it used in the
returned config.

Example:
    >>> res = ftgd_finetune(model, train_pairs, config=FTGDConfig(steps=5))   # doctest: +SKIP
    >>> res.n_updated                                                          # doctest: +SKIP
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import numpy as np
import torch
from jaxtyping import Bool
from torch import Tensor

from ..core.errors import InputError, check_int, check_positive_int
from ..core.models import HookedModel
from .gradients import margin_gradient, pair_margins
from .minimal_pairs import text_logprobs
from .pairs import MinimalPair, check_pairs
from .parameters import OnlyGradFor, model_parameters
from .similarity import check_top_frac, top_mask

OBJECTIVES = ("margin", "lm")
MASKS = ("gradient", "random")


@dataclass
class FTGDConfig:
    """The FTGD budget and objective (every choice the paper leaves open; see the module docstring).

    Attributes:
        top_frac: fraction of the selected parameters that may change (largest ``|grad differential|``).
        steps: optimiser steps.
        lr: Adam learning rate (no weight decay, so unmasked parameters stay exactly unchanged).
        batch_size: pairs per step (drawn in a seeded order, cycling through the training pairs).
        objective: ``"margin"`` (``softplus(-margin)``) or ``"lm"`` (next-token loss on the good sentences).
        include: regex restricting the candidate parameters (default all).
        seed: order of the training pairs (and, in :func:`~vsem_lens.taskspace.transfer.ftgd_transfer`,
            the train/eval split).
        prepend_bos: ``None`` follows the model's rule; :func:`ftgd_finetune` stores the rule used.
        mask: ``"gradient"`` (FTGD: the largest ``|grad differential|``) or ``"random"`` (the control:
            a :func:`random_mask` of the same size).
        mask_seed: seed of the random mask.

    Example:
        >>> FTGDConfig(top_frac=0.05, steps=20).objective
        'margin'
    """

    top_frac: float = 0.01
    steps: int = 10
    lr: float = 1e-4
    batch_size: int = 8
    objective: str = "margin"
    include: str | None = None
    seed: int = 0
    prepend_bos: bool | None = None
    mask: str = "gradient"
    mask_seed: int = 0

    def check(self) -> "FTGDConfig":
        """Validate the fields; return self."""
        check_top_frac(self.top_frac)
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            check_positive_int(value, f"FTGDConfig.{name}")
        if not self.lr > 0:
            raise InputError(f"FTGDConfig.lr must be positive, got {self.lr!r}.")
        if self.objective not in OBJECTIVES:
            raise InputError(f"FTGDConfig.objective must be one of {OBJECTIVES}, got {self.objective!r}.")
        if self.mask not in MASKS:
            raise InputError(f"FTGDConfig.mask must be one of {MASKS}, got {self.mask!r}.")
        check_int(self.mask_seed, "FTGDConfig.mask_seed", minimum=0)
        return self


@dataclass
class FTGDResult:
    """A fine-tuned copy, its mask (clean parameter name -> bool tensor) and the training losses."""

    model: HookedModel
    mask: dict[str, Tensor]
    losses: list[float]
    n_updated: int
    n_candidates: int
    config: FTGDConfig


def ftgd_mask(
    model: HookedModel,
    pairs: Sequence[MinimalPair],
    *,
    top_frac: float = 0.01,
    include: str | None = None,
    batch_size: int = 16,
    prepend_bos: bool | None = None,
) -> dict[str, Bool[Tensor, "..."]]:
    """The FTGD mask: the ``top_frac`` parameters with the largest gradient differential on ``pairs``.

    The gradient differential is the gradient of ``mean(log p(good) - log p(bad))``. Parameters with no
    selected entry are left out of the returned dict.

    Example:
        >>> mask = ftgd_mask(model, train_pairs, top_frac=0.01)          # doctest: +SKIP
        >>> sum(int(m.sum()) for m in mask.values())                      # doctest: +SKIP
    """
    pairs = check_pairs(pairs)
    params = model_parameters(model, include)
    flat = margin_gradient(model, params, pairs, batch_size=batch_size, prepend_bos=prepend_bos, dtype=torch.float32)
    flat_mask = top_mask(flat, top_frac)
    out, offset = {}, 0
    for name, p in params:
        m = flat_mask[offset : offset + p.numel()].reshape(p.shape)
        offset += p.numel()
        if bool(m.any()):
            out[name] = m.to(p.device)
    return out


def mask_size(model: HookedModel, top_frac: float, include: str | None = None) -> int:
    """Number of parameters a ``top_frac`` mask selects: ``ceil(top_frac * candidates)`` (at least 1).

    Ties at the threshold can add a few to a gradient mask (:func:`~vsem_lens.taskspace.similarity.top_mask`).

    Example:
        >>> mask_size(model, 0.01)  # doctest: +SKIP
        1345151
    """
    check_top_frac(top_frac)
    n = sum(p.numel() for _, p in model_parameters(model, include))
    return max(1, int(math.ceil(top_frac * n)))


def random_mask(
    model: HookedModel, n_selected: int, *, include: str | None = None, seed: int = 0
) -> dict[str, Bool[Tensor, "..."]]:
    """A control mask: ``n_selected`` parameters drawn uniformly without replacement among the candidates.

    Same format as :func:`ftgd_mask` (clean name -> bool tensor; parameters with no selected entry
    left out), so ``ftgd_finetune(..., mask=random_mask(model, n, seed=s))`` tunes a random subset of
    the same size as an FTGD mask of ``n`` parameters.

    Example:
        >>> mask = random_mask(model, 1000, seed=0)           # doctest: +SKIP
        >>> sum(int(m.sum()) for m in mask.values())           # doctest: +SKIP
        1000
    """
    params = model_parameters(model, include)
    total = sum(p.numel() for _, p in params)
    n_selected = check_int(n_selected, "n_selected", minimum=1)
    if n_selected > total:
        raise InputError(f"n_selected={n_selected} is more than the {total} candidate parameters.")
    chosen = np.random.default_rng(check_int(seed, "seed", minimum=0)).choice(total, size=n_selected, replace=False)
    flat = torch.zeros(total, dtype=torch.bool)
    flat[torch.from_numpy(np.asarray(chosen, dtype=np.int64))] = True
    out, offset = {}, 0
    for name, p in params:
        m = flat[offset : offset + p.numel()].reshape(p.shape)
        offset += p.numel()
        if bool(m.any()):
            out[name] = m.to(p.device)
    return out


def copy_model(model: HookedModel) -> HookedModel:
    """An independent deep copy of a hooked model (weights and tokenizer).

    Example:
        >>> twin = copy_model(model)  # doctest: +SKIP
    """
    twin = copy.deepcopy(model)
    twin.name = f"{model.name} (copy)"
    twin._fingerprint = None
    return twin


def _loss(model: HookedModel, batch: Sequence[MinimalPair], cfg: FTGDConfig) -> Tensor:
    if cfg.objective == "margin":
        return torch.nn.functional.softplus(-pair_margins(model, batch, prepend_bos=cfg.prepend_bos)).mean()
    lp, tokens = text_logprobs(model, [p.good for p in batch], prepend_bos=cfg.prepend_bos)
    return -lp.sum() / tokens.mask[:, 1:].sum().clamp_min(1)


def ftgd_finetune(
    model: HookedModel,
    train_pairs: Sequence[MinimalPair],
    *,
    config: FTGDConfig | None = None,
    mask: Mapping[str, Tensor] | None = None,
    inplace: bool = False,
) -> FTGDResult:
    """Fine-tune a copy of ``model`` on ``train_pairs``, updating only the FTGD-masked parameters.

    Args:
        model: the model; unchanged unless ``inplace=True``.
        train_pairs: the pairs of one phenomenon (any list works).
        config: budget and objective (:class:`FTGDConfig`).
        mask: a precomputed mask (clean name -> bool tensor); default :func:`ftgd_mask` on ``train_pairs``
            (``config.mask="gradient"``) or a :func:`random_mask` of :func:`mask_size` parameters
            (``config.mask="random"``, seed ``config.mask_seed``).
        inplace: tune ``model`` itself (used by :func:`ftgd_transfer` on its working copy).

    Example:
        >>> res = ftgd_finetune(model, train, config=FTGDConfig(steps=5))   # doctest: +SKIP
        >>> minimal_pair_accuracy(res.model, test)                          # doctest: +SKIP
    """
    cfg = (config or FTGDConfig()).check()
    cfg = replace(cfg, prepend_bos=model.resolve_bos(cfg.prepend_bos))
    train_pairs = check_pairs(train_pairs)
    if mask is None and cfg.mask == "random":
        mask = random_mask(model, mask_size(model, cfg.top_frac, cfg.include), include=cfg.include, seed=cfg.mask_seed)
    elif mask is None:
        mask = ftgd_mask(model, train_pairs, top_frac=cfg.top_frac, include=cfg.include, prepend_bos=cfg.prepend_bos)
    target = model if inplace else copy_model(model)
    by_name = dict(model_parameters(target))
    unknown = [n for n in mask if n not in by_name]
    if unknown:
        raise InputError(f"the mask names parameters the model does not have: {unknown[:3]}.")
    params = [by_name[n] for n in mask]
    masks = [mask[n].to(by_name[n].device, torch.bool) for n in mask]
    for p, m in zip(params, masks):
        if p.shape != m.shape:
            raise InputError(f"mask shape {tuple(m.shape)} does not match parameter shape {tuple(p.shape)}.")
    n_candidates = sum(p.numel() for _, p in model_parameters(target, cfg.include))
    losses: list[float] = []
    rng = np.random.default_rng(cfg.seed)
    order: list[int] = []
    was_training = target.training
    target.eval()  # no dropout in the models we target; eval keeps it deterministic anyway
    with OnlyGradFor(target, params), torch.enable_grad():
        optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=0.0, foreach=False)
        for _ in range(cfg.steps):
            while len(order) < cfg.batch_size:
                order.extend(rng.permutation(len(train_pairs)).tolist())
            batch = [train_pairs[i] for i in order[: cfg.batch_size]]
            del order[: cfg.batch_size]
            optimizer.zero_grad(set_to_none=False)
            loss = _loss(target, batch, cfg)
            loss.backward()
            for p, m in zip(params, masks):
                if p.grad is not None:
                    p.grad.mul_(m)
            optimizer.step()
            losses.append(float(loss.detach()))
    target.train(was_training)
    target._fingerprint = None
    return FTGDResult(
        model=target, mask=dict(mask), losses=losses, n_updated=int(sum(int(m.sum()) for m in masks)),
        n_candidates=int(n_candidates), config=cfg,
    )


__all__ = ["FTGDConfig", "FTGDResult", "MASKS", "OBJECTIVES", "copy_model", "ftgd_finetune", "ftgd_mask", "mask_size", "random_mask"]
