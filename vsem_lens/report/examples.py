"""The report's example texts: per layer and position, the affinity and logit-lens readouts with top-k tokens.

Example:
    >>> table, metas = example_table(model, agg, "final_norm", ["The capital of France is"])  # doctest: +SKIP
    >>> table.query("layer == 29").affinity_top1.tolist()[-1]                                 # doctest: +SKIP
    ' Paris'
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from ..core.capture import iter_capture
from ..core.models import HookedModel
from ..readout import LensAggregator, vocabulary_strings

#: Example texts are cut to this many tokens (a heatmap column per token).
EXAMPLE_MAX_TOKENS = 24
#: Top-k tokens shown on hover in the affinity map.
EXAMPLE_TOP_K = 5


def example_table(
    model: HookedModel, agg: LensAggregator, frame: str, texts: list[str]
) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Lens and affinity readouts of every position of the example texts (with the top-k tokens) as a
    tidy table, through the aggregator's own readout kernel (no second set of vocabulary buffers).

    Returns:
        The table (one row per example, layer and position) and, per example, ``index``, ``text``,
        ``n_tokens`` (shown) and ``n_tokens_full``.

    Example:
        >>> table, metas = example_table(model, agg, "final_norm", ["Hello world"])   # doctest: +SKIP
    """
    vocab = vocabulary_strings(model)
    frames, metas = [], []
    for i, text in enumerate(texts):
        ids = model.token_ids([text], max_length=model.n_ctx)[0]
        tokens = model.pad([ids[: min(EXAMPLE_MAX_TOKENS, model.n_ctx)]])
        batch = next(iter_capture(model, tokens, layers=agg.capture_layers, batch_size=1))
        out = agg.read_batch(batch, k=EXAMPLE_TOP_K, names=("lens", "affinity"))
        n_layers, n_tok = len(agg.layers), batch.n_tokens
        aff = {key: value.cpu() for key, value in out.readouts["affinity"].items()}
        lens = {key: value.cpu() for key, value in out.readouts["lens"].items()}
        cols: dict[str, Any] = {
            "example": i,
            "layer": torch.tensor(agg.layers).repeat_interleave(n_tok).numpy(),
            "position": batch.positions.repeat(n_layers).numpy(),
            "token_id": batch.token_ids.repeat(n_layers).numpy(),
            "final_id": out.final_ids.cpu().repeat(n_layers).numpy(),
        }
        aff_ids = aff["top_ids"].reshape(n_layers * n_tok, -1).tolist()
        cols["affinity_top1"] = [vocab[row[0]] for row in aff_ids]
        cols["affinity_top_tokens"] = [[vocab[j] for j in row] for row in aff_ids]
        cols["affinity_top_scores"] = aff["top_scores"].reshape(n_layers * n_tok, -1).tolist()
        cols["affinity_final_cos"] = aff["final_score"].reshape(-1).numpy()
        cols["affinity_final_rank"] = aff["final_rank"].reshape(-1).numpy()
        cols["lens_top1"] = [vocab[j] for j in lens["top_ids"][..., 0].reshape(-1).tolist()]
        cols["lens_final_rank"] = lens["final_rank"].reshape(-1).numpy()
        cols["lens_final_prob"] = lens["final_prob"].reshape(-1).numpy()
        cols["lens_kl_bits"] = lens["kl_bits"].reshape(-1).numpy()
        df = pd.DataFrame(cols)
        df.insert(4, "token", [vocab[j] for j in df["token_id"]])
        df.insert(6, "final_token", [vocab[j] for j in df["final_id"]])
        frames.append(df)
        metas.append({"index": i, "text": text, "n_tokens": n_tok, "n_tokens_full": len(ids)})
    table = pd.concat(frames, ignore_index=True)
    table["frame"] = frame
    return table, metas
