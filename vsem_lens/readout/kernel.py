"""The readout kernel: full-vocabulary readouts of every layer of captured residuals, in bounded memory.

This module owns the one engine behind every readout of the package (:func:`~vsem_lens.readout.affinity.
layerwise_affinity`, :func:`~vsem_lens.readout.affinity.iter_layer_readouts` and the report's corpus
statistics) and its one result type, :class:`Readout` (layout ``[layer, token, ...]``).

Per (layer, token), a readout maps the residual ``h_l`` through a lens and compares it with the model's
final next-token distribution ``p`` (its output logits at the same position): top-k tokens and scores,
the rank of the final top-1 token (0 = also the readout's top-1), its probability and score under the
readout, and ``KL(p || q)`` in bits. Kinds: ``"lens"`` (the model's logits of ``lens(h)``, the logit
lens) and ``"affinity"`` (cosine of ``lens(h)`` with the unit semantic basis vectors; see
docs/concepts/affinity.md). Work is done over chunks of ``tokens x layers`` rows (at most
:data:`READOUT_MAX_ROWS`), so memory is one ``[rows, d_vocab]`` buffer and a [layers, tokens, vocab]
tensor is never built.

Example:
    >>> kernel = ReadoutKernel.for_model(model, basis=basis, k=3)                         # doctest: +SKIP
    >>> batch = next(iter_capture(model, ["The capital of France is"], layers=kernel.capture_layers))  # doctest: +SKIP
    >>> kernel.read_batch(batch).readouts["lens"]["final_rank"].shape  # [layer, token]   # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..core.capture import ActivationBatch, check_layers
from ..core.errors import InputError, check_positive_int
from ..core.logits import final_distribution
from ..core.models import HookedModel
from ..lenses.base import Lens
from ..lenses.frames import resolve_frame
from .basis import SemanticBasis

LN2 = math.log(2.0)
#: Readout kinds.
READOUTS = ("affinity", "lens")
#: Per-readout statistics of a :class:`Readout` (plus ``top_ids``/``top_scores`` when ``k`` > 0).
READOUT_KEYS = ("final_rank", "final_prob", "final_score", "kl_bits")
#: Elements of the readout buffer ([rows, d_vocab] float32; 2**25 elements = 128 MiB).
READOUT_BUFFER_ELEMENTS = 2**25
#: Upper bound on rows per readout product (larger products barely run faster on CPU).
READOUT_MAX_ROWS = 512
#: Rows per post-processing sub-chunk (log-softmax, KL, rank): small enough to stay in the CPU caches.
SUB_ROWS = 32


@dataclass
class Readout:
    """Readout statistics of some tokens at every read layer; every tensor is ``[layer, token, ...]``.

    ``readouts[name]`` (name: ``affinity``, ``lens``, or a report's ``tuned_lens``) holds ``final_rank``
    (int64; number of strictly larger scores than the final top-1's), ``final_prob``, ``final_score``
    (the final top-1's score; a cosine for affinity), ``kl_bits`` (KL(final || readout)) [L, T] and, when
    read with ``k`` > 0, ``top_ids``/``top_scores`` [L, T, k]. The token fields describe where the tokens
    come from when read from a captured batch (``None`` otherwise).

    Example:
        >>> out = kernel.read_batch(batch)                              # doctest: +SKIP
        >>> out.readouts["lens"]["kl_bits"].mean(dim=1)  # per layer    # doctest: +SKIP
    """

    layers: list[int]
    final_ids: Int[Tensor, " token"]
    final_entropy_bits: Float[Tensor, " token"]
    readouts: dict[str, dict[str, Tensor]]
    doc_index: Int[Tensor, " token"] | None = None
    positions: Int[Tensor, " token"] | None = None
    token_ids: Int[Tensor, " token"] | None = None


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
    ``[SUB_ROWS, vocab]`` one, whatever the number of tokens.

    Args:
        model: the hooked model (its :meth:`~vsem_lens.core.models.HookedModel.unembedding` and ``final_norm``).
        layers: the layers read out (validated by the caller; see :meth:`for_model`).
        readouts: ``{name: (kind, lens)}`` with kind ``"lens"`` (the model's logits of ``lens(h)``) or
            ``"affinity"`` (cosine of ``lens(h)`` with the unit semantic bases).
        unit_vectors: unit semantic basis vectors [d_vocab, d_model]; needed for affinity readouts.
        k: default number of top tokens returned by :meth:`read` and :meth:`read_batch`.

    Example:
        >>> kernel = ReadoutKernel(model, range(30), {"lens": ("lens", FinalNormLens(model))})  # doctest: +SKIP
        >>> out = kernel.read(resid, rows=list(range(30)), last=29, k=5)                        # doctest: +SKIP
        >>> out.readouts["lens"]["kl_bits"].shape   # [layer, token]                           # doctest: +SKIP
    """

    def __init__(
        self,
        model: HookedModel,
        layers: Sequence[int],
        readouts: dict[str, tuple[str, Lens]],
        *,
        unit_vectors: Tensor | None = None,
        k: int = 0,
        max_rows: int = READOUT_MAX_ROWS,
        buffer_elements: int = READOUT_BUFFER_ELEMENTS,
    ) -> None:
        for name, (kind, _) in readouts.items():
            if kind not in READOUTS:
                raise InputError(f"unknown readout kind {kind!r} for {name!r}; choose from {', '.join(READOUTS)}.")
            if kind == "affinity" and unit_vectors is None:
                raise InputError("affinity readouts need the unit semantic basis vectors (unit_vectors=...).")
        check_positive_int(max_rows, "max_rows")
        self.layers = list(layers)
        self.last = model.n_layers - 1
        #: The layers a batch must hold: the read layers plus the last one (the final distribution).
        self.capture_layers = sorted(set(self.layers) | {self.last})
        self.readouts = dict(readouts)
        self.names = list(self.readouts)
        self.k = k
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

    @classmethod
    def for_model(
        cls,
        model: HookedModel,
        *,
        basis: SemanticBasis | None = None,
        frame: str | Lens | None = None,
        layers: int | Sequence[int] | None = None,
        readouts: Sequence[str] = READOUTS,
        k: int = 5,
        max_rows: int = READOUT_MAX_ROWS,
    ) -> ReadoutKernel:
        """The kernel of the readouts ``readouts`` (kinds) of ``layers`` through ``frame`` (validated).

        ``frame`` defaults to the basis's frame (``final_norm`` without a basis); the semantic basis is
        built when an affinity readout needs it and none is given.

        Example:
            >>> kernel = ReadoutKernel.for_model(model, readouts=("lens",), k=1)   # doctest: +SKIP
        """
        for name in readouts:
            if name not in READOUTS:
                raise InputError(f"unknown readout {name!r}; choose from {', '.join(READOUTS)}.")
        if check_positive_int(k, "k") > model.d_vocab:
            raise InputError(f"k must be between 1 and {model.d_vocab}, got {k}.")
        check_positive_int(max_rows, "max_rows")
        if frame is None:
            frame = basis.frame if basis is not None else "final_norm"
        basis, lens = basis_and_lens(model, frame, basis, build_basis="affinity" in readouts)
        kernel = cls(
            model,
            check_layers(layers, model.n_layers),
            {name: (name, lens) for name in readouts},
            unit_vectors=basis.unit_vectors if basis is not None else None,
            k=k,
            max_rows=max_rows,
        )
        kernel.frame = lens.frame
        return kernel

    def _buffers(self) -> tuple[Tensor, Tensor]:
        if self._buffers_ is None:
            make = lambda rows: torch.empty(rows, self.d_vocab, dtype=self.W_U.dtype, device=self.W_U.device)  # noqa: E731
            sub_rows = max(1, SUB_ROWS // len(self.layers)) * len(self.layers)
            self._buffers_ = (make(self._rows), make(min(self._rows, sub_rows)))
        return self._buffers_

    def release(self) -> None:
        """Free the buffers (they are re-made on the next call).

        Example:
            >>> kernel.release()   # doctest: +SKIP
        """
        self._buffers_ = None

    def rows_of(self, batch_layers: Sequence[int]) -> tuple[list[int], int]:
        """Where the read layers and the last layer sit in activations captured at ``batch_layers``.

        Raises:
            InputError: a layer of :attr:`capture_layers` is missing.

        Example:
            >>> kernel.rows_of(batch.layers)   # doctest: +SKIP
            ([0, 1, 2], 2)
        """
        index = {layer: i for i, layer in enumerate(batch_layers)}
        missing = sorted(set(self.capture_layers) - set(index))
        if missing:
            raise InputError(f"the activations lack layers {missing}; capture layers {self.capture_layers}.")
        return [index[layer] for layer in self.layers], index[self.last]

    def _fill_scores(self, x: Tensor, rows: Sequence[int], name: str, scores: Tensor) -> None:
        """Write readout ``name``'s scores of the tokens of ``x`` into ``scores`` [token x layer, vocab]."""
        kind, lens = self.readouts[name]
        # Token-major rows [token, layer]: each token's final distribution applies to its L rows.
        h = torch.stack([lens(x[row], layer) for row, layer in zip(rows, self.layers)], dim=1)
        h = h.reshape(x.shape[1] * len(self.layers), -1).to(self.W_U.dtype)
        if kind == "affinity":
            h = h / h.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(h.dtype).tiny)
            torch.mm(h, self.unit_T, out=scores)
        else:
            self.unembedding(h, out=scores)

    @torch.no_grad()
    def iter_scores(
        self, x: Float[Tensor, "layer token d_model"], rows: Sequence[int], last: int, name: str
    ) -> Iterator[tuple[Float[Tensor, "token layer d_vocab"], Float[Tensor, "token d_vocab"], Float[Tensor, " token"]]]:
        """Readout ``name``'s full-vocabulary scores, chunk by chunk, with the final distribution.

        Yields, per chunk of at most :attr:`tokens_per_chunk` tokens: the scores [token, layer, vocab] (a view
        of the kernel's buffer, overwritten by the next chunk), the model's final distribution ``p``
        [token, vocab] and ``sum_v p log p`` [token] (nats). For statistics the kernel does not compute
        (e.g. :mod:`vsem_lens.readout.temperature`), with the same scores as :meth:`read`.

        Example:
            >>> for scores, p, neg_entropy in kernel.iter_scores(resid, rows, last, "affinity"):  # doctest: +SKIP
            ...     print(scores.shape)
        """
        if name not in self.readouts:
            raise InputError(f"unknown readout {name!r}; this kernel has {', '.join(self.names)}.")
        n_layers = len(self.layers)
        for start in range(0, x.shape[1], self.tokens_per_chunk):
            chunk = x[:, start : start + self.tokens_per_chunk]
            p, neg_entropy, _ = final_distribution(chunk[last], self.final_norm, self.unembedding, top1=False)
            scores = self._buffers()[0][: chunk.shape[1] * n_layers]
            self._fill_scores(chunk, rows, name, scores)
            yield scores.view(chunk.shape[1], n_layers, self.d_vocab), p, neg_entropy

    @torch.no_grad()
    def _chunk(
        self, x: Tensor, rows: Sequence[int], last: int, k: int, names: Sequence[str]
    ) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
        """Readouts of at most :attr:`tokens_per_chunk` tokens, as [token, layer, ...] tensors."""
        t, n_layers, V = x.shape[1], len(self.layers), self.d_vocab
        final_p, neg_entropy, final_ids = final_distribution(x[last], self.final_norm, self.unembedding)
        finals = {"final_ids": final_ids, "final_entropy_bits": -neg_entropy / LN2}
        scores_buffer, small = self._buffers()
        scores = scores_buffer[: t * n_layers]
        sub_tokens = max(1, SUB_ROWS // n_layers)
        target_index = final_ids.view(t, 1, 1).expand(t, n_layers, 1)
        results: dict[str, dict[str, Tensor]] = {}
        for name in names:
            self._fill_scores(x, rows, name, scores)
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
            values["final_rank"] = torch.cat(rank_parts).long()
            values["final_prob"] = torch.cat(target_parts).exp()
            values["final_score"] = target_score
            values["kl_bits"] = (neg_entropy.unsqueeze(1) - cross).clamp_min(0.0) / LN2
            results[name] = values
        return finals, results

    def _empty(self, k: int, names: Sequence[str]) -> Readout:
        n_layers, device = len(self.layers), self.W_U.device
        empty = {"final_rank": torch.empty(n_layers, 0, dtype=torch.long, device=device),
                 **{key: torch.empty(n_layers, 0, dtype=self.dtype, device=device) for key in READOUT_KEYS[1:]}}
        if k:
            empty["top_ids"] = torch.empty(n_layers, 0, k, dtype=torch.long, device=device)
            empty["top_scores"] = torch.empty(n_layers, 0, k, dtype=self.dtype, device=device)
        return Readout(
            layers=list(self.layers),
            final_ids=torch.empty(0, dtype=torch.long, device=device),
            final_entropy_bits=torch.empty(0, dtype=self.dtype, device=device),
            readouts={name: dict(empty) for name in names},
        )

    @torch.no_grad()
    def read(
        self, x: Float[Tensor, "layer token d_model"], rows: Sequence[int], last: int, *, k: int | None = None,
        names: Sequence[str] | None = None,
    ) -> Readout:
        """Readouts of any number of tokens, chunk by chunk (zero tokens give empty tensors).

        Args:
            x: residuals; ``x[rows[i]]`` is layer ``layers[i]`` and ``x[last]`` the last layer (:meth:`rows_of`).
            k: top-k tokens to return (default :attr:`k`; 0: none).
            names: the readouts to compute (default all).

        Example:
            >>> out = kernel.read(resid, rows=list(range(30)), last=29, k=5)  # doctest: +SKIP
            >>> out.readouts["lens"]["top_ids"].shape                          # doctest: +SKIP
            torch.Size([30, 12, 5])
        """
        k = self.k if k is None else k
        names = list(self.readouts) if names is None else list(names)
        n_tok = x.shape[1]
        if n_tok == 0:
            return self._empty(k, names)
        final_parts: dict[str, list[Tensor]] = {}
        parts: dict[str, dict[str, list[Tensor]]] = {name: {} for name in names}
        for start in range(0, n_tok, self.tokens_per_chunk):
            chunk_finals, values = self._chunk(x[:, start : start + self.tokens_per_chunk], rows, last, k, names)
            for key, value in chunk_finals.items():
                final_parts.setdefault(key, []).append(value)
            for name, by_key in values.items():
                for key, value in by_key.items():
                    parts[name].setdefault(key, []).append(value)
        finals = {key: torch.cat(chunks) for key, chunks in final_parts.items()}
        return Readout(
            layers=list(self.layers),
            final_ids=finals["final_ids"],
            final_entropy_bits=finals["final_entropy_bits"],
            # [token, layer, ...] chunks -> [layer, token, ...]
            readouts={
                name: {key: torch.cat(chunks).transpose(0, 1).contiguous() for key, chunks in by_key.items()}
                for name, by_key in parts.items()
            },
        )

    def read_batch(
        self, batch: ActivationBatch, select: Tensor | None = None, *, k: int | None = None,
        names: Sequence[str] | None = None,
    ) -> Readout:
        """Readouts of a captured batch whose ``resid_post`` covers :attr:`capture_layers`;
        ``select`` (bool [token]) restricts them to some tokens.

        Example:
            >>> for batch in iter_capture(model, corpus, layers=kernel.capture_layers):  # doctest: +SKIP
            ...     out = kernel.read_batch(batch)
        """
        if not set(self.capture_layers) <= set(batch.layers):
            raise InputError(f"the batch lacks layers {sorted(set(self.capture_layers) - set(batch.layers))}.")
        resid = batch.acts["resid_post"]
        rows, last = self.rows_of(batch.layers)
        doc_index, positions, token_ids = batch.doc_index, batch.positions, batch.token_ids
        if select is not None:
            resid = resid[:, select.to(resid.device)]
            doc_index, positions, token_ids = doc_index[select], positions[select], token_ids[select]
        out = self.read(resid, rows, last, k=k, names=names)
        out.doc_index, out.positions, out.token_ids = doc_index, positions, token_ids
        return out
