r"""Isotropy of point clouds: IsoScore, IsoScore*, the I-STAR penalty and simpler companions.

All functions here are pure tensor functions (no model code). They take a point cloud ``x`` [N, n]
(N points, n dimensions) or, where only the covariance matters, a streamed
:class:`~vsem_lens.stats.Moments`, and compute in float64.

**IsoScore** (Rudman, Gillman, Rayne & Eickhoff, "IsoScore: Measuring the Uniformity of Embedding
Space Utilization", Findings of ACL 2022). With ``lambda`` the eigenvalues of the sample covariance
``C`` (ddof=1), the paper normalises ``l_hat = sqrt(n) lambda / ||lambda||``, measures the defect
``delta = ||l_hat - 1|| / sqrt(2 (n - sqrt n))`` and rescales
``iota = ((n - delta^2 (n - sqrt n))^2 - n) / (n (n - 1))``. Expanding ``||l_hat - 1||^2`` gives the
closed form used here::

    iota = (PR - 1) / (n - 1),    PR = (sum lambda)^2 / sum lambda^2 = trace(C)^2 / ||C||_F^2

``PR`` is the participation ratio (effective number of dimensions), so no eigendecomposition is
needed and the covariance can be streamed. ``iota`` is 1 for isotropic data, 0 for rank 1 and
``(k - 1)/(n - 1)`` when k of n eigenvalues are equal and the rest zero; it is invariant to rotation,
translation and scale.

**IsoScore\*** (Rudman & Eickhoff, "Stable Anisotropic Regularization", ICLR 2024) replaces ``C`` by
the shrinkage covariance ``Sigma = (1 - zeta) C_batch + zeta C0``, where ``C0`` is the covariance of a
large reference sample (or the identity). ``zeta`` weights ``C0``, exactly as in the authors' code
(PyPI ``isoscore`` 2.0.1, ``IsoScore_star(points, C0, zeta)``, points [num_samples, dim], no PCA or
normalisation step, ``torch.cov`` i.e. ddof=1). It is differentiable and stable on mini-batches with
fewer points than dimensions. The **I-STAR** regulariser adds ``weight * (1 - IsoScore*)`` to the task
loss.

Also here: the average pairwise cosine similarity (common, but it measures the mean direction rather
than isotropy: a cloud can have average cosine 0 and IsoScore near 0), the participation ratio, and
the coordinate dimensions with the largest variance ("outlier dimensions").

Example:
    >>> import torch
    >>> x = torch.randn(20_000, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> round(isoscore(x), 2)
    1.0
    >>> round(isoscore(x * torch.tensor([10., 1, 1, 1, 1, 1, 1, 1])), 2)   # one dominant dimension
    0.02
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence, Union

import torch
from jaxtyping import Float, Int, Shaped
from torch import Tensor

from .errors import InputError, NumericalError
from .stats import Moments, _as_tensor

PointsOrMoments = Union[Float[Tensor, "n_points dim"], Moments]

# Rows per Moments.update when a whole in-memory cloud is given: bounds the float64 copy.
_CHUNK = 8192


# ---------------------------------------------------------------------------------- helpers


def _points(x: Any, name: str = "x", *, min_points: int = 2) -> Tensor:
    """Validate a [N, n] real point cloud."""
    x = _as_tensor(x, name)
    if x.ndim != 2:
        raise InputError(
            f"{name} must be a point cloud of shape [n_points, dim], got shape {tuple(x.shape)}; "
            "flatten the leading dims (and drop padding), or stream them into a Moments with a mask."
        )
    if x.dtype.is_complex:
        raise InputError(f"{name} must be real-valued, got dtype {x.dtype}.")
    if x.shape[0] < min_points:
        raise InputError(f"{name} has {x.shape[0]} point(s); at least {min_points} are needed.")
    return x


def _moments(x_or_moments: Any) -> Moments:
    """A Moments for either input form; in-memory clouds are folded in chunks to bound memory."""
    if isinstance(x_or_moments, Moments):
        return x_or_moments
    x = _points(x_or_moments)
    m = Moments(x.shape[1], device=x.device)
    for start in range(0, x.shape[0], _CHUNK):
        m.update(x[start : start + _CHUNK].detach())
    return m


def _cov64(x_or_moments: Any) -> Tensor:
    """Float64 covariance (ddof=1) of points or Moments."""
    return _moments(x_or_moments).cov(ddof=1).to(torch.float64)


def _traces(cov: Tensor) -> tuple[Tensor, Tensor]:
    """``sum lambda = trace(C)`` and ``sum lambda^2 = ||C||_F^2`` (C symmetric), with checks."""
    if not bool(torch.isfinite(cov).all()):
        raise NumericalError("the covariance contains NaN or inf; check the points for NaN/inf or overflow.")
    s1 = torch.diagonal(cov).sum()
    s2 = (cov * cov).sum()
    if not bool(s2 > 0):
        raise InputError("the points have zero variance (all identical), so isotropy is undefined.")
    return s1, s2


def _iota(cov: Tensor) -> Tensor:
    n = cov.shape[0]
    if n < 2:
        raise InputError(f"IsoScore needs at least 2 dimensions, got {n}.")
    s1, s2 = _traces(cov)
    return (s1 * s1 / s2 - 1.0) / (n - 1)


# ---------------------------------------------------------------------------------- IsoScore


def isoscore(x_or_moments: PointsOrMoments) -> float:
    """IsoScore of points [N, n] or of a streamed :class:`Moments` (same value either way).

    ``iota = (trace(C)^2 / ||C||_F^2 - 1) / (n - 1)`` with C the float64 covariance (ddof=1); equal to
    the eigenvalue formula of Rudman et al. (2022) without an eigendecomposition.

    Example:
        >>> x = torch.tensor([[2., 1.], [2., -1.], [-2., 1.], [-2., -1.], [0., 0.]])  # cov = diag(4, 1)
        >>> round(isoscore(x), 6) == round(8 / 17, 6)
        True
        >>> isoscore(Moments(2).update(x)) == isoscore(x)
        True
    """
    return float(_iota(_cov64(x_or_moments)))


def isoscore_star(
    points: Float[Tensor, "n_points dim"] | Moments,
    zeta: float = 0.2,
    c0: Float[Tensor, "dim dim"] | None = None,
    *,
    dtype: torch.dtype = torch.float64,
) -> Float[Tensor, ""]:
    """IsoScore* with covariance shrinkage: ``Sigma = (1 - zeta) C_batch + zeta C0``; differentiable.

    Args:
        points: point cloud [N, n] (rows are points, as in the ``isoscore`` package), N >= 2; may be
            fewer points than dimensions. A :class:`Moments` is accepted too (no gradient then).
        zeta: weight of the reference covariance ``c0``, in [0, 1]; 0 gives plain IsoScore.
        c0: reference covariance [n, n], e.g. from :func:`reference_covariance`; default identity.
        dtype: compute dtype (float64; pass float32 to save memory/time on accelerators).

    Returns:
        A 0-dim tensor in ``dtype``; gradients flow back to ``points``.

    Example:
        >>> x = torch.randn(16, 32, requires_grad=True)            # fewer points than dims
        >>> s = isoscore_star(x, zeta=0.2)
        >>> s.backward(); x.grad.shape
        torch.Size([16, 32])
    """
    zeta = _check_zeta(zeta)
    if isinstance(points, Moments):
        n, batch_cov = points.dim, points.cov(ddof=1).to(dtype)
    else:
        x = _points(points, "points").to(dtype)
        n = x.shape[1]
        xc = x - x.mean(dim=0, keepdim=True)
        batch_cov = (xc.T @ xc) / (x.shape[0] - 1)
    sigma = (1.0 - zeta) * batch_cov
    if zeta > 0 or c0 is not None:  # validate a given c0 even when zeta = 0
        sigma = sigma + zeta * _reference(c0, n, batch_cov)
    return _iota(sigma)


def _check_zeta(zeta: Any) -> float:
    try:
        zeta = float(zeta)
    except (TypeError, ValueError):
        raise InputError(f"zeta must be a number in [0, 1], got {zeta!r}.") from None
    if not 0.0 <= zeta <= 1.0:
        raise InputError(f"zeta must be in [0, 1] (the weight of the reference covariance C0), got {zeta}.")
    return zeta


def _reference(c0: Any, n: int, like: Tensor) -> Tensor:
    """The shrinkage target C0 in ``like``'s dtype/device (identity if None)."""
    if c0 is None:
        return torch.eye(n, dtype=like.dtype, device=like.device)
    c0 = _as_tensor(c0, "c0")
    if tuple(c0.shape) != (n, n):
        raise InputError(
            f"c0 must be a [{n}, {n}] covariance matching the points' dimension, got {tuple(c0.shape)}; "
            "build it with reference_covariance() on activations of the same site."
        )
    c0 = c0.to(dtype=like.dtype, device=like.device)
    if not bool(torch.isfinite(c0).all()):
        raise NumericalError("c0 contains NaN or inf; rebuild the reference covariance.")
    return c0


