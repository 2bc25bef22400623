"""The on-disk format of a saved calibration head: a directory with ``config.json`` (constructor
arguments, input shape, training history, metadata) and ``weights.safetensors`` (module weights,
log-scale and the label bases), each written atomically.

Example:
    >>> write_head_files("my_head", {"config": {}}, {"log_scale": torch.zeros(())})  # doctest: +SKIP
    >>> config, weights = read_head_files("my_head")                                 # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor

from ..core.errors import ArtifactError
from ..core.io import atomic_write, check_tensors, tensors_digest

FORMAT_VERSION = 1
KIND = "vsem_lens.NeuralClusteringHead"


def write_head_files(path: str | os.PathLike, config: dict, weights: dict[str, Tensor]) -> Path:
    """Write ``config.json`` (``config`` plus format version and kind) and ``weights.safetensors``.

    Example:
        >>> write_head_files("my_head", config, weights)  # doctest: +SKIP
        PosixPath('my_head')
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {"format_version": FORMAT_VERSION, "kind": KIND, **config, "sha256": tensors_digest(weights)}
    atomic_write(path / "weights.safetensors", lambda tmp: save_file(weights, str(tmp)))
    atomic_write(path / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2)))
    return path


def read_head_files(path: str | os.PathLike) -> tuple[dict, dict[str, Tensor]]:
    """Read and check a head directory written by :func:`write_head_files`.

    Raises :class:`~vsem_lens.core.errors.ArtifactError` when files are missing, unreadable, not a head,
    written by a newer vsem-lens, or hold non-finite weights or weights changed since saving.

    Example:
        >>> config, weights = read_head_files("my_head")  # doctest: +SKIP
    """
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
        weights = load_file(str(path / "weights.safetensors"))
    except FileNotFoundError as exc:
        raise ArtifactError(f"{path} holds no saved head (config.json + weights.safetensors): {exc}") from None
    except Exception as exc:
        raise ArtifactError(f"could not read the head in {path}: {type(exc).__name__}: {exc}") from exc
    if config.get("kind") != KIND or "label_bases" not in weights:
        raise ArtifactError(f"{path} does not hold a vsem-lens calibration head.")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ArtifactError(f"the head in {path} was saved by a newer vsem-lens; upgrade to load it.")
    check_tensors(weights, f"the head in {path}", digest=config.get("sha256"),
                  remedy=" Retrain it with `vsem-lens calibrate` (or restore the folder from a copy).")
    return config, weights


__all__ = ["FORMAT_VERSION", "read_head_files", "write_head_files"]
