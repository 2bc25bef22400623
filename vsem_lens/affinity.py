"""Vocabulary-affinity (cosine) logits and the logit lens, layer by layer, in bounded memory.

Vocabulary affinity (Gu et al.'s similarity logits, DESIGN 3.2): ``a_i(r) = cos(s_i, r)`` for every
semantic basis vector ``s_i``; probabilities are a softmax over the candidate set with no temperature.
Identity: ``cos(s_i, h) = u_i^T G^{-1} h / (||G^{-1} u_i|| ||h||)`` with ``G = U^T U``: a whitened,
per-token-normalised logit lens.

Logit lens (nostalgebraist 2020): ``LN_f(h_l) W_U + b_U``. Both readouts apply the same frame (the
lens that maps ``h_l`` into the LM-head input space; ``final_norm`` by default).

Readout statistics per (layer, token), compared with the model's final next-token distribution ``p``
(its output logits at the same position): top-k tokens and scores, the rank of the final top-1 token
(0 = also the lens's top-1), its probability under the lens, and ``KL(p || q_lens)`` in bits.
Everything is computed over chunks of tokens, so memory is ``chunk x d_vocab`` per buffer and a
[layers, tokens, vocab] tensor is never built.

Example:
    >>> df = layerwise_affinity(model, "The capital of France is", k=3)  # doctest: +SKIP
    >>> df.query("layer == 29").iloc[-1][["lens_top1", "affinity_top1"]]  # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from .basis import SemanticBasis
from .capture import ActivationBatch, check_layers, iter_capture
from .errors import InputError
from .lenses import Lens, resolve_frame
from .models import HookedModel

LN2 = math.log(2.0)
READOUTS = ("affinity", "lens")


def vocab_affinity(
    h: Float[Tensor, "... d_model"], basis: SemanticBasis
) -> Float[Tensor, "... d_vocab"]:
    """Cosine of each row of ``h`` with every semantic basis vector (zero rows give zeros).

    ``h`` must already be in the basis's frame (see :meth:`SemanticBasis.project`).

    Example:
        >>> vocab_affinity(basis.project(h, layer=29), basis).shape  # doctest: +SKIP
        torch.Size([5, 49152])
    """
    if h.shape[-1] != basis.d_model:
        raise InputError(f"h has width {h.shape[-1]} but the basis has d_model={basis.d_model}.")
    unit = basis.unit_vectors
    h = h.to(unit.dtype)
    h_unit = h / h.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(h.dtype).tiny)
    return h_unit @ unit.T


def logit_lens(
    h: Float[Tensor, "... d_model"],
    model: HookedModel,
    *,
    layer: int = -1,
    frame: str | Lens = "final_norm",
) -> Float[Tensor, "... d_vocab"]:
    """Logit lens: ``lens(h) @ W_U + b_U`` (``final_norm`` frame: ``LN_f(h) W_U + b_U``).

    Example:
        >>> logit_lens(acts.layer("resid_post", 20), model).argmax(-1)  # doctest: +SKIP
    """
    lens = resolve_frame(frame, model)
    return model.unembed(lens(h, layer % model.n_layers))


@dataclass
class ReadoutBatch:
    """Readout statistics of one batch, all tensors [layer, token, ...] over real tokens.

    ``readouts[name]`` (name in ``affinity``, ``lens``) holds ``top_ids``/``top_scores`` [L, T, k],
    ``final_rank`` [L, T], ``final_prob`` [L, T], ``final_score`` [L, T], ``kl_bits`` [L, T].
    """

    layers: list[int]
    doc_index: Int[Tensor, " token"]
    positions: Int[Tensor, " token"]
    token_ids: Int[Tensor, " token"]
    final_ids: Int[Tensor, " token"]
    final_entropy_bits: Float[Tensor, " token"]
    readouts: dict[str, dict[str, Tensor]]


def readout_statistics(
    scores: Float[Tensor, "token d_vocab"],
    final_logp: Float[Tensor, "token d_vocab"],
    final_p: Float[Tensor, "token d_vocab"],
    final_neg_entropy: Float[Tensor, " token"],
    final_ids: Int[Tensor, " token"],
    k: int,
) -> dict[str, Tensor]:
    """Statistics of one readout (scores = logits of a distribution) against the final distribution.

    ``KL(p || softmax(scores)) = sum p log p - p . (scores - logsumexp(scores))``. ``scores`` is
    overwritten (shifted by its logsumexp in place) to avoid another [token, vocab] buffer.

    Example:
        >>> s = torch.randn(3, 10); lp = torch.log_softmax(torch.randn(3, 10), -1)
        >>> out = readout_statistics(s, lp, lp.exp(), (lp.exp() * lp).sum(-1), lp.argmax(-1), k=2)
        >>> sorted(out)
        ['final_prob', 'final_rank', 'final_score', 'kl_bits', 'top_ids', 'top_scores']
    """
    del final_logp  # the identity above needs only p and its negative entropy
    lse = torch.logsumexp(scores, dim=-1)
    target = scores.gather(1, final_ids.unsqueeze(1)).squeeze(1)
    rank = (scores > target.unsqueeze(1)).sum(dim=1)
    top_scores, top_ids = scores.topk(k, dim=-1)
    # p . (scores - lse) rather than p . scores - lse: the dominant terms are then near zero, which
    # keeps float32 accumulation over the vocabulary accurate (KL of a distribution with itself ~1e-6).
    log_q = scores.sub_(lse.unsqueeze(1))
    cross = torch.bmm(final_p.unsqueeze(1), log_q.unsqueeze(2)).reshape(-1)
    kl = (final_neg_entropy - cross).clamp_min(0.0) / LN2
    return {
        "top_ids": top_ids,
        "top_scores": top_scores,
        "final_rank": rank,
        "final_prob": torch.exp(target - lse),
        "final_score": target,
        "kl_bits": kl,
    }


class LayerReadout:
    """Readout statistics of captured residuals: the per-batch engine behind :func:`iter_layer_readouts`.

    Build it once, then call it on each :class:`~vsem_lens.capture.ActivationBatch` whose ``resid_post``
    covers :attr:`capture_layers` (the requested layers plus the last one, which gives the final
    distribution). A streaming analysis that already captures residuals for other statistics can
    reuse its batches instead of running the model again, optionally on a subset of tokens.

    Example:
        >>> readout = LayerReadout(model, basis=basis, k=3)                      # doctest: +SKIP
        >>> for batch in iter_capture(model, corpus, layers=readout.capture_layers):  # doctest: +SKIP
        ...     out = readout(batch)
    """

    def __init__(
        self,
        model: HookedModel,
        *,
        basis: SemanticBasis | None = None,
        frame: str | Lens | None = None,
        layers: int | Sequence[int] | None = None,
        readouts: Sequence[str] = READOUTS,
        k: int = 5,
        token_chunk: int = 512,
    ):
        for name in readouts:
            if name not in READOUTS:
                raise InputError(f"unknown readout {name!r}; choose from {', '.join(READOUTS)}.")
        if not 1 <= k <= model.d_vocab:
            raise InputError(f"k must be between 1 and {model.d_vocab}, got {k}.")
        if token_chunk < 1:
            raise InputError(f"token_chunk must be at least 1, got {token_chunk}.")
        if basis is None and "affinity" in readouts:
            basis = SemanticBasis.from_model(model, frame=frame if isinstance(frame, str) else "final_norm")
        if frame is None:
            frame = basis.frame if basis is not None else "final_norm"
        self.model = model
        self.lens = basis.lens if basis is not None and frame == basis.frame else resolve_frame(frame, model)
        self.frame = self.lens.frame
        self.readouts = tuple(readouts)
        self.k = k
        self.token_chunk = token_chunk
        self.layers = check_layers(layers, model.n_layers)
        self.capture_layers = sorted(set(self.layers) | {model.n_layers - 1})
        self._unit = basis.unit_vectors if basis is not None else None
        self._final_norm = resolve_frame("final_norm", model)

    def __call__(self, batch: ActivationBatch, select: Tensor | None = None) -> ReadoutBatch:
        """Readouts of one captured batch; ``select`` (bool [token]) restricts them to some tokens."""
        if not set(self.capture_layers) <= set(batch.layers):
            raise InputError(f"the batch lacks layers {sorted(set(self.capture_layers) - set(batch.layers))}.")
        resid = batch.acts["resid_post"]
        index = {layer: batch.layers.index(layer) for layer in self.capture_layers}
        doc_index, positions, token_ids = batch.doc_index, batch.positions, batch.token_ids
        if select is not None:
            resid = resid[:, select.to(resid.device)]
            doc_index, positions, token_ids = doc_index[select], positions[select], token_ids[select]
        W_U, b_U, last = self.model.W_U, self.model.b_U, self.model.n_layers - 1
        stats: dict[str, dict[str, list[Tensor]]] = {name: {} for name in self.readouts}
        final_ids_parts, entropy_parts = [], []
        with torch.no_grad():
            for start in range(0, resid.shape[1], self.token_chunk):
                chunk = resid[:, start : start + self.token_chunk]
                final_logits = self._final_norm(chunk[index[last]], last) @ W_U + b_U
                final_logp = torch.log_softmax(final_logits, dim=-1)
                final_p = final_logp.exp()
                neg_entropy = torch.bmm(final_p.unsqueeze(1), final_logp.unsqueeze(2)).reshape(-1)
                final_ids = final_logits.argmax(dim=-1)
                del final_logits
                final_ids_parts.append(final_ids)
                entropy_parts.append(-neg_entropy / LN2)
                per_layer: dict[str, dict[str, list[Tensor]]] = {name: {} for name in self.readouts}
                for layer in self.layers:
                    h = self.lens(chunk[index[layer]], layer)
                    for name in self.readouts:
                        if name == "lens":
                            scores = h @ W_U + b_U
                        else:
                            h_unit = h / h.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(h.dtype).tiny)
                            scores = h_unit @ self._unit.T
                        out = readout_statistics(scores, final_logp, final_p, neg_entropy, final_ids, self.k)
                        del scores
                        for key, value in out.items():
                            per_layer[name].setdefault(key, []).append(value)
                for name in self.readouts:
                    for key, values in per_layer[name].items():
                        stats[name].setdefault(key, []).append(torch.stack(values))
        readout_tensors = {
            name: {key: torch.cat(parts, dim=1) for key, parts in by_key.items()} for name, by_key in stats.items()
        }
        return ReadoutBatch(
            layers=self.layers,
            doc_index=doc_index,
            positions=positions,
            token_ids=token_ids,
            final_ids=torch.cat(final_ids_parts),
            final_entropy_bits=torch.cat(entropy_parts),
            readouts=readout_tensors,
        )


def iter_layer_readouts(
    model: HookedModel,
    texts: str | Sequence[str],
    *,
    basis: SemanticBasis | None = None,
    frame: str | Lens | None = None,
    layers: int | Sequence[int] | None = None,
    readouts: Sequence[str] = READOUTS,
    k: int = 5,
    batch_size: int = 8,
    max_length: int | None = None,
    token_chunk: int = 512,
    progress: bool = False,
) -> Iterator[ReadoutBatch]:
    """Stream per-layer readout statistics batch by batch (see :func:`layerwise_affinity`).

    Example:
        >>> for out in iter_layer_readouts(model, corpus, k=1):  # doctest: +SKIP
        ...     print(out.readouts["lens"]["kl_bits"].mean(dim=1))
    """
    readout = LayerReadout(
        model, basis=basis, frame=frame, layers=layers, readouts=readouts, k=k, token_chunk=token_chunk
    )
    for batch in iter_capture(
        model, texts, layers=readout.capture_layers, batch_size=batch_size, max_length=max_length, progress=progress
    ):
        yield readout(batch)


def vocabulary_strings(model: HookedModel) -> list[str]:
    """Decoded string of every token id (cached on the model).

    Example:
        >>> vocabulary_strings(model)[504]  # doctest: +SKIP
        'The'
    """
    cached = getattr(model, "_vocabulary_strings", None)
    if cached is None or len(cached) != model.d_vocab:
        n_tok = len(model.tokenizer)
        cached = model.token_strings(list(range(min(n_tok, model.d_vocab))))
        cached += [f"<unused {i}>" for i in range(len(cached), model.d_vocab)]
        model._vocabulary_strings = cached
    return cached


def layerwise_affinity(
    model: HookedModel,
    text_or_texts: str | Sequence[str],
    *,
    frame: str | Lens = "final_norm",
    k: int = 5,
    layers: int | Sequence[int] | None = None,
    basis: SemanticBasis | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Per (text, layer, position): what the layer's residual says in vocabulary coordinates.

    Two readouts of each layer's residual ``h_l`` (``resid_post``), after mapping it into ``frame``:
    vocabulary affinity (cosine to every semantic basis vector) and the logit lens. Both are compared
    with the model's final next-token distribution at the same position.

    Returns:
        A tidy DataFrame with columns ``text, layer, position, token_id, token, final_id, final_token,
        final_entropy_bits, frame`` and, for ``r`` in (``affinity``, ``lens``): ``r_top1``,
        ``r_top_tokens`` (list of k strings), ``r_top_scores`` (list of k floats; cosines for affinity,
        logits for the lens), ``r_final_rank`` (0 = the final top-1 is the readout's top-1),
        ``r_final_prob`` (softmax over the whole vocabulary, no temperature), ``r_final_score`` and
        ``r_kl_bits`` (KL(final || readout) in bits).

    Example:
        >>> df = layerwise_affinity(model, "The capital of France is")          # doctest: +SKIP
        >>> df.groupby("layer").lens_kl_bits.mean().round(1).tail(2).tolist()   # doctest: +SKIP
        [2.3, 0.0]
    """
    if basis is None:
        basis = SemanticBasis.from_model(model, frame=frame if isinstance(frame, str) else "final_norm")
    frame_name = frame.frame if isinstance(frame, Lens) else frame
    vocab = vocabulary_strings(model)
    frames = []
    for out in iter_layer_readouts(
        model, text_or_texts, basis=basis, frame=frame, layers=layers, k=k,
        batch_size=batch_size, max_length=max_length, progress=progress,
    ):
        n_layers, n_tok = len(out.layers), out.token_ids.numel()
        columns: dict[str, object] = {
            "text": out.doc_index.repeat(n_layers).numpy(),
            "layer": torch.tensor(out.layers).repeat_interleave(n_tok).numpy(),
            "position": out.positions.repeat(n_layers).numpy(),
            "token_id": out.token_ids.repeat(n_layers).numpy(),
            "final_id": out.final_ids.repeat(n_layers).numpy(),
            "final_entropy_bits": out.final_entropy_bits.repeat(n_layers).numpy(),
        }
        for name, stats in out.readouts.items():
            top_ids = stats["top_ids"].reshape(n_layers * n_tok, -1).tolist()
            columns[f"{name}_top1"] = [vocab[row[0]] for row in top_ids]
            columns[f"{name}_top_tokens"] = [[vocab[i] for i in row] for row in top_ids]
            columns[f"{name}_top_scores"] = stats["top_scores"].reshape(n_layers * n_tok, -1).tolist()
            for key in ("final_rank", "final_prob", "final_score", "kl_bits"):
                columns[f"{name}_{key}"] = stats[key].reshape(-1).numpy()
        frames.append(pd.DataFrame(columns))
    df = pd.concat(frames, ignore_index=True)
    df.insert(4, "token", [vocab[i] for i in df["token_id"]])
    df.insert(6, "final_token", [vocab[i] for i in df["final_id"]])
    df["frame"] = frame_name
    return df.sort_values(["text", "layer", "position"], kind="stable").reset_index(drop=True)