def istar_penalty(
    hidden_states: Float[Tensor, "layer batch pos dim"] | Sequence[Float[Tensor, "batch pos dim"]],
    mask: Shaped[Tensor, "batch pos"] | None,
    *,
    zeta: float,
    c0: Float[Tensor, "dim dim"] | None = None,
    weight: float,
    dtype: torch.dtype = torch.float64,
) -> Float[Tensor, ""]:
    """I-STAR regulariser ``weight * (1 - IsoScore*)`` of the token states of all given layers.

    The non-padding token states of *all* layers are pooled into one point cloud (the I-STAR paper
    regularises the union of the layers' token representations; pooling also gives the mini-batch
    estimate more points). Pass only the layers to regularise: the caller excludes the embedding
    output (HF ``hidden_states[1:]``).

    Sign convention: add the result to the task loss and minimise. ``weight > 0`` pushes IsoScore*
    *up* (more isotropic), ``weight < 0`` pushes it *down* (the authors' example: ``zeta=0.2,
    weight=-5``, which they found helps most tasks).

    Args:
        hidden_states: [layer, batch, pos, dim] tensor, or a sequence of [batch, pos, dim] tensors.
        mask: [batch, pos], True/1 for real tokens, False/0 for padding; None keeps every position.
        zeta, c0: shrinkage as in :func:`isoscore_star`.
        weight: the regularisation strength lambda (sign as above).
        dtype: compute dtype of the covariance (float64 default); the result has this dtype.

    Example:
        >>> hs = torch.randn(3, 2, 5, 16, requires_grad=True)       # 3 layers, 2 texts, 5 positions
        >>> mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
        >>> loss = istar_penalty(hs, mask, zeta=0.2, weight=-5.0)
        >>> loss.backward(); bool(torch.isfinite(hs.grad).all())
        True
    """
    layers = _layer_list(hidden_states)
    batch_shape = tuple(layers[0].shape[:-1])
    if mask is None:
        keep = None
    else:
        mask = _as_tensor(mask, "mask")
        if tuple(mask.shape) != batch_shape:
            raise InputError(
                f"mask shape {tuple(mask.shape)} does not match the hidden states' [batch, pos] "
                f"{batch_shape}; pass the attention mask of the same batch."
            )
        keep = (mask != 0).to(layers[0].device)
    points = torch.cat([h[keep] if keep is not None else h.reshape(-1, h.shape[-1]) for h in layers])
    if points.shape[0] < 2:
        raise InputError(f"the mask keeps {points.shape[0]} token state(s); IsoScore* needs at least 2.")
    try:
        weight = float(weight)
    except (TypeError, ValueError):
        raise InputError(f"weight must be a number, got {weight!r}.") from None
    return weight * (1.0 - isoscore_star(points, zeta=zeta, c0=c0, dtype=dtype))


