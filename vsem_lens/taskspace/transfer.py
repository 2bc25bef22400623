"""The FTGD transfer study: tune a copy on each phenomenon (:func:`~vsem_lens.taskspace.ftgd.ftgd_finetune`)
and re-evaluate every phenomenon. The transfer matrix ``T[i, j] = acc_j(after tuning on i) - acc_j(before)``
on held-out pairs is the task space; the margin change is reported too (it is less coarse than
accuracy), and the perplexity change on a corpus (by default the embedded corpus) measures collateral
damage. The per-pair margins before and after each tuning are kept (``TransferResult.pairs``) for paired
statistics, e.g. FTGD against its random-mask control (``FTGDConfig(mask="random")``), and an optional
``probe`` measures anything else on the original model and on every tuned copy (``TransferResult.probes``).
The BOS rule (``config.prepend_bos``, ``None``: the model's) is recorded in every table and in ``meta``.

Example:
    >>> result = ftgd_transfer(model, load_minimal_pairs(), n_train=40, n_eval=60)  # doctest: +SKIP
    >>> plot_task_space(result.matrix("delta_accuracy")).show()                     # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..core.corpus import load_corpus
from ..core.errors import InputError
from ..core.models import HookedModel
from .ftgd import FTGDConfig, copy_model, ftgd_finetune
from .gradients import group_by_phenomenon
from .matrix import task_space_matrix
from .minimal_pairs import score_minimal_pairs, summarize_pair_scores, text_logprobs
from .pairs import MinimalPair, check_pairs
from .parameters import model_parameters


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
            lp, tokens = text_logprobs(model, texts[start : start + batch_size], max_length=max_length)
        total += float(lp.double().sum())
        count += int(tokens.mask[:, 1:].sum())
    if count == 0:
        raise InputError("the texts have no predicted tokens (each text needs at least two tokens).")
    return math.exp(-total / count)


@dataclass
class TransferResult:
    """FTGD transfer study: before/after scores on held-out pairs, perplexity, training logs.

    ``pairs`` has one row per tuned phenomenon and held-out pair (``trained_on, evaluated_on, pair,
    margin_before, margin_after, prepend_bos``); ``probes`` the rows of the optional probe (``trained_on``
    is ``None`` for the original model).
    """

    transfer: pd.DataFrame
    perplexity: pd.DataFrame
    before: pd.DataFrame
    training: pd.DataFrame
    config: FTGDConfig
    meta: dict[str, Any]
    pairs: pd.DataFrame = field(default_factory=pd.DataFrame)
    probes: pd.DataFrame = field(default_factory=pd.DataFrame)

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
    groups = group_by_phenomenon(check_pairs(pairs), phenomena)
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


def _pair_rows(name: str, before: pd.DataFrame, after: pd.DataFrame) -> pd.DataFrame:
    """Per held-out pair margins before and after tuning on ``name`` (pairs in evaluation order)."""
    return pd.DataFrame({
        "trained_on": name, "evaluated_on": after.phenomenon.to_numpy(),
        "pair": after.groupby("phenomenon", sort=False).cumcount().to_numpy(),
        "margin_before": before.margin.to_numpy(), "margin_after": after.margin.to_numpy(),
        "prepend_bos": after.prepend_bos.to_numpy(),
    })


def _transfer_rows(name: str, before: pd.DataFrame, after: pd.DataFrame) -> list[dict[str, Any]]:
    """Transfer rows of the copy tuned on ``name``: every phenomenon's scores before and after."""
    return [
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
            "prepend_bos": bool(after.loc[other, "prepend_bos"]),
        }
        for other in after.index
    ]


