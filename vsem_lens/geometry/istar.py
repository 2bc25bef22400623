"""The I-STAR regulariser (Rudman & Eickhoff, ICLR 2024): the differentiable penalty
``weight * (1 - IsoScore*)`` over the token states of several layers, and the reference covariance
``C0`` it shrinks towards.

IsoScore* itself lives in :mod:`vsem_lens.geometry.metrics`.

Example:
    >>> import torch
    >>> hs = torch.randn(2, 1, 6, 8, requires_grad=True)          # 2 layers, 1 text, 6 positions
    >>> istar_penalty(hs, None, zeta=0.2, weight=1.0).ndim
    0
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from jaxtyping import Float, Shaped
from torch import Tensor

from ..core.errors import InputError
from ..core.moments import Moments
from ..core.stats import as_tensor
from .metrics import isoscore_star


def istar_penalty(
    hidden_states: Float[Tensor, "layer batch pos dim"] | Sequence[Float[Tensor, "batch pos dim"]],
    mask: Shaped[Tensor, "batch pos"] | None,
    *,
    zeta: float,
    c0: Float[Tensor, "dim dim"] | None = None,
    weight: float,
    dtype: torch.dtype = torch.float64,
) -> Float[Tensor, ""]:
    """I-STAR regulariser ``weight * (1 - IsoScore*)`` of the token states of all given layers.

    The non-padding token states of *all* layers are pooled into one point cloud (the I-STAR paper
    regularises the union of the layers' token representations; pooling also gives the mini-batch
    estimate more points). Pass only the layers to regularise: the caller excludes the embedding
    output (HF ``hidden_states[1:]``).

    Sign convention: add the result to the task loss and minimise. ``weight > 0`` pushes IsoScore*
    *up* (more isotropic), ``weight < 0`` pushes it *down* (the authors' example: ``zeta=0.2,
    weight=-5``, which they found helps most tasks).

    Args:
        hidden_states: [layer, batch, pos, dim] tensor, or a sequence of [batch, pos, dim] tensors.
        mask: [batch, pos], True/1 for real tokens, False/0 for padding; None keeps every position.
        zeta, c0: shrinkage as in :func:`isoscore_star`.
        weight: the regularisation strength lambda (sign as above).
        dtype: compute dtype of the covariance (float64 default); the result has this dtype.

    Example:
        >>> hs = torch.randn(3, 2, 5, 16, requires_grad=True)       # 3 layers, 2 texts, 5 positions
        >>> mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
        >>> loss = istar_penalty(hs, mask, zeta=0.2, weight=-5.0)
        >>> loss.backward(); bool(torch.isfinite(hs.grad).all())
        True
    """
    layers = _layer_list(hidden_states)
    batch_shape = tuple(layers[0].shape[:-1])
    if mask is None:
        keep = None
    else:
        mask = as_tensor(mask, "mask")
        if tuple(mask.shape) != batch_shape:
            raise InputError(
                f"mask shape {tuple(mask.shape)} does not match the hidden states' [batch, pos] "
                f"{batch_shape}; pass the attention mask of the same batch."
            )
        keep = (mask != 0).to(layers[0].device)
    points = torch.cat([h[keep] if keep is not None else h.reshape(-1, h.shape[-1]) for h in layers])
    if points.shape[0] < 2:
        raise InputError(f"the mask keeps {points.shape[0]} token state(s); IsoScore* needs at least 2.")
    try:
        weight = float(weight)
    except (TypeError, ValueError):
        raise InputError(f"weight must be a number, got {weight!r}.") from None
    return weight * (1.0 - isoscore_star(points, zeta=zeta, c0=c0, dtype=dtype))


def _layer_list(hidden_states: Any) -> list[Tensor]:
    """Normalise the two accepted hidden-state layouts to a list of [batch, pos, dim] tensors."""
    if isinstance(hidden_states, Tensor):
        if hidden_states.ndim != 4:
            raise InputError(
                "hidden_states tensor must be [layer, batch, pos, dim], "
                f"got shape {tuple(hidden_states.shape)}; "
                "stack per-layer [batch, pos, dim] states (e.g. torch.stack(hf_out.hidden_states[1:]))."
            )
        return list(hidden_states.unbind(0))
    if not isinstance(hidden_states, Sequence) or len(hidden_states) == 0:
        raise InputError("hidden_states must be a [layer, batch, pos, dim] tensor or a non-empty list of "
                         "[batch, pos, dim] tensors.")
    layers = [as_tensor(h, "hidden_states[i]") for h in hidden_states]
    shape = tuple(layers[0].shape)
    for i, h in enumerate(layers):
        if h.ndim != 3 or tuple(h.shape) != shape:
            raise InputError(
                f"hidden_states[{i}] has shape {tuple(h.shape)}; every layer must be [batch, pos, dim] "
                f"with the same shape as hidden_states[0] {shape}."
            )
    return layers


def reference_covariance(
    batches: Iterable[
        Float[Tensor, "*batch dim"] | tuple[Float[Tensor, "*batch dim"], Shaped[Tensor, "*batch"]]
    ],
) -> Float[Tensor, "dim dim"]:
    """Reference covariance C0 for :func:`isoscore_star`, streamed over activation batches.

    Each item is a tensor [..., dim] or a ``(tensor, mask)`` pair (mask over the leading dims, 0/False =
    padding). Statistics are accumulated in float64 with :class:`Moments`, so any number of batches
    fits in memory (the authors use ~250k token states, refreshed each epoch).

    Example:
        >>> c0 = reference_covariance([torch.randn(4, 7, 16), (torch.randn(4, 7, 16), torch.ones(4, 7))])
        >>> c0.shape, c0.dtype
        (torch.Size([16, 16]), torch.float64)
    """
    moments: Moments | None = None
    for i, item in enumerate(batches):
        if isinstance(item, (tuple, list)):
            if len(item) != 2:
                raise InputError(
                    f"batch {i}: expected a tensor or a (tensor, mask) pair, got {len(item)} items."
                )
            x, mask = item
        else:
            x, mask = item, None
        x = as_tensor(x, f"batch {i}")
        if x.ndim == 0:
            raise InputError(f"batch {i} is a scalar; expected activations [..., dim].")
        if moments is None:
            moments = Moments(x.shape[-1], device=x.device)
        moments.update(x.detach(), mask)
    if moments is None:
        raise InputError("reference_covariance got no batches; pass an iterable of activation tensors.")
    return moments.cov(ddof=1)

