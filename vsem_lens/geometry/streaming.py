"""The streamed, mergeable isotropy state of many (site, layer, frame) point clouds at once
(:class:`IsotropyState`), and the check of its result options.

A frame is a name (``raw``, ``final_norm``, ``tuned``) or any :class:`~vsem_lens.lenses.base.Lens`; the
state keeps the lens of every non-raw frame and applies it, layer by layer, to the raw activations it
is fed (see :mod:`vsem_lens.geometry.frames`).

Example:
    >>> state = IsotropyState([("resid_post", 0, "raw")], d_model=4)
    >>> state.keys
    [('resid_post', 0, 'raw')]
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..core.capture import SITES, ActivationBatch, check_layers, check_sites
from ..core.distributed import all_reduce_moments, all_reduce_sum
from ..core.errors import ArtifactError, InputError, NumericalError
from ..core.models import HookedModel
from ..core.moments import Moments
from ..core.stats import Stat, as_tensor, chan_combine
from ..lenses.base import Lens
from ..lenses.frames import frame_order, resolve_frames
from .cosine import CosineAccumulator
from .frames import RESIDUAL_SITES, check_site_frame
from .metrics import check_zeta, covariance_traces, isoscore_of_covariance

#: Frames :func:`~vsem_lens.geometry.isotropy.isotropy_by_layer` reads by default.
DEFAULT_ISOTROPY_FRAMES = ("raw", "final_norm")
#: Shrinkage targets for IsoScore* in :func:`isotropy_by_layer`.
STAR_REFERENCES = ("scaled_identity", "identity")

# Float64 elements per stacked [group, token, d] buffer folded in one batched matmul (~64 MiB).
_FOLD_ELEMENTS = 8 * 2**20


class IsotropyState(Stat):
    """Streaming, mergeable isotropy statistics of many (site, layer, frame) point clouds at once.

    For every key ``(site, layer, frame)`` it keeps the token count, the float64 mean [d], the centred
    scatter matrix [d, d] (the :class:`~vsem_lens.core.moments.Moments` state) and the float64 sum of unit
    vectors [d] (the :class:`CosineAccumulator` state): O(d^2) memory per key, whatever the corpus size.
    Keys are stored stacked, so one batch is folded in with a few batched matmuls (all layers of a
    (site, frame) at once, Chan et al.'s pairwise update accumulated in place with ``baddbmm``) rather
    than one small matmul per layer.

    Reduce states computed on different shards (processes, ranks) with :meth:`merge`; move them between
    processes with :meth:`state_dict` / :meth:`from_state_dict` (plain tensors, e.g. for
    ``torch.distributed.all_gather_object``). The result does not depend on how tokens were split into
    batches or shards (up to float64 rounding).

    Args:
        keys: the ``(site, layer, frame)`` triples to track; ``frame`` is a frame name (frames other
            than ``raw`` apply to residual sites only, see
            :data:`~vsem_lens.geometry.frames.RESIDUAL_SITES`).
        d_model: width of the points.
        lenses: ``{frame name: Lens}`` for the non-raw frames; needed by :meth:`update` (which calls
            ``lens(h, layer)`` on each layer's raw activations), not by :meth:`merge`/:meth:`result`.
            :meth:`for_model` fills it from frame names or lenses.
        final_norm: shorthand for the ``final_norm`` lens: the function applying the model's final norm
            (``model.final_norm``).

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
        lenses: Mapping[str, Lens] | None = None,
        final_norm: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        keys = [(str(s), int(layer), str(f)) for s, layer, f in keys]
        if not keys:
            raise InputError("IsotropyState needs at least one (site, layer, frame) key.")
        if len(set(keys)) != len(keys):
            raise InputError("IsotropyState keys must be distinct (site, layer, frame) triples.")
        for site, _, frame in keys:
            check_site_frame(site, frame)
        if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 2:
            raise InputError(f"d_model must be an integer >= 2, got {d_model!r}.")
        # Order keys by (site, frame, layer) so every (site, frame) group is a contiguous slice.
        self.keys: list[tuple[str, int, str]] = sorted(
            keys, key=lambda k: (SITES.index(k[0]), frame_order(k[2]), k[1])
        )
        self.d_model = d_model
        self.lenses: dict[str, Lens] = dict(lenses or {})
        for name, lens in self.lenses.items():
            if not isinstance(lens, Lens):
                raise InputError(f"lenses[{name!r}] must be a Lens, got {type(lens).__name__}.")
        if final_norm is not None:
            self.lenses.setdefault("final_norm", _FunctionLens(final_norm))
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
        frames: str | Lens | Sequence[str | Lens] = DEFAULT_ISOTROPY_FRAMES,
        layers: int | Sequence[int] | None = None,
    ) -> "IsotropyState":
        """An empty state for ``model``'s sites x layers x frames (non-raw frames on residual sites only).

        ``frames`` are names (resolved by :func:`~vsem_lens.lenses.frames.resolve_frame`: ``tuned`` needs a
        cached tuned lens) or :class:`~vsem_lens.lenses.base.Lens` objects, recorded under
        :func:`~vsem_lens.lenses.frames.frame_name`.

        Example:
            >>> IsotropyState.for_model(model, sites=("resid_post", "mlp_out"), layers=[3]).keys  # doctest: +SKIP
            [('resid_post', 3, 'raw'), ('resid_post', 3, 'final_norm'), ('mlp_out', 3, 'raw')]
        """
        sites = check_sites(sites)
        lenses = resolve_frames(frames, model)
        layer_list = check_layers(layers, model.n_layers)
        keys = []
        for site in sites:
            usable = [f for f in lenses if f == "raw" or site in RESIDUAL_SITES]
            if not usable:
                raise InputError(
                    f"site {site!r} is a block output, not a residual state, so the frames {list(lenses)} do "
                    f"not apply to it (a lens maps a whole residual state); add 'raw' to frames."
                )
            for frame in usable:
                for layer in [0] if site == "embed" else layer_list:
                    keys.append((site, layer, frame))
        return cls(keys, model.d_model, lenses={k: v for k, v in lenses.items() if k != "raw"})

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

        ``points`` are the *raw* activations; a non-raw frame applies its lens here, layer by layer.

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
        lens = None if frame == "raw" else self.lenses.get(frame)
        if frame != "raw" and lens is None:
            raise InputError(
                f"this state has no lens for frame {frame!r}; build it with IsotropyState.for_model(model, "
                "frames=...) or pass lenses={name: lens}."
            )
        step = max(1, _FOLD_ELEMENTS // max(1, n_tok * self.d_model))
        for a in range(0, len(slots), step):
            chunk = points[a : a + step].detach()
            if lens is not None:
                with torch.no_grad():
                    chunk = torch.stack([lens(h, int(layer)) for h, layer in zip(chunk, layers[a : a + step])])
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
        count, self.mean, self.m2 = all_reduce_moments(self.count, self.mean, self.m2, env, outer=True)
        self.count = count.to(torch.int64)
        self.cos_total = all_reduce_sum(self.cos_total.to(torch.float64), env)

    def copy(self) -> "IsotropyState":
        """An independent copy (sharing the lenses).

        Example:
            >>> state.copy().merge(state).count[0] == 2 * state.count[0]  # doctest: +SKIP
            tensor(True)
        """
        new = IsotropyState(self.keys, self.d_model, lenses=self.lenses)
        new.count, new.mean = self.count.clone(), self.mean.clone()
        new.m2, new.cos_total = self.m2.clone(), self.cos_total.clone()
        return new

    # ------------------------------------------------------------------ views and results

    def moments(self, site: str, layer: int, frame: str = "raw") -> Moments:
        """The :class:`~vsem_lens.core.moments.Moments` of one key (a copy; symmetrised scatter matrix).

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
        zeta = check_result_options(k_outliers, zeta, star_reference, self.d_model)
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
            s1, s2 = covariance_traces(cov)
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
                    "isoscore": float(isoscore_of_covariance(cov)),
                    "isoscore_star": float(isoscore_of_covariance((1.0 - zeta) * cov + zeta * c0)),
                    "average_cosine": self.cosines(site, layer, frame).result(),
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
            >>> IsotropyState.from_state_dict(state.state_dict(), lenses=state.lenses)  # doctest: +SKIP
        """
        copy = (lambda t: t.clone()) if clone else (lambda t: t)
        return {
            "keys": [list(k) for k in self.keys],
            "d_model": self.d_model,
            **{name: copy(getattr(self, name)) for name in ("count", "mean", "m2", "cos_total")},
        }

    @classmethod
    def from_state_dict(
        cls,
        state: dict[str, Any],
        *,
        lenses: Mapping[str, Lens] | None = None,
        final_norm: Callable[[Tensor], Tensor] | None = None,
    ) -> "IsotropyState":
        """Rebuild a state from :meth:`state_dict` output (``lenses``/``final_norm`` as in the constructor;
        only needed to keep updating it).

        Example:
            >>> s2 = IsotropyState.from_state_dict(state.state_dict())  # doctest: +SKIP
        """
        try:
            new = cls(
                [tuple(k) for k in state["keys"]], int(state["d_model"]), lenses=lenses, final_norm=final_norm
            )
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
        loaded = IsotropyState.from_state_dict(state, lenses=self.lenses)
        if loaded.keys != self.keys or loaded.d_model != self.d_model:
            raise ArtifactError("the saved isotropy state tracks other (site, layer, frame) keys or another width.")
        self.count, self.mean, self.m2, self.cos_total = loaded.count, loaded.mean, loaded.m2, loaded.cos_total

    def __repr__(self) -> str:
        return f"IsotropyState(keys={len(self.keys)}, d_model={self.d_model}, n_tokens={self.count.tolist()[:1]})"


def check_result_options(k_outliers: Any, zeta: Any, star_reference: Any, d_model: int) -> float:
    """Validate the options of :meth:`IsotropyState.result`; returns ``zeta`` as a float.

    Example:
        >>> check_result_options(5, 0.2, "identity", d_model=16)
        0.2
    """
    zeta = check_zeta(zeta)
    if star_reference not in STAR_REFERENCES:
        raise InputError(f"unknown star_reference {star_reference!r}; choose from {', '.join(STAR_REFERENCES)}.")
    if isinstance(k_outliers, bool) or not isinstance(k_outliers, numbers.Integral) or not 1 <= k_outliers <= d_model:
        raise InputError(f"k_outliers must be an integer between 1 and d_model={d_model}, got {k_outliers!r}.")
    return zeta


class _FunctionLens(Lens):
    """The ``final_norm`` frame given as a bare function (the ``final_norm=`` shorthand)."""

    frame = "final_norm"

    def __init__(self, function: Callable[[Tensor], Tensor]) -> None:
        self.function = function

    def forward(self, h: Float[Tensor, "... d_model"], layer: int) -> Float[Tensor, "... d_model"]:
        """Apply the function, whatever the layer."""
        return self.function(h)