def _layer_list(hidden_states: Any) -> list[Tensor]:
    """Normalise the two accepted hidden-state layouts to a list of [batch, pos, dim] tensors."""
    if isinstance(hidden_states, Tensor):
        if hidden_states.ndim != 4:
            raise InputError(
                "hidden_states tensor must be [layer, batch, pos, dim], "
                f"got shape {tuple(hidden_states.shape)}; "
                "stack per-layer [batch, pos, dim] states (e.g. torch.stack(hf_out.hidden_states[1:]))."
            )
        return list(hidden_states.unbind(0))
    if not isinstance(hidden_states, Sequence) or len(hidden_states) == 0:
        raise InputError("hidden_states must be a [layer, batch, pos, dim] tensor or a non-empty list of "
                         "[batch, pos, dim] tensors.")
    layers = [_as_tensor(h, "hidden_states[i]") for h in hidden_states]
    shape = tuple(layers[0].shape)
    for i, h in enumerate(layers):
        if h.ndim != 3 or tuple(h.shape) != shape:
            raise InputError(
                f"hidden_states[{i}] has shape {tuple(h.shape)}; every layer must be [batch, pos, dim] "
                f"with the same shape as hidden_states[0] {shape}."
            )
    return layers


def reference_covariance(
    batches: Iterable[
        Float[Tensor, "*batch dim"] | tuple[Float[Tensor, "*batch dim"], Shaped[Tensor, "*batch"]]
    ],
) -> Float[Tensor, "dim dim"]:
    """Reference covariance C0 for :func:`isoscore_star`, streamed over activation batches.

    Each item is a tensor [..., dim] or a ``(tensor, mask)`` pair (mask over the leading dims, 0/False =
    padding). Statistics are accumulated in float64 with :class:`Moments`, so any number of batches
    fits in memory (the authors use ~250k token states, refreshed each epoch).

    Example:
        >>> c0 = reference_covariance([torch.randn(4, 7, 16), (torch.randn(4, 7, 16), torch.ones(4, 7))])
        >>> c0.shape, c0.dtype
        (torch.Size([16, 16]), torch.float64)
    """
    moments: Moments | None = None
    for i, item in enumerate(batches):
        if isinstance(item, (tuple, list)):
            if len(item) != 2:
                raise InputError(
                    f"batch {i}: expected a tensor or a (tensor, mask) pair, got {len(item)} items."
                )
            x, mask = item
        else:
            x, mask = item, None
        x = _as_tensor(x, f"batch {i}")
        if x.ndim == 0:
            raise InputError(f"batch {i} is a scalar; expected activations [..., dim].")
        if moments is None:
            moments = Moments(x.shape[-1], device=x.device)
        moments.update(x.detach(), mask)
    if moments is None:
        raise InputError("reference_covariance got no batches; pass an iterable of activation tensors.")
    return moments.cov(ddof=1)


