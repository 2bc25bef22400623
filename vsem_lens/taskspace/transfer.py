"""The FTGD transfer study: tune a copy on each phenomenon (:func:`~vsem_lens.taskspace.ftgd.ftgd_finetune`)
and re-evaluate every phenomenon. The transfer matrix ``T[i, j] = acc_j(after tuning on i) - acc_j(before)``
on held-out pairs is the task space; the margin change is reported too (it is less coarse than
accuracy), and the perplexity change on a corpus (by default the embedded corpus) measures collateral
damage.

Example:
    >>> result = ftgd_transfer(model, load_minimal_pairs(), n_train=40, n_eval=60)  # doctest: +SKIP
    >>> plot_task_space(result.matrix("delta_accuracy")).show()                     # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
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
    cfg = (config or FTGDConfig()).check()
    train, test = split_pairs(pairs, n_train=n_train, n_eval=n_eval, seed=cfg.seed, phenomena=phenomena)
    eval_pairs = [p for group in test.values() for p in group]
    if corpus is None:
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
        rows += _transfer_rows(name, before, after)
        ppl_rows.append(
            {"trained_on": name, "perplexity_before": ppl_before, "perplexity_after": ppl_after,
             "delta_perplexity": ppl_after - ppl_before, "relative_change": ppl_after / ppl_before - 1}
        )
        train_rows.append(
            {"trained_on": name, "n_train": len(train[name]), "n_updated": result.n_updated,
             "n_candidates": result.n_candidates, "loss_first": result.losses[0], "loss_last": result.losses[-1]}
        )
        _reset_masked(work, originals, result.mask)
        if callback is not None:
            callback(_result())
    return _result()


__all__ = ["TransferResult", "corpus_perplexity", "ftgd_transfer", "split_pairs"]
