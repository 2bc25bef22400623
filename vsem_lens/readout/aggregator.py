"""The corpus aggregator: full-vocabulary readouts of sampled tokens folded into per-layer statistics.

This module owns :class:`LensAggregator`, the streaming (:class:`~vsem_lens.core.stats.Stat`) state behind
the report's "when does the prediction form?" section: per (readout, layer), running means/variances
of the rank, probability, KL and cosine of the model's final top-1 token, top-1 agreement counts and a
bounded sample of values for quantiles. The readouts themselves are the one
:class:`~vsem_lens.readout.kernel.ReadoutKernel`.

Example:
    >>> agg = LensAggregator(model, basis)                                   # doctest: +SKIP
    >>> for batch in iter_capture(model, texts, layers=agg.capture_layers):   # doctest: +SKIP
    ...     agg.update(batch.acts["resid_post"], batch.layers)
    >>> agg.result(frame="final_norm").head()                                # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..core.capture import ActivationBatch, check_layers
from ..core.distributed import all_gather_objects, all_reduce_sum
from ..core.errors import InputError, check_positive_int
from ..core.models import HookedModel
from ..core.stats import RunningScalars, Stat
from ..lenses.base import Lens
from .basis import SemanticBasis
from .kernel import READOUT_MAX_ROWS, Readout, ReadoutKernel

#: At most this many sampled tokens keep their per-layer readout values for quantiles (a bounded,
#: seeded subsample of the report's lens sample; exact quantiles whenever there are not more tokens).
QUANTILE_CAPACITY = 8192


class LensAggregator(Stat):
    """Full-vocabulary readouts of sampled tokens at every layer, folded into per-layer statistics.

    For each token and layer, the residual is mapped through each readout's frame and compared with
    the model's final next-token distribution ``p`` at the same position (the final layer's residual
    through the final norm and unembedding, i.e. the model's output):

    - ``lens``: the logit lens ``lens(h) W_U + b_U``;
    - ``affinity``: cosines to every semantic basis vector (softmax without temperature);
    - ``tuned_lens`` (optional): the logit lens through a trained tuned lens.

    :meth:`update` keeps, per (readout, layer), streaming means/variances of the rank of the final
    top-1 token (0 = the readout's top-1 agrees), its probability, ``KL(p || q)`` in bits and
    (affinity) its cosine, the count of top-1 agreements and, for at most ``quantile_capacity``
    tokens, the values themselves (for medians and quartiles); :meth:`result` tabulates them.
    :meth:`read_batch` returns the same quantities per token of a captured batch, with the top-k tokens
    (for the example heatmaps), through the same kernel and buffers.

    The per-chunk work is :class:`~vsem_lens.readout.kernel.ReadoutKernel` (one fused all-layers product,
    then cache-sized post-processing); this class adds the gathering of tokens across batches, the
    streaming statistics, quantile values and the :class:`~vsem_lens.core.stats.Stat` verbs (``update``,
    ``merge``, ``all_reduce``, ``state_dict``, ``load_state_dict``, ``result``).

    Example:
        >>> agg = LensAggregator(model, basis, layers=range(30))                     # doctest: +SKIP
        >>> for batch in iter_capture(model, texts, layers=agg.capture_layers):       # doctest: +SKIP
        ...     agg.update(batch.acts["resid_post"], batch.layers)
        >>> agg.result(frame="final_norm").head()                                     # doctest: +SKIP
    """

    STATS = ("rank", "prob", "kl_bits", "final_cos")
    #: The :class:`~vsem_lens.readout.kernel.Readout` key each statistic is read from.
    SOURCE = {"rank": "final_rank", "prob": "final_prob", "kl_bits": "kl_bits", "final_cos": "final_score"}

    def __init__(
        self,
        model: HookedModel,
        basis: SemanticBasis,
        *,
        layers: Sequence[int] | None = None,
        readouts: dict[str, tuple[str, Lens]] | None = None,
        quantile_capacity: int = QUANTILE_CAPACITY,
        max_rows: int = READOUT_MAX_ROWS,
    ) -> None:
        self.model = model
        self.layers = check_layers(list(layers) if layers is not None else None, model.n_layers)
        self.last = model.n_layers - 1
        self.capture_layers = sorted(set(self.layers) | {self.last})
        # name -> (kind, lens); kind "lens" (unembedding) or "affinity" (unit semantic bases).
        self.readouts = readouts or {"lens": ("lens", basis.lens), "affinity": ("affinity", basis.lens)}
        self.names = list(self.readouts)
        self.kernel = ReadoutKernel(
            model, self.layers, self.readouts, unit_vectors=basis.unit_vectors, max_rows=max_rows
        )
        self.tokens_per_chunk = self.kernel.tokens_per_chunk
        shape = (len(self.names), len(self.layers))
        self.running = {stat: RunningScalars(shape) for stat in self.STATS}
        self.agree = torch.zeros(shape, dtype=torch.float64)
        self.final_entropy = RunningScalars((1, 1))
        self.quantile_capacity = check_positive_int(quantile_capacity, "quantile_capacity")
        self._kept: dict[str, list[Tensor]] = {stat: [] for stat in ("rank", "prob", "kl_bits")}
        self.n_tokens = 0
        self.n_kept = 0
        self._pending: list[tuple[Tensor, Tensor]] = []
        self._pending_tokens = 0

    def release(self) -> None:
        """Free the readout buffers (statistics are kept)."""
        self.kernel.release()

    def read_batch(self, batch: ActivationBatch, *, k: int, names: Sequence[str] | None = None) -> Readout:
        """Per-token readouts (with the top-``k`` tokens) of a captured batch, through this aggregator's
        kernel and buffers; the statistics are not changed.

        Example:
            >>> out = agg.read_batch(batch, k=5, names=("lens", "affinity"))   # doctest: +SKIP
            >>> out.readouts["affinity"]["top_ids"].shape   # [layer, token, 5]  # doctest: +SKIP
        """
        return self.kernel.read_batch(batch, k=k, names=names)

    @torch.no_grad()
    def update(
        self,
        resid: Float[Tensor, "layer token d_model"],
        batch_layers: Sequence[int],
        keep: Tensor | None = None,
    ) -> None:
        """Fold the readouts of the tokens of ``resid`` (already restricted to the sampled ones) in.

        Tokens are gathered across calls into full chunks (a few sampled tokens per batch would
        otherwise make small, slow products); :meth:`flush` (called by :meth:`result`) reads the rest.

        Args:
            resid: ``resid_post`` of the tokens, one slice per entry of ``batch_layers``.
            batch_layers: the layer index of each slice (must include :attr:`capture_layers`).
            keep: bool [token]: tokens whose values are kept for quantiles (default: while capacity lasts).
        """
        self.kernel.rows_of(batch_layers)  # validates the layers
        index = {layer: i for i, layer in enumerate(batch_layers)}
        n_tok = resid.shape[1]
        if keep is None:
            pending_keep = sum(int(k.sum()) for _, k in self._pending)
            room = max(0, self.quantile_capacity - self.n_kept - pending_keep)
            keep = torch.arange(n_tok) < room
        slots = [index[layer] for layer in self.capture_layers]
        part = resid[slots] if slots != list(range(resid.shape[0])) else resid
        self._pending.append((part, keep.to(torch.bool).cpu()))
        self._pending_tokens += n_tok
        if self._pending_tokens >= self.tokens_per_chunk:
            self._drain(full_only=True)

    def flush(self) -> None:
        """Read the tokens still waiting for a full chunk."""
        if self._pending_tokens:
            self._drain(full_only=False)

    def _drain(self, *, full_only: bool) -> None:
        resid = torch.cat([p for p, _ in self._pending], dim=1) if len(self._pending) > 1 else self._pending[0][0]
        keep = torch.cat([k for _, k in self._pending]) if len(self._pending) > 1 else self._pending[0][1]
        n_tok = resid.shape[1]
        n_full = (n_tok // self.tokens_per_chunk) * self.tokens_per_chunk if full_only else n_tok
        rows, last = self.kernel.rows_of(self.capture_layers)
        with torch.no_grad():
            for start in range(0, n_full, self.tokens_per_chunk):
                stop = min(n_full, start + self.tokens_per_chunk)
                self._fold(resid[:, start:stop], rows, last, keep[start:stop])
        rest = n_tok - n_full
        self._pending = [(resid[:, n_full:].clone(), keep[n_full:].clone())] if rest else []
        self._pending_tokens = rest
        self.n_tokens += n_full

    def _fold(self, x: Tensor, rows: list[int], last: int, chunk_keep: Tensor) -> None:
        """Read one chunk of tokens (:class:`~vsem_lens.readout.kernel.ReadoutKernel`) into the running
        statistics; ``final_cos`` is the final top-1's cosine (affinity readouts; NaN for the lens).
        """
        out = self.kernel.read(x, rows, last, k=0)
        self.final_entropy.update(out.final_entropy_bits.unsqueeze(0).cpu(), 0)
        n_keep = int(chunk_keep.sum())
        kept: dict[str, list[Tensor]] = {stat: [] for stat in self._kept}
        for r, (name, readout) in enumerate(out.readouts.items()):
            values = {stat: readout[key] for stat, key in self.SOURCE.items()}
            values["rank"] = values["rank"].to(torch.float64)
            if self.readouts[name][0] != "affinity":
                values["final_cos"] = torch.full_like(values["final_cos"], float("nan"))
            for stat in self.STATS:
                self.running[stat].update(values[stat].cpu(), r)  # [layer, token] into streams r
            self.agree[r] += (values["rank"] == 0).sum(1).cpu().to(torch.float64)
            if n_keep:
                for stat in self._kept:
                    kept[stat].append(values[stat][:, chunk_keep.to(values[stat].device)].T.cpu().float())
        if n_keep:
            for stat, parts in kept.items():
                self._kept[stat].append(torch.stack(parts))  # [readout, token, layer]
            self.n_kept += n_keep

    def kept(self, stat: str) -> Tensor:
        """Values kept for quantiles, [readout, token, layer] (float32)."""
        parts = self._kept[stat]
        if not parts:
            return torch.empty(len(self.names), 0, len(self.layers))
        return torch.cat(parts, dim=1)

    # -- mergeable state: checkpoints and multi-process reduction ------------------------------

    def merge(self, other: LensAggregator) -> LensAggregator:
        """Fold ``other`` (same readouts and layers, another part of the corpus) into ``self``; returns ``self``.

        Both must be flushed (:meth:`flush`); the kept quantile values are concatenated.

        Example:
            >>> a.flush(); b.flush(); a.merge(b)   # doctest: +SKIP
        """
        if not isinstance(other, LensAggregator) or other.names != self.names or other.layers != self.layers:
            raise InputError("LensAggregator.merge expects an aggregator of the same readouts and layers.")
        if self._pending_tokens or other._pending_tokens:
            raise InputError("flush() both aggregators before merging them.")
        for stat in self.STATS:
            self.running[stat].merge(other.running[stat])
        self.final_entropy.merge(other.final_entropy)
        self.agree = self.agree + other.agree
        for stat in self._kept:
            self._kept[stat] = [t for t in (self.kept(stat), other.kept(stat)) if t.shape[1]]
        self.n_kept += other.n_kept
        self.n_tokens += other.n_tokens
        return self

    def state_dict(self) -> dict[str, Any]:
        """The accumulated statistics, the kept quantile values and the tokens still waiting for a
        chunk, as plain tensors (loadable with ``torch.load(weights_only=True)``).

        Example:
            >>> agg2.load_state_dict(agg.state_dict())   # doctest: +SKIP
        """
        pending_resid = torch.cat([p for p, _ in self._pending], dim=1).cpu() if self._pending else None
        pending_keep = torch.cat([k for _, k in self._pending]) if self._pending else None
        running = {**self.running, "final_entropy": self.final_entropy}
        return {
            "names": list(self.names),
            "layers": list(self.layers),
            "running": {k: r.state_dict() for k, r in running.items()},
            "agree": self.agree.clone(),
            "kept": {stat: self.kept(stat) for stat in self._kept},  # kept() builds a new tensor
            "n_tokens": int(self.n_tokens),
            "n_kept": int(self.n_kept),
            "pending_resid": pending_resid,
            "pending_keep": pending_keep,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (same readouts and layers).

        Raises:
            InputError: the state was made for other readouts or layers.
        """
        if list(state["names"]) != self.names or list(state["layers"]) != self.layers:
            raise InputError("the saved readout state tracks other readouts or layers than this aggregator.")
        for key, saved in state["running"].items():
            (self.final_entropy if key == "final_entropy" else self.running[key]).load_state_dict(saved)
        self.agree = state["agree"].clone()
        self._kept = {stat: ([t.clone()] if t.shape[1] else []) for stat, t in state["kept"].items()}
        self.n_tokens, self.n_kept = int(state["n_tokens"]), int(state["n_kept"])
        if state["pending_resid"] is not None:
            device = self.kernel.W_U.device
            self._pending = [(state["pending_resid"].to(device), state["pending_keep"].to(torch.bool))]
            self._pending_tokens = int(state["pending_keep"].numel())
        else:
            self._pending, self._pending_tokens = [], 0

    def all_reduce(self, env: Any) -> None:
        """Combine the statistics of every rank in place (call :meth:`flush` first); every rank gets them.

        Means and variances combine exactly (k-way Chan update), counts add, and the values kept for
        quantiles are gathered (at most :data:`QUANTILE_CAPACITY` tokens over all ranks).
        """
        if not env.active:
            return
        if self._pending_tokens:
            raise InputError("flush() the aggregator before reducing it over ranks.")
        for running in [*self.running.values(), self.final_entropy]:
            running.all_reduce(env)
        self.agree = all_reduce_sum(self.agree, env)
        gathered = all_gather_objects({stat: self.kept(stat) for stat in self._kept}, env)
        self._kept = {stat: [g[stat] for g in gathered if g[stat].shape[1]] for stat in self._kept}
        self.n_kept = sum(int(g["rank"].shape[1]) for g in gathered)
        self.n_tokens = int(all_reduce_sum(torch.tensor(self.n_tokens, dtype=torch.float64), env))

    def result(self, *, frame: str) -> pd.DataFrame:
        """Tidy per (readout, layer) statistics over the tokens read so far (``frame`` labels the rows).

        Columns: ``readout, frame, layer, n_tokens, n_quantile_tokens, rank_mean, rank_median, rank_q25,
        rank_q75, top1_agreement, prob_mean, prob_std, prob_median, prob_q25, prob_q75, kl_bits_mean,
        kl_bits_std, kl_bits_median, kl_bits_q25, kl_bits_q75, final_cos_mean, final_cos_std``.

        Example:
            >>> agg.result(frame="final_norm").query("readout == 'lens'").rank_median   # doctest: +SKIP
        """
        self.flush()
        quant = {}
        for stat in ("rank", "prob", "kl_bits"):
            values = self.kept(stat).double()
            if values.shape[1]:
                quant[stat] = torch.quantile(values, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64), dim=1)
            else:
                quant[stat] = torch.full((3, len(self.names), len(self.layers)), float("nan"), dtype=torch.float64)
        rows = []
        for r, name in enumerate(self.names):
            for j, layer in enumerate(self.layers):
                count = int(self.running["rank"].count[r, j])
                row: dict[str, Any] = {
                    "readout": name,
                    "frame": frame if name != "tuned_lens" else "tuned",
                    "layer": layer,
                    "n_tokens": count,
                    "n_quantile_tokens": int(self.n_kept),
                    "rank_mean": float(self.running["rank"].mean[r, j]) if count else float("nan"),
                    "rank_median": float(quant["rank"][1, r, j]),
                    "rank_q25": float(quant["rank"][0, r, j]),
                    "rank_q75": float(quant["rank"][2, r, j]),
                    "top1_agreement": float(self.agree[r, j]) / count if count else float("nan"),
                }
                for stat in ("prob", "kl_bits"):
                    row[f"{stat}_mean"] = float(self.running[stat].mean[r, j]) if count else float("nan")
                    row[f"{stat}_std"] = float(self.running[stat].std()[r, j])
                    row[f"{stat}_median"] = float(quant[stat][1, r, j])
                    row[f"{stat}_q25"] = float(quant[stat][0, r, j])
                    row[f"{stat}_q75"] = float(quant[stat][2, r, j])
                if self.readouts[name][0] == "affinity":
                    row["final_cos_mean"] = float(self.running["final_cos"].mean[r, j])
                    row["final_cos_std"] = float(self.running["final_cos"].std()[r, j])
                else:
                    row["final_cos_mean"] = row["final_cos_std"] = float("nan")
                rows.append(row)
        return pd.DataFrame(rows)

    def table(self, *, frame: str) -> pd.DataFrame:
        """Same as :meth:`result` (the name the report's tables use).

        Example:
            >>> agg.table(frame="final_norm").columns[:3].tolist()   # doctest: +SKIP
            ['readout', 'frame', 'layer']
        """
        return self.result(frame=frame)
