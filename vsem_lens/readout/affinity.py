"""Vocabulary-affinity (cosine) logits and the logit lens, layer by layer, in bounded memory.

Vocabulary affinity (Gu et al.'s similarity logits, docs/concepts/affinity.md): ``a_i(r) = cos(s_i, r)`` for every
semantic basis vector ``s_i``; probabilities are a softmax over the candidate set with no temperature.
Identity: ``cos(s_i, h) = u_i^T G^{-1} h / (||G^{-1} u_i|| ||h||)`` with ``G = U^T U``: a whitened,
per-token-normalised logit lens.

Logit lens (nostalgebraist 2020): ``LN_f(h_l) W_U + b_U``, then the model's output-logit transform
(:mod:`vsem_lens.core.logits`; the identity for most models, a softcap or scale for Gemma 2, Cohere, Granite).
Both readouts apply the same frame (the
lens that maps ``h_l`` into the LM-head input space; ``final_norm`` by default).

This module owns the interactive readouts: the two readouts of a tensor (:func:`vocab_affinity`,
:func:`logit_lens`) and of every layer of texts (:func:`iter_layer_readouts`, :func:`layerwise_affinity`).
The statistics per (layer, token) (rank, probability, score and KL of the final top-1 token, top-k) come
from the one readout engine, :class:`~vsem_lens.readout.kernel.ReadoutKernel`, in bounded memory.

Example:
    >>> df = layerwise_affinity(model, "The capital of France is", k=3)  # doctest: +SKIP
    >>> df.query("layer == 29").iloc[-1][["lens_top1", "affinity_top1"]]  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Iterator, Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..core.capture import iter_capture
from ..core.errors import InputError, check_layer_index
from ..core.models import HookedModel
from ..lenses.base import Lens
from ..lenses.frames import resolve_frame
from .basis import SemanticBasis
from .kernel import READOUT_MAX_ROWS, READOUTS, Readout, ReadoutKernel
from .scores import VocabScores, vocabulary_strings

__all__ = [
    "iter_layer_readouts",
    "layerwise_affinity",
    "logit_lens",
    "vocab_affinity",
    "vocabulary_strings",
]


def vocab_affinity(
    h: Float[Tensor, "... d_model"], basis: SemanticBasis
) -> Float[VocabScores, "... d_vocab"]:
    """Cosine of each row of ``h`` with every semantic basis vector (zero rows give zeros).

    ``h`` must already be in the basis's frame (see :meth:`SemanticBasis.project`). The result is a
    tensor that speaks tokens (:class:`~vsem_lens.readout.scores.VocabScores`): ``.topk(k)`` unpacks as
    ``(values, indices)`` and shows the token strings.

    Example:
        >>> vocab_affinity(basis.project(h, layer=29), basis).shape  # doctest: +SKIP
        torch.Size([5, 49152])
        >>> vocab_affinity(basis.project(h, layer=29), basis)[-1].topk(3).to_frame()  # doctest: +SKIP
    """
    if not isinstance(h, Tensor):
        raise InputError(f"h must be a tensor of hidden states [..., d_model], got {type(h).__name__}.")
    if h.shape[-1] != basis.d_model:
        raise InputError(f"h has width {h.shape[-1]} but the basis has d_model={basis.d_model}.")
    unit = basis.unit_vectors
    h = h.to(unit.dtype)
    h_unit = h / h.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(h.dtype).tiny)
    return VocabScores.wrap(h_unit @ unit.T, basis.model, "affinity")


def logit_lens(
    h: Float[Tensor, "... d_model"],
    model: HookedModel,
    *,
    layer: int = -1,
    frame: str | Lens = "final_norm",
) -> Float[VocabScores, "... d_vocab"]:
    """Logit lens: the model's logits of ``lens(h)`` (``final_norm`` frame: ``LN_f(h) W_U + b_U``, then the
    model's output-logit transform, e.g. Gemma 2's softcap; at the last layer these are the model's logits),
    as a tensor that speaks tokens (:class:`~vsem_lens.readout.scores.VocabScores`).

    Example:
        >>> logit_lens(acts.layer("resid_post", 20), model).argmax(-1)  # doctest: +SKIP
        >>> logit_lens(acts.layer("resid_post", 20), model)[-1].topk(3)   # doctest: +SKIP
    """
    lens = resolve_frame(frame, model)
    return VocabScores.wrap(model.unembed(lens(h, check_layer_index(layer, model.n_layers))), model, "lens")


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
    max_rows: int = READOUT_MAX_ROWS,
    progress: bool = False,
) -> Iterator[Readout]:
    """Stream per-layer readout statistics batch by batch (see :func:`layerwise_affinity`), one
    :class:`~vsem_lens.readout.kernel.Readout` ([layer, token] tensors) per batch.

    ``max_rows`` bounds the rows (tokens x layers) of one fused product, hence the memory
    (``max_rows x d_vocab`` floats); the results do not depend on it.

    Example:
        >>> for out in iter_layer_readouts(model, corpus, k=1):  # doctest: +SKIP
        ...     print(out.readouts["lens"]["kl_bits"].mean(dim=1))
    """
    kernel = ReadoutKernel.for_model(
        model, basis=basis, frame=frame, layers=layers, readouts=readouts, k=k, max_rows=max_rows
    )
    for batch in iter_capture(
        model, texts, layers=kernel.capture_layers, batch_size=batch_size, max_length=max_length, progress=progress
    ):
        yield kernel.read_batch(batch)


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
