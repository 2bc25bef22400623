"""The one logits path: final-norm-space vectors to the model's own next-token logits.

A model's logits are ``transform(h @ W_U + b_U)`` where ``h`` is a vector after the final norm and
``transform`` is the architecture's output-logit transform, which Hugging Face's ``*ForCausalLM.forward``
applies after the LM head: ``cap * tanh(x / cap)`` for Gemma 2/3 (``final_logit_softcapping``),
``x * logit_scale`` for Cohere / Cohere 2, ``x / logits_scaling`` for Granite, and the identity for
most models (Llama, GPT-2, ...). Every lens readout, final distribution, tuned-lens loss, sentence
log-probability and label logit in vsem-lens goes through :class:`Unembedding`, so they all equal the
model's own output at the last layer.

The semantic basis and the affinity cosines stay on ``W_U`` itself: the transform is elementwise and
strictly increasing, so it changes no ranking of the lens's scores (top-k and ranks are the same with
or without it), but it changes every probability, entropy and KL built on the logits.

Example:
    >>> import torch
    >>> head = Unembedding(torch.eye(2), None, lambda x: 2 * x)
    >>> head(torch.tensor([[1.0, -1.0]])).tolist()
    [[2.0, -2.0]]
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

Transform = Callable[[Tensor], Tensor]

#: Values on which a transform is probed: an identity returns them unchanged, any scale or softcap
#: of the kind the adapters apply changes at least the large ones.
_PROBE = (-1.0e4, -57.25, -1.5, 0.0, 0.25, 3.0, 41.75, 1.0e4)
#: Rows per in-place application of a transform (bounds its temporary to ``rows x d_vocab``).
_TRANSFORM_ROWS = 64


def effective_transform(transform: Transform | None) -> Transform | None:
    """``transform``, or ``None`` when it is the identity (probed on a few values; skips a vocabulary pass).

    Example:
        >>> effective_transform(lambda x: x) is None
        True
    """
    if transform is None:
        return None
    probe = torch.tensor(_PROBE)
    return None if torch.equal(transform(probe.clone()), probe) else transform


class Unembedding:
    """``transform(h @ W_U + b_U)``: the model's logits of vectors in the LM-head input space.

    Args:
        W_U: unembedding [d_model, d_vocab] (row convention ``logits = h @ W_U``).
        b_U: bias [d_vocab], or ``None``; an all-zero bias is dropped (saves a vocabulary pass).
        transform: the model's elementwise output-logit transform, or ``None`` (identity).
        dtype: dtype of the products (default ``W_U``'s).

    Example:
        >>> import torch
        >>> head = Unembedding(torch.eye(2), torch.tensor([0.0, 1.0]), None)
        >>> head(torch.tensor([[3.0, 4.0]])).tolist()
        [[3.0, 5.0]]
    """

    def __init__(
        self,
        W_U: Float[Tensor, "d_model d_vocab"],
        b_U: Float[Tensor, " d_vocab"] | None,
        transform: Transform | None,
        *,
        dtype: torch.dtype | None = None,
    ):
        self.dtype = dtype or W_U.dtype
        self.W_U = W_U.to(self.dtype)
        self.b_U = b_U.to(self.dtype) if b_U is not None and bool((b_U != 0).any()) else None
        self.transform = effective_transform(transform)

    @property
    def d_vocab(self) -> int:
        """Number of logits per vector."""
        return int(self.W_U.shape[1])

    def columns(self, ids: Sequence[int] | Tensor) -> "Unembedding":
        """The same path restricted to some tokens (e.g. a task's label tokens); the transform is
        elementwise, so a column subset of the logits is the logits of the column subset.

        Example:
            >>> import torch
            >>> Unembedding(torch.eye(3), None, None).columns([2, 0]).W_U.tolist()
            [[0.0, 1.0], [0.0, 0.0], [1.0, 0.0]]
        """
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.W_U.device)
        b_U = self.b_U[ids] if self.b_U is not None else None
        return Unembedding(self.W_U[:, ids], b_U, self.transform, dtype=self.dtype)

    def __call__(
        self, h: Float[Tensor, "... d_model"], *, out: Tensor | None = None
    ) -> Float[Tensor, "... d_vocab"]:
        """The logits of ``h``; with ``out`` (a 2-D buffer), written into it without another [rows, vocab]."""
        if out is not None:
            return self.apply_transform_(self.pre_transform(h, out=out))
        logits = self.pre_transform(h)
        return self.transform(logits) if self.transform is not None else logits

    def pre_transform(
        self, h: Float[Tensor, "... d_model"], *, out: Tensor | None = None
    ) -> Float[Tensor, "... d_vocab"]:
        """``h @ W_U + b_U``, before the model's transform (the tuned-lens backward needs it)."""
        h = h.to(self.dtype)
        if out is None:
            logits = h @ self.W_U
            return logits + self.b_U if self.b_U is not None else logits
        if self.b_U is not None:
            return torch.addmm(self.b_U, h, self.W_U, out=out)
        return torch.mm(h, self.W_U, out=out)

    def apply_transform_(self, logits: Float[Tensor, "rows d_vocab"]) -> Float[Tensor, "rows d_vocab"]:
        """Apply the transform to a 2-D tensor in place, a few rows at a time (bounded temporaries)."""
        if self.transform is None:
            return logits
        flat = logits.view(-1, logits.shape[-1])
        for start in range(0, flat.shape[0], _TRANSFORM_ROWS):
            part = flat[start : start + _TRANSFORM_ROWS]
            part.copy_(self.transform(part))
        return logits

    def transform_backward(
        self, pre: Float[Tensor, "... d_vocab"], grad: Float[Tensor, "... d_vocab"]
    ) -> Float[Tensor, "... d_vocab"]:
        """The gradient with respect to the pre-transform logits ``pre``, given the gradient ``grad``
        with respect to the logits (``grad`` itself when there is no transform).

        Example:
            >>> import torch
            >>> head = Unembedding(torch.eye(1), None, lambda x: 3 * x)
            >>> head.transform_backward(torch.ones(1, 1), torch.ones(1, 1)).tolist()
            [[3.0]]
        """
        if self.transform is None:
            return grad
        with torch.enable_grad():
            x = pre.detach().requires_grad_(True)
            (out,) = torch.autograd.grad(self.transform(x), x, grad.to(x.dtype))
        return out


def final_distribution(
    h_last: Float[Tensor, "token d_model"], final_norm: Any, unembedding: Unembedding, *, top1: bool = True,
) -> tuple[Float[Tensor, "token d_vocab"], Float[Tensor, " token"], Int[Tensor, " token"] | None]:
    """The model's next-token distribution from last-layer residuals, in the unembedding's dtype.

    The logits go through the model's one logits path (:meth:`~vsem_lens.core.models.HookedModel.unembedding`,
    output-logit transform included), so they equal the model's own. Returns ``p`` [token, vocab],
    ``sum_v p log p`` [token] (the negative entropy, nats) and the top-1 ids (``None`` with
    ``top1=False``, which saves a full-vocabulary argmax): the targets of every KL readout and of
    tuned-lens training.

    Example:
        >>> p, neg_entropy, top1 = final_distribution(h, model.final_norm, model.unembedding())  # doctest: +SKIP
    """
    logp = torch.log_softmax(unembedding(final_norm(h_last)), dim=-1)
    p = logp.exp()
    neg_entropy = torch.bmm(p.unsqueeze(1), logp.unsqueeze(2)).reshape(-1)
    return p, neg_entropy, logp.argmax(dim=-1) if top1 else None
