"""Device strings: one validator, used by :func:`~vsem_lens.core.loading.load_model` and every command.

``torch.device`` accepts strings such as ``"cuda"`` on a machine without a GPU, so a typo or a missing
driver would otherwise surface as a silent CPU run (the bridge records the device it is told) or as a
deep CUDA traceback. :func:`check_device` parses the string, checks that the backend is there and the
index exists, and says what to do when not.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import InputError


def _available(kind: str) -> tuple[bool, int]:
    """Whether the backend ``kind`` can run here, and how many devices it has (1 for non-indexed ones)."""
    if kind == "cpu":
        return True, 1
    if kind == "cuda":
        return torch.cuda.is_available(), torch.cuda.device_count()
    if kind == "mps":
        return torch.backends.mps.is_available(), 1
    backend = getattr(torch, kind, None)  # xpu, npu, ... expose the same two functions when built in
    if backend is not None and hasattr(backend, "is_available"):
        available = bool(backend.is_available())
        return available, int(backend.device_count()) if available and hasattr(backend, "device_count") else 1
    return False, 0


def check_device(device: Any, name: str = "device") -> torch.device:
    """``device`` as a :class:`torch.device` that exists on this machine.

    Args:
        device: a string (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``) or a ``torch.device``.
        name: the argument's name, for the message.

    Raises:
        InputError: not a device string, the ``meta`` device (it holds no weights), a backend that is not
            available here (no GPU, no driver, a CPU-only torch build) or an index beyond the device count.

    Example:
        >>> check_device("cpu")
        device(type='cpu')
        >>> check_device("nonsense:7")
        Traceback (most recent call last):
        ...
        vsem_lens.core.errors.InputError: device='nonsense:7' is not a torch device; use cpu, cuda, cuda:N or mps.
    """
    if isinstance(device, bool) or not isinstance(device, (str, torch.device)):
        raise InputError(f"{name} must be a device string such as 'cpu' or 'cuda:0', got {device!r}.")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"{name}={device!r} is not a torch device; use cpu, cuda, cuda:N or mps.") from None
    if parsed.type == "meta":
        raise InputError(f"{name}='meta' holds no weights; vsem-lens needs a real device (cpu, cuda, mps).")
    available, count = _available(parsed.type)
    if not available:
        raise InputError(
            f"{name}={str(device)!r}: no {parsed.type} device is available here (torch {torch.__version__}"
            f"{', CPU-only build' if parsed.type == 'cuda' and torch.version.cuda is None else ''}); "
            "use --device cpu, or install a torch build with that backend."
        )
    if parsed.index is not None and parsed.index >= count:
        raise InputError(f"{name}={str(device)!r}: this machine has {count} {parsed.type} device(s) (indices 0-{count - 1}).")
    return parsed


DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}


def check_dtype(dtype: Any, name: str = "dtype") -> torch.dtype:
    """``dtype`` (a floating torch dtype or its name, e.g. ``"bf16"``) as a torch dtype.

    Raises:
        InputError: anything but float32, bfloat16, float16 or float64.

    Example:
        >>> check_dtype("bf16"), check_dtype(torch.float64)
        (torch.bfloat16, torch.float64)
    """
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.strip().lower() in DTYPES:
        return DTYPES[dtype.strip().lower()]
    raise InputError(f"{name} expects one of float32, bfloat16, float16, float64; got {dtype!r}.")


def same_device(actual: torch.device, requested: torch.device) -> bool:
    """Whether ``actual`` is the ``requested`` device (``cuda`` matches any ``cuda:N``; ``cpu:0`` is ``cpu``).

    Example:
        >>> same_device(torch.device("cpu"), torch.device("cpu:0"))
        True
    """
    if actual.type != requested.type:
        return False
    return requested.index is None or actual.type == "cpu" or actual.index == requested.index
