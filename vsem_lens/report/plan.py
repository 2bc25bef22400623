"""The corpus plan of a report: which texts and tokens are read, in which batches, and the readout sample.

Example:
    >>> plan = plan_corpus(model, texts, max_tokens=4000, lens_tokens=512, batch_size=8, seed=0)  # doctest: +SKIP
    >>> len(plan.batches), plan.n_tokens                                                          # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..core.models import HookedModel
from ..readout.aggregator import QUANTILE_CAPACITY


@dataclass
class CorpusPlan:
    """The tokenised corpus after the budget, its batches and the seeded lens sample.

    Example:
        >>> plan = plan_corpus(model, texts, max_tokens=4000, lens_tokens=512, batch_size=8, seed=0)  # doctest: +SKIP
        >>> plan.n_tokens, len(plan.batches), int(plan.lens_mask.sum())                               # doctest: +SKIP
    """

    rows: list[list[int]]  # token ids per used text, corpus order
    texts: list[str]  # the used texts (corpus order)
    n_available: int  # texts given
    n_truncated: int  # used texts cut to the model's context
    n_dropped: int  # tokens those cuts dropped
    cut_first: bool  # the first text alone exceeded max_tokens and was cut to it
    offsets: list[int]  # global index of each text's first token
    batches: list[list[int]]  # text indices per batch (length-sorted)
    lens_mask: Tensor  # bool [N]: sampled for readouts
    keep_mask: Tensor  # bool [N]: sampled and kept for quantiles

    @property
    def n_tokens(self) -> int:
        """Tokens of the used texts."""
        return int(self.offsets[-1] + len(self.rows[-1])) if self.rows else 0


def plan_corpus(
    model: HookedModel,
    texts: list[str],
    *,
    max_tokens: int | None,
    lens_tokens: int | str,
    batch_size: int,
    seed: int,
    quantile_capacity: int = QUANTILE_CAPACITY,
) -> CorpusPlan:
    """Tokenise ``texts``, keep whole texts within ``max_tokens``, batch them by length and draw the
    seeded sample of ``lens_tokens`` readout tokens (the first ``quantile_capacity`` of them kept for quantiles).

    The sample is uniform without replacement over the token positions, from
    ``torch.Generator().manual_seed(seed)``, so it does not depend on ``batch_size``.

    Texts longer than the model's context are cut to it (the report reads every text it uses); when
    any used text is cut, a warning (on stderr under ``vsem-lens report``) says how many texts and
    tokens were dropped, and the plan records both (``n_truncated``, ``n_dropped``).

    Example:
        >>> plan = plan_corpus(model, texts, max_tokens=8192, lens_tokens=512, batch_size=8, seed=0)  # doctest: +SKIP
        >>> plan.n_tokens, int(plan.lens_mask.sum())                                                  # doctest: +SKIP
        (8190, 512)
    """
    n_ctx = model.n_ctx
    # Tokenise without a limit (max_length far above any text) so the tokens cut off can be counted.
    rows = model.token_ids(texts, max_length=2**62)
    full_lengths = [len(r) for r in rows]
    rows = [r[:n_ctx] for r in rows]
    used, total, cut_first = [], 0, False
    for i, row in enumerate(rows):
        if max_tokens is not None and total + len(row) > max_tokens:
            if not used:  # the first text alone is over budget: keep its first max_tokens tokens
                used.append(i)
                rows[i] = row[:max_tokens]
                total = max_tokens
                cut_first = True
            break
        used.append(i)
        total += len(row)
    kept_rows = [rows[i] for i in used]
    n_truncated = sum(full_lengths[i] > n_ctx for i in used)
    n_dropped = sum(max(0, full_lengths[i] - n_ctx) for i in used)
    if n_truncated:
        warnings.warn(truncation_notice(n_truncated, len(used), n_dropped, n_ctx), stacklevel=2)
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in kept_rows])[:-1]]).astype(int).tolist()
    n_tokens = total
    order = sorted(range(len(kept_rows)), key=lambda i: (len(kept_rows[i]), i))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    generator = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n_tokens, generator=generator)
    n_lens = n_tokens if lens_tokens == "all" else min(int(lens_tokens), n_tokens)
    lens_mask = torch.zeros(n_tokens, dtype=torch.bool)
    lens_mask[perm[:n_lens]] = True
    keep_mask = torch.zeros(n_tokens, dtype=torch.bool)
    keep_mask[perm[: min(n_lens, quantile_capacity)]] = True
    return CorpusPlan(
        rows=kept_rows,
        texts=[texts[i] for i in used],
        n_available=len(texts),
        n_truncated=n_truncated,
        n_dropped=n_dropped,
        cut_first=cut_first,
        offsets=offsets,
        batches=batches,
        lens_mask=lens_mask,
        keep_mask=keep_mask,
    )


def truncation_notice(n_cut: int, n_texts: int, n_dropped: int, n_ctx: int) -> str:
    """The report's notice about texts cut to the model's context.

    Example:
        >>> truncation_notice(2, 10, 1500, 8192)
        "2 of 10 texts are longer than the model's context of 8,192 tokens and were cut to it: 1,500 tokens dropped."
    """
    return (
        f"{n_cut} of {n_texts} texts are longer than the model's context of {n_ctx:,} tokens and were cut to it: "
        f"{n_dropped:,} tokens dropped."
    )
