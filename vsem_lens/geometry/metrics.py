r"""IsoScore, IsoScore* and their covariance companions (participation ratio, outlier dimensions).

Pure tensor functions (no model code). They take a point cloud ``x`` [N, n] (N points, n dimensions)
or, where only the covariance matters, a streamed :class:`~vsem_lens.core.moments.Moments`, and compute
in float64.

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

Example:
    >>> import torch
    >>> x = torch.randn(20_000, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> round(isoscore(x), 2)
    1.0
    >>> round(isoscore(x * torch.tensor([10., 1, 1, 1, 1, 1, 1, 1])), 2)   # one dominant dimension
    0.02
"""

from __future__ import annotations

from typing import Any, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..core.errors import InputError, NumericalError
from ..core.moments import Moments
from ..core.stats import as_tensor

PointsOrMoments = Union[Float[Tensor, "n_points dim"], Moments]

#: Rows per streaming update when a whole in-memory cloud is given: bounds the float64 copy.
CHUNK_ROWS = 8192


# ---------------------------------------------------------------------------------- helpers


def point_cloud(x: Any, name: str = "x", *, min_points: int = 2) -> Tensor:
    """``x`` as a tensor if it is a real point cloud [N, n] with at least ``min_points`` rows, else InputError.

    Example:
        >>> point_cloud(torch.zeros(3, 2)).shape
        torch.Size([3, 2])
    """
    x = as_tensor(x, name)
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
    x = point_cloud(x_or_moments)
    m = Moments(x.shape[1], device=x.device)
    for start in range(0, x.shape[0], CHUNK_ROWS):
        m.update(x[start : start + CHUNK_ROWS].detach())
    return m


def _cov64(x_or_moments: Any) -> Tensor:
    """Float64 covariance (ddof=1) of points or Moments."""
    return _moments(x_or_moments).cov(ddof=1).to(torch.float64)


def covariance_traces(cov: Tensor) -> tuple[Tensor, Tensor]:
    """``sum lambda = trace(C)`` and ``sum lambda^2 = ||C||_F^2`` (C symmetric), with checks.

    Example:
        >>> [float(t) for t in covariance_traces(torch.diag(torch.tensor([4.0, 1.0])))]
        [5.0, 17.0]
    """
    if not bool(torch.isfinite(cov).all()):
        raise NumericalError("the covariance contains NaN or inf; check the points for NaN/inf or overflow.")
    s1 = torch.diagonal(cov).sum()
    s2 = (cov * cov).sum()
    if not bool(s2 > 0):
        raise InputError("the points have zero variance (all identical), so isotropy is undefined.")
    return s1, s2


def isoscore_of_covariance(cov: Tensor) -> Tensor:
    """IsoScore ``(trace(C)^2 / ||C||_F^2 - 1) / (n - 1)`` of a covariance [n, n] (a 0-dim tensor; differentiable).

    Example:
        >>> round(float(isoscore_of_covariance(torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64)))), 6)
        0.470588
    """
    n = cov.shape[0]
    if n < 2:
        raise InputError(f"IsoScore needs at least 2 dimensions, got {n}.")
    s1, s2 = covariance_traces(cov)
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
    return float(isoscore_of_covariance(_cov64(x_or_moments)))


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
    zeta = check_zeta(zeta)
    if isinstance(points, Moments):
        n, batch_cov = points.dim, points.cov(ddof=1).to(dtype)
    else:
        x = point_cloud(points, "points").to(dtype)
        n = x.shape[1]
        xc = x - x.mean(dim=0, keepdim=True)
        batch_cov = (xc.T @ xc) / (x.shape[0] - 1)
    sigma = (1.0 - zeta) * batch_cov
    if zeta > 0 or c0 is not None:  # validate a given c0 even when zeta = 0
        sigma = sigma + zeta * _reference(c0, n, batch_cov)
    return isoscore_of_covariance(sigma)


def check_zeta(zeta: Any) -> float:
    """``zeta`` as a float if it is a number in [0, 1] (the IsoScore* shrinkage weight), else InputError.

    Example:
        >>> check_zeta(0.2)
        0.2
    """
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
    c0 = as_tensor(c0, "c0")
    if tuple(c0.shape) != (n, n):
        raise InputError(
            f"c0 must be a [{n}, {n}] covariance matching the points' dimension, got {tuple(c0.shape)}; "
            "build it with reference_covariance() on activations of the same site."
        )
    c0 = c0.to(dtype=like.dtype, device=like.device)
    if not bool(torch.isfinite(c0).all()):
        raise NumericalError("c0 contains NaN or inf; rebuild the reference covariance.")
    return c0



def participation_ratio(x_or_moments: PointsOrMoments) -> float:
    """Participation ratio ``(sum lambda)^2 / sum lambda^2`` of the covariance, in [1, n].

    The effective number of dimensions used; ``isoscore = (PR - 1) / (n - 1)``.

    Example:
        >>> x = torch.tensor([[2., 1.], [2., -1.], [-2., 1.], [-2., -1.], [0., 0.]])  # eigenvalues 4, 1
        >>> round(participation_ratio(x), 6) == round(25 / 17, 6)
        True
    """
    s1, s2 = covariance_traces(_cov64(x_or_moments))
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

