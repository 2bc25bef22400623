r"""Linguistic task spaces (Weber et al., ACL 2024): gradient-similarity probing and FTGD transfer.

A *task space* places linguistic phenomena (minimal-pair tasks, :mod:`vsem_lens.taskspace.minimal_pairs`) in
a space whose geometry says which phenomena the model treats alike. Two probes (docs/studies/task-spaces.md):

**Gradient similarity** (:func:`phenomenon_gradients`, :func:`gradient_similarity`). For phenomenon
``t`` with pairs ``(g_i, b_i)`` the objective is the mean log-probability margin

    m_t(theta) = 1/n sum_i [log p(g_i) - log p(b_i)]

(sentence log-probabilities as in :func:`~vsem_lens.taskspace.minimal_pairs.minimal_pair_accuracy`) and its
gradient ``grad_t = d m_t / d theta`` is the *gradient differential*: grammatical minus ungrammatical.
Two phenomena are compared by the cosine of their gradients and by the Jaccard overlap of their
top-k% masks (the ``top_frac`` largest ``|grad|``; entries with zero gradient never count), overall
and per block (``embed``, ``block_0`` ... ``block_{L-1}``, ``final_norm``, ``unembed`` when untied).
Per-block masks take the top-k% *within* the block (so every block has a comparable mask); the
overall mask takes the top-k% of all parameters.

**FTGD** (fine-tuning via gradient differentials; :func:`ftgd_finetune`, :func:`ftgd_transfer`).
A *copy* of the model is fine-tuned on the training pairs of one phenomenon, updating only the
``top_frac`` parameters with the largest ``|grad_t|`` (computed once, on the training pairs, before
tuning); all other parameters stay bit-identical (their gradients are zeroed; Adam with zero
gradient and zero state makes no update; no weight decay). The transfer matrix
``T[i, j] = acc_j(after tuning on i) - acc_j(before)`` on held-out pairs is the task space; the
margin change is reported too (it is less coarse than accuracy), and the perplexity change on a
corpus (by default the embedded corpus) measures collateral damage.

Choices not fixed by the paper (which does not publish these details), all in :class:`FTGDConfig`:
the objective (default ``"margin"``: ``softplus(-margin)``, i.e. the logistic loss on the pair's
log-probability margin; ``"lm"``: next-token loss on the grammatical sentences only), Adam without
weight decay, ``lr`` 1e-4, a budget of ``steps`` optimiser steps of ``batch_size`` pairs drawn in a
seeded order, and the mask fraction ``top_frac`` (default 1% of the selected parameters).

**Across training.** Every function takes any :class:`~vsem_lens.core.models.HookedModel`, so the same
study runs on training checkpoints: TransformerLens resolves ``checkpoint_index`` /
``checkpoint_value`` to a hub revision for model families with published checkpoints (e.g.
``TransformerBridge.boot_transformers("EleutherAI/pythia-70m", checkpoint_index=i)``; see
``transformer_lens.model_bridge.sources.transformers.get_checkpoint_labels``). Load each checkpoint's
HF weights (``AutoModelForCausalLM.from_pretrained(name, revision=...)``, or a local directory per
checkpoint), wrap them with ``vsem_lens.load_model((hf_model, tokenizer))`` and run the functions
below per checkpoint; vsem-lens itself never downloads anything.

Memory: one gradient vector per phenomenon is kept (``n_params`` values in ``dtype``; 0.54 GB in
float32 for SmolLM2-135M, so pass ``dtype=torch.bfloat16`` for many phenomena); similarity and masks
are computed block by block in chunks.

Example:
    >>> pairs = load_minimal_pairs()                                       # doctest: +SKIP
    >>> grads = phenomenon_gradients(model, pairs, max_pairs=40)           # doctest: +SKIP
    >>> sim = gradient_similarity(grads, top_frac=0.01)                    # doctest: +SKIP
    >>> task_space_matrix(sim, "cosine")                                   # doctest: +SKIP
    >>> result = ftgd_transfer(model, pairs, n_train=40, n_eval=60)        # doctest: +SKIP
    >>> plot_task_space(result.matrix("delta_accuracy")).show()            # doctest: +SKIP
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..core.errors import InputError, check_positive_int
from ..core.models import HookedModel
from .minimal_pairs import MinimalPair, _check_pairs, _text_logprobs, score_minimal_pairs, summarize_pair_scores

OBJECTIVES = ("margin", "lm")


# ------------------------------------------------------------------------------------ parameters
@dataclass(frozen=True)
class ParamSlice:
    """Where one parameter tensor sits in a flat gradient vector."""

    name: str
    block: str
    start: int
    stop: int
    shape: tuple[int, ...]


_BLOCK_RE = re.compile(r"(?:^|\.)(?:layers|blocks|h)\.(\d+)\.")


def clean_param_name(name: str) -> str:
    """Drop TransformerBridge's ``_original_component`` wrappers from a parameter name.

    Example:
        >>> clean_param_name("model.layers.0._original_component.mlp._original_component.up_proj.weight")
        'model.layers.0.mlp.up_proj.weight'
    """
    return name.replace("._original_component", "").replace("_original_component.", "")


def param_block(name: str) -> str:
    """Block label of a parameter: ``embed``, ``block_{i}``, ``final_norm``, ``unembed`` or ``other``.

    Example:
        >>> param_block("model.layers.3.self_attn.q_proj.weight"), param_block("model.norm.weight")
        ('block_3', 'final_norm')
    """
    match = _BLOCK_RE.search(name)
    if match:
        return f"block_{int(match.group(1))}"
    if "embed" in name or name.startswith("wte") or ".wte" in name:
        return "embed"
    if "lm_head" in name or "unembed" in name:
        return "unembed"
    if "norm" in name or "ln_f" in name or "ln_final" in name:
        return "final_norm"
    return "other"


def model_parameters(model: HookedModel, include: str | None = None) -> list[tuple[str, torch.nn.Parameter]]:
    """The model's parameters (tied ones once) with clean names, optionally filtered by a regex.

    Example:
        >>> [n for n, _ in model_parameters(model, include=r"layers\.0\.mlp")][:1]  # doctest: +SKIP
        ['model.layers.0.mlp.gate_proj.weight']
    """
    params = [(clean_param_name(n), p) for n, p in model.bridge.named_parameters()]
    if include is not None:
        try:
            pattern = re.compile(include)
        except re.error as exc:
            raise InputError(f"include={include!r} is not a valid regular expression ({exc}).") from None
        params = [(n, p) for n, p in params if pattern.search(n)]
    if not params:
        raise InputError(f"no parameters match include={include!r}; check the names with model_parameters(model).")
    return params


class _OnlyGradFor:
    """Context manager: ``requires_grad`` only for the given parameters; restores the flags."""

    def __init__(self, model: HookedModel, chosen: Sequence[torch.nn.Parameter]):
        self.all = list(model.bridge.parameters())
        ids = {id(p) for p in chosen}
        self.flags = [p.requires_grad for p in self.all]
        self.want = [id(p) in ids for p in self.all]

    def __enter__(self):
        for p, want in zip(self.all, self.want):
            p.requires_grad_(want)
            p.grad = None
        return self

    def __exit__(self, *exc):
        for p, flag in zip(self.all, self.flags):
            p.grad = None
            p.requires_grad_(flag)


def pair_margins(
    model: HookedModel, pairs: Sequence[MinimalPair], *, prepend_bos: bool = True
) -> Float[Tensor, " pair"]:
    """Differentiable log-probability margins ``log p(good) - log p(bad)`` of a batch of pairs.

    Runs under the caller's grad mode (wrap in ``torch.no_grad()`` for evaluation).

    Example:
        >>> pair_margins(model, pairs[:4]).shape  # doctest: +SKIP
        torch.Size([4])
    """
    lp, _ = _text_logprobs(model, [p.good for p in pairs] + [p.bad for p in pairs], prepend_bos=prepend_bos)
    logp = lp.sum(dim=1)
    n = len(pairs)
    return logp[:n] - logp[n:]


def _group(pairs: Sequence[MinimalPair], phenomena: Sequence[str] | None) -> dict[str, list[MinimalPair]]:
    groups: dict[str, list[MinimalPair]] = {}
    for pair in pairs:
        groups.setdefault(pair.phenomenon, []).append(pair)
    if phenomena is None:
        return groups
    missing = [p for p in phenomena if p not in groups]
    if missing:
        raise InputError(f"phenomena {missing} have no pairs; the pairs cover {sorted(groups)}.")
    return {p: groups[p] for p in phenomena}


def _margin_gradient(
    model: HookedModel,
    params: list[tuple[str, torch.nn.Parameter]],
    pairs: Sequence[MinimalPair],
    *,
    batch_size: int,
    prepend_bos: bool,
    dtype: torch.dtype,
) -> Float[Tensor, " n_params"]:
    """Flat gradient of the mean margin over ``pairs`` w.r.t. ``params`` (accumulated over batches)."""
    chosen = [p for _, p in params]
    with _OnlyGradFor(model, chosen), torch.enable_grad():
        for start in range(0, len(pairs), batch_size):
            batch = pairs[start : start + batch_size]
            margins = pair_margins(model, batch, prepend_bos=prepend_bos)
            (margins.sum() / len(pairs)).backward()
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype) for p in chosen]
        )
    if not torch.isfinite(flat.float()).all():
        from ..core.errors import NumericalError

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
        meta: model name, prepend_bos, include filter, dtype.

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
        """L2 norm of each phenomenon's gradient per block (``phenomenon, block, grad_norm``)."""
        rows = []
        for name, vec in self.vectors.items():
            for block, slices in self.blocks().items():
                sq = sum(float(vec[s.start : s.stop].float().square().sum()) for s in slices)
                rows.append({"phenomenon": name, "block": block, "grad_norm": math.sqrt(sq)})
        return pd.DataFrame(rows)