# ---------------------------------------------------------------------------------- companions


class CosineAccumulator:
    """Streaming, mergeable sum of unit vectors for :func:`average_cosine`.

    Keeps ``count`` and ``total = sum_i x_i / ||x_i||`` in float64; the mean pairwise cosine of all
    points seen is ``(||total||^2 - count) / (count (count - 1))``.

    Example:
        >>> x = torch.randn(100, 8)
        >>> acc = CosineAccumulator(8).update(x[:40]).merge(CosineAccumulator(8).update(x[40:]))
        >>> abs(average_cosine(acc) - average_cosine(x)) < 1e-12
        True
    """

    def __init__(self, dim: int, *, device: Any = None) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise InputError(f"CosineAccumulator(dim=...) needs a positive integer, got {dim!r}.")
        self.dim = dim
        self.count = 0
        self.total = torch.zeros(dim, dtype=torch.float64, device=device)

    def update(
        self, x: Float[Tensor, "*batch dim"], mask: Shaped[Tensor, "*batch"] | None = None
    ) -> CosineAccumulator:
        """Add the points of ``x`` [..., dim] where ``mask`` is True/1; returns ``self``.

        Example:
            >>> CosineAccumulator(2).update(torch.tensor([[3., 4.], [1., 0.]])).total.tolist()
            [1.6, 0.8]
        """
        x = _as_tensor(x, "x")
        if x.ndim == 0 or x.shape[-1] != self.dim:
            raise InputError(f"expected points of shape [..., {self.dim}], got {tuple(x.shape)}.")
        if mask is not None:
            mask = _as_tensor(mask, "mask")
            if tuple(mask.shape) != tuple(x.shape[:-1]):
                raise InputError(
                    f"mask shape {tuple(mask.shape)} does not match the leading shape of x "
                    f"{tuple(x.shape[:-1])}; give one mask entry per point."
                )
            x = x[(mask != 0).to(x.device)]
        x = x.detach().reshape(-1, self.dim).to(device=self.total.device, dtype=torch.float64)
        if x.shape[0] == 0:
            return self
        norms = torch.linalg.vector_norm(x, dim=1)
        if not bool(torch.isfinite(norms).all()):
            raise NumericalError("points contain NaN or inf; mask them out or fix the activations.")
        if not bool((norms > 0).all()):
            raise InputError(
                f"{int((norms == 0).sum())} zero vector(s): cosine similarity is undefined for them; "
                "mask them out (padding is often all zeros)."
            )
        self.total += (x / norms[:, None]).sum(dim=0)
        self.count += x.shape[0]
        return self

    def merge(self, other: CosineAccumulator) -> CosineAccumulator:
        """Fold another accumulator in place (exact); returns ``self``.

        Example:
            >>> a = CosineAccumulator(2).update(torch.ones(2, 2))
            >>> a.merge(a.copy()).count
            4
        """
        if not isinstance(other, CosineAccumulator) or other.dim != self.dim:
            raise InputError("can only merge a CosineAccumulator of the same dimension.")
        self.total += other.total.to(self.total.device)
        self.count += other.count
        return self

    def __add__(self, other: CosineAccumulator) -> CosineAccumulator:
        if not isinstance(other, CosineAccumulator):
            return NotImplemented
        return self.copy().merge(other)

    def copy(self) -> CosineAccumulator:
        """An independent copy.

        Example:
            >>> CosineAccumulator(3).copy().count
            0
        """
        new = CosineAccumulator(self.dim, device=self.total.device)
        new.count, new.total = self.count, self.total.clone()
        return new

    def value(self) -> float:
        """Mean cosine similarity over all ordered pairs of distinct points.

        Example:
            >>> CosineAccumulator(2).update(torch.tensor([[1., 0.], [0., 2.]])).value()
            0.0
        """
        if self.count < 2:
            raise InputError(f"average cosine needs at least 2 points, got {self.count}.")
        n = self.count
        return float((self.total @ self.total - n) / (n * (n - 1)))


