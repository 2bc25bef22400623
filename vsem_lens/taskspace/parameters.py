"""Model parameters for gradient analyses: clean names, the block each belongs to, where each sits in
a flat gradient vector, and switching ``requires_grad`` on for a chosen subset only.

Example:
    >>> param_block("model.layers.3.mlp.up_proj.weight")
    'block_3'
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch

from ..core.errors import InputError
from ..core.models import HookedModel


@dataclass(frozen=True)
class ParamSlice:
    """Where one parameter tensor sits in a flat gradient vector."""

    name: str
    block: str
    start: int
    stop: int
    shape: tuple[int, ...]


_BLOCK_RE = re.compile(r"(?:^|\.)(?:layers|blocks|h)\.(\d+)\.")


def clean_param_name(name: str) -> str:
    """Drop TransformerBridge's ``_original_component`` wrappers from a parameter name.

    Example:
        >>> clean_param_name("model.layers.0._original_component.mlp._original_component.up_proj.weight")
        'model.layers.0.mlp.up_proj.weight'
    """
    return name.replace("._original_component", "").replace("_original_component.", "")


def param_block(name: str) -> str:
    """Block label of a parameter: ``embed``, ``block_{i}``, ``final_norm``, ``unembed`` or ``other``.

    Example:
        >>> param_block("model.layers.3.self_attn.q_proj.weight"), param_block("model.norm.weight")
        ('block_3', 'final_norm')
    """
    match = _BLOCK_RE.search(name)
    if match:
        return f"block_{int(match.group(1))}"
    if "embed" in name or name.startswith("wte") or ".wte" in name:
        return "embed"
    if "lm_head" in name or "unembed" in name:
        return "unembed"
    if "norm" in name or "ln_f" in name or "ln_final" in name:
        return "final_norm"
    return "other"


def model_parameters(model: HookedModel, include: str | None = None) -> list[tuple[str, torch.nn.Parameter]]:
    """The model's parameters (tied ones once) with clean names, optionally filtered by a regex.

    Example:
        >>> [n for n, _ in model_parameters(model, include=r"layers\.0\.mlp")][:1]  # doctest: +SKIP
        ['model.layers.0.mlp.gate_proj.weight']
    """
    params = [(clean_param_name(n), p) for n, p in model.named_parameters()]
    if include is not None:
        try:
            pattern = re.compile(include)
        except re.error as exc:
            raise InputError(f"include={include!r} is not a valid regular expression ({exc}).") from None
        params = [(n, p) for n, p in params if pattern.search(n)]
    if not params:
        raise InputError(f"no parameters match include={include!r}; check the names with model_parameters(model).")
    return params


class OnlyGradFor:
    """Context manager: ``requires_grad`` only for the given parameters (gradients cleared); restores the
    flags and clears the gradients on exit.

    Example:
        >>> with OnlyGradFor(model, [p for _, p in model_parameters(model, "layers\\.0\\.")]):  # doctest: +SKIP
        ...     loss.backward()
    """

    def __init__(self, model: HookedModel, chosen: Sequence[torch.nn.Parameter]):
        self.all = list(model.parameters())
        ids = {id(p) for p in chosen}
        self.flags = [p.requires_grad for p in self.all]
        self.want = [id(p) in ids for p in self.all]

    def __enter__(self) -> "OnlyGradFor":
        """Switch ``requires_grad`` on for the chosen parameters only."""
        for p, want in zip(self.all, self.want):
            p.requires_grad_(want)
            p.grad = None
        return self

    def __exit__(self, *exc: object) -> None:
        """Restore the saved ``requires_grad`` flags."""
        for p, flag in zip(self.all, self.flags):
            p.grad = None
            p.requires_grad_(flag)


__all__ = ["OnlyGradFor", "ParamSlice", "clean_param_name", "model_parameters", "param_block"]