def phenomenon_gradients(
    model: HookedModel,
    pairs: Sequence[MinimalPair],
    *,
    phenomena: Sequence[str] | None = None,
    max_pairs: int | None = 50,
    include: str | None = None,
    batch_size: int = 16,
    prepend_bos: bool = True,
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
        prepend_bos: as in :func:`~vsem_lens.taskspace.minimal_pairs.minimal_pair_accuracy`.
        dtype: storage dtype of the vectors (``torch.bfloat16`` halves the memory).

    Example:
        >>> grads = phenomenon_gradients(model, pairs, max_pairs=40, dtype=torch.bfloat16)  # doctest: +SKIP
        >>> grads.vectors["npi_licensing"].shape                                           # doctest: +SKIP
        torch.Size([134515008])
    """
    pairs = _check_pairs(pairs)
    if max_pairs is not None and (isinstance(max_pairs, bool) or not isinstance(max_pairs, int) or max_pairs < 1):
        raise InputError(f"max_pairs must be a positive integer or None, got {max_pairs!r}.")
    check_positive_int(batch_size, "batch_size")
    params = model_parameters(model, include)
    slices, offset = [], 0
    for name, p in params:
        slices.append(ParamSlice(name, param_block(name), offset, offset + p.numel(), tuple(p.shape)))
        offset += p.numel()
    vectors, counts = {}, {}
    for name, group in _group(pairs, phenomena).items():
        used = group if max_pairs is None else group[:max_pairs]
        vectors[name] = _margin_gradient(model, params, used, batch_size=batch_size, prepend_bos=prepend_bos, dtype=dtype)
        counts[name] = len(used)
    meta = {"model": model.name, "prepend_bos": prepend_bos, "include": include, "dtype": str(dtype)}
    return TaskGradients(vectors=vectors, slices=slices, n_pairs=counts, meta=meta)


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
    _check_frac(top_frac)
    k = max(1, int(math.ceil(top_frac * values.numel())))
    threshold = _kth_largest_abs(values, k)
    a = values.abs()
    return (a >= threshold) & (a > 0)


def _check_frac(top_frac: float) -> None:
    if isinstance(top_frac, bool) or not isinstance(top_frac, (int, float)) or not 0 < top_frac <= 1:
        raise InputError(f"top_frac must be a fraction in (0, 1], got {top_frac!r}.")


def gradient_similarity(
    grads: TaskGradients, *, top_frac: float = 0.01, chunk: int = 1 << 22
) -> pd.DataFrame:
    """Pairwise cosine of gradients and Jaccard overlap of top-k% masks, overall and per block.

    Returns:
        Tidy rows ``scope, phenomenon_a, phenomenon_b, cosine, jaccard, mask_size_a, mask_size_b,
        intersection`` for every ordered pair (diagonal included; ``scope`` is ``overall`` or a block
        label). Use :func:`task_space_matrix` for a square matrix.

    Example:
        >>> sim = gradient_similarity(grads, top_frac=0.01)                          # doctest: +SKIP
        >>> task_space_matrix(sim, "jaccard", scope="block_10").round(2)             # doctest: +SKIP
    """
    _check_frac(top_frac)
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
    out.attrs["top_frac"] = top_frac
    return out


def task_space_matrix(
    table: pd.DataFrame, value: str = "cosine", *, scope: str | None = "overall", row: str | None = None, col: str | None = None
) -> pd.DataFrame:
    """Pivot a tidy similarity/transfer table into a square phenomenon x phenomenon matrix.

    Works on :func:`gradient_similarity` output (``scope`` selects overall or a block) and on
    :attr:`TransferResult.transfer` (rows: trained on, columns: evaluated on; pass ``scope=None``).

    Example:
        >>> task_space_matrix(sim, "cosine").shape  # doctest: +SKIP
        (9, 9)
    """
    if scope is not None and "scope" in table:
        if scope not in set(table["scope"]):
            raise InputError(f"scope {scope!r} is not in the table; it has {sorted(set(table['scope']))}.")
        table = table[table["scope"] == scope]
    row = row or ("phenomenon_a" if "phenomenon_a" in table else "trained_on")
    col = col or ("phenomenon_b" if "phenomenon_b" in table else "evaluated_on")
    if value not in table:
        raise InputError(f"column {value!r} is not in the table; choose one of {list(table.columns)}.")
    order = list(dict.fromkeys(table[row]))
    cols = list(dict.fromkeys(table[col]))
    return table.pivot(index=row, columns=col, values=value).loc[order, cols]


# ------------------------------------------------------------------------------------ FTGD
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
        seed: order of the training pairs.
        prepend_bos: as in :func:`~vsem_lens.taskspace.minimal_pairs.minimal_pair_accuracy`.

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
    prepend_bos: bool = True

    def check(self) -> "FTGDConfig":
        """Validate the fields; return self."""
        _check_frac(self.top_frac)
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            check_positive_int(value, f"FTGDConfig.{name}")
        if not self.lr > 0:
            raise InputError(f"FTGDConfig.lr must be positive, got {self.lr!r}.")
        if self.objective not in OBJECTIVES:
            raise InputError(f"FTGDConfig.objective must be one of {OBJECTIVES}, got {self.objective!r}.")
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
    prepend_bos: bool = True,
) -> dict[str, Bool[Tensor, "..."]]:
    """The FTGD mask: the ``top_frac`` parameters with the largest gradient differential on ``pairs``.

    The gradient differential is the gradient of ``mean(log p(good) - log p(bad))``. Parameters with no
    selected entry are left out of the returned dict.

    Example:
        >>> mask = ftgd_mask(model, train_pairs, top_frac=0.01)          # doctest: +SKIP
        >>> sum(int(m.sum()) for m in mask.values())                      # doctest: +SKIP
    """
    pairs = _check_pairs(pairs)
    params = model_parameters(model, include)
    flat = _margin_gradient(model, params, pairs, batch_size=batch_size, prepend_bos=prepend_bos, dtype=torch.float32)
    flat_mask = top_mask(flat, top_frac)
    out, offset = {}, 0
    for name, p in params:
        m = flat_mask[offset : offset + p.numel()].reshape(p.shape)
        offset += p.numel()
        if bool(m.any()):
            out[name] = m.to(p.device)
    return out


def copy_model(model: HookedModel) -> HookedModel:
    """An independent deep copy of a hooked model (weights, bridge and tokenizer).

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
    lp, tokens = _text_logprobs(model, [p.good for p in batch], prepend_bos=cfg.prepend_bos)
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
        mask: a precomputed mask (clean name -> bool tensor); default :func:`ftgd_mask` on ``train_pairs``.
        inplace: tune ``model`` itself (used by :func:`ftgd_transfer` on its working copy).

    Example:
        >>> res = ftgd_finetune(model, train, config=FTGDConfig(steps=5))   # doctest: +SKIP
        >>> minimal_pair_accuracy(res.model, test)                          # doctest: +SKIP
    """
    cfg = (config or FTGDConfig()).check()
    train_pairs = _check_pairs(train_pairs)
    if mask is None:
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
    was_training = target.bridge.training
    target.bridge.eval()  # no dropout in the models we target; eval keeps it deterministic anyway
    with _OnlyGradFor(target, params), torch.enable_grad():
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
    target.bridge.train(was_training)
    target._fingerprint = None
    return FTGDResult(
        model=target, mask=dict(mask), losses=losses, n_updated=int(sum(int(m.sum()) for m in masks)),
        n_candidates=int(n_candidates), config=cfg,
    )


def corpus_perplexity(
    model: HookedModel, texts: Sequence[str], *, batch_size: int = 8, max_length: int = 128
) -> float:
    """Perplexity ``exp(mean next-token NLL)`` over the texts' tokens (the model's tokenisation rule).

    Example:
        >>> corpus_perplexity(model, load_corpus("default")[:50])  # doctest: +SKIP
    """
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        with torch.no_grad():
            lp, tokens = _text_logprobs(model, texts[start : start + batch_size], max_length=max_length)
        total += float(lp.double().sum())
        count += int(tokens.mask[:, 1:].sum())
    if count == 0:
        raise InputError("the texts have no predicted tokens (each text needs at least two tokens).")
    return math.exp(-total / count)


@dataclass
class TransferResult:
    """FTGD transfer study: before/after scores on held-out pairs, perplexity, training logs."""

    transfer: pd.DataFrame
    perplexity: pd.DataFrame
    before: pd.DataFrame
    training: pd.DataFrame
    config: FTGDConfig
    meta: dict[str, Any]

    def matrix(self, value: str = "delta_accuracy") -> pd.DataFrame:
        """Square matrix rows = tuned on, columns = evaluated on (``delta_accuracy`` or ``delta_margin``)."""
        return task_space_matrix(self.transfer, value, scope=None)


def split_pairs(
    pairs: Sequence[MinimalPair], *, n_train: int, n_eval: int | None = None, seed: int = 0,
    phenomena: Sequence[str] | None = None,
) -> tuple[dict[str, list[MinimalPair]], dict[str, list[MinimalPair]]]:
    """Seeded disjoint train/eval split per phenomenon (eval: the next ``n_eval`` pairs, or all the rest).

    Example:
        >>> from vsem_lens.taskspace.minimal_pairs import load_minimal_pairs
        >>> train, test = split_pairs(load_minimal_pairs(), n_train=40, n_eval=60)
        >>> len(train["npi_licensing"]), len(test["npi_licensing"])
        (40, 60)
    """
    groups = _group(_check_pairs(pairs), phenomena)
    train, test = {}, {}
    for name, group in groups.items():
        need = n_train + (n_eval or 1)
        if len(group) < need:
            raise InputError(f"phenomenon {name!r} has {len(group)} pairs; the split needs at least {need}.")
        perm = np.random.default_rng([seed, len(group)]).permutation(len(group))
        shuffled = [group[i] for i in perm]
        train[name] = shuffled[:n_train]
        test[name] = shuffled[n_train : None if n_eval is None else n_train + n_eval]
    return train, test


def ftgd_transfer(
    model: HookedModel,
    pairs: Sequence[MinimalPair],
    *,
    phenomena: Sequence[str] | None = None,
    n_train: int = 40,
    n_eval: int | None = 60,
    config: FTGDConfig | None = None,
    corpus: Sequence[str] | None = None,
    n_corpus: int = 40,
    corpus_max_length: int = 128,
    batch_size: int = 32,
    progress: bool = False,
    callback: Callable[[TransferResult], None] | None = None,
) -> TransferResult:
    """FTGD transfer matrix: tune a copy on each phenomenon, re-evaluate every phenomenon.

    The model itself is never modified: one working copy is tuned per phenomenon and its masked
    parameters are reset from ``model`` before the next one.

    Args:
        pairs: minimal pairs; split per phenomenon by :func:`split_pairs` (seed ``config.seed``).
        n_train, n_eval: training / held-out evaluation pairs per phenomenon.
        config: :class:`FTGDConfig` (mask fraction, steps, lr, objective).
        corpus: texts for the perplexity change (default: the first ``n_corpus`` texts of the
            embedded corpus ``load_corpus("default")``), truncated to ``corpus_max_length`` tokens.
        callback: called with the partial :class:`TransferResult` after each tuned phenomenon (to save
            intermediate results of a long run).

    Returns:
        :class:`TransferResult`; ``transfer`` has rows ``trained_on, evaluated_on, accuracy_before,
        accuracy_after, delta_accuracy, margin_before, margin_after, delta_margin``.

    Example:
        >>> res = ftgd_transfer(model, load_minimal_pairs(), n_train=40, n_eval=60)  # doctest: +SKIP
        >>> res.matrix("delta_accuracy").round(2)                                      # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    cfg = (config or FTGDConfig()).check()
    train, test = split_pairs(pairs, n_train=n_train, n_eval=n_eval, seed=cfg.seed, phenomena=phenomena)
    eval_pairs = [p for group in test.values() for p in group]
    if corpus is None:
        from ..core.corpus import load_corpus

        corpus = load_corpus("default")[:n_corpus]
    corpus = list(corpus)

    def evaluate(m: HookedModel) -> pd.DataFrame:
        scores = score_minimal_pairs(m, eval_pairs, batch_size=batch_size, prepend_bos=cfg.prepend_bos)
        return summarize_pair_scores(scores).set_index("phenomenon")

    before = evaluate(model)
    ppl_before = corpus_perplexity(model, corpus, max_length=corpus_max_length) if corpus else math.nan
    work = copy_model(model)
    originals = dict(model_parameters(model))
    rows, ppl_rows, train_rows = [], [], []
    meta = {"model": model.name, "n_train": n_train, "n_eval": n_eval, "n_corpus_texts": len(corpus),
            "corpus_max_length": corpus_max_length, "config": asdict(cfg)}

    def _result() -> TransferResult:
        return TransferResult(
            transfer=pd.DataFrame(rows), perplexity=pd.DataFrame(ppl_rows), before=before.reset_index(),
            training=pd.DataFrame(train_rows), config=cfg, meta=meta,
        )

    for name in tqdm(list(train), desc="ftgd", disable=not progress):
        result = ftgd_finetune(work, train[name], config=cfg, inplace=True)
        after = evaluate(work)
        ppl_after = corpus_perplexity(work, corpus, max_length=corpus_max_length) if corpus else math.nan
        for other in after.index:
            rows.append(
                {
                    "trained_on": name,
                    "evaluated_on": other,
                    "accuracy_before": float(before.loc[other, "accuracy"]),
                    "accuracy_after": float(after.loc[other, "accuracy"]),
                    "delta_accuracy": float(after.loc[other, "accuracy"] - before.loc[other, "accuracy"]),
                    "margin_before": float(before.loc[other, "mean_margin"]),
                    "margin_after": float(after.loc[other, "mean_margin"]),
                    "delta_margin": float(after.loc[other, "mean_margin"] - before.loc[other, "mean_margin"]),
                    "n_eval": int(after.loc[other, "n_pairs"]),
                }
            )
        ppl_rows.append(
            {"trained_on": name, "perplexity_before": ppl_before, "perplexity_after": ppl_after,
             "delta_perplexity": ppl_after - ppl_before, "relative_change": ppl_after / ppl_before - 1}
        )
        train_rows.append(
            {"trained_on": name, "n_train": len(train[name]), "n_updated": result.n_updated,
             "n_candidates": result.n_candidates, "loss_first": result.losses[0], "loss_last": result.losses[-1]}
        )
        # Reset the working copy's changed parameters from the untouched original.
        by_name = dict(model_parameters(work))
        with torch.no_grad():
            for pname in result.mask:
                by_name[pname].copy_(originals[pname])
        if callback is not None:
            callback(_result())
    return _result()


