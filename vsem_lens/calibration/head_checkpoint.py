"""Resumable training of a calibration head: the run identity and the per-epoch training state
(weights, AdamW moments, shuffling generator, epoch, early-stopping state, history) in
``checkpoint_dir/checkpoint.pt``, written atomically.

Example:
    >>> run_id = training_run_id({"epochs": 5}, (torch.zeros(2, 3),))
    >>> len(run_id)
    24
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from ..core.errors import ArtifactError
from ..core.io import atomic_write
from .head_files import FORMAT_VERSION


def training_run_id(config: dict, tensors: Sequence[Tensor | None]) -> str:
    """Digest of a training run: the head's config and the shapes and bytes of its data (``None`` skipped).

    Example:
        >>> training_run_id({}, (None,)) == training_run_id({}, ())
        True
    """
    digest = hashlib.blake2b(digest_size=12)
    digest.update(json.dumps(config, sort_keys=True).encode())
    for tensor in tensors:
        if tensor is not None:
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_training_state(
    directory: Path,
    run_id: str,
    state: dict,
    weights: dict[str, Tensor],
    best_weights: dict[str, Tensor],
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> None:
    """Write the training state of run ``run_id`` to ``directory/checkpoint.pt``.

    Example:
        >>> save_training_state(Path("ckpt"), run_id, state, w, best, opt, gen)  # doctest: +SKIP
    """
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT_VERSION,
        "run_id": run_id,
        "state": json.dumps(state),
        "weights": weights,
        "best_weights": best_weights,
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
    }
    atomic_write(directory / "checkpoint.pt", lambda tmp: torch.save(payload, tmp))


def load_training_state(directory: Path, run_id: str) -> dict[str, Any] | None:
    """The saved training state of run ``run_id`` (``state`` decoded), or None when there is none.

    Raises :class:`~vsem_lens.core.errors.ArtifactError` for an unreadable file or another run's state.

    Example:
        >>> load_training_state(Path("ckpt"), run_id)["state"]["epoch"]  # doctest: +SKIP
        3
    """
    path = directory / "checkpoint.pt"
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        payload["state"] = json.loads(payload["state"])
    except Exception as exc:  # a torn or foreign file
        raise ArtifactError(
            f"the checkpoint {path} is unreadable ({type(exc).__name__}: {exc}); delete it to start over."
        ) from exc
    if payload.get("run_id") != run_id:
        raise ArtifactError(
            f"the checkpoint in {directory} belongs to another training run (different data or "
            "settings); use another checkpoint_dir, delete it, or pass resume=False to start over."
        )
    return payload


__all__ = ["load_training_state", "save_training_state", "training_run_id"]