def average_cosine(
    x: Float[Tensor, "n_points dim"] | CosineAccumulator, *, max_points: int | None = None, seed: int = 0
) -> float:
    """Mean cosine similarity of distinct pairs: the common (but flawed) anisotropy measure.

    Exact and O(N d): ``sum_{i != j} cos(x_i, x_j) = ||sum_i x_i / ||x_i|| ||^2 - N``, so no N x N
    matrix. High values mean the points share a common direction (often just a large mean), which is
    not the same as using few dimensions; report it next to :func:`isoscore`, not instead of it.

    Args:
        x: points [N, dim] or a :class:`CosineAccumulator` (streamed form).
        max_points: if set and N is larger, use a random subset of this many points (for comparison
            with studies that subsample); by default all points are used, since the cost is linear.
        seed: seed of that subset.

    Example:
        >>> round(average_cosine(torch.tensor([[1., 0.], [0., 1.], [1., 1.]])), 6)   # (0 + 2 * 0.7071) / 3
        0.471405
    """
    if isinstance(x, CosineAccumulator):
        return x.value()
    x = _points(x)
    if max_points is not None:
        if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 2:
            raise InputError(f"max_points must be an integer >= 2 or None, got {max_points!r}.")
        if x.shape[0] > max_points:
            gen = torch.Generator().manual_seed(seed)
            x = x[torch.randperm(x.shape[0], generator=gen)[:max_points].to(x.device)]
    acc = CosineAccumulator(x.shape[1], device=x.device)
    for start in range(0, x.shape[0], _CHUNK):
        acc.update(x[start : start + _CHUNK])
    return acc.value()


def participation_ratio(x_or_moments: PointsOrMoments) -> float:
    """Participation ratio ``(sum lambda)^2 / sum lambda^2`` of the covariance, in [1, n].

    The effective number of dimensions used; ``isoscore = (PR - 1) / (n - 1)``.

    Example:
        >>> x = torch.tensor([[2., 1.], [2., -1.], [-2., 1.], [-2., -1.], [0., 0.]])  # eigenvalues 4, 1
        >>> round(participation_ratio(x), 6) == round(25 / 17, 6)
        True
    """
    s1, s2 = _traces(_cov64(x_or_moments))
    return float(s1 * s1 / s2)


def outlier_dimensions(
    x_or_moments: PointsOrMoments, k: int = 5
) -> tuple[Int[Tensor, " k"], Float[Tensor, " k"]]:
    """The ``k`` coordinate dimensions with the largest variance and their share of the total variance.

    Residual streams typically have a few such "outlier dimensions" that dominate the variance (and
    drive IsoScore towards 0). Returns indices sorted by decreasing variance and the fraction
    ``var[i] / sum(var)`` of each.

    Example:
        >>> x = torch.randn(1000, 4, dtype=torch.float64) * torch.tensor([1., 10., 1., 3.])
        >>> idx, share = outlier_dimensions(x, k=2)
        >>> idx.tolist()
        [1, 3]
    """
    m = _moments(x_or_moments)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= m.dim:
        raise InputError(f"k must be an integer between 1 and the dimension {m.dim}, got {k!r}.")
    var = m.var(ddof=1).to(torch.float64)
    total = var.sum()
    if not bool(torch.isfinite(total)):
        raise NumericalError("variances contain NaN or inf; check the activations.")
    if not bool(total > 0):
        raise InputError("the points have zero variance, so variance shares are undefined.")
    top, idx = torch.topk(var, k)
    return idx, top / total