# ------------------------------------------------------------------------------ clustering, plots
def _as_square(matrix: pd.DataFrame | Mapping[str, Mapping[str, float]], what: str) -> pd.DataFrame:
    if isinstance(matrix, Mapping):
        matrix = pd.DataFrame(matrix).T
    if not isinstance(matrix, pd.DataFrame):
        raise InputError(f"{what} must be a pandas DataFrame (or a dict of dicts) with phenomena as index and columns.")
    if list(matrix.index) != list(matrix.columns):
        if set(matrix.index) != set(matrix.columns):
            raise InputError(f"{what} must have the same phenomena as rows and columns.")
        matrix = matrix.loc[:, list(matrix.index)]
    values = matrix.to_numpy(dtype=float)
    if not np.isfinite(values).all():
        raise InputError(f"{what} has NaN/inf entries; fill them before comparing or clustering.")
    return matrix.astype(float)


def cluster_order(matrix: pd.DataFrame, *, method: str = "average") -> list[str]:
    """Leaf order of a hierarchical clustering of the phenomena (scipy).

    A symmetric matrix with unit diagonal is treated as a similarity (distance ``1 - s``); any other
    matrix (e.g. a transfer matrix) is clustered by the Euclidean distance between the phenomena's
    profiles (their row and column concatenated).

    Example:
        >>> cluster_order(pd.DataFrame([[1, .9, 0], [.9, 1, 0], [0, 0, 1]], index=list("abc"), columns=list("abc")))
        ['c', 'a', 'b']
    """
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import pdist, squareform

    m = _as_square(matrix, "the matrix")
    labels = list(m.index)
    if len(labels) < 3:
        return labels
    values = m.to_numpy()
    if np.allclose(values, values.T) and np.allclose(np.diag(values), 1.0):
        dist = np.clip(1.0 - values, 0.0, None)
        np.fill_diagonal(dist, 0.0)
        condensed = squareform((dist + dist.T) / 2, checks=False)
    else:
        condensed = pdist(np.concatenate([values, values.T], axis=1))
    order = leaves_list(linkage(condensed, method=method))
    return [labels[i] for i in order]


