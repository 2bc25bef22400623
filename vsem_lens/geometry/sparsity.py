"""Affinity sparsity: how concentrated each layer's vocabulary readout is.

:func:`affinity_sparsity_by_layer` reads each layer's residual in a frame (a name or a
:class:`~vsem_lens.lenses.base.Lens`) and measures the entropy of the softmax over vocabulary affinities
(cosines, no temperature, as in the paper) and over the logit lens, the probability mass of the top k,
and the top-1 cosine.

Example:
    >>> df = affinity_sparsity_by_layer(model, corpus, k=10)   # doctest: +SKIP
"""

from __future__ import annotations

import math
from typing import Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..core.capture import check_layers, iter_capture
from ..core.errors import InputError, check_positive_int
from ..core.models import HookedModel
from ..core.stats import RunningScalars
from ..lenses.base import Lens
from ..lenses.frames import frame_name
from ..readout import basis_and_lens, vocab_affinity
from ..readout.basis import SemanticBasis

LN2 = math.log(2.0)


def _softmax_stats(scores: Float[Tensor, "token vocab"], k: int) -> tuple[dict[str, Tensor], Tensor]:
    """Entropy (bits), top-k mass and top-1 probability of softmax(scores), row by row (float32 is fine);
    and the top-1 score itself (from the same top-k pass).
    """
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # [T, 1]
    top = scores.topk(k, dim=-1).values  # [T, k]
    p = (scores - lse).exp_()  # the only [T, vocab] buffer
    # H = -sum p log p = lse - sum p * scores (one batched dot per row, no p log p buffer).
    expected = torch.bmm(p.unsqueeze(1), scores.unsqueeze(2)).reshape(-1)
    entropy = (lse.squeeze(1) - expected) / LN2
    top_p = (top - lse).exp()
    return {"entropy_bits": entropy, "topk_mass": top_p.sum(-1), "top1_prob": top_p[:, 0]}, top[:, 0]


def affinity_sparsity_by_layer(
    model: HookedModel,
    texts: str | Sequence[str],
    *,
    frame: str | Lens = "final_norm",
    k: int = 10,
    layers: int | Sequence[int] | None = None,
    basis: SemanticBasis | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    token_chunk: int = 256,
    progress: bool = False,
) -> pd.DataFrame:
    """Per layer, how concentrated the vocabulary readout of the residual is.

    For each token and layer, the residual ``h_l`` (``resid_post``) is mapped into ``frame`` and read
    out two ways over the whole vocabulary: vocabulary affinity (cosines to every semantic basis vector;
    softmax without temperature, as in Gu et al.) and the logit lens (the model's logits of ``lens(h)``, in the same
    frame; the usual logit lens in the default ``final_norm`` frame). Reported per (layer, readout):
    the entropy in bits of the softmax (at most ``log2(d_vocab)``; since cosines lie in [-1, 1], the
    affinity softmax is always close to uniform and its entropy close to that maximum, which is the
    paper's setting, not a bug), the probability mass of the top ``k`` tokens, the top-1 probability
    and (affinity only) the top-1 cosine, each as mean and sample std over tokens. Tokens are processed
    in chunks of ``token_chunk`` (memory ``token_chunk x d_vocab``); a [layers, tokens, vocab] tensor
    is never built.

    Args:
        model: a :class:`~vsem_lens.core.models.HookedModel`.
        texts: one text or a list of texts.
        frame: a frame name (``raw``, ``final_norm``, ``tuned``) or any :class:`~vsem_lens.lenses.base.Lens`,
            resolved by :func:`~vsem_lens.lenses.frames.resolve_frame`; the ``frame`` column holds its name
            (:func:`~vsem_lens.lenses.frames.frame_name`).
        k: size of the top-k mass.
        layers: layer indices (``None`` = all).
        basis: the semantic basis to read affinities against (built in ``frame`` when not given; a Lens
            gets the ``final_norm`` basis).
        batch_size, max_length, progress: as in :func:`~vsem_lens.core.capture.iter_capture`.
        token_chunk: tokens per working block.

    Returns:
        A tidy DataFrame: ``layer, readout`` (``affinity``/``lens``), ``frame, k, n_tokens,
        max_entropy_bits, entropy_bits_mean, entropy_bits_std, topk_mass_mean, topk_mass_std,
        top1_prob_mean, top1_prob_std, top1_cosine_mean, top1_cosine_std`` (NaN for the lens).

    Example:
        >>> df = affinity_sparsity_by_layer(model, corpus, k=10)             # doctest: +SKIP
        >>> df.pivot(index="layer", columns="readout", values="entropy_bits_mean")  # doctest: +SKIP
    """
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= model.d_vocab:
        raise InputError(f"k must be an integer between 1 and {model.d_vocab}, got {k!r}.")
    check_positive_int(token_chunk, "token_chunk")
    layer_list = check_layers(layers, model.n_layers)
    name = frame_name(frame)
    if basis is not None and not isinstance(basis, SemanticBasis):
        raise InputError(f"basis must be a SemanticBasis, got {type(basis).__name__}.")
    basis, lens = basis_and_lens(model, frame, basis)
    keys = ("entropy_bits", "topk_mass", "top1_prob", "top1_cosine")
    running = {key: RunningScalars((len(layer_list), 2)) for key in keys}  # readout 0 affinity, 1 lens
    for batch in iter_capture(
        model, texts, layers=layer_list, batch_size=batch_size, max_length=max_length, progress=progress
    ):
        resid = batch.acts["resid_post"]
        with torch.no_grad():
            for start in range(0, batch.n_tokens, token_chunk):
                for t, layer in enumerate(layer_list):
                    h = lens(resid[t, start : start + token_chunk], layer)
                    affinity = vocab_affinity(h, basis).as_tensor()
                    out, top1_cosine = _softmax_stats(affinity, k)
                    out["top1_cosine"] = top1_cosine  # the top-k pass already found the maximum
                    del affinity
                    for key, value in out.items():
                        running[key].update(value, (t, 0))
                    lens_out, _ = _softmax_stats(model.unembed(h), k)
                    for key, value in lens_out.items():
                        running[key].update(value, (t, 1))
    return _sparsity_table(running, layer_list, name, k, model.d_vocab)


def _sparsity_table(
    running: dict[str, RunningScalars], layer_list: list[int], name: str, k: int, d_vocab: int
) -> pd.DataFrame:
    """The tidy table of :func:`affinity_sparsity_by_layer` from its running (layer, readout) statistics."""
    keys = tuple(running)
    rows = []
    for t, layer in enumerate(layer_list):
        for r, readout in enumerate(("affinity", "lens")):
            row = {
                "layer": layer,
                "readout": readout,
                "frame": name,
                "k": k,
                "n_tokens": int(running["entropy_bits"].count[t, r]),
                "max_entropy_bits": math.log2(d_vocab),
            }
            for key in keys:
                nan = readout == "lens" and key == "top1_cosine"
                row[f"{key}_mean"] = float("nan") if nan else float(running[key].mean[t, r])
                row[f"{key}_std"] = float("nan") if nan else float(running[key].std()[t, r])
            rows.append(row)
    return pd.DataFrame(rows)
