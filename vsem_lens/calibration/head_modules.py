"""The torch modules of the calibration heads: the CBAM/SE channel gate, the clustering module
``LN(MLP(r * CA(r)))`` and the authors' encoder/decoder prototype (the architecture and the reading of
``avg``/``max`` are explained in :mod:`vsem_lens.calibration.heads`).

Example:
    >>> import torch
    >>> ClusteringModule(64)(torch.randn(2, 3, 64))[0].shape
    torch.Size([2, 64])
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn

HEADS = ("clustering", "prototype")


class ChannelAttention(nn.Module):
    """CBAM/SE channel gate ``sigmoid(Bn(avg) + Bn(max))`` with one shared bottleneck d -> d/r -> d.

    Example:
        >>> gate = ChannelAttention(32, reduction=16)
        >>> gate(torch.randn(4, 32), torch.randn(4, 32)).shape
        torch.Size([4, 32])
    """

    def __init__(self, d: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, d // reduction)
        self.bottleneck = nn.Sequential(nn.Linear(d, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, d, bias=False))

    def forward(self, avg: Float[Tensor, "batch d"], mx: Float[Tensor, "batch d"]) -> Float[Tensor, "batch d"]:
        """The gate in (0, 1) per channel."""
        return torch.sigmoid(self.bottleneck(avg) + self.bottleneck(mx))


def mlp(d: int) -> nn.Sequential:
    """The head's two-layer MLP d -> 2d -> d (GELU, no bias).

    Example:
        >>> mlp(8)(torch.randn(2, 8)).shape
        torch.Size([2, 8])
    """
    return nn.Sequential(nn.Linear(d, 2 * d, bias=False), nn.GELU(), nn.Linear(2 * d, d, bias=False))


def split_head_input(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(r, avg, max) from a [batch, d] (avg = max = r) or [batch, 3, d] (last, mean, max) input.

    Example:
        >>> [t.shape for t in split_head_input(torch.zeros(2, 3, 4))]
        [torch.Size([2, 4]), torch.Size([2, 4]), torch.Size([2, 4])]
    """
    if x.dim() == 3:
        return x[:, 0], x[:, 1], x[:, 2]
    return x, x, x


class ClusteringModule(nn.Module):
    """``lambda(r) = LN(MLP(r * CA(r)))`` (see :mod:`vsem_lens.calibration.heads`); input [b, d] or [b, 3, d].

    Example:
        >>> ClusteringModule(64)(torch.randn(2, 3, 64))[0].shape
        torch.Size([2, 64])
    """

    def __init__(self, d: int, *, channel_attention: bool = True, reduction: int = 16):
        super().__init__()
        self.ca = ChannelAttention(d, reduction) if channel_attention else None
        self.mlp = mlp(d)
        self.ln = nn.LayerNorm(d)

    def forward(self, x: Tensor) -> tuple[Float[Tensor, "batch d"], Tensor | None]:
        """``(lambda(r), None)``: the calibrated representation, no reconstruction."""
        r, avg, mx = split_head_input(x)
        if self.ca is not None:
            r = r * self.ca(avg, mx)
        return self.ln(self.mlp(r)), None


class PrototypeModule(nn.Module):
    """The authors' prototype: encoder MLP (classified) + decoder MLP (reconstructs ``r``).

    Example:
        >>> z, recon = PrototypeModule(16)(torch.randn(2, 16)); z.shape, recon.shape
        (torch.Size([2, 16]), torch.Size([2, 16]))
    """

    def __init__(self, d: int):
        super().__init__()
        self.encoder = mlp(d)
        self.decoder = mlp(d)

    def forward(self, x: Tensor) -> tuple[Float[Tensor, "batch d"], Float[Tensor, "batch d"]]:
        """``(z, reconstruction of r)``."""
        r = split_head_input(x)[0]
        z = self.encoder(r)
        return z, self.decoder(z)



def build_head_module(head: str, d: int, *, channel_attention: bool = True, reduction: int = 16) -> nn.Module:
    """The module of a head kind (``"clustering"`` or ``"prototype"``) for width ``d``.

    Example:
        >>> type(build_head_module("prototype", 8)).__name__
        'PrototypeModule'
    """
    if head == "prototype":
        return PrototypeModule(d)
    return ClusteringModule(d, channel_attention=channel_attention, reduction=reduction)


__all__ = ["HEADS", "ChannelAttention", "ClusteringModule", "PrototypeModule", "build_head_module", "mlp", "split_head_input"]