def plot_task_space(
    matrix: pd.DataFrame,
    *,
    title: str = "task space",
    cluster: bool = True,
    zmid: float | None = None,
    colorscale: str = "RdBu",
    value_label: str = "value",
):
    """Plotly heatmap of a task-space matrix, rows/columns in clustered order.

    Example:
        >>> fig = plot_task_space(task_space_matrix(sim, "cosine"), title="gradient cosine")  # doctest: +SKIP
        >>> fig.write_html("task_space.html", include_plotlyjs="cdn")                         # doctest: +SKIP
    """
    import plotly.graph_objects as go

    m = _as_square(matrix, "the matrix")
    order = cluster_order(m) if cluster else list(m.index)
    m = m.loc[order, order]
    values = m.to_numpy()
    if zmid is None:
        zmid = 0.0 if values.min() < 0 else None
    fig = go.Figure(
        go.Heatmap(
            z=values, x=order, y=order, colorscale=colorscale, zmid=zmid, reversescale=True,
            colorbar={"title": value_label},
            text=np.round(values, 3), texttemplate="%{text}",
            hovertemplate="row %{y}<br>column %{x}<br>" + value_label + " %{z:.4f}<extra></extra>",
        )
    )
    fig.update_layout(title=title, yaxis={"autorange": "reversed"}, width=760, height=680,
                      xaxis={"tickangle": -40}, margin={"l": 200, "b": 180})
    return fig


