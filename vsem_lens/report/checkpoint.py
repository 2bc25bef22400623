"""Resumable report runs: the checkpoint key of a run and this rank's checkpoint file of streaming stats.

A checkpoint holds the number of batches done and the :meth:`~vsem_lens.core.stats.Stat.state_dict` of
every named streaming statistic of the pass; :meth:`Checkpoint.restore` loads them back with
:meth:`~vsem_lens.core.stats.Stat.load_state_dict`, so a run started again with the same arguments ends
with the numbers of an uninterrupted run. Files are written atomically and loaded with
``torch.load(weights_only=True)``; an unreadable or foreign file is ignored (the run starts over).

Example:
    >>> ckpt = Checkpoint("ckpt", checkpoint_key(model, texts, {"seed": 0}), env)   # doctest: +SKIP
    >>> done = ckpt.restore(stats)          # 0 when there is nothing to resume    # doctest: +SKIP
    >>> ckpt.save(done + 50, stats)                                                 # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..core.io import atomic_write, state_digest, texts_digest
from ..core.models import HookedModel
from ..core.stats import Stat
from .record import _jsonable

#: 3: one ``stats`` mapping of ``Stat.state_dict()`` per named statistic (2: fixed keys per statistic).
CHECKPOINT_FORMAT = 4  # 4: a content digest of the stats


def weights_digest(model: HookedModel) -> str:
    """A hash of every parameter's name, shape, sum and absolute sum (one read of the weights).

    Example:
        >>> len(weights_digest(model))   # doctest: +SKIP
        20
    """
    digest = hashlib.blake2b(digest_size=10)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.device.type == "meta":
                continue
            x = p.detach().reshape(-1)
            digest.update(f"{name}|{tuple(p.shape)}|{x.dtype}|".encode())
            total = torch.zeros(2, dtype=torch.float64, device=x.device)
            for chunk in x.split(2**20):  # float64 sums in 8 MB pieces (no full-size copy)
                c = chunk.double()
                total += torch.stack([c.sum(), c.abs().sum()])
            digest.update(total.cpu().numpy().tobytes())
    return digest.hexdigest()


def checkpoint_key(model: HookedModel, texts: Sequence[str], parameters: dict[str, Any]) -> str:
    """The name of a run's checkpoint folder: a hash of the model, the corpus and every parameter
    that changes the numbers (plus the number of ranks).

    Example:
        >>> checkpoint_key(model, texts, {"seed": 0})   # doctest: +SKIP
        'report-3f2a...'
    """
    spec = {
        "format": CHECKPOINT_FORMAT,
        "model": {"name": model.name, "fingerprint": model.fingerprint, "weights": weights_digest(model),
                  "dtype": str(model.dtype), "prepend_bos": model.prepend_bos},
        "corpus": texts_digest(texts),
        "parameters": parameters,
    }
    blob = json.dumps(_jsonable(spec), sort_keys=True).encode()
    return "report-" + hashlib.blake2b(blob, digest_size=10).hexdigest()


class Checkpoint:
    """This rank's checkpoint file ``<dir>/<key>/rank<r>-of-<w>.pt`` of named streaming stats.

    Example:
        >>> ckpt = Checkpoint(tmp_path, "report-abc", env)   # doctest: +SKIP
        >>> ckpt.save(10, {"lens_per_text": counts})         # doctest: +SKIP
        >>> ckpt.restore({"lens_per_text": fresh})           # doctest: +SKIP
        10
    """

    def __init__(self, directory: str | os.PathLike, key: str, env: Any) -> None:
        self.folder = Path(directory).expanduser().absolute() / key
        self.key = key
        self.path = self.folder / f"rank{env.rank}-of-{env.world_size}.pt"

    def _load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a corrupt file must not stop the run: start over
            warnings.warn(f"ignoring unreadable checkpoint {self.path} ({type(exc).__name__}: {exc}); starting over.")
            return None
        if not isinstance(state, dict) or state.get("key") != self.key or state.get("format") != CHECKPOINT_FORMAT:
            return None
        if state.get("sha256") != state_digest(state.get("stats")):
            warnings.warn(f"ignoring damaged checkpoint {self.path} (its content does not match its digest); starting over.")
            return None
        return state

    def restore(self, stats: Mapping[str, Stat]) -> int:
        """Load the saved state of every stat of ``stats`` (same names); returns the batches done (0: none saved).

        Example:
            >>> start_at = ckpt.restore({"isotropy": iso, "lens": agg})   # doctest: +SKIP
        """
        saved = self._load()
        if saved is None or set(saved["stats"]) != set(stats):
            return 0
        for name, stat in stats.items():
            stat.load_state_dict(saved["stats"][name])
        return int(saved["batches_done"])

    def save(self, batches_done: int, stats: Mapping[str, Stat]) -> None:
        """Write the state of every stat and the number of batches done, atomically.

        Example:
            >>> ckpt.save(50, {"isotropy": iso, "lens": agg})   # doctest: +SKIP
        """
        states = {name: stat.state_dict() for name, stat in stats.items()}
        payload = {
            "format": CHECKPOINT_FORMAT,
            "key": self.key,
            "batches_done": int(batches_done),
            "stats": states,
            "sha256": state_digest(states),
        }
        atomic_write(self.path, lambda tmp: torch.save(payload, tmp))

    def remove(self, env: Any) -> None:
        """Delete this rank's file (and the folder once every rank removed its own).

        Example:
            >>> ckpt.remove(env)   # doctest: +SKIP
        """
        with contextlib.suppress(OSError):
            self.path.unlink()
        if env.is_main:
            with contextlib.suppress(OSError):
                self.folder.rmdir()  # only when every rank removed its file
