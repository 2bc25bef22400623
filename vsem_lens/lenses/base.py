"""Frames: how a layer's residual is mapped into the space the semantic bases live in.

The semantic bases (Gu et al.) live in the LM-head input space, i.e. after the final norm. For an
intermediate layer ``l`` the papers do not say what to compare them with; vsem-lens names three frames
and uses the same names everywhere (docs/concepts/frames.md):

- ``raw``: the residual ``h_l`` as it is (:class:`RawLens`).
- ``final_norm`` (default): the model's own final norm applied to ``h_l``, the logit-lens convention
  (:class:`FinalNormLens`).
- ``tuned``: a learned affine translator ``h_l + A_l h_l + b_l`` followed by the final norm (tuned lens,
  Belrose et al. 2023, arXiv 2303.08112), trained separately (:class:`~vsem_lens.lenses.tuned.TunedLens`).

Cosine is not invariant to the norm's gain vector or centring, so the frames give different answers;
every table records which one was used.

Frame names are turned into lenses by :func:`vsem_lens.lenses.frames.resolve_frame`.

Example:
    >>> FinalNormLens(model)(h, layer=3).shape  # doctest: +SKIP
    torch.Size([5, 576])
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from jaxtyping import Float
from torch import Tensor

from ..core.errors import InputError


class Lens(ABC):
    """Maps a layer's residual into the final layer's frame (the LM-head input space or ``raw``).

    Subclasses implement :meth:`forward`; :meth:`save`/``load`` exist where a lens has parameters.

    Example:
        >>> import torch
        >>> class Scaled(Lens):            # a custom frame: any map of residuals into the LM-head space
        ...     frame = "scaled"
        ...     def forward(self, h, layer):
        ...         return 2 * h
        >>> Scaled()(torch.ones(2), layer=0).tolist()
        [2.0, 2.0]
    """

    frame: str = ""

    @abstractmethod
    def forward(self, h: Float[Tensor, "... d_model"], layer: int) -> Float[Tensor, "... d_model"]:
        """Transform residual vectors of ``layer`` into the lens's frame."""

    def __call__(self, h: Float[Tensor, "... d_model"], layer: int) -> Float[Tensor, "... d_model"]:
        """Apply :meth:`forward` (a lens is called like a function)."""
        return self.forward(h, layer)

    def check_model(self, model: Any) -> None:
        """Raise :class:`~vsem_lens.core.errors.ArtifactError` if the lens does not belong to ``model``.

        Parameter-free lenses fit any model; trained lenses (:class:`~vsem_lens.lenses.tuned.TunedLens`) check
        the model's fingerprint.
        """

    def save(self, path: Any) -> None:  # pragma: no cover - parameter-free lenses have nothing to save
        """Save the lens (parameter-free lenses need no file)."""
        raise InputError(f"the {self.frame!r} frame has no parameters to save.")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class RawLens(Lens):
    """Identity: the residual as it is.

    Example:
        >>> import torch
        >>> RawLens()(torch.ones(2, 3), layer=0).tolist()
        [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    """

    frame = "raw"

    def forward(self, h: Float[Tensor, "... d_model"], layer: int) -> Float[Tensor, "... d_model"]:
        """Return ``h`` unchanged."""
        return h


class FinalNormLens(Lens):
    """The model's own final norm, applied to any layer (the logit-lens convention).

    Example:
        >>> FinalNormLens(model)(h, layer=3)  # doctest: +SKIP
    """

    frame = "final_norm"

    def __init__(self, model: Any):
        self.model = model

    def forward(self, h: Float[Tensor, "... d_model"], layer: int) -> Float[Tensor, "... d_model"]:
        """Apply the model's final norm, whatever the layer."""
        return self.model.final_norm(h)
