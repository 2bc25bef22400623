"""Vocabulary scores that speak tokens: a ``[..., d_vocab]`` tensor that decodes its own top-k.

:func:`~vsem_lens.readout.affinity.vocab_affinity` and :func:`~vsem_lens.readout.affinity.logit_lens`
return a :class:`VocabScores`: a ``torch.Tensor`` subclass, so every tensor operation works as before
(arithmetic and reductions give plain tensors; indexing, ``.to``, ``.float()``, ``.detach()``, ``.clone()``
keep the vocabulary while the last axis is still the vocabulary). What it adds is the token strings:
``scores.topk(k)`` still unpacks as ``(values, indices)`` like ``torch.topk``, and is a :class:`TopTokens`
whose :meth:`TopTokens.to_frame` is the tidy table (position, rank, token, id, score) and which draws
itself in Jupyter as a position x rank grid of tokens. The strings are decoded once per model
(:func:`vocabulary_strings`) and only when shown.

Example:
    >>> top = vocab_affinity(h, basis)[-1].topk(5)      # doctest: +SKIP
    >>> values, ids = top                               # doctest: +SKIP
    >>> top.to_frame()                                  # doctest: +SKIP
       rank   token    id     score
    0     0   Paris  7042  0.183...
"""

from __future__ import annotations

import copy
import html
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from ..core.models import HookedModel
from ..core.tokens import display_token

__all__ = ["TopTokens", "VocabScores", "vocabulary_strings"]

#: Kinds of score, as the tables and pictures name them.
SCORE_NAMES = {"affinity": "cosine", "lens": "logit"}
#: Positions and ranks drawn by the HTML summaries (the tables hold everything).
HTML_MAX_POSITIONS = 64
HTML_TOP_K = 5


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


def _token_of(model: HookedModel | None, token_id: int) -> str | None:
    return None if model is None else vocabulary_strings(model)[token_id]


class VocabScores(Tensor):
    """A ``[..., d_vocab]`` score tensor (cosines or logits) that knows its model's vocabulary.

    Made by :meth:`wrap`; used like any tensor. ``kind`` is ``"affinity"`` (cosines) or ``"lens"``
    (logits); ``model`` decodes the ids (``None``: ids only, e.g. for a basis loaded without its model).

    Example:
        >>> scores = logit_lens(acts.layer("resid_post", 29), model)   # doctest: +SKIP
        >>> scores.softmax(-1).sum(-1)                                 # doctest: +SKIP
        tensor([1.0000, 1.0000, 1.0000, 1.0000, 1.0000])
        >>> scores[-1].topk(3).to_frame().token.tolist()               # doctest: +SKIP
        [' Paris', ' the', ' a']
    """

    model: HookedModel | None
    kind: str

    @staticmethod
    def wrap(scores: Tensor, model: HookedModel | None, kind: str) -> "VocabScores":
        """``scores`` (not copied) as a :class:`VocabScores` of ``model``'s vocabulary."""
        out = scores.as_subclass(VocabScores)
        out.model, out.kind = model, kind
        return out

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        source = args[0] if args and isinstance(args[0], VocabScores) else None
        if (source is not None and func in _KEEPS_VOCABULARY and isinstance(out, Tensor)
                and out.ndim >= 1 and out.shape[-1] == source.shape[-1]):
            return VocabScores.wrap(out, getattr(source, "model", None), getattr(source, "kind", "affinity"))
        return out

    def __deepcopy__(self, memo: dict) -> "VocabScores":
        # A copy of the scores that shares the model (the default would try new_empty on the subclass).
        return VocabScores.wrap(copy.deepcopy(self.as_tensor(), memo), getattr(self, "model", None), self.kind)

    def __reduce_ex__(self, protocol: int):
        # Pickled (and torch.save'd) as a plain tensor: the file must not carry the whole model.
        return self.as_tensor().__reduce_ex__(protocol)

    def as_tensor(self) -> Tensor:
        """The scores as a plain ``torch.Tensor`` (same storage)."""
        return self.as_subclass(Tensor)

    def topk(self, k: int, dim: int = -1, largest: bool = True, sorted: bool = True):  # noqa: A002 - torch's name
        """``torch.topk`` over the vocabulary, as a :class:`TopTokens` (unpacks as ``values, indices``).

        Over another axis (``dim`` not the last) this is plain ``torch.topk``.
        """
        plain = self.as_tensor()
        result = plain.topk(k, dim=dim, largest=largest, sorted=sorted)
        if dim not in (-1, plain.ndim - 1):
            return result
        return TopTokens(result.values, result.indices, model=getattr(self, "model", None),
                         kind=getattr(self, "kind", "affinity"))

    def _repr_html_(self) -> str:
        if self.ndim > 2:
            return f"<pre>{html.escape(repr(self.as_tensor()))}</pre>"
        head = (f"<b>VocabScores</b> {list(self.shape)} · {html.escape(self.kind)} "
                f"({SCORE_NAMES.get(self.kind, 'score')}s over the vocabulary) · top {HTML_TOP_K} per position")
        return self.topk(min(HTML_TOP_K, self.shape[-1]))._grid_html(head)


