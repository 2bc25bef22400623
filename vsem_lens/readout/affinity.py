"""Vocabulary-affinity (cosine) logits and the logit lens, layer by layer, in bounded memory.

Vocabulary affinity (Gu et al.'s similarity logits, docs/concepts/affinity.md): ``a_i(r) = cos(s_i, r)`` for every
semantic basis vector ``s_i``; probabilities are a softmax over the candidate set with no temperature.
Identity: ``cos(s_i, h) = u_i^T G^{-1} h / (||G^{-1} u_i|| ||h||)`` with ``G = U^T U``: a whitened,
per-token-normalised logit lens.

Logit lens (nostalgebraist 2020): ``LN_f(h_l) W_U + b_U``, then the model's output-logit transform
(:mod:`vsem_lens.core.logits`; the identity for most models, a softcap or scale for Gemma 2, Cohere, Granite).
Both readouts apply the same frame (the
lens that maps ``h_l`` into the LM-head input space; ``final_norm`` by default).

Readout statistics per (layer, token), compared with the model's final next-token distribution ``p``
(its output logits at the same position): top-k tokens and scores, the rank of the final top-1 token
(0 = also the lens's top-1), its probability under the lens, and ``KL(p || q_lens)`` in bits.
Everything is computed by :class:`ReadoutKernel` over chunks of ``tokens x layers`` rows (at most
:data:`READOUT_MAX_ROWS`), so memory is one ``[rows, d_vocab]`` buffer and a [layers, tokens, vocab]
tensor is never built.

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

from ..core.capture import ActivationBatch, check_layers, iter_capture
from ..core.errors import InputError
from ..core.logits import final_distribution
from ..core.models import HookedModel
from ..lenses.base import Lens
from ..lenses.frames import resolve_frame
from .basis import SemanticBasis

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
    """Logit lens: the model's logits of ``lens(h)`` (``final_norm`` frame: ``LN_f(h) W_U + b_U``, then the
    model's output-logit transform, e.g. Gemma 2's softcap; at the last layer these are the model's logits).

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


#: Elements of the readout buffer ([rows, d_vocab] float32; 2**25 elements = 128 MiB).
READOUT_BUFFER_ELEMENTS = 2**25
#: Upper bound on rows per readout product (larger products barely run faster on CPU).
READOUT_MAX_ROWS = 512
#: Rows per post-processing sub-chunk (log-softmax, KL, rank): small enough to stay in the CPU caches.
SUB_ROWS = 32


