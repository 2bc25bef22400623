"""Memory of a capture batch: an estimate before the forward pass runs, and a clear error when it fails.

The estimate (bytes, per batch of ``n_texts`` right-padded to ``width`` tokens) adds up

============== ============================================================================
part           size
============== ============================================================================
buffers        captured activations: ``n_buffers x real tokens x d_model``
forward        one block's working set: ``n_texts x width x (8 d_model + 3 d_mlp)``
attention      eager: ``3 x n_texts x n_heads x width^2`` float32 (scores, masked scores,
               softmax) plus the ``width^2`` additive mask; SDPA: a ``width^2`` boolean mask
logits         with ``keep_logits``: ``n_texts x width x d_vocab``
============== ============================================================================

(elements of the model's dtype unless stated). On SmolLM2 (one text, all 30 layers' ``resid_post``)
it gives 0.87 GiB with SDPA at 8,192 tokens (measured peak growth 896 MiB) and 2.2 GiB with eager
attention at 4,096 tokens (measured 2,042 MiB; ``benchmarks/bench_long_input.py``).

Example:
    >>> need = capture_memory(model, 4, 8192, n_tokens=32768, n_buffers=30, attention="eager")  # doctest: +SKIP
    >>> round(need["attention"] / 2**30, 1)                                                      # doctest: +SKIP
    28.0
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import MemoryLimitError

#: Substrings of the RuntimeError messages torch raises when an allocation fails.
OOM_MARKERS = ("can't allocate memory", "out of memory", "not enough memory", "Cannot allocate memory")

ADVICE = "lower the batch size (--batch-size, batch_size=) or the text length (--max-length, max_length=)"


def capture_memory(
    model: Any,
    n_texts: int,
    width: int,
    *,
    n_tokens: int,
    n_buffers: int,
    attention: str,
    keep_logits: bool = False,
) -> dict[str, int]:
    """Estimated peak memory (bytes) of one capture batch, by part, and its ``total``.

    Args:
        model: a :class:`~vsem_lens.core.models.HookedModel`.
        n_texts: texts in the batch.
        width: padded length of the batch (its longest text).
        n_tokens: real (non-padding) tokens in the batch.
        n_buffers: captured [token, d_model] slices (sites x layers).
        attention: ``"eager"`` or ``"sdpa"`` (the implementation that will actually run).
        keep_logits: whether the logits are computed and kept.

    Example:
        >>> need = capture_memory(model, 1, 8192, n_tokens=8192, n_buffers=30, attention="sdpa")  # doctest: +SKIP
        >>> sorted(need)                                                                          # doctest: +SKIP
        ['attention', 'buffers', 'forward', 'logits', 'total']
    """
    cfg = model.bridge.cfg
    item = torch.empty((), dtype=model.dtype).element_size()
    d_model = model.d_model
    d_mlp = int(getattr(cfg, "d_mlp", None) or 4 * d_model)
    n_heads = int(getattr(cfg, "n_heads", 0) or 1)
    cells = n_texts * width
    square = n_texts * width * width
    need = {
        "buffers": n_buffers * n_tokens * d_model * item,
        "forward": cells * (8 * d_model + 3 * d_mlp) * item,
        "attention": 3 * n_heads * square * 4 + square * item if attention == "eager" else square,
        "logits": cells * model.d_vocab * item + n_tokens * model.d_vocab * item if keep_logits else 0,
    }
    need["total"] = sum(need.values())
    return need


def free_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device`` (available RAM for the CPU), or ``None`` when unknown.

    Example:
        >>> free_memory(torch.device("cpu")) > 0
        True
    """
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu":
            import psutil

            return int(psutil.virtual_memory().available)
    except Exception:  # a query that fails must never stop a capture
        return None
    return None


def describe(need: dict[str, int], attention: str) -> str:
    """One-line summary of an estimate, e.g. ``'~7.6 GiB (eager attention 7.1 GiB)'``.

    Example:
        >>> describe({"attention": 3 * 2**30, "total": 4 * 2**30}, "eager")
        '~4.0 GiB (eager attention 3.0 GiB)'
    """
    return f"~{need['total'] / 2**30:.1f} GiB ({attention} attention {need['attention'] / 2**30:.1f} GiB)"


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure (``MemoryError``, ``torch.OutOfMemoryError``, or the
    ``RuntimeError`` "DefaultCPUAllocator: can't allocate memory" of the CPU allocator).

    Example:
        >>> is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 bytes"))
        True
        >>> is_out_of_memory(RuntimeError("shape mismatch"))
        False
    """
    torch_oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if isinstance(exc, MemoryError) or (torch_oom is not None and isinstance(exc, torch_oom)):
        return True
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in OOM_MARKERS)


def out_of_memory_error(
    exc: BaseException, what: str, need: dict[str, int], attention: str, hint: str = ""
) -> MemoryLimitError:
    """The :class:`MemoryLimitError` that replaces an allocation failure during ``what`` (``hint``: one
    more piece of advice, appended).

    Example:
        >>> err = out_of_memory_error(MemoryError(), "texts 0..3 (4 x 9,000 tokens)",
        ...                           {"attention": 2**33, "total": 2**34}, "eager")
        >>> "--batch-size" in str(err) and "--max-length" in str(err)
        True
    """
    return MemoryLimitError(
        f"ran out of memory capturing {what}: the batch needs {describe(need, attention)}; {ADVICE}{'; ' + hint if hint else ''} "
        f"(allocator: {str(exc).strip()[:200] or type(exc).__name__})."
    )