def compare_with_hypothesis(
    matrix: pd.DataFrame,
    hypothesis: pd.DataFrame | Mapping[str, Mapping[str, float]],
    *,
    n_permutations: int = 999,
    seed: int = 0,
) -> dict[str, float]:
    """Compare a task space with a hypothesis matrix over the shared phenomena.

    Both matrices are symmetrised (``(M + M^T) / 2``; a no-op for similarities) and their strictly
    upper triangles compared: Spearman and Pearson correlation, and a Mantel permutation p-value for
    Spearman (rows and columns of the hypothesis permuted together, ``n_permutations`` times; one-sided,
    larger = more similar). At least 3 shared phenomena are needed.

    Example:
        >>> hyp = pd.DataFrame(1.0, index=names, columns=names)             # doctest: +SKIP
        >>> compare_with_hypothesis(task_space_matrix(sim), hyp)             # doctest: +SKIP
        {'n_phenomena': 9, 'n_cells': 36, 'spearman': 0.41, 'pearson': 0.38, 'mantel_p': 0.03}
    """
    from scipy.stats import pearsonr, spearmanr

    m = _as_square(matrix, "the task-space matrix")
    h = _as_square(hypothesis, "the hypothesis matrix")
    shared = [name for name in m.index if name in set(h.index)]
    if len(shared) < 3:
        raise InputError(
            f"the hypothesis shares {len(shared)} phenomena with the matrix ({shared}); at least 3 are needed. "
            f"Matrix phenomena: {list(m.index)}."
        )
    a = m.loc[shared, shared].to_numpy()
    b = h.loc[shared, shared].to_numpy()
    a, b = (a + a.T) / 2, (b + b.T) / 2
    iu = np.triu_indices(len(shared), k=1)
    x, y = a[iu], b[iu]
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        raise InputError("one of the matrices is constant off the diagonal; a correlation is undefined.")
    rho = float(spearmanr(x, y).statistic)
    r = float(pearsonr(x, y).statistic)
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(n_permutations):
        perm = rng.permutation(len(shared))
        bp = b[np.ix_(perm, perm)]
        if float(spearmanr(x, bp[iu]).statistic) >= rho - 1e-12:
            hits += 1
    return {
        "n_phenomena": len(shared),
        "n_cells": int(x.size),
        "spearman": rho,
        "pearson": r,
        "mantel_p": (hits + 1) / (n_permutations + 1) if n_permutations > 0 else math.nan,
    }