class ReadoutKernel:
    """Fused full-vocabulary readouts of every layer of a chunk of tokens (the hot loop of all readouts).

    Per chunk of ``t`` tokens, the residuals of all layers are stacked token-major into
    ``[t x layers, d]`` and multiplied into one preallocated ``[rows, vocab]`` buffer (a large,
    compute-bound product); then, per sub-chunk of ~:data:`SUB_ROWS` rows that stays in the CPU
    caches, an out-of-place log-softmax into a small buffer, one batched product with the final
    distribution (cross-entropy, hence KL), and the rank as a comparison with the gathered target
    score written over that small buffer and summed. This runs at close to the cost of the bare
    products of the same shapes (``benchmarks/bench_core.py --only readouts``), where one pass per
    statistic over a ``[tokens, vocab]`` buffer in DRAM costs about twice as much.

    Memory: the ``[rows, vocab]`` buffer (at most :data:`READOUT_BUFFER_ELEMENTS` elements) plus a
    ``[SUB_ROWS, vocab]`` one, whatever the corpus.

    Args:
        model: the hooked model (its :meth:`~vsem_lens.core.models.HookedModel.unembedding` and ``final_norm``).
        layers: the layers read out (validated by the caller).
        readouts: ``{name: (kind, lens)}`` with kind ``"lens"`` (the model's logits of ``lens(h)``) or
            ``"affinity"`` (cosine of ``lens(h)`` with the unit semantic bases).
        unit_vectors: unit semantic basis vectors [d_vocab, d_model]; needed for affinity readouts.

    Example:
        >>> kernel = ReadoutKernel(model, range(30), {"lens": ("lens", FinalNormLens(model))})  # doctest: +SKIP
        >>> finals, values = kernel(resid, rows=list(range(30)), last=29, k=5)                 # doctest: +SKIP
        >>> values["lens"]["kl_bits"].shape   # [token, layer]                                 # doctest: +SKIP
    """

    def __init__(
        self,
        model: HookedModel,
        layers: Sequence[int],
        readouts: dict[str, tuple[str, Lens]],
        *,
        unit_vectors: Tensor | None = None,
        max_rows: int = READOUT_MAX_ROWS,
        buffer_elements: int = READOUT_BUFFER_ELEMENTS,
    ) -> None:
        for name, (kind, _) in readouts.items():
            if kind not in READOUTS:
                raise InputError(f"unknown readout kind {kind!r} for {name!r}; choose from {', '.join(READOUTS)}.")
            if kind == "affinity" and unit_vectors is None:
                raise InputError("affinity readouts need the unit semantic basis vectors (unit_vectors=...).")
        self.layers = list(layers)
        self.readouts = dict(readouts)
        self.unembedding = model.unembedding()
        self.dtype, self.W_U = self.unembedding.dtype, self.unembedding.W_U
        self.unit_T = (
            unit_vectors.T.to(device=self.W_U.device, dtype=self.dtype) if unit_vectors is not None else None
        )
        self.final_norm = model.final_norm
        self.d_vocab = model.d_vocab
        rows = max(1, min(max_rows, buffer_elements // self.d_vocab))
        #: Tokens per fused product (rows = tokens_per_chunk x layers).
        self.tokens_per_chunk = max(1, rows // len(self.layers))
        self._rows = self.tokens_per_chunk * len(self.layers)
        self._buffers_: tuple[Tensor, Tensor] | None = None

    def _buffers(self) -> tuple[Tensor, Tensor]:
        if self._buffers_ is None:
            make = lambda rows: torch.empty(rows, self.d_vocab, dtype=self.W_U.dtype, device=self.W_U.device)  # noqa: E731
            sub_rows = max(1, SUB_ROWS // len(self.layers)) * len(self.layers)
            self._buffers_ = (make(self._rows), make(min(self._rows, sub_rows)))
        return self._buffers_

    def release(self) -> None:
        """Free the buffers (they are re-made on the next call)."""
        self._buffers_ = None

    @torch.no_grad()
    def __call__(
        self, x: Float[Tensor, "layer token d_model"], rows: Sequence[int], last: int, *, k: int = 0,
        names: Sequence[str] | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
        """Readouts of at most :attr:`tokens_per_chunk` tokens.

        Args:
            x: residuals; ``x[rows[i]]`` is layer ``layers[i]`` and ``x[last]`` the last layer.
            k: top-k tokens to return (0: none).
            names: the readouts to compute (default all).

        Returns:
            ``finals`` (``final_ids`` [t], ``final_entropy_bits`` [t]) and per readout name a dict of
            [t, layer] tensors: ``rank`` (float64; strictly larger scores than the final top-1's),
            ``prob``, ``kl_bits`` (KL(final || readout)), ``target_score`` (the final top-1's score;
            a cosine for affinity) and, when ``k``, ``top_ids``/``top_scores`` [t, layer, k].
        """
        t, n_layers, V = x.shape[1], len(self.layers), self.d_vocab
        if t > self.tokens_per_chunk:
            raise InputError(f"at most {self.tokens_per_chunk} tokens per call, got {t}.")
        final_p, neg_entropy, final_ids = final_distribution(x[last], self.final_norm, self.unembedding)
        finals = {"final_ids": final_ids, "final_entropy_bits": -neg_entropy / LN2}
        scores_buffer, small = self._buffers()
        scores = scores_buffer[: t * n_layers]
        sub_tokens = max(1, SUB_ROWS // n_layers)
        target_index = final_ids.view(t, 1, 1).expand(t, n_layers, 1)
        results: dict[str, dict[str, Tensor]] = {}
        for name, (kind, lens) in self.readouts.items():
            if names is not None and name not in names:
                continue
            # Token-major rows [token, layer]: each token's final distribution applies to its L rows.
            h = torch.stack([lens(x[row], layer) for row, layer in zip(rows, self.layers)], dim=1)
            h = h.reshape(t * n_layers, -1).to(self.W_U.dtype)
            if kind == "affinity":
                h = h / h.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(h.dtype).tiny)
                torch.mm(h, self.unit_T, out=scores)
            else:
                self.unembedding(h, out=scores)
            grid = scores.view(t, n_layers, V)
            target_score = grid.gather(2, target_index).squeeze(2)  # [t, L]
            values: dict[str, Tensor] = {}
            if k:
                top_scores, top_ids = scores.topk(k, dim=-1)
                values["top_ids"] = top_ids.view(t, n_layers, k)
                values["top_scores"] = top_scores.view(t, n_layers, k)
            cross_parts, target_parts, rank_parts = [], [], []
            for a in range(0, t, sub_tokens):
                b = min(t, a + sub_tokens)
                block = small[: (b - a) * n_layers]
                torch.log_softmax(scores[a * n_layers : b * n_layers], dim=-1, out=block)
                block_grid = block.view(b - a, n_layers, V)
                target_parts.append(block_grid.gather(2, target_index[a:b]).squeeze(2))
                cross_parts.append(torch.bmm(block_grid, final_p[a:b].unsqueeze(2)).squeeze(2))
                # Rank = number of strictly larger scores, counted as a float sum over the small buffer.
                rank_parts.append(torch.gt(grid[a:b], target_score[a:b].unsqueeze(2), out=block_grid).sum(dim=2))
            cross = torch.cat(cross_parts)  # sum_v p_v log q_v, [t, L]
            values["rank"] = torch.cat(rank_parts).to(torch.float64)
            values["prob"] = torch.cat(target_parts).exp()
            values["kl_bits"] = (neg_entropy.unsqueeze(1) - cross).clamp_min(0.0) / LN2
            values["target_score"] = target_score
            results[name] = values
        return finals, results

    def read(
        self, x: Float[Tensor, "layer token d_model"], rows: Sequence[int], last: int, *, k: int = 0,
        names: Sequence[str] | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
        """Readouts of any number of tokens (chunk by chunk), keyed and shaped as in :class:`ReadoutBatch`.

        Returns ``finals`` (``final_ids``, ``final_entropy_bits`` [token]) and per readout name
        ``final_rank`` (int64), ``final_prob``, ``final_score``, ``kl_bits`` [layer, token] and, when
        ``k``, ``top_ids``/``top_scores`` [layer, token, k]. Zero tokens give empty tensors.

        Example:
            >>> finals, values = kernel.read(resid, rows=list(range(30)), last=29, k=5)  # doctest: +SKIP
            >>> values["lens"]["top_ids"].shape                                         # doctest: +SKIP
            torch.Size([30, 12, 5])
        """
        names = list(self.readouts) if names is None else list(names)
        n_layers, n_tok, device = len(self.layers), x.shape[1], self.W_U.device
        if n_tok == 0:
            empty = {"final_rank": torch.empty(n_layers, 0, dtype=torch.long, device=device),
                     **{key: torch.empty(n_layers, 0, dtype=self.dtype, device=device)
                        for key in ("final_prob", "final_score", "kl_bits")}}
            if k:
                empty["top_ids"] = torch.empty(n_layers, 0, k, dtype=torch.long, device=device)
                empty["top_scores"] = torch.empty(n_layers, 0, k, dtype=self.dtype, device=device)
            finals = {"final_ids": torch.empty(0, dtype=torch.long, device=device),
                      "final_entropy_bits": torch.empty(0, dtype=self.dtype, device=device)}
            return finals, {name: dict(empty) for name in names}
        final_parts: dict[str, list[Tensor]] = {}
        parts: dict[str, dict[str, list[Tensor]]] = {name: {} for name in names}
        for start in range(0, n_tok, self.tokens_per_chunk):
            chunk_finals, values = self(x[:, start : start + self.tokens_per_chunk], rows, last, k=k, names=names)
            for key, value in chunk_finals.items():
                final_parts.setdefault(key, []).append(value)
            for name, by_key in values.items():
                for key, value in by_key.items():
                    parts[name].setdefault(key, []).append(value)
        renamed = {"rank": "final_rank", "prob": "final_prob", "target_score": "final_score", "kl_bits": "kl_bits",
                   "top_ids": "top_ids", "top_scores": "top_scores"}
        readouts = {
            # [token, layer, ...] chunks -> [layer, token, ...]
            name: {renamed[key]: torch.cat(chunks).transpose(0, 1).contiguous() for key, chunks in by_key.items()}
            for name, by_key in parts.items()
        }
        for by_key in readouts.values():
            by_key["final_rank"] = by_key["final_rank"].long()
        return {key: torch.cat(chunks) for key, chunks in final_parts.items()}, readouts


def basis_and_lens(
    model: HookedModel, frame: str | Lens, basis: SemanticBasis | None = None, *, build_basis: bool = True
) -> tuple[SemanticBasis | None, Lens]:
    """The semantic basis of ``frame`` (built when not given and ``build_basis``) and the lens into it.

    A frame name equal to the basis's frame reuses the basis's own lens (so a tuned lens is loaded once);
    a :class:`Lens` (or another frame name) is resolved by :func:`~vsem_lens.lenses.frames.resolve_frame`.

    Example:
        >>> basis, lens = basis_and_lens(model, "final_norm")   # doctest: +SKIP
        >>> lens is basis.lens                                 # doctest: +SKIP
        True
    """
    if basis is None and build_basis:
        basis = SemanticBasis.from_model(model, frame=frame if isinstance(frame, str) else "final_norm")
    if basis is not None and isinstance(frame, str) and frame == basis.frame:
        return basis, basis.lens
    return basis, resolve_frame(frame, model)


class LayerReadout:
    """Readout statistics of captured residuals: the per-batch engine behind :func:`iter_layer_readouts`.

    Build it once, then call it on each :class:`~vsem_lens.core.capture.ActivationBatch` whose ``resid_post``
    covers :attr:`capture_layers` (the requested layers plus the last one, which gives the final
    distribution). A streaming analysis that already captures residuals for other statistics can
    reuse its batches instead of running the model again, optionally on a subset of tokens. The work
    is done by a :class:`ReadoutKernel` (tested against a dense float64 computation).

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
        max_rows: int = READOUT_MAX_ROWS,
    ):
        for name in readouts:
            if name not in READOUTS:
                raise InputError(f"unknown readout {name!r}; choose from {', '.join(READOUTS)}.")
        if not 1 <= k <= model.d_vocab:
            raise InputError(f"k must be between 1 and {model.d_vocab}, got {k}.")
        if max_rows < 1:
            raise InputError(f"max_rows must be at least 1, got {max_rows}.")
        if frame is None:
            frame = basis.frame if basis is not None else "final_norm"
        basis, self.lens = basis_and_lens(model, frame, basis, build_basis="affinity" in readouts)
        self.model = model
        self.frame = self.lens.frame
        self.readouts = tuple(readouts)
        self.k = k
        self.layers = check_layers(layers, model.n_layers)
        self.capture_layers = sorted(set(self.layers) | {model.n_layers - 1})
        self.kernel = ReadoutKernel(
            model,
            self.layers,
            {name: (name, self.lens) for name in self.readouts},
            unit_vectors=basis.unit_vectors if basis is not None else None,
            max_rows=max_rows,
        )

    def __call__(self, batch: ActivationBatch, select: Tensor | None = None) -> ReadoutBatch:
        """Readouts of one captured batch; ``select`` (bool [token]) restricts them to some tokens."""
        if not set(self.capture_layers) <= set(batch.layers):
            raise InputError(f"the batch lacks layers {sorted(set(self.capture_layers) - set(batch.layers))}.")
        resid = batch.acts["resid_post"]
        index = {layer: i for i, layer in enumerate(batch.layers)}
        rows, last = [index[layer] for layer in self.layers], index[self.model.n_layers - 1]
        doc_index, positions, token_ids = batch.doc_index, batch.positions, batch.token_ids
        if select is not None:
            resid = resid[:, select.to(resid.device)]
            doc_index, positions, token_ids = doc_index[select], positions[select], token_ids[select]
        finals, readout_tensors = self.kernel.read(resid, rows, last, k=self.k)
        return ReadoutBatch(
            layers=self.layers,
            doc_index=doc_index,
            positions=positions,
            token_ids=token_ids,
            final_ids=finals["final_ids"],
            final_entropy_bits=finals["final_entropy_bits"],
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
    max_rows: int = READOUT_MAX_ROWS,
    progress: bool = False,
) -> Iterator[ReadoutBatch]:
    """Stream per-layer readout statistics batch by batch (see :func:`layerwise_affinity`).

    ``max_rows`` bounds the rows (tokens x layers) of one fused product, hence the memory
    (``max_rows x d_vocab`` floats); the results do not depend on it.

    Example:
        >>> for out in iter_layer_readouts(model, corpus, k=1):  # doctest: +SKIP
        ...     print(out.readouts["lens"]["kl_bits"].mean(dim=1))
    """
    readout = LayerReadout(
        model, basis=basis, frame=frame, layers=layers, readouts=readouts, k=k, max_rows=max_rows
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
