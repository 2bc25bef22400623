r"""Scoring minimal pairs: sentence log-probabilities, per-pair margins, accuracy per phenomenon at the
output and read from every layer through a lens.

Scoring (:func:`minimal_pair_accuracy`): the log-probability of a sentence is the sum of its tokens'
log-probabilities; a pair is correct when the grammatical sentence is strictly more probable
(ties count as wrong, as in BLiMP).

**BOS rule.** Every function here (and in :mod:`.gradients`, :mod:`.ftgd`, :mod:`.transfer`) takes
``prepend_bos: bool | None = None``: ``None`` follows the model's rule (:attr:`HookedModel.prepend_bos
<vsem_lens.core.models.HookedModel>`, ``False`` unless the model was loaded with ``prepend_bos=True``),
``True``/``False`` override it, and the rule used is recorded in every output (a ``prepend_bos``
column or meta entry). :meth:`~vsem_lens.core.models.HookedModel.resolve_bos` is the one check: BOS
on a tokenizer without a BOS token is an :class:`~vsem_lens.core.errors.InputError`.

What the score means under each rule:

- with BOS, every token of the sentence is scored: ``log p(s) = sum_t log p(w_t | BOS, w_<t)``, the
  BLiMP-style full-sentence probability. The first word is scored after the BOS token, which on
  SmolLM2 is the chat token ``<|im_start|>`` (normally followed by a role name), so the first word's
  term is a chat-context unigram preference.
- without BOS, the first token is only context: ``log p(s) = sum_{t>1} log p(w_t | w_<t)``. For a
  pair that differs after the first token the margin compares the same conditionals as with BOS,
  minus the (identical) first-token term. For a pair that differs *in its first token*
  (``npi_licensing``: "No/This singer has ever ...") the margin is ``log p(rest | good first word) -
  log p(rest | bad first word)``: whether the rest of the sentence fits the first word, not which first
  word is more probable. The same rule is used for scoring, gradients and FTGD objectives, so every
  stage of a study scores the same quantity.

:func:`minimal_pair_accuracy_by_layer` reads the same log-probabilities from every layer through a lens
(``final_norm``: the logit lens; ``tuned``: a tuned lens), chunked so no [layers, tokens, vocab] tensor
exists; :func:`preference_onset` says at which layer the preference appears.

Example:
    >>> acc = minimal_pair_accuracy(model, load_minimal_pairs())        # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..core.capture import check_layers, iter_capture
from ..core.errors import check_positive_int
from ..core.models import HookedModel, Tokens
from ..lenses.base import Lens
from ..lenses.frames import resolve_frame
from .pairs import MinimalPair, check_pairs, load_minimal_pairs


def _batches(n: int, batch_size: int) -> Iterable[slice]:
    check_positive_int(batch_size, "batch_size")
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


def token_logprobs(
    logits: Float[Tensor, "batch pos d_vocab"], tokens: Tokens
) -> Float[Tensor, "batch pos_minus_1"]:
    """Log p(token_{t+1} | <= t) at every real next token (0 elsewhere), without a log-softmax buffer.

    Example:
        >>> token_logprobs(model.forward(tokens), tokens).shape  # doctest: +SKIP
        torch.Size([2, 6])
    """
    ids = tokens.ids.to(logits.device)
    mask = tokens.mask.to(logits.device)
    head = logits[:, :-1].float()
    target = head.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    lp = target - torch.logsumexp(head, dim=-1)
    return lp * mask[:, 1:].to(lp.dtype)


def text_logprobs(
    model: HookedModel, texts: Sequence[str], *, prepend_bos: bool | None = None, max_length: int | None = None
) -> tuple[Float[Tensor, "text pos_minus_1"], Tokens]:
    """Tokenise ``texts``, run the model (in the caller's grad mode) and return the log-probability of
    every real next token (0 at padding), with the tokens.

    Example:
        >>> lp, tokens = text_logprobs(model, ["The cat sleeps."])  # doctest: +SKIP
    """
    tokens = model.tokenize(list(texts), prepend_bos=prepend_bos, max_length=max_length)
    logits = model.logits(tokens)
    return token_logprobs(logits, tokens), tokens


def sentence_logprobs(
    model: HookedModel,
    sentences: Sequence[str],
    *,
    batch_size: int = 32,
    prepend_bos: bool | None = None,
) -> Float[Tensor, " sentence"]:
    """Sum of token log-probabilities (nats, float64) of each sentence under the model.

    ``prepend_bos``: ``None`` follows the model's rule; with BOS every token of the sentence is scored
    given the BOS token, without it the first token is only context (module docstring).

    Example:
        >>> sentence_logprobs(model, ["The cat sleeps.", "The cat sleep."])  # doctest: +SKIP
        tensor([-21.3, -24.9], dtype=torch.float64)
    """
    out = torch.empty(len(sentences), dtype=torch.float64)
    for span in _batches(len(sentences), batch_size):
        with torch.no_grad():
            lp, _ = text_logprobs(model, sentences[span], prepend_bos=prepend_bos)
        out[span] = lp.sum(dim=1).double().cpu()
    return out


def score_minimal_pairs(
    model: HookedModel,
    pairs: Sequence[MinimalPair],
    *,
    batch_size: int = 32,
    prepend_bos: bool | None = None,
) -> pd.DataFrame:
    """Per-pair log-probabilities: ``phenomenon, good, bad, logp_good, logp_bad, margin, correct, prepend_bos``.

    ``margin = logp_good - logp_bad`` (nats); ``correct`` is ``margin > 0``; ``prepend_bos`` is the BOS
    rule used (``None`` follows the model's rule; see the module docstring).

    Example:
        >>> score_minimal_pairs(model, pairs[:2]).margin.round(1).tolist()  # doctest: +SKIP
    """
    pairs = check_pairs(pairs)
    bos = model.resolve_bos(prepend_bos)
    sentences = [p.good for p in pairs] + [p.bad for p in pairs]
    scores = sentence_logprobs(model, sentences, batch_size=batch_size, prepend_bos=bos).numpy()
    n = len(pairs)
    df = pd.DataFrame(
        {
            "phenomenon": [p.phenomenon for p in pairs],
            "good": [p.good for p in pairs],
            "bad": [p.bad for p in pairs],
            "logp_good": scores[:n],
            "logp_bad": scores[n:],
        }
    )
    df["margin"] = df.logp_good - df.logp_bad
    df["correct"] = df.margin > 0
    df["prepend_bos"] = bos
    return df


def _wilson(k: np.ndarray, n: np.ndarray, z: float = 1.959964) -> tuple[np.ndarray, np.ndarray]:
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return centre - half, centre + half


def summarize_pair_scores(scores: pd.DataFrame, by: Sequence[str] = ()) -> pd.DataFrame:
    """Accuracy per phenomenon (and per ``by`` columns) from per-pair scores, plus an ``all`` row.

    Columns: ``*by, phenomenon, n_pairs, accuracy, accuracy_ci_low, accuracy_ci_high`` (Wilson 95%),
    ``n_ties, mean_margin, median_margin``, and ``prepend_bos`` (the BOS rule) when ``scores`` records it.

    Example:
        >>> summarize_pair_scores(score_minimal_pairs(model, pairs))  # doctest: +SKIP
    """
    by = list(by)
    recorded = "prepend_bos" in scores.columns and "prepend_bos" not in by
    if recorded:
        by.append("prepend_bos")
    frames = [scores, scores.assign(phenomenon="all")]
    data = pd.concat(frames, ignore_index=True)
    grouped = data.groupby(by + ["phenomenon"], sort=False)
    out = grouped.agg(
        n_pairs=("margin", "size"),
        accuracy=("correct", "mean"),
        n_ties=("margin", lambda m: int((m == 0).sum())),
        mean_margin=("margin", "mean"),
        median_margin=("margin", "median"),
    ).reset_index()
    low, high = _wilson(out.accuracy.to_numpy() * out.n_pairs.to_numpy(), out.n_pairs.to_numpy().astype(float))
    out.insert(out.columns.get_loc("accuracy") + 1, "accuracy_ci_low", low)
    out.insert(out.columns.get_loc("accuracy") + 2, "accuracy_ci_high", high)
    if recorded:  # the rule goes last, after the statistics
        out["prepend_bos"] = out.pop("prepend_bos")
    return out


def minimal_pair_accuracy(
    model: HookedModel,
    pairs: Sequence[MinimalPair] | str | os.PathLike = "default",
    *,
    batch_size: int = 32,
    prepend_bos: bool | None = None,
) -> pd.DataFrame:
    """Minimal-pair accuracy per phenomenon: is the grammatical sentence more probable?

    A sentence's log-probability is the sum of its tokens' log-probabilities (see the module
    docstring for the BOS rule); a pair counts as correct when ``logp(good) > logp(bad)``.

    Args:
        model: a :class:`~vsem_lens.core.models.HookedModel`.
        pairs: a list of :class:`MinimalPair`, ``"default"`` (the shipped pairs) or a JSONL path.
        batch_size: sentences per forward pass.
        prepend_bos: ``None`` (default) follows the model's rule; ``True`` scores the first token too by
            conditioning on BOS, ``False`` uses the first token only as context (module docstring).

    Returns:
        One row per phenomenon plus ``all``: ``phenomenon, n_pairs, accuracy, accuracy_ci_low,
        accuracy_ci_high, n_ties, mean_margin, median_margin, prepend_bos`` (margins in nats;
        ``prepend_bos`` is the rule used).

    Example:
        >>> acc = minimal_pair_accuracy(model, load_minimal_pairs())  # doctest: +SKIP
        >>> acc.set_index("phenomenon").accuracy.round(2)              # doctest: +SKIP
    """
    if isinstance(pairs, (str, os.PathLike)):
        pairs = load_minimal_pairs(pairs)
    scores = score_minimal_pairs(model, pairs, batch_size=batch_size, prepend_bos=prepend_bos)
    return summarize_pair_scores(scores)


def layer_sentence_logprobs(
    model: HookedModel,
    sentences: Sequence[str],
    *,
    frame: str | Lens = "final_norm",
    lens: Lens | None = None,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    token_chunk: int = 256,
    prepend_bos: bool | None = None,
) -> Float[Tensor, "layer sentence"]:
    """Sentence log-probabilities read from each layer's residual (``resid_post``) through a lens.

    Per layer the lens logits are the model's logits of ``lens(h_l)`` (its one logits path,
    :meth:`~vsem_lens.core.models.HookedModel.unembedding`; float32 for half-precision models) for
    ``token_chunk`` tokens at a time; only ``logsumexp`` and the logit of the actual next token are
    kept, so memory is ``token_chunk x d_vocab`` and no [layers, tokens, vocab] tensor is built.

    Example:
        >>> layer_sentence_logprobs(model, ["The cat sleeps."]).shape  # doctest: +SKIP
        torch.Size([30, 1])
    """
    layer_list = check_layers(layers, model.n_layers)
    lens_obj = resolve_frame(frame, model, lens=lens)
    check_positive_int(token_chunk, "token_chunk")
    prepend_bos = model.resolve_bos(prepend_bos)
    out = torch.zeros(len(layer_list), len(sentences), dtype=torch.float64)
    unembedding = model.unembedding()
    for span in _batches(len(sentences), batch_size):
        tokens = model.tokenize(list(sentences[span]), prepend_bos=prepend_bos)
        lengths = tokens.lengths
        for batch in iter_capture(model, tokens, layers=layer_list, batch_size=tokens.ids.shape[0]):
            doc, pos = batch.doc_index, batch.positions
            has_next = pos + 1 < lengths[doc]
            select = has_next.nonzero().squeeze(1)
            doc_s, pos_s = doc[select], pos[select]
            targets = tokens.ids[doc_s, pos_s + 1].to(model.device)
            resid = batch.acts["resid_post"][:, select.to(model.device)]
            with torch.no_grad():
                for li, layer in enumerate(layer_list):
                    for start in range(0, select.numel(), token_chunk):
                        part = slice(start, start + token_chunk)
                        logits = unembedding(lens_obj(resid[li, part], layer))
                        lp = logits.gather(1, targets[part].unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, -1)
                        out[li].index_add_(0, doc_s[part] + span.start, lp.double().cpu())
    return out


def minimal_pair_accuracy_by_layer(
    model: HookedModel,
    pairs: Sequence[MinimalPair] | str | os.PathLike = "default",
    *,
    frame: str | Lens = "final_norm",
    lens: Lens | None = None,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    token_chunk: int = 256,
    prepend_bos: bool | None = None,
) -> pd.DataFrame:
    """Minimal-pair accuracy per layer and phenomenon, reading each layer through a lens.

    Args:
        frame: ``"final_norm"`` (logit lens: the model's final norm then the unembedding) or
            ``"tuned"`` (a trained :class:`~vsem_lens.lenses.tuned.TunedLens`, given as ``lens=`` or found
            in the cache; see :func:`~vsem_lens.lenses.frames.resolve_frame`), or a :class:`Lens`.
            ``"raw"`` skips the final norm (rarely meaningful for log-probabilities).
        layers: layers to read (default all); the last layer in the ``final_norm`` frame equals
            :func:`minimal_pair_accuracy`.

        prepend_bos: ``None`` follows the model's rule (module docstring).

    Returns:
        Rows ``layer, phenomenon, n_pairs, accuracy, accuracy_ci_low, accuracy_ci_high, n_ties,
        mean_margin, median_margin, prepend_bos, frame`` (``phenomenon == "all"`` pools every pair;
        ``prepend_bos`` is the rule used).

    Example:
        >>> by_layer = minimal_pair_accuracy_by_layer(model, pairs, frame="final_norm")  # doctest: +SKIP
        >>> preference_onset(by_layer)                                                    # doctest: +SKIP
    """
    if isinstance(pairs, (str, os.PathLike)):
        pairs = load_minimal_pairs(pairs)
    pairs = check_pairs(pairs)
    layer_list = check_layers(layers, model.n_layers)
    prepend_bos = model.resolve_bos(prepend_bos)
    sentences = [p.good for p in pairs] + [p.bad for p in pairs]
    logp = layer_sentence_logprobs(
        model, sentences, frame=frame, lens=lens, layers=layer_list, batch_size=batch_size,
        token_chunk=token_chunk, prepend_bos=prepend_bos,
    ).numpy()
    n = len(pairs)
    frames = []
    for li, layer in enumerate(layer_list):
        margin = logp[li, :n] - logp[li, n:]
        frames.append(
            pd.DataFrame({"layer": layer, "phenomenon": [p.phenomenon for p in pairs], "margin": margin,
                          "correct": margin > 0, "prepend_bos": prepend_bos})
        )
    out = summarize_pair_scores(pd.concat(frames, ignore_index=True), by=["layer"])
    out["frame"] = frame.frame if isinstance(frame, Lens) else frame
    return out


def preference_onset(by_layer: pd.DataFrame, *, threshold: float | None = None, margin: float = 0.05) -> pd.DataFrame:
    """The layer at which each phenomenon's preference for the grammatical sentence appears.

    ``onset_layer`` is the first layer from which the accuracy stays at or above ``threshold`` for
    every later layer read; by default ``threshold = final accuracy - margin`` (the layer where the
    final preference is (nearly) reached). It is ``NaN`` when the final accuracy is not above chance
    (0.5), i.e. there is no preference to find.

    Example:
        >>> preference_onset(by_layer)[["phenomenon", "onset_layer"]]  # doctest: +SKIP
    """
    rows = []
    for phenomenon, group in by_layer.groupby("phenomenon", sort=False):
        group = group.sort_values("layer")
        acc = group.accuracy.to_numpy()
        layers = group.layer.to_numpy()
        final = float(acc[-1])
        level = final - margin if threshold is None else float(threshold)
        onset = math.nan
        if final > 0.5:
            above = acc >= level
            # first index from which every later layer is above
            for i in range(len(acc)):
                if above[i:].all():
                    onset = int(layers[i])
                    break
        rows.append({"phenomenon": phenomenon, "final_accuracy": final, "threshold": level,
                     "onset_layer": onset, "best_layer": int(layers[int(np.argmax(acc))]),
                     "best_accuracy": float(acc.max())})
    return pd.DataFrame(rows)


__all__ = ["layer_sentence_logprobs", "minimal_pair_accuracy", "minimal_pair_accuracy_by_layer", "preference_onset", "score_minimal_pairs", "sentence_logprobs", "summarize_pair_scores", "text_logprobs", "token_logprobs"]