_KEEPS_VOCABULARY = {
    Tensor.__getitem__, Tensor.to, Tensor.cpu, Tensor.cuda, Tensor.float, Tensor.double, Tensor.half,
    Tensor.bfloat16, Tensor.detach, Tensor.clone, Tensor.contiguous,
}


class TopTokens(tuple):
    """The top-k of :class:`VocabScores`: ``(values, indices)`` like ``torch.topk``, plus their tokens.

    Example:
        >>> values, ids = scores[-1].topk(5)          # doctest: +SKIP
        >>> scores.topk(3).to_frame().head(3)         # doctest: +SKIP
    """

    def __new__(cls, values: Tensor, indices: Tensor, *, model: HookedModel | None, kind: str) -> "TopTokens":
        """The pair ``(values, indices)``, decoded through ``model``'s vocabulary."""
        out = super().__new__(cls, (values, indices))
        out.model, out.kind = model, kind
        return out

    @property
    def values(self) -> Tensor:
        """``[..., k]`` scores, best first."""
        return self[0]

    @property
    def indices(self) -> Tensor:
        """``[..., k]`` token ids."""
        return self[1]

    @property
    def tokens(self) -> list:
        """Token strings with the shape of ``indices`` (nested lists; ``None`` without a vocabulary)."""
        def decode(ids: Any) -> Any:
            return [decode(i) for i in ids] if isinstance(ids, list) else _token_of(self.model, ids)
        return decode(self.indices.tolist())

    def to_frame(self) -> pd.DataFrame:
        """One row per (position, rank): ``position`` (one column per leading axis: ``position`` for 2-D
        scores, ``dim_0, dim_1, ...`` before it for more), ``rank`` (0 = best), ``token``, ``id``, ``score``.
        """
        k = self.indices.shape[-1]
        lead = list(self.indices.shape[:-1])
        names = [f"dim_{i}" for i in range(len(lead) - 1)] + (["position"] if lead else [])
        grid = torch.cartesian_prod(*[torch.arange(n) for n in [*lead, k]]) if lead else torch.arange(k)[:, None]
        ids = self.indices.reshape(-1).tolist()
        columns: dict[str, Any] = {name: grid[:, i].numpy() for i, name in enumerate(names)}
        columns["rank"] = grid[:, -1].numpy()
        columns["token"] = [_token_of(self.model, i) for i in ids]
        columns["id"] = ids
        columns["score"] = self.values.detach().reshape(-1).float().cpu().numpy()
        return pd.DataFrame(columns)

    def __repr__(self) -> str:
        return (f"TopTokens(values={self.values!r},\n          indices={self.indices!r},\n"
                f"          tokens={self.tokens!r})")

    def _grid_html(self, head: str) -> str:
        if self.indices.ndim > 2:
            return f"<div>{head}</div><pre>{html.escape(self.to_frame().to_string(max_rows=40))}</pre>"
        values, ids = self.values.detach().float().cpu(), self.indices
        if ids.ndim == 1:
            values, ids = values[None], ids[None]
        more = f"<div>... {ids.shape[0] - HTML_MAX_POSITIONS} more position(s)</div>" if ids.shape[0] > HTML_MAX_POSITIONS else ""
        rows = []
        for position in range(min(ids.shape[0], HTML_MAX_POSITIONS)):
            cells = "".join(
                f"<td title='id {int(i)}'><code>{self._display(int(i))}</code> <small>{float(v):.3g}</small></td>"
                for v, i in zip(values[position], ids[position])
            )
            rows.append(f"<tr><th>{position}</th>{cells}</tr>")
        ranks = "".join(f"<th>{r}</th>" for r in range(ids.shape[-1]))
        return (f"<div class='vsem-scores'><div>{head}</div><table><tr><th>position</th>{ranks}</tr>"
                f"{''.join(rows)}</table>{more}</div>")

    def _display(self, token_id: int) -> str:
        token = _token_of(self.model, token_id)
        return f"#{token_id}" if token is None else display_token(token, max_chars=24)

    def _repr_html_(self) -> str:
        head = (f"<b>TopTokens</b> k={self.indices.shape[-1]} · {html.escape(self.kind)} "
                f"({SCORE_NAMES.get(self.kind, 'score')}s), columns are ranks")
        return self._grid_html(head)
