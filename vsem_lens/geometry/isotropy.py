r"""Isotropy of point clouds: IsoScore, IsoScore*, the I-STAR penalty and simpler companions.

All functions here are pure tensor functions (no model code). They take a point cloud ``x`` [N, n]
(N points, n dimensions) or, where only the covariance matters, a streamed
:class:`~vsem_lens.core.stats.Moments`, and compute in float64.

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

Model-level, streamed over a corpus: :func:`isotropy_by_layer` (one capture pass; per (site, layer,
frame) a float64 mean/covariance and a sum of unit vectors, kept in a mergeable :class:`IsotropyState`).

Example:
    >>> import torch
    >>> x = torch.randn(20_000, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> round(isoscore(x), 2)
    1.0
    >>> round(isoscore(x * torch.tensor([10., 1, 1, 1, 1, 1, 1, 1])), 2)   # one dominant dimension
    0.02
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Sequence, Union

import torch
from jaxtyping import Float, Int, Shaped
from torch import Tensor

from ..core.errors import InputError, NumericalError
from ..core.stats import Moments, Stat, as_tensor, chan_combine, select_points

if TYPE_CHECKING:  # annotations only: this module stays importable without the model stack
    import pandas as pd

    from ..core.capture import ActivationBatch
    from ..core.models import HookedModel

PointsOrMoments = Union[Float[Tensor, "n_points dim"], Moments]

# Rows per Moments.update when a whole in-memory cloud is given: bounds the float64 copy.
_CHUNK = 8192


# ---------------------------------------------------------------------------------- helpers


def _points(x: Any, name: str = "x", *, min_points: int = 2) -> Tensor:
    """Validate a [N, n] real point cloud."""
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
        mask = as_tensor(mask, "mask")
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
    layers = [as_tensor(h, "hidden_states[i]") for h in hidden_states]
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
        x = as_tensor(x, f"batch {i}")
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
        x = select_points(x, mask, self.dim, who="CosineAccumulator.update")
        x = x.to(device=self.total.device, dtype=torch.float64)
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


# ---------------------------------------------------------------------------------- by layer, streamed

#: Sites whose activations are residual-stream states: the ``final_norm`` frame applies only to these.
RESIDUAL_SITES = ("embed", "resid_pre", "resid_mid", "resid_post")
#: Frames :func:`isotropy_by_layer` supports (see :mod:`vsem_lens.lenses.base`).
ISOTROPY_FRAMES = ("raw", "final_norm")
#: Shrinkage targets for IsoScore* in :func:`isotropy_by_layer`.
STAR_REFERENCES = ("scaled_identity", "identity")

# Float64 elements per stacked [group, token, d] buffer folded in one batched matmul (~64 MiB).
_FOLD_ELEMENTS = 8 * 2**20


class IsotropyState(Stat):
    """Streaming, mergeable isotropy statistics of many (site, layer, frame) point clouds at once.

    For every key ``(site, layer, frame)`` it keeps the token count, the float64 mean [d], the centred
    scatter matrix [d, d] (the :class:`~vsem_lens.core.stats.Moments` state) and the float64 sum of unit
    vectors [d] (the :class:`CosineAccumulator` state): O(d^2) memory per key, whatever the corpus size.
    Keys are stored stacked, so one batch is folded in with a few batched matmuls (all layers of a
    (site, frame) at once, Chan et al.'s pairwise update accumulated in place with ``baddbmm``) rather
    than one small matmul per layer.

    Reduce states computed on different shards (processes, ranks) with :meth:`merge`; move them between
    processes with :meth:`state_dict` / :meth:`from_state_dict` (plain tensors, e.g. for
    ``torch.distributed.all_gather_object``). The result does not depend on how tokens were split into
    batches or shards (up to float64 rounding).

    Args:
        keys: the ``(site, layer, frame)`` triples to track; ``frame`` in ``raw`` / ``final_norm``
            (``final_norm`` only for residual sites, see :data:`RESIDUAL_SITES`).
        d_model: width of the points.
        final_norm: the function applying the model's final norm (``model.final_norm``); needed by
            :meth:`update` when a ``final_norm`` key is tracked, not by :meth:`merge`/:meth:`result`.

    Example:
        >>> state = IsotropyState.for_model(model, layers=[0, 5])                  # doctest: +SKIP
        >>> for batch in iter_capture(model, corpus, layers=state.layers):          # doctest: +SKIP
        ...     state.update(batch)
        >>> state.result().head()                                                   # doctest: +SKIP
    """

    def __init__(
        self,
        keys: Sequence[tuple[str, int, str]],
        d_model: int,
        *,
        final_norm: Any = None,
    ) -> None:
        keys = [(str(s), int(layer), str(f)) for s, layer, f in keys]
        if not keys:
            raise InputError("IsotropyState needs at least one (site, layer, frame) key.")
        if len(set(keys)) != len(keys):
            raise InputError("IsotropyState keys must be distinct (site, layer, frame) triples.")
        for site, _, frame in keys:
            _check_site_frame(site, frame)
        if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 2:
            raise InputError(f"d_model must be an integer >= 2, got {d_model!r}.")
        # Order keys by (site, frame, layer) so every (site, frame) group is a contiguous slice.
        from ..core.capture import SITES

        self.keys: list[tuple[str, int, str]] = sorted(
            keys, key=lambda k: (SITES.index(k[0]), ISOTROPY_FRAMES.index(k[2]), k[1])
        )
        self.d_model = d_model
        self.final_norm = final_norm
        n = len(self.keys)
        self.count = torch.zeros(n, dtype=torch.int64)
        self.mean = torch.zeros(n, d_model, dtype=torch.float64)
        self.m2 = torch.zeros(n, d_model, d_model, dtype=torch.float64)
        self.cos_total = torch.zeros(n, d_model, dtype=torch.float64)
        self._groups = self._make_groups()

    @classmethod
    def for_model(
        cls,
        model: HookedModel,
        *,
        sites: str | Sequence[str] = ("resid_post",),
        frames: str | Sequence[str] = ISOTROPY_FRAMES,
        layers: int | Sequence[int] | None = None,
    ) -> "IsotropyState":
        """An empty state for ``model``'s sites x layers x frames (``final_norm`` on residual sites only).

        Example:
            >>> IsotropyState.for_model(model, sites=("resid_post", "mlp_out"), layers=[3]).keys  # doctest: +SKIP
            [('resid_post', 3, 'raw'), ('resid_post', 3, 'final_norm'), ('mlp_out', 3, 'raw')]
        """
        from ..core.capture import check_layers, check_sites

        sites = check_sites(sites)
        frames = _check_frames(frames)
        layer_list = check_layers(layers, model.n_layers)
        keys = []
        for site in sites:
            usable = [f for f in frames if f == "raw" or site in RESIDUAL_SITES]
            if not usable:
                raise InputError(
                    f"site {site!r} is a block output, not a residual state, so the 'final_norm' frame does "
                    f"not apply to it (the final norm rescales the whole residual); add 'raw' to frames."
                )
            for frame in usable:
                for layer in [0] if site == "embed" else layer_list:
                    keys.append((site, layer, frame))
        return cls(keys, model.d_model, final_norm=model.final_norm)

    # ------------------------------------------------------------------ bookkeeping

    @property
    def sites(self) -> list[str]:
        """Sites tracked, in key order."""
        return list(dict.fromkeys(k[0] for k in self.keys))

    @property
    def layers(self) -> list[int]:
        """Layers a capture must provide (the union over non-embed sites; ``[0]`` if only embed)."""
        return sorted({k[1] for k in self.keys if k[0] != "embed"}) or [0]

    def _make_groups(self) -> list[tuple[str, str, int, int, list[int]]]:
        """Contiguous (site, frame, start, stop, layers) slices of :attr:`keys`."""
        groups: list[tuple[str, str, int, int, list[int]]] = []
        start = 0
        for i in range(1, len(self.keys) + 1):
            if i == len(self.keys) or self.keys[i][::2] != self.keys[start][::2]:
                site, _, frame = self.keys[start]
                groups.append((site, frame, start, i, [k[1] for k in self.keys[start:i]]))
                start = i
        return groups

    # ------------------------------------------------------------------ accumulation

    def update(self, batch: ActivationBatch) -> "IsotropyState":
        """Fold one :class:`~vsem_lens.core.capture.ActivationBatch` in (padding is already removed); returns self.

        The batch must hold every tracked site and layer (capture with ``sites=state.sites,
        layers=state.layers``).

        Example:
            >>> for batch in iter_capture(model, corpus, layers=state.layers):  # doctest: +SKIP
            ...     state.update(batch)
        """
        for site, frame, start, stop, layers in self._groups:
            if site not in batch.acts:
                raise InputError(
                    f"the batch has no {site!r} activations; capture with sites={tuple(self.sites)}."
                )
            acts = batch.acts[site]
            batch_layers = [0] if site == "embed" else list(batch.layers)
            missing = sorted(set(layers) - set(batch_layers))
            if missing:
                raise InputError(f"the batch lacks {site} layers {missing}; capture with layers={self.layers}.")
            slots = [batch_layers.index(layer) for layer in layers]
            points = acts if slots == list(range(acts.shape[0])) else acts[slots]
            self.update_points(site, frame, layers, points)
        return self

    def update_points(
        self, site: str, frame: str, layers: Sequence[int], points: Float[Tensor, "layer token d_model"]
    ) -> "IsotropyState":
        """Fold raw activations of one site (layer by layer, [layer, token, d_model]) into ``frame``'s keys.

        ``points`` are the *raw* activations; the ``final_norm`` frame applies the final norm here.

        Example:
            >>> state.update_points("resid_post", "raw", [0, 5], acts["resid_post"])  # doctest: +SKIP
        """
        index = {k: i for i, k in enumerate(self.keys)}
        try:
            slots = [index[(site, int(layer), frame)] for layer in layers]
        except KeyError as exc:
            raise InputError(f"key {exc.args[0]} is not tracked by this state; tracked: {self.keys}.") from None
        points = as_tensor(points, "points")
        if points.ndim != 3 or points.shape[0] != len(slots) or points.shape[2] != self.d_model:
            raise InputError(
                f"points must be [layer={len(slots)}, token, d_model={self.d_model}], got {tuple(points.shape)}."
            )
        n_tok = points.shape[1]
        if n_tok == 0:
            return self
        if frame == "final_norm" and self.final_norm is None:
            raise InputError("this state has no final_norm function; build it with IsotropyState.for_model(model).")
        step = max(1, _FOLD_ELEMENTS // max(1, n_tok * self.d_model))
        for a in range(0, len(slots), step):
            chunk = points[a : a + step].detach()
            if frame == "final_norm":
                with torch.no_grad():
                    chunk = self.final_norm(chunk)
            # Contiguous runs of slots map to slices of the stacked state (always the case when called
            # from update(), whose layers follow key order).
            idx = slots[a : a + step]
            if idx == list(range(idx[0], idx[0] + len(idx))):
                self._fold(slice(idx[0], idx[0] + len(idx)), chunk)
            else:
                for j, slot in enumerate(idx):
                    self._fold(slice(slot, slot + 1), chunk[j : j + 1])
        return self

    def _fold(self, where: slice, x: Tensor) -> None:
        """Chan et al. update of keys ``where`` with points x [g, T, d], in place, in float64."""
        x = x.to(device=self.mean.device, dtype=torch.float64, copy=True)
        n_b = x.shape[1]
        mean_b = x.mean(dim=1)  # [g, d]
        norms = torch.linalg.vector_norm(x, dim=2)  # [g, T]
        if not bool(torch.isfinite(mean_b).all()) or not bool(torch.isfinite(norms).all()):
            raise NumericalError(
                "activations contain NaN or inf; check the model's dtype (float16 overflows are common: "
                "load it with dtype=torch.float32)."
            )
        if not bool((norms > 0).all()):
            raise InputError(
                f"{int((norms == 0).sum())} zero activation vector(s): their cosine is undefined; "
                "this site is all zeros for some tokens, so analyse another site."
            )
        # Sum of unit vectors as one batched [1, T] x [T, d] product per key (no [g, T, d] temporary).
        self.cos_total[where] += torch.bmm(norms.reciprocal().unsqueeze(1), x).squeeze(1)
        n_a = self.count[where].to(torch.float64)  # [g]
        n = n_a + n_b
        delta = mean_b - self.mean[where]
        m2 = self.m2[where]  # a view: updated in place
        xc = x.sub_(mean_b.unsqueeze(1))
        m2.baddbmm_(xc.transpose(1, 2), xc)
        coef = (n_a * n_b / n).reshape(-1, 1, 1)
        m2.baddbmm_(delta.unsqueeze(2) * coef, delta.unsqueeze(1))
        self.mean[where] += delta * (n_b / n).unsqueeze(1)
        self.count[where] += n_b

    def merge(self, other: "IsotropyState") -> "IsotropyState":
        """Fold another state with the same keys in place (exact pairwise combination); returns self.

        Example:
            >>> total = states[0].copy()                  # doctest: +SKIP
            >>> for s in states[1:]: total.merge(s)       # doctest: +SKIP
        """
        if not isinstance(other, IsotropyState):
            raise InputError(f"IsotropyState.merge expects another IsotropyState, got {type(other).__name__}.")
        if other.keys != self.keys or other.d_model != self.d_model:
            raise InputError(
                "cannot merge isotropy states tracking different (site, layer, frame) keys or widths; "
                "build every shard's state with the same sites, layers and frames."
            )
        _, self.mean, self.m2 = chan_combine(
            self.count, self.mean, self.m2, other.count, other.mean, other.m2, outer=True
        )
        self.cos_total += other.cos_total
        self.count += other.count
        return self

    def all_reduce(self, env: Any) -> None:
        """Combine the states of every ``torch.distributed`` rank in place (exact Chan update)."""
        from ..core.distributed import all_reduce_moments, all_reduce_sum

        count, self.mean, self.m2 = all_reduce_moments(self.count, self.mean, self.m2, env, outer=True)
        self.count = count.to(torch.int64)
        self.cos_total = all_reduce_sum(self.cos_total.to(torch.float64), env)

    def copy(self) -> "IsotropyState":
        """An independent copy (sharing the final-norm function).

        Example:
            >>> state.copy().merge(state).count[0] == 2 * state.count[0]  # doctest: +SKIP
            tensor(True)
        """
        new = IsotropyState(self.keys, self.d_model, final_norm=self.final_norm)
        new.count, new.mean = self.count.clone(), self.mean.clone()
        new.m2, new.cos_total = self.m2.clone(), self.cos_total.clone()
        return new

    # ------------------------------------------------------------------ views and results

    def moments(self, site: str, layer: int, frame: str = "raw") -> Moments:
        """The :class:`~vsem_lens.core.stats.Moments` of one key (a copy; symmetrised scatter matrix).

        Example:
            >>> isoscore(state.moments("resid_post", 5, "raw"))  # doctest: +SKIP
        """
        i = self._index(site, layer, frame)
        m2 = self.m2[i]
        return Moments.from_state_dict({"count": self.count[i].clone(), "mean": self.mean[i], "m2": 0.5 * (m2 + m2.T)})

    def cosines(self, site: str, layer: int, frame: str = "raw") -> CosineAccumulator:
        """The :class:`CosineAccumulator` of one key (a copy).

        Example:
            >>> average_cosine(state.cosines("resid_post", 5))  # doctest: +SKIP
        """
        i = self._index(site, layer, frame)
        acc = CosineAccumulator(self.d_model)
        acc.count, acc.total = int(self.count[i]), self.cos_total[i].clone()
        return acc

    def _index(self, site: str, layer: int, frame: str) -> int:
        try:
            return self.keys.index((site, int(layer), frame))
        except ValueError:
            raise InputError(f"({site!r}, {layer}, {frame!r}) is not tracked; tracked keys: {self.keys}.") from None

    def result(
        self, *, k_outliers: int = 5, zeta: float = 0.2, star_reference: str = "scaled_identity"
    ) -> pd.DataFrame:
        """The tidy table of :func:`isotropy_by_layer` for the statistics gathered so far.

        Example:
            >>> state.result(k_outliers=3).columns.tolist()[:4]  # doctest: +SKIP
            ['layer', 'site', 'frame', 'n_tokens']
        """
        import pandas as pd

        zeta = _check_result_options(k_outliers, zeta, star_reference, self.d_model)
        rows = []
        for site, layer, frame in self.keys:
            n_tok = int(self.count[self._index(site, layer, frame)])
            if n_tok < 2:
                raise InputError(
                    f"{site} layer {layer} ({frame}) has {n_tok} token(s); isotropy needs at least 2: "
                    "give more or longer texts."
                )
            i = self._index(site, layer, frame)
            # One symmetrised covariance per key feeds every measure (the same formulas as isoscore(),
            # isoscore_star(), participation_ratio() and outlier_dimensions() on a Moments).
            cov = (self.m2[i] + self.m2[i].T) * (0.5 / (n_tok - 1))
            s1, s2 = _traces(cov)
            if star_reference == "scaled_identity":
                c0 = torch.eye(self.d_model, dtype=torch.float64) * (s1 / self.d_model)
            else:
                c0 = torch.eye(self.d_model, dtype=torch.float64)
            var = torch.diagonal(cov)
            share, idx = torch.topk(var / var.sum(), k_outliers)
            rows.append(
                {
                    "layer": layer,
                    "site": site,
                    "frame": frame,
                    "n_tokens": n_tok,
                    "isoscore": float(_iota(cov)),
                    "isoscore_star": float(_iota((1.0 - zeta) * cov + zeta * c0)),
                    "average_cosine": self.cosines(site, layer, frame).value(),
                    "participation_ratio": float(s1 * s1 / s2),
                    "outlier_dims": idx.tolist(),
                    "outlier_shares": share.tolist(),
                    "outlier_variance_share": float(share.sum()),
                }
            )
        df = pd.DataFrame(rows)
        df.attrs.update({"zeta": zeta, "star_reference": star_reference, "k_outliers": k_outliers})
        return df

    # ------------------------------------------------------------------ persistence

    def state_dict(self, *, clone: bool = True) -> dict[str, Any]:
        """Plain tensors plus the key list (picklable; no model reference).

        ``clone=False`` returns the live tensors, for a caller that serialises them at once (the
        scatter matrices are ``keys x d_model^2`` float64: a checkpoint need not copy them first).

        Example:
            >>> IsotropyState.from_state_dict(state.state_dict(), final_norm=model.final_norm)  # doctest: +SKIP
        """
        copy = (lambda t: t.clone()) if clone else (lambda t: t)
        return {
            "keys": [list(k) for k in self.keys],
            "d_model": self.d_model,
            **{name: copy(getattr(self, name)) for name in ("count", "mean", "m2", "cos_total")},
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], *, final_norm: Any = None) -> "IsotropyState":
        """Rebuild a state from :meth:`state_dict` output.

        Example:
            >>> s2 = IsotropyState.from_state_dict(state.state_dict())  # doctest: +SKIP
        """
        from ..core.errors import ArtifactError

        try:
            new = cls([tuple(k) for k in state["keys"]], int(state["d_model"]), final_norm=final_norm)
            tensors = {name: state[name] for name in ("count", "mean", "m2", "cos_total")}
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"not an IsotropyState state dict ({exc!r}); build it with state_dict().") from None
        # The stored keys are already in canonical order, so tensors line up with new.keys.
        if [tuple(k) for k in state["keys"]] != new.keys:
            raise ArtifactError("the state dict's keys are not in canonical order; it was not made by state_dict().")
        shapes = {"count": (len(new.keys),), "mean": tuple(new.mean.shape), "m2": tuple(new.m2.shape),
                  "cos_total": tuple(new.cos_total.shape)}
        for name, shape in shapes.items():
            if tuple(tensors[name].shape) != shape:
                raise ArtifactError(f"IsotropyState {name} has shape {tuple(tensors[name].shape)}, expected {shape}.")
        new.count = tensors["count"].to(torch.int64).clone()
        new.mean = tensors["mean"].to(torch.float64).clone()
        new.m2 = tensors["m2"].to(torch.float64).clone()
        new.cos_total = tensors["cos_total"].to(torch.float64).clone()
        return new

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output in place (same keys and width; validated)."""
        loaded = IsotropyState.from_state_dict(state, final_norm=self.final_norm)
        if loaded.keys != self.keys or loaded.d_model != self.d_model:
            from ..core.errors import ArtifactError

            raise ArtifactError("the saved isotropy state tracks other (site, layer, frame) keys or another width.")
        self.count, self.mean, self.m2, self.cos_total = loaded.count, loaded.mean, loaded.m2, loaded.cos_total

    def __repr__(self) -> str:
        return f"IsotropyState(keys={len(self.keys)}, d_model={self.d_model}, n_tokens={self.count.tolist()[:1]})"


def _check_result_options(k_outliers: Any, zeta: Any, star_reference: Any, d_model: int) -> float:
    zeta = _check_zeta(zeta)
    if star_reference not in STAR_REFERENCES:
        raise InputError(f"unknown star_reference {star_reference!r}; choose from {', '.join(STAR_REFERENCES)}.")
    if isinstance(k_outliers, bool) or not isinstance(k_outliers, int) or not 1 <= k_outliers <= d_model:
        raise InputError(f"k_outliers must be an integer between 1 and d_model={d_model}, got {k_outliers!r}.")
    return zeta


def _check_frames(frames: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(frames, str):
        frames = (frames,)
    frames = tuple(frames)
    if not frames:
        raise InputError(f"no frames were given; choose from {', '.join(ISOTROPY_FRAMES)}.")
    for frame in frames:
        if frame not in ISOTROPY_FRAMES:
            hint = (
                " (the tuned frame is not supported by isotropy analyses yet)" if frame == "tuned" else ""
            )
            raise InputError(f"unknown frame {frame!r}{hint}; choose from {', '.join(ISOTROPY_FRAMES)}.")
    return tuple(dict.fromkeys(frames))


def _check_site_frame(site: str, frame: str) -> None:
    from ..core.capture import SITES

    if site not in SITES:
        raise InputError(f"unknown site {site!r}; choose from {', '.join(SITES)}.")
    _check_frames(frame)
    if frame == "final_norm" and site not in RESIDUAL_SITES:
        raise InputError(
            f"the 'final_norm' frame applies to residual sites ({', '.join(RESIDUAL_SITES)}), not {site!r}; "
            "use frame 'raw' for block outputs."
        )


def isotropy_by_layer(
    model: HookedModel,
    texts: str | Sequence[str],
    *,
    sites: str | Sequence[str] = ("resid_post",),
    frames: str | Sequence[str] = ISOTROPY_FRAMES,
    layers: int | Sequence[int] | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    k_outliers: int = 5,
    zeta: float = 0.2,
    star_reference: str = "scaled_identity",
    progress: bool = False,
) -> pd.DataFrame:
    """Isotropy of the token states of every layer, streamed once over any corpus.

    One pass of :func:`~vsem_lens.core.capture.iter_capture` feeds an :class:`IsotropyState` with a
    float64 mean/covariance and a sum of unit vectors per (site, layer, frame): memory is O(d^2) per
    key whatever the corpus size, and the result does not depend on ``batch_size``. Padding never
    enters (capture removes it). Tokenisation follows the model's rule (see :mod:`vsem_lens.core.models`).

    Frames: ``raw`` is the activation as captured; ``final_norm`` applies the model's own final norm to
    each token vector (the logit-lens frame, where the semantic bases live). The final norm rescales a
    whole residual state, so ``final_norm`` rows are produced for residual sites only (``embed``,
    ``resid_pre``, ``resid_mid``, ``resid_post``); block outputs (``attn_out``, ``mlp_out``) get ``raw``
    rows only, and asking for a block output with no applicable frame is an error.

    IsoScore* (Rudman & Eickhoff 2024) shrinks the covariance towards a reference ``C0``:
    ``Sigma = (1 - zeta) C + zeta C0``. Over a whole corpus the authors' data-driven ``C0`` (the
    covariance of a large sample of token states) is ``C`` itself and would make IsoScore* equal to
    IsoScore, so the default ``star_reference="scaled_identity"`` uses ``C0 = (trace(C)/d) I``: the
    isotropic covariance with the same total variance (Ledoit-Wolf-style shrinkage). Unlike the plain
    identity (``star_reference="identity"``, the ``isoscore`` package default), it keeps IsoScore*
    invariant to the scale of the activations, so frames and layers with very different norms stay
    comparable. IsoScore* is evaluated from the streamed covariance, without autograd.

    Args:
        model: a :class:`~vsem_lens.core.models.HookedModel`.
        texts: one text or a list of texts.
        sites: activation sites (see :mod:`vsem_lens.core.capture`).
        frames: ``raw`` and/or ``final_norm``.
        layers: layer indices (``None`` = all; negative count from the end).
        batch_size, max_length, progress: as in :func:`~vsem_lens.core.capture.iter_capture`.
        k_outliers: number of highest-variance coordinate dimensions to report.
        zeta: IsoScore* shrinkage weight of ``C0``, in [0, 1].
        star_reference: ``scaled_identity`` (default) or ``identity``: the ``C0`` of IsoScore*.

    Returns:
        A tidy DataFrame, one row per (site, frame, layer): ``layer, site, frame, n_tokens, isoscore,
        isoscore_star, average_cosine, participation_ratio, outlier_dims`` (list of k indices, largest
        variance first), ``outlier_shares`` (their variance shares) and ``outlier_variance_share``
        (their sum). ``df.attrs`` records ``zeta``, ``star_reference`` and ``k_outliers``.

    Raises:
        InputError: unknown site or frame, bad layers, empty texts, fewer than 2 tokens.

    Example:
        >>> df = isotropy_by_layer(model, corpus, layers=[0, 15, 29])       # doctest: +SKIP
        >>> df.query("frame == 'raw'")[["layer", "isoscore", "outlier_dims"]]  # doctest: +SKIP
    """
    from ..core.capture import iter_capture

    state = IsotropyState.for_model(model, sites=sites, frames=frames, layers=layers)
    _check_result_options(k_outliers, zeta, star_reference, model.d_model)  # fail before the long pass
    for batch in iter_capture(
        model,
        texts,
        sites=state.sites,
        layers=state.layers,
        batch_size=batch_size,
        max_length=max_length,
        progress=progress,
    ):
        state.update(batch)
    return state.result(k_outliers=k_outliers, zeta=zeta, star_reference=star_reference)
