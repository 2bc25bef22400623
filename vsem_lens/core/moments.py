"""Streaming, mergeable first and second moments (mean and covariance) in float64.

:class:`Moments` keeps the count ``n``, the mean ``mu`` [dim] and the centred scatter matrix
``M2 = sum_i (x_i - mu)(x_i - mu)^T`` [dim, dim]. Each batch is centred on its *own* mean and folded in
with the pairwise update of Chan, Golub & LeVeque (1979)::

    delta = mu_b - mu_a,   n = n_a + n_b
    mu    = mu_a + delta * n_b / n
    M2    = M2_a + M2_b + outer(delta, delta) * n_a * n_b / n

This never forms the raw sum of squares ``sum x x^T`` (which cancels catastrophically when the mean
is large next to the spread, as in residual streams whose outlier dimensions have means in the
hundreds), and it is exact under merging: shards processed on different workers combine to the same
statistics as one pass over everything (up to float64 rounding).

Example:
    >>> import torch
    >>> x = torch.randn(1000, 8)
    >>> a = Moments(8).update(x[:300])
    >>> b = Moments(8).update(x[300:])
    >>> torch.allclose((a + b).cov(), torch.cov(x.double().T))
    True
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Shaped
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .distributed import all_reduce_moments
from .errors import ArtifactError, InputError, NumericalError, check_int, check_positive_int
from .io import atomic_write
from .stats import Stat, chan_combine, select_points

_FORMAT = "vsem_lens.Moments"
_FORMAT_VERSION = "1"


class Moments(Stat):
    """Running count, mean and centred scatter matrix of ``dim``-dimensional points.

    Args:
        dim: dimensionality of the points.
        dtype: accumulation dtype (float64 by default; keep it unless you know the data is benign).
        device: where the accumulators live (default CPU).

    Attributes:
        count: number of points seen (int).
        mean: running mean [dim].
        m2: centred scatter matrix [dim, dim], ``sum_i (x_i - mean)(x_i - mean)^T``.

    Example:
        >>> m = Moments(3).update(torch.tensor([[0., 0., 0.], [2., 2., 2.]]))
        >>> m.count, m.mean.tolist()
        (2, [1.0, 1.0, 1.0])
        >>> m.var().tolist()
        [2.0, 2.0, 2.0]
    """

    def __init__(self, dim: int, *, dtype: torch.dtype = torch.float64, device: Any = None) -> None:
        dim = check_positive_int(dim, "Moments(dim=...)")
        if not dtype.is_floating_point:
            raise InputError(f"Moments dtype must be a floating dtype (use torch.float64), got {dtype}.")
        self.dim = dim
        self.count = 0
        self.mean = torch.zeros(dim, dtype=dtype, device=device)
        self.m2 = torch.zeros(dim, dim, dtype=dtype, device=device)

    # ------------------------------------------------------------------ accumulation

    def update(
        self, x: Float[Tensor, "*batch dim"], mask: Shaped[Tensor, "*batch"] | None = None
    ) -> Moments:
        """Fold the points ``x`` (any leading shape) into the statistics; returns ``self``.

        Points where ``mask`` is False/0 are ignored (e.g. padding tokens); an empty or all-masked batch
        is a no-op. The work is one centring pass and one matmul ``x_c^T x_c`` per call.

        Raises:
            InputError: ``x`` is not a tensor of shape [..., dim], or ``mask`` does not match its
                leading shape.
            NumericalError: a selected point contains NaN or inf.

        Example:
            >>> x = torch.tensor([[[1., 2.], [9., 9.]], [[3., 4.], [5., 6.]]])   # [batch, pos, dim]
            >>> mask = torch.tensor([[1, 0], [1, 1]])
            >>> Moments(2).update(x, mask).mean.tolist()
            [3.0, 4.0]
        """
        x = select_points(x, mask, self.dim, who="Moments.update")
        if x.shape[0] == 0:
            return self
        # Convert only the selected points, so masked-out padding costs no float64 memory. Always copy:
        # the copy is centred in place below (saves a second [n, dim] buffer) and must not be the caller's.
        x = x.to(device=self.mean.device, dtype=self.mean.dtype, copy=True)
        n_b = x.shape[0]
        mean_b = x.mean(dim=0)
        # NaN/inf in any point propagates into the batch mean, so checking [dim] numbers replaces a
        # full pass over x; only on failure do we scan x to say how many points are bad.
        if not bool(torch.isfinite(mean_b).all()):
            bad = int((~torch.isfinite(x)).any(dim=1).sum())
            what = f"{bad} point(s) containing NaN or inf" if bad else "values so large their mean overflows"
            raise NumericalError(
                f"Moments.update got {what}; find where the activations overflow "
                "(e.g. fp16 overflow) or mask those points out."
            )
        xc = x.sub_(mean_b)
        m2_b = xc.T @ xc  # the single matmul of the update
        # Symmetrise: blocked GEMM can leave the two triangles differing by rounding.
        m2_b = 0.5 * (m2_b + m2_b.T)
        self._combine(n_b, mean_b, m2_b)
        return self

    def merge(self, other: Moments) -> Moments:
        """Fold another :class:`Moments` into this one in place (exact combination); returns ``self``.

        Example:
            >>> x = torch.randn(100, 4, dtype=torch.float64)
            >>> a, b = Moments(4).update(x[:10]), Moments(4).update(x[10:])
            >>> torch.allclose(a.merge(b).mean, x.mean(0))
            True
        """
        if not isinstance(other, Moments):
            raise InputError(f"Moments.merge expects another Moments, got {type(other).__name__}.")
        if other.dim != self.dim:
            raise InputError(
                f"cannot merge Moments of dimension {other.dim} into Moments of dimension {self.dim}; "
                "only statistics of the same activation site can be combined."
            )
        if other.count == 0:
            return self
        ref = self.mean
        self._combine(other.count, other.mean.to(ref), other.m2.to(ref))
        return self

    def all_reduce(self, env: Any) -> None:
        """Combine the moments of every ``torch.distributed`` rank in place (exact Chan combination)."""
        count = torch.tensor(float(self.count), dtype=self.mean.dtype, device=self.mean.device)
        count, self.mean, self.m2 = all_reduce_moments(count, self.mean, self.m2, env, outer=True)
        self.count = int(round(float(count)))

    def result(self, ddof: int = 1) -> dict[str, Any]:
        """``count``, ``mean`` and the covariance (see :meth:`cov`)."""
        return {"count": self.count, "mean": self.mean.clone(), "cov": self.cov(ddof)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`state_dict` output in place (validated as :meth:`from_state_dict` does)."""
        loaded = Moments.from_state_dict(state, device=self.mean.device)
        if loaded.dim != self.dim:
            raise ArtifactError(f"saved Moments have dimension {loaded.dim}, this one {self.dim}.")
        self.count, self.mean, self.m2 = loaded.count, loaded.mean.to(self.mean.dtype), loaded.m2.to(self.mean.dtype)

    def _combine(self, n_b: int, mean_b: Tensor, m2_b: Tensor) -> None:
        """Chan et al. pairwise update with a batch summarised by (n_b, mean_b, m2_b)."""
        _, self.mean, self.m2 = chan_combine(self.count, self.mean, self.m2, n_b, mean_b, m2_b, outer=True)
        self.count += int(n_b)

    def __add__(self, other: Moments) -> Moments:
        """``a + b`` is a new :class:`Moments` holding both; ``a`` and ``b`` are left unchanged.

        Example:
            >>> a = Moments(2).update(torch.ones(3, 2))
            >>> (a + a).count
            6
        """
        if not isinstance(other, Moments):
            return NotImplemented
        return self.copy().merge(other)

    def copy(self) -> Moments:
        """An independent copy.

        Example:
            >>> a = Moments(2).update(torch.ones(3, 2))
            >>> b = a.copy().update(torch.zeros(1, 2))
            >>> a.count, b.count
            (3, 4)
        """
        new = Moments(self.dim, dtype=self.mean.dtype, device=self.mean.device)
        new.count, new.mean, new.m2 = self.count, self.mean.clone(), self.m2.clone()
        return new

    # ------------------------------------------------------------------ results

    def cov(self, ddof: int = 1) -> Float[Tensor, "dim dim"]:
        """Covariance matrix ``m2 / (count - ddof)`` (ddof=1: unbiased, as ``torch.cov``).

        Example:
            >>> Moments(2).update(torch.tensor([[0., 0.], [2., 4.]])).cov().tolist()
            [[2.0, 4.0], [4.0, 8.0]]
        """
        self._check_count(ddof)
        return self.m2 / (self.count - ddof)

    def var(self, ddof: int = 1) -> Float[Tensor, " dim"]:
        """Per-dimension variance (the diagonal of :meth:`cov`).

        Example:
            >>> Moments(2).update(torch.tensor([[0., 0.], [2., 4.]])).var().tolist()
            [2.0, 8.0]
        """
        self._check_count(ddof)
        return torch.diagonal(self.m2) / (self.count - ddof)

    def _check_count(self, ddof: int) -> None:
        check_int(ddof, "ddof", minimum=0)
        if self.count <= ddof:
            raise InputError(
                f"a covariance with ddof={ddof} needs more than {ddof} point(s), but only {self.count} "
                "were accumulated; feed more (unmasked) activations first."
            )

    def __repr__(self) -> str:
        return (
            f"Moments(dim={self.dim}, count={self.count}, dtype={self.mean.dtype}, device={self.mean.device})"
        )

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, Tensor]:
        """Plain tensors ``{"count", "mean", "m2"}`` (e.g. for ``torch.distributed`` gathering).

        Example:
            >>> sorted(Moments(2).state_dict())
            ['count', 'm2', 'mean']
        """
        return {
            "count": torch.tensor(self.count, dtype=torch.int64),
            "mean": self.mean.clone(),
            "m2": self.m2.clone(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], *, device: Any = None) -> Moments:
        """Rebuild from :meth:`state_dict` output.

        Raises:
            ArtifactError: keys are missing or shapes/values are inconsistent.

        Example:
            >>> a = Moments(2).update(torch.randn(5, 2))
            >>> Moments.from_state_dict(a.state_dict()).count
            5
        """
        try:
            count, mean, m2 = state["count"], state["mean"], state["m2"]
        except (KeyError, TypeError) as exc:
            raise ArtifactError(
                f"not a Moments state dict (need keys 'count', 'mean', 'm2'): {exc!r}; "
                "build it with Moments.state_dict()."
            ) from None
        if not all(isinstance(t, Tensor) for t in (count, mean, m2)):
            raise ArtifactError(
                "Moments state dict values must be tensors; build it with Moments.state_dict()."
            )
        if mean.ndim != 1 or tuple(m2.shape) != (mean.shape[0], mean.shape[0]) or count.numel() != 1:
            raise ArtifactError(
                f"inconsistent Moments state: count {tuple(count.shape)}, mean {tuple(mean.shape)}, "
                f"m2 {tuple(m2.shape)}; expected [], [d] and [d, d]. The file is probably corrupt."
            )
        if not mean.dtype.is_floating_point or int(count) < 0 or mean.shape[0] < 1:
            raise ArtifactError("invalid Moments state (non-float tensors, negative count or dim 0).")
        new = cls(int(mean.shape[0]), dtype=mean.dtype, device=device if device is not None else mean.device)
        new.count = int(count)
        new.mean = mean.detach().clone().to(new.mean.device)
        new.m2 = m2.detach().to(mean.dtype).clone().to(new.mean.device)
        return new

    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file atomically (temp file in the same folder, then ``os.replace``).

        A reader never sees a half-written file, even if the process dies mid-write.

        Example:
            >>> import tempfile, os
            >>> p = os.path.join(tempfile.mkdtemp(), "m.safetensors")
            >>> Moments(2).update(torch.randn(4, 2)).save(p)
            >>> Moments.load(p).count
            4
        """
        path = Path(path)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        metadata = {"format": _FORMAT, "version": _FORMAT_VERSION}

        try:
            atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), mkdir=False)
        except (OSError, RuntimeError, SafetensorError) as exc:
            raise ArtifactError(
                f"cannot write Moments to {path}: {getattr(exc, 'strerror', None) or exc}; "
                "check that the folder exists and is writable."
            ) from None

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: Any = None) -> Moments:
        """Read a file written by :meth:`save`.

        Raises:
            ArtifactError: the file is missing, unreadable, corrupt or not a Moments file.

        Example:
            >>> Moments.load("/nonexistent.safetensors")  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            vsem_lens.core.errors.ArtifactError: no Moments file at /nonexistent.safetensors; ...
        """
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(
                f"no Moments file at {path}; check the path or create it with Moments.save()."
            )
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise ArtifactError(
                f"cannot read Moments file {path} ({type(exc).__name__}: {exc}); it is corrupt or not a "
                "safetensors file; recompute the statistics."
            ) from None
        if metadata.get("format") != _FORMAT:
            raise ArtifactError(
                f"{path} is a safetensors file but not a saved Moments (format={metadata.get('format')!r})."
            )
        return cls.from_state_dict(state, device=device)