def _reset_masked(work: HookedModel, originals: dict[str, torch.nn.Parameter], mask: dict[str, Any]) -> None:
    """Reset the working copy's changed parameters from the untouched original."""
    by_name = dict(model_parameters(work))
    with torch.no_grad():
        for pname in mask:
            by_name[pname].copy_(originals[pname])


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
    probe: Callable[[HookedModel], pd.DataFrame] | None = None,
    tune: Sequence[str] | None = None,
) -> TransferResult:
    """FTGD transfer matrix: tune a copy on each phenomenon, re-evaluate every phenomenon.

    The model itself is never modified: one working copy is tuned per phenomenon and its masked
    parameters are reset from ``model`` before the next one.

    Args:
        pairs: minimal pairs; split per phenomenon by :func:`split_pairs` (seed ``config.seed``).
        n_train, n_eval: training / held-out evaluation pairs per phenomenon.
        config: :class:`FTGDConfig` (mask fraction, steps, lr, objective, ``mask="random"`` for the
            random-mask control, BOS rule: ``prepend_bos=None`` follows the model's).
        corpus: texts for the perplexity change (default: the first ``n_corpus`` texts of the
            embedded corpus ``load_corpus("default")``), truncated to ``corpus_max_length`` tokens.
        callback: called with the partial :class:`TransferResult` after each tuned phenomenon (to save
            intermediate results of a long run).
        tune: tune only these phenomena (default all); every phenomenon is still evaluated.
        probe: called with the original model and with every tuned copy; its rows are collected in
            ``TransferResult.probes`` with a ``trained_on`` column (e.g. a first-word log-probability).

    Returns:
        :class:`TransferResult`; ``transfer`` has rows ``trained_on, evaluated_on, accuracy_before,
        accuracy_after, delta_accuracy, margin_before, margin_after, delta_margin, n_eval, prepend_bos``;
        ``meta["config"]`` records the BOS rule and mask used.

    Example:
        >>> res = ftgd_transfer(model, load_minimal_pairs(), n_train=40, n_eval=60)  # doctest: +SKIP
        >>> res.matrix("delta_accuracy").round(2)                                      # doctest: +SKIP
    """
    cfg = (config or FTGDConfig()).check()
    cfg = replace(cfg, prepend_bos=model.resolve_bos(cfg.prepend_bos))
    train, test = split_pairs(pairs, n_train=n_train, n_eval=n_eval, seed=cfg.seed, phenomena=phenomena)
    eval_pairs = [p for group in test.values() for p in group]
    if corpus is None:
        corpus = load_corpus("default")[:n_corpus]
    corpus = list(corpus)

    def evaluate(m: HookedModel) -> pd.DataFrame:
        return score_minimal_pairs(m, eval_pairs, batch_size=batch_size, prepend_bos=cfg.prepend_bos)

    def probed(m: HookedModel, name: str | None) -> list[pd.DataFrame]:
        return [] if probe is None else [pd.DataFrame(probe(m)).assign(trained_on=name)]

    before_pairs = evaluate(model)
    before = summarize_pair_scores(before_pairs).set_index("phenomenon")
    probe_frames = probed(model, None)
    pair_frames: list[pd.DataFrame] = []
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
            pairs=pd.concat(pair_frames, ignore_index=True) if pair_frames else pd.DataFrame(),
            probes=pd.concat(probe_frames, ignore_index=True) if probe_frames else pd.DataFrame(),
        )

    tuned = list(train) if tune is None else list(tune)
    unknown = [name for name in tuned if name not in train]
    if unknown:
        raise InputError(f"tune names phenomena without pairs: {unknown}; the pairs cover {list(train)}.")
    for name in tqdm(tuned, desc="ftgd", disable=not progress):
        result = ftgd_finetune(work, train[name], config=cfg, inplace=True)
        after_pairs = evaluate(work)
        after = summarize_pair_scores(after_pairs).set_index("phenomenon")
        ppl_after = corpus_perplexity(work, corpus, max_length=corpus_max_length) if corpus else math.nan
        rows += _transfer_rows(name, before, after)
        pair_frames.append(_pair_rows(name, before_pairs, after_pairs))
        probe_frames += probed(work, name)
        ppl_rows.append(
            {"trained_on": name, "perplexity_before": ppl_before, "perplexity_after": ppl_after,
             "delta_perplexity": ppl_after - ppl_before, "relative_change": ppl_after / ppl_before - 1}
        )
        train_rows.append(
            {"trained_on": name, "mask": cfg.mask, "mask_seed": cfg.mask_seed if cfg.mask == "random" else None,
             "n_train": len(train[name]), "n_updated": result.n_updated,
             "n_candidates": result.n_candidates, "loss_first": result.losses[0], "loss_last": result.losses[-1]}
        )
        _reset_masked(work, originals, result.mask)
        if callback is not None:
            callback(_result())
    return _result()


__all__ = ["TransferResult", "corpus_perplexity", "ftgd_transfer", "split_pairs"]
