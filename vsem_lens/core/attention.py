"""Memory-efficient attention for forward passes that capture no attention pattern.

TransformerLens 4.x's ``TransformerBridge`` switches the wrapped Hugging Face model to eager attention
when it boots (``force_eager_attention``), and most of its attention components (Llama, Mistral,
Qwen, Gemma, Phi, OLMo, GPT-NeoX, ...) do not call the HF attention at all: they recompute it step by
step so that ``hook_attn_scores`` and ``hook_pattern`` can fire, which materialises the full
[batch, head, query, key] score and pattern tensors in every layer (2.4 GB per tensor for one
8,192-token text on SmolLM2). The bridge has no switch to turn this off per call.

:func:`sdpa_attention` does it for the duration of one forward pass: each attention component runs
the base ``AttentionBridge.forward`` (``hook_in`` -> the wrapped HF attention -> ``hook_out``, so every
block-level hook still fires: ``resid_pre/mid/post``, ``attn_out``, ``mlp_out``), and the HF model
runs its ``"sdpa"`` implementation (``torch.nn.functional.scaled_dot_product_attention``, which never
forms the score matrix on a causal batch). Attention patterns, scores and the bridge's rotary hooks do
not fire inside it; use ``attention="eager"`` when a hook needs them. Architectures whose HF class
has no SDPA kernel (Gemma 2, GPT-Neo, GPT-J, BLOOM, CodeGen in transformers 5) keep eager attention.

Example:
    >>> with sdpa_attention(model) as active:   # doctest: +SKIP
    ...     logits = model.bridge(ids)           # SDPA attention if active
"""

from __future__ import annotations

import contextlib
import types
import weakref
from typing import Any, Iterator

from .errors import InputError

#: Attention implementations a capture accepts.
ATTENTION_MODES = ("sdpa", "eager")

_SDPA_SUPPORT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_attention(attention: Any) -> str:
    """Validate an ``attention`` argument (``"sdpa"`` or ``"eager"``).

    Example:
        >>> check_attention("sdpa")
        'sdpa'
    """
    if not isinstance(attention, str) or attention not in ATTENTION_MODES:
        raise InputError(f"attention must be one of {', '.join(ATTENTION_MODES)}; got {attention!r}.")
    return attention


def supports_sdpa(model: Any) -> bool:
    """Whether :func:`sdpa_attention` can switch this model to SDPA (its HF class has an SDPA kernel).

    Example:
        >>> supports_sdpa(load_model())   # doctest: +SKIP
        True
    """
    hf_model = getattr(model.bridge, "original_model", None)
    if hf_model is None or not hasattr(hf_model, "set_attn_implementation"):
        return False
    if hf_model not in _SDPA_SUPPORT:
        previous = _implementation(hf_model)
        try:
            hf_model.set_attn_implementation("sdpa")
            ok = _implementation(hf_model) == "sdpa"
        except Exception:  # transformers raises ValueError/ImportError for classes without SDPA support
            ok = False
        finally:
            _set_implementation(hf_model, previous)
        _SDPA_SUPPORT[hf_model] = ok
    return _SDPA_SUPPORT[hf_model]


@contextlib.contextmanager
def sdpa_attention(model: Any, enabled: bool = True) -> Iterator[bool]:
    """Run the bridge's attention through HF's SDPA implementation inside the ``with`` block.

    Yields whether SDPA is active (``False`` when ``enabled`` is false or the architecture has no SDPA
    kernel). Everything is restored on exit, also when the forward pass raises.

    Example:
        >>> with sdpa_attention(model):                                     # doctest: +SKIP
        ...     acts = model.bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("resid_post"))
    """
    if not enabled or not supports_sdpa(model):
        yield False
        return
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    hf_model = model.bridge.original_model
    previous = _implementation(hf_model)
    # Components that recompute attention themselves get the base class's delegating forward as an
    # instance attribute. object.__setattr__ on purpose: the bridge's __setattr__ would forward the
    # assignment to the wrapped HF module.
    patched = [
        module for module in model.bridge.modules()
        if isinstance(module, AttentionBridge) and type(module).forward is not AttentionBridge.forward
    ]
    try:
        hf_model.set_attn_implementation("sdpa")
        for module in patched:
            object.__setattr__(module, "forward", types.MethodType(AttentionBridge.forward, module))
        yield True
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)
        _set_implementation(hf_model, previous)


def _implementation(hf_model: Any) -> str | None:
    return getattr(getattr(hf_model, "config", None), "_attn_implementation", None)


def _set_implementation(hf_model: Any, name: str | None) -> None:
    if name is None:
        return
    try:
        hf_model.set_attn_implementation(name)
    except Exception:  # the bridge's own fallback: write the config (see force_eager_attention)
        hf_model.config._attn_implementation = name
