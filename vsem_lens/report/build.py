"""The layerwise semantic report: one streaming pass over a corpus -> tables, figures, HTML.

:func:`build_report` reads a corpus through a hooked model and answers, layer by layer, "what does
the residual stream say in the coordinates of the model's own vocabulary?":

1. **Affinity map** of a few example texts: per layer and position, the token whose semantic basis
   vector has the highest cosine with the residual (hover: top-k, the logit lens's top-1).
2. **When the prediction forms**: per layer, rank / probability of the model's final top-1 token and
   KL(final || readout) in bits, for the logit lens and for vocabulary affinity.
3. **Isotropy** of the residual stream (IsoScore, IsoScore*, average cosine, participation ratio,
   outlier dimensions) in the raw and final-norm frames.
4. **Disentanglement**: pairwise cosines of the semantic bases vs the unembedding, token leverage,
   and the residual decomposition into embedding / attention / MLP components.
5. **Run card**: model facts, token counts, timings, memory.

Cost model (measured on the embedded SmolLM2-135M, 2 CPU cores): reading every layer over the
whole vocabulary costs 2 x 30 unembeddings per token (~24 ms, ~10x a forward pass), so readouts (section 2)
are computed on a deterministic seeded sample of ``lens_tokens`` tokens (default
:data:`DEFAULT_LENS_TOKENS`), while the streaming statistics (isotropy, decomposition) use every
token. The sample is drawn uniformly without replacement over the token positions of the corpus
(after the ``max_tokens`` budget), with ``torch.Generator().manual_seed(seed)``, so it does not
depend on ``batch_size``. Memory is bounded: one batch of activations, one
``[rows, d_vocab]`` readout buffer (~128 MB at most), O(layers x d_model^2) streaming state, and at
most :data:`QUANTILE_CAPACITY` tokens x layers of readout values for the quantiles.

Scale (docs/scale.md): every corpus-wide statistic is mergeable streaming state (isotropy moments,
readout running means/variances and kept quantile values, decomposition running means/variances),
so ``distributed=True`` under ``torchrun`` shards the length-sorted batches over ranks (batch ``b``
to rank ``b % world_size``) and combines the states with collective operations
(:mod:`vsem_lens.core.distributed`), and ``checkpoint_dir`` makes a run resumable: the state is written
atomically every ``checkpoint_every`` batches and a run started again with the same arguments
continues from it, ending with the numbers of an uninterrupted run (tested).

The readouts use a fused engine (:class:`LensAggregator`): per chunk of sampled tokens, all layers'
residuals go through one ``[tokens x layers, d] @ [d, vocab]`` product into a preallocated buffer,
then an in-place ``log_softmax`` and two reductions (rank count, cross-entropy with the final
distribution). Its numbers equal :class:`~vsem_lens.readout.affinity.LayerReadout`'s (tested).

Example:
    >>> model = vl.load_model()                                    # doctest: +SKIP
    >>> report = vl.build_report(model, vl.load_corpus("default"))  # doctest: +SKIP
    >>> report.tables["prediction_formation"].head()               # doctest: +SKIP
    >>> report.save("vsem-report")                                  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import math
import os
import platform
import re
import resource
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from ..core.capture import check_layers, iter_capture
from ..core.errors import InputError, check_positive_int
from ..core.io import atomic_write, texts_digest
from ..core.models import HookedModel, check_texts
from ..core.stats import RunningScalars
from ..lenses.base import Lens
from ..lenses.frames import check_frame
from ..readout.affinity import READOUT_MAX_ROWS, ReadoutKernel, vocabulary_strings
from ..readout.basis import SemanticBasis

#: Default number of sampled tokens whose every layer is read out over the whole vocabulary. Measured on
#: the embedded model (2 CPU cores): ~24 ms per token for 30 layers x 2 readouts, so 512 tokens cost
#: ~12 s, about 0.65x a plain forward pass over the default 8192-token budget. Statistical precision at
#: 512: standard error of a top-1 agreement rate <= 2.2 points, of a mean KL ~ 0.45 bits at mid layers
#: (std ~ 10 bits). Pass ``lens_tokens=2048`` (or ``"all"``) for tighter estimates.
DEFAULT_LENS_TOKENS = 512
#: Default token budget of the corpus (whole texts in corpus order until the budget is reached).
DEFAULT_MAX_TOKENS = 8192
#: At most this many sampled tokens keep their per-layer readout values for quantiles (a bounded,
#: seeded subsample of the lens sample; exact quantiles whenever ``lens_tokens`` is not larger).
QUANTILE_CAPACITY = 8192
#: Number of example texts taken from the corpus when none are given.
DEFAULT_N_EXAMPLES = 3
#: Example texts are cut to this many tokens (a heatmap column per token).
EXAMPLE_MAX_TOKENS = 24
#: Top-k tokens shown on hover in the affinity map.
EXAMPLE_TOP_K = 5
#: Tokens sampled for the pairwise-cosine histogram of the semantic bases.
COHERENCE_SAMPLE = 2048

REPORT_FORMAT = 1
GENERATOR = "vsem-lens report"
LN2 = math.log(2.0)

BOS_DESCRIPTION = (
    "Token ids are exactly what the model's HF tokenizer produces (its default special tokens); "
    "prepend_bos=True forces a BOS token first (TransformerLens's convention). Padding never enters a "
    "statistic."
)


# ---------------------------------------------------------------------------------- the Report


@dataclass
class Section:
    """One report section: a title, a one-paragraph reading guide, figure keys and optional HTML."""

    key: str
    title: str
    guide: str
    figures: list[str]
    captions: dict[str, str] = field(default_factory=dict)


@dataclass
class Report:
    """A built report: tidy tables, plotly figures, a JSON-able summary, and the section layout.

    Attributes:
        tables: tidy ``pandas.DataFrame`` per name (written as ``<name>.csv`` by :meth:`save`).
        figures: ``plotly.graph_objects.Figure`` per name.
        summary: JSON-able run information (model, parameters, versions, token counts, timings,
            peak RSS, highlights, figure descriptions); written as ``summary.json``.
        sections: the order and reading guides of the HTML page.

    Example:
        >>> report = build_report(model, texts, max_tokens=2000)   # doctest: +SKIP
        >>> sorted(report.tables)[:3]                              # doctest: +SKIP
        ['coherence_histogram', 'coherence_summary', 'decomposition']
        >>> report.save("my-report")                               # doctest: +SKIP
        PosixPath('/.../my-report')
    """

    tables: dict[str, pd.DataFrame]
    figures: dict[str, Any]
    summary: dict[str, Any]
    sections: list[Section] = field(default_factory=list)

    def to_html(self) -> str:
        """The whole report as one self-contained HTML page (plotly.js inlined, no external URL).

        Example:
            >>> html = report.to_html()                   # doctest: +SKIP
            >>> "cdn" in html.lower()                     # doctest: +SKIP
            False
        """
        from .html import render_page

        return render_page(self, standalone=True)

    def _repr_html_(self) -> str:
        """Inline rendering in Jupyter: every figure, with plotly.js included once (no CDN)."""
        from .html import render_page

        return render_page(self, standalone=False)

    def add_timing(self, stage: str, seconds: float) -> None:
        """Record the time of a stage done outside :func:`build_report` (e.g. loading the model).

        Example:
            >>> report.add_timing("load_model", 5.1)   # doctest: +SKIP
        """
        timings = self.summary.setdefault("timings_s", {})
        timings[stage] = round(float(seconds), 3)
        self.summary["timings_s"] = {stage: timings.pop(stage), **timings} if stage == "load_model" else timings
        self.summary["peak_rss_mib"] = peak_rss_mib()
        self.tables["timings"] = _timings_table(self.summary["timings_s"])
        from .figures import plot_timings

        self.figures["timings"] = plot_timings(self.tables["timings"], peak_rss=self.summary["peak_rss_mib"])

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write ``index.html``, one CSV per table and ``summary.json`` into ``out_dir``, atomically.

        Everything is written into a temporary directory next to ``out_dir`` and moved into place only
        when complete (on Linux with an atomic directory exchange), so an interrupted run leaves an
        earlier report in ``out_dir`` untouched. An existing ``out_dir`` is replaced only if it is
        empty or holds a vsem-lens report (never an unrelated directory).

        Returns:
            The absolute path of the report directory.

        Raises:
            InputError: ``out_dir`` exists but is a file or a directory that is not a report.

        Example:
            >>> report.save("vsem-report")    # doctest: +SKIP
        """
        out = Path(out_dir).expanduser().absolute()
        _check_replaceable(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(out)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            self._write_into(tmp)
            _swap_into_place(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out

    def _write_into(self, directory: Path) -> None:
        summary = dict(self.summary)
        summary["files"] = {"index.html": "the report (self-contained HTML)", "summary.json": "this file"}
        for name, table in self.tables.items():
            filename = f"{name}.csv"
            _csv_ready(table).to_csv(directory / filename, index=False)
            summary["files"][filename] = TABLE_DESCRIPTIONS.get(name, "")
        self.summary["files"] = summary["files"]
        (directory / "index.html").write_text(self.to_html(), encoding="utf-8")
        (directory / "summary.json").write_text(json.dumps(_jsonable(summary), indent=2) + "\n", encoding="utf-8")

    def __repr__(self) -> str:
        tokens = self.summary.get("tokens", {})
        return (
            f"Report(model={self.summary.get('model', {}).get('name')!r}, tokens={tokens.get('corpus_tokens')}, "
            f"lens_tokens={tokens.get('lens_tokens')}, tables={list(self.tables)}, figures={list(self.figures)})"
        )


TABLE_DESCRIPTIONS = {
    "examples": "per example text, layer and position: affinity top-k tokens and cosines, logit-lens top-1, "
    "the model's prediction and its affinity cosine and ranks",
    "prediction_formation": "per readout and layer, over the sampled tokens: rank (median, quartiles, mean), "
    "top-1 agreement, probability and KL(final || readout) in bits of the model's final top-1 token",
    "isotropy": "per layer and frame (raw, final_norm) over all corpus tokens: IsoScore, IsoScore*, average "
    "cosine, participation ratio, outlier dimensions and their variance shares",
    "decomposition": "per layer and residual component (embed, attn_j, mlp_j, remainder): spim, cosine, "
    "distance and norm ratio to the residual (mean and std over tokens)",
    "coherence_summary": "pairwise cosines of a token sample: semantic basis vs unembedding columns",
    "coherence_histogram": "histogram of those pairwise cosines",
    "leverage_extremes": "tokens with the highest and lowest leverage P_ii",
    "corpus": "per text used: its index in the corpus, token count and number of sampled (lens) tokens",
    "timings": "wall time per stage in seconds",
}


# ---------------------------------------------------------------------------------- fused readouts


class LensAggregator:
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
    tokens, the values themselves (for medians and quartiles). :meth:`read` returns the same
    quantities per token, with the top-k tokens (for the example heatmaps). Both give the numbers of
    :class:`~vsem_lens.readout.affinity.LayerReadout` (tested), at close to the cost of the bare products.

    The per-chunk work is :class:`~vsem_lens.readout.affinity.ReadoutKernel` (one fused all-layers product,
    then cache-sized post-processing); this class adds the sampling across batches, the streaming
    statistics, quantile values and the mergeable state.

    Example:
        >>> agg = LensAggregator(model, basis, layers=range(30))                     # doctest: +SKIP
        >>> for batch in iter_capture(model, texts, layers=agg.capture_layers):       # doctest: +SKIP
        ...     agg.update(batch.acts["resid_post"], batch.layers)
        >>> agg.table(frame="final_norm").head()                                      # doctest: +SKIP
    """

    STATS = ("rank", "prob", "kl_bits", "final_cos")

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
        self.quantile_capacity = int(quantile_capacity)
        self._kept: dict[str, list[Tensor]] = {stat: [] for stat in ("rank", "prob", "kl_bits")}
        self.n_tokens = 0
        self.n_kept = 0
        self._pending: list[tuple[Tensor, Tensor]] = []
        self._pending_tokens = 0

    def release(self) -> None:
        """Free the readout buffers (statistics are kept)."""
        self.kernel.release()

    def _rows_of(self, batch_layers: Sequence[int]) -> tuple[list[int], int]:
        index = {layer: i for i, layer in enumerate(batch_layers)}
        missing = sorted(set(self.capture_layers) - set(index))
        if missing:
            raise InputError(f"the activations lack layers {missing}; capture layers {self.capture_layers}.")
        return [index[layer] for layer in self.layers], index[self.last]

    @torch.no_grad()
    def update(
        self,
        resid: Float[Tensor, "layer token d_model"],
        batch_layers: Sequence[int],
        keep: Tensor | None = None,
    ) -> None:
        """Fold the readouts of the tokens of ``resid`` (already restricted to the sampled ones) in.

        Tokens are gathered across calls into full chunks (a few sampled tokens per batch would
        otherwise make small, slow products); :meth:`flush` (called by :meth:`table`) reads the rest.

        Args:
            resid: ``resid_post`` of the tokens, one slice per entry of ``batch_layers``.
            batch_layers: the layer index of each slice (must include :attr:`capture_layers`).
            keep: bool [token]: tokens whose values are kept for quantiles (default: while capacity lasts).
        """
        self._rows_of(batch_layers)  # validates the layers
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
        rows, last = self._rows_of(self.capture_layers)
        with torch.no_grad():
            for start in range(0, n_full, self.tokens_per_chunk):
                stop = min(n_full, start + self.tokens_per_chunk)
                self._fold(resid[:, start:stop], rows, last, keep[start:stop])
        rest = n_tok - n_full
        self._pending = [(resid[:, n_full:].clone(), keep[n_full:].clone())] if rest else []
        self._pending_tokens = rest
        self.n_tokens += n_full

    def _fold(self, x: Tensor, rows: list[int], last: int, chunk_keep: Tensor) -> None:
        """Read one chunk of tokens (:class:`~vsem_lens.readout.affinity.ReadoutKernel`) into the running
        statistics; ``final_cos`` is the final top-1's cosine (affinity readouts; NaN for the lens).
        """
        chunk_finals, results = self.kernel(x, rows, last, k=0)
        self.final_entropy.update(chunk_finals["final_entropy_bits"].unsqueeze(0).cpu(), 0)
        n_keep = int(chunk_keep.sum())
        kept: dict[str, list[Tensor]] = {stat: [] for stat in self._kept}
        for r, (name, values) in enumerate(results.items()):
            target = values["target_score"]
            is_affinity = self.readouts[name][0] == "affinity"
            values["final_cos"] = target if is_affinity else torch.full_like(target, float("nan"))
            for stat in self.STATS:
                self.running[stat].update(values[stat].cpu().T, r)  # [layer, token] into streams r
            self.agree[r] += (values["rank"] == 0).sum(0).cpu().to(torch.float64)
            if n_keep:
                for stat in self._kept:
                    kept[stat].append(values[stat][chunk_keep.to(values[stat].device)].cpu().float())
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
        from ..core.distributed import all_gather_objects, all_reduce_sum

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

    def table(self, *, frame: str) -> pd.DataFrame:
        """Tidy per (readout, layer) statistics over the tokens read so far.

        Columns: ``readout, frame, layer, n_tokens, n_quantile_tokens, rank_mean, rank_median, rank_q25,
        rank_q75, top1_agreement, prob_mean, prob_std, prob_median, prob_q25, prob_q75, kl_bits_mean,
        kl_bits_std, kl_bits_median, kl_bits_q25, kl_bits_q75, final_cos_mean, final_cos_std``.
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


# ---------------------------------------------------------------------------------- decomposition state

# ---------------------------------------------------------------------------------- checkpoints

CHECKPOINT_FORMAT = 2  # 2: the decomposition state is DecompositionAccumulator's


def _weights_digest(model: HookedModel) -> str:
    """A hash of every parameter's name, shape, sum and absolute sum (one read of the weights)."""
    digest = hashlib.blake2b(digest_size=10)
    with torch.no_grad():
        for name, p in model.bridge.named_parameters():
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


def _lens_digest(lens: Any) -> str | None:
    if lens is None or not hasattr(lens, "state_dict"):
        return None
    digest = hashlib.blake2b(digest_size=8)
    for name, t in sorted(lens.state_dict().items()):
        if isinstance(t, Tensor):
            digest.update(name.encode())
            digest.update(t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
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
        "model": {"name": model.name, "fingerprint": model.fingerprint, "weights": _weights_digest(model),
                  "dtype": str(model.dtype), "prepend_bos": model.prepend_bos},
        "corpus": texts_digest(texts),
        "parameters": parameters,
    }
    blob = json.dumps(_jsonable(spec), sort_keys=True).encode()
    return "report-" + hashlib.blake2b(blob, digest_size=10).hexdigest()


class _Checkpoint:
    """This rank's checkpoint file ``<dir>/<key>/rank<r>-of-<w>.pt`` (atomic writes, safe loads)."""

    def __init__(self, directory: str | os.PathLike, key: str, env: Any) -> None:
        self.folder = Path(directory).expanduser().absolute() / key
        self.key = key
        self.path = self.folder / f"rank{env.rank}-of-{env.world_size}.pt"

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a corrupt file must not stop the run: start over
            import warnings

            warnings.warn(f"ignoring unreadable checkpoint {self.path} ({type(exc).__name__}: {exc}); starting over.")
            return None
        if not isinstance(state, dict) or state.get("key") != self.key or state.get("format") != CHECKPOINT_FORMAT:
            return None
        return state

    def save(self, state: dict[str, Any]) -> None:
        payload = {"format": CHECKPOINT_FORMAT, "key": self.key, **state}
        atomic_write(self.path, lambda tmp: torch.save(payload, tmp))

    def remove(self, env: Any) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()
        if env.is_main:
            with contextlib.suppress(OSError):
                self.folder.rmdir()  # only when every rank removed its file


# ---------------------------------------------------------------------------------- corpus planning


@dataclass
class _Plan:
    """The tokenised corpus after the budget, its batches and the seeded lens sample."""

    rows: list[list[int]]  # token ids per used text, corpus order
    texts: list[str]  # the used texts (corpus order)
    n_available: int  # texts given
    n_truncated: int  # texts cut to the model's context
    cut_first: bool  # the first text alone exceeded max_tokens and was cut to it
    offsets: list[int]  # global index of each text's first token
    batches: list[list[int]]  # text indices per batch (length-sorted)
    lens_mask: Tensor  # bool [N]: sampled for readouts
    keep_mask: Tensor  # bool [N]: sampled and kept for quantiles

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1] + len(self.rows[-1])) if self.rows else 0


def _plan(
    model: HookedModel,
    texts: list[str],
    *,
    max_tokens: int | None,
    lens_tokens: int | str,
    batch_size: int,
    seed: int,
) -> _Plan:
    n_ctx = model.n_ctx
    # Tokenise one token past the context to detect (and count) texts cut to the context.
    rows = model.token_ids(texts, max_length=n_ctx + 1)
    n_truncated = sum(len(r) > n_ctx for r in rows)
    rows = [r[:n_ctx] for r in rows]
    used, total, cut_first = [], 0, False
    for i, row in enumerate(rows):
        if max_tokens is not None and total + len(row) > max_tokens:
            if not used:  # the first text alone is over budget: keep its first max_tokens tokens
                used.append(i)
                rows[i] = row[:max_tokens]
                total = max_tokens
                cut_first = True
            break
        used.append(i)
        total += len(row)
    kept_rows = [rows[i] for i in used]
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in kept_rows])[:-1]]).astype(int).tolist()
    n_tokens = total
    order = sorted(range(len(kept_rows)), key=lambda i: (len(kept_rows[i]), i))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    generator = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n_tokens, generator=generator)
    n_lens = n_tokens if lens_tokens == "all" else min(int(lens_tokens), n_tokens)
    lens_mask = torch.zeros(n_tokens, dtype=torch.bool)
    lens_mask[perm[:n_lens]] = True
    keep_mask = torch.zeros(n_tokens, dtype=torch.bool)
    keep_mask[perm[: min(n_lens, QUANTILE_CAPACITY)]] = True
    return _Plan(
        rows=kept_rows,
        texts=[texts[i] for i in used],
        n_available=len(texts),
        n_truncated=n_truncated,
        cut_first=cut_first,
        offsets=offsets,
        batches=batches,
        lens_mask=lens_mask,
        keep_mask=keep_mask,
    )


# ---------------------------------------------------------------------------------- build_report


def build_report(
    model: HookedModel,
    texts: str | Sequence[str],
    *,
    frame: str = "final_norm",
    layers: int | Sequence[int] | None = None,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    lens_tokens: int | str = DEFAULT_LENS_TOKENS,
    examples: str | Sequence[str] | None = None,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = False,
    corpus_name: str | None = None,
    distributed: bool | Any = False,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> Report | None:
    """Build the layerwise semantic report of ``model`` over a corpus.

    One streaming pass over the corpus (one ``iter_capture`` per batch of ``resid_post`` and the block
    outputs ``embed``/``attn_out``/``mlp_out``) feeds the isotropy statistics (every token, raw and
    final-norm frames), the full-vocabulary readouts (the seeded sample of ``lens_tokens`` tokens) and
    the residual decomposition (every token). Everything
    corpus-wide is mergeable streaming state, so the pass can be split over processes and resumed.

    Args:
        model: a :class:`~vsem_lens.core.models.HookedModel`.
        texts: the corpus (one text or a list; see :func:`~vsem_lens.core.corpus.load_corpus`).
        frame: ``final_norm`` (default; the logit-lens convention), ``raw`` or ``tuned`` (needs a trained
            tuned lens) for the readouts and the semantic basis. Isotropy is always shown in both the
            raw and final-norm frames.
        layers: layers to analyse (``None`` = all; negative indices count from the end). The last layer
            is always captured: it defines the model's final distribution.
        max_tokens: token budget: whole texts in corpus order until the next one would exceed it
            (``None`` = the whole corpus). Texts longer than the context are cut to it.
        lens_tokens: number of tokens sampled (uniformly, seeded) for the full-vocabulary readouts,
            or ``"all"``.
        examples: texts for the affinity map (default: the first :data:`DEFAULT_N_EXAMPLES` corpus
            texts); each is cut to :data:`EXAMPLE_MAX_TOKENS` tokens.
        batch_size: texts per forward pass (texts are length-sorted into batches to limit padding).
        seed: seed of the lens sample, the quantile subsample and the coherence sample.
        progress: print stages and show a progress bar over batches (on stderr; rank 0 only).
        corpus_name: label of the corpus for the summary (e.g. ``"default"`` or a file name).
        distributed: ``True`` inside ``torchrun`` (or a :class:`~vsem_lens.core.distributed.DistEnv`):
            batch ``b`` of the length-sorted plan goes to rank ``b % world_size``, each rank streams
            its batches and reads out the sampled tokens it owns (the sample is drawn over global
            token positions, so it is the single-process sample), the states are combined with
            collective operations, and rank 0 assembles the report. Other ranks return ``None``.
        checkpoint_dir: folder for resumable runs. The streaming state is written (atomically) to
            ``<checkpoint_dir>/<key>/rank<r>-of-<w>.pt``, where the key hashes the model weights, the
            corpus and every parameter; a run started again with the same arguments resumes from it
            and gives the numbers of an uninterrupted run. Removed when the report is built.
        checkpoint_every: write the checkpoint every this many batches (of this rank); default 50
            when ``checkpoint_dir`` is given. The state is also written at the end of the pass.
        on_batch: called as ``on_batch(batches_done, batches_total)`` (this rank's counts) after each
            batch is folded in and any checkpoint written; for progress displays. An exception it
            raises stops the run (the checkpoint survives).

    Returns:
        A :class:`Report` (``None`` on ranks other than 0 of a distributed run).

    Raises:
        InputError: empty texts, unknown frame, bad layers, a non-positive budget, ``distributed``
            outside torchrun.

    Example:
        >>> report = build_report(model, load_corpus("default"), max_tokens=4000, lens_tokens=512)  # doctest: +SKIP
        >>> report.tables["prediction_formation"].query("readout == 'lens'")[["layer", "rank_median"]]  # doctest: +SKIP
    """
    from ..core.distributed import all_gather_objects, all_reduce_sum, resolve_env, shard
    from ..geometry.disentangle import DECOMPOSITION_SITES, DecompositionAccumulator, basis_coherence
    from ..geometry.isotropy import IsotropyState
    from . import plots
    from .figures import (
        READOUT_STYLE,
        plot_affinity_map,
        plot_isotropy_overview,
        plot_prediction_formation,
        plot_timings,
        side_by_side,
    )

    started = time.perf_counter()
    timings: dict[str, float] = {}

    # -- validate everything before the long pass ------------------------------------------------
    texts = check_texts(texts)
    check_frame(frame)
    layer_list = check_layers(layers, model.n_layers)
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise InputError(f"max_tokens must be a positive integer or None, got {max_tokens!r}.")
    if lens_tokens != "all" and (isinstance(lens_tokens, bool) or not isinstance(lens_tokens, int) or lens_tokens < 1):
        raise InputError(f"lens_tokens must be a positive integer or 'all', got {lens_tokens!r}.")
    check_positive_int(batch_size, "batch_size")
    if checkpoint_every is not None and (
        isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1
    ):
        raise InputError(f"checkpoint_every must be a positive number of batches, got {checkpoint_every!r}.")
    if checkpoint_every is not None and checkpoint_dir is None:
        raise InputError("checkpoint_every needs checkpoint_dir (where to write the checkpoints).")
    example_texts = check_texts(examples) if examples is not None else texts[:DEFAULT_N_EXAMPLES]
    env = resolve_env(distributed, device=model.device, command="report")
    log = _logger(progress and env.is_main)

    with _stage(timings, "basis"):
        basis = SemanticBasis.from_model(model, frame=frame)  # resolves (and checks) the frame's lens
    readouts: dict[str, tuple[str, Lens]] = {"lens": ("lens", basis.lens), "affinity": ("affinity", basis.lens)}
    tuned = _cached_tuned_lens(model) if frame != "tuned" else None
    if tuned is not None:
        readouts["tuned_lens"] = ("lens", tuned)

    with _stage(timings, "tokenize"):
        plan = _plan(model, texts, max_tokens=max_tokens, lens_tokens=lens_tokens, batch_size=batch_size, seed=seed)
    n_tokens = plan.n_tokens
    if n_tokens < 2:
        raise InputError(f"the corpus has {n_tokens} token(s) within the budget; the report needs at least 2.")
    n_lens = int(plan.lens_mask.sum())
    log(
        f"{len(plan.texts)} of {plan.n_available} texts, {n_tokens} tokens; full-vocabulary readouts on "
        f"{n_lens} sampled tokens x {len(layer_list)} layers"
        + (f"; {env.world_size} ranks" if env.active else "")
    )

    # -- one streaming pass: isotropy and decomposition on every token, readouts on the sample ---
    iso = IsotropyState.for_model(model, sites=("resid_post",), frames=("raw", "final_norm"), layers=layer_list)
    agg = LensAggregator(model, basis, layers=layer_list, readouts=readouts)
    dec = DecompositionAccumulator(model.n_layers, layer_list)
    # One capture per batch serves all three: residuals for isotropy and readouts, block outputs for
    # the decomposition.
    capture_layers = sorted(set(agg.capture_layers) | set(dec.capture_layers))
    lens_per_text = torch.zeros(len(plan.rows), dtype=torch.float64)
    my_batches = shard(range(len(plan.batches)), env)
    checkpoint = None
    start_at = 0
    if checkpoint_dir is not None:
        every = checkpoint_every or 50
        key_params = {
            "frame": frame, "layers": layer_list, "max_tokens": max_tokens, "lens_tokens": lens_tokens,
            "batch_size": batch_size, "seed": seed, "readouts": list(readouts),
            "tuned_lens": _lens_digest(tuned), "world_size": env.world_size,
        }
        checkpoint = _Checkpoint(checkpoint_dir, checkpoint_key(model, texts, key_params), env)
        saved = checkpoint.load()
        if saved is not None:
            iso = IsotropyState.from_state_dict(saved["isotropy"], final_norm=model.final_norm)
            agg.load_state_dict(saved["lens"])
            dec.load_state_dict(saved["decomposition"])
            lens_per_text = saved["lens_per_text"].clone()
            start_at = int(saved["batches_done"])
            log(f"resuming from checkpoint {checkpoint.path} after {start_at} of {len(my_batches)} batches")

    def save_checkpoint(done: int) -> None:
        assert checkpoint is not None
        checkpoint.save(
            {
                "batches_done": done,
                "isotropy": iso.state_dict(clone=False),  # serialised at once: no copy of the scatter matrices
                "lens": agg.state_dict(),
                "decomposition": dec.state_dict(),
                "lens_per_text": lens_per_text,
            }
        )

    t_capture = t_iso = t_lens = t_dec = t_ckpt = 0.0
    pass_start = time.perf_counter()
    offsets = torch.tensor(plan.offsets, dtype=torch.long)
    bar = tqdm(
        total=len(my_batches), initial=start_at, desc="report", unit="batch",
        disable=not (progress and env.is_main), file=sys.stderr, leave=False,
    )
    for done, b in enumerate(my_batches[start_at:], start=start_at + 1):
        text_ids = plan.batches[b]
        tokens = model.pad([plan.rows[i] for i in text_ids])
        t0 = time.perf_counter()
        for batch in iter_capture(
            model, tokens, sites=DECOMPOSITION_SITES, layers=capture_layers, batch_size=len(text_ids)
        ):
            pass  # exactly one batch
        t1 = time.perf_counter()
        iso.update(batch)
        t2 = time.perf_counter()
        docs = torch.tensor(text_ids, dtype=torch.long)[batch.doc_index]
        global_index = offsets[docs] + batch.positions
        select = plan.lens_mask[global_index]
        if bool(select.any()):
            lens_per_text += torch.bincount(docs[select], minlength=len(plan.rows)).to(torch.float64)
            resid = batch.acts["resid_post"][:, select.to(batch.acts["resid_post"].device)]
            agg.update(resid, batch.layers, keep=plan.keep_mask[global_index][select])
        t3 = time.perf_counter()
        dec.update(batch)
        del batch
        t4 = time.perf_counter()
        if checkpoint is not None and done % every == 0 and done < len(my_batches):
            save_checkpoint(done)
        t5 = time.perf_counter()
        t_capture, t_iso, t_lens = t_capture + t1 - t0, t_iso + t2 - t1, t_lens + t3 - t2
        t_dec, t_ckpt = t_dec + t4 - t3, t_ckpt + t5 - t4
        bar.update(1)
        if on_batch is not None:
            on_batch(done, len(my_batches))
    bar.close()
    if checkpoint is not None and start_at < len(my_batches):
        t5 = time.perf_counter()
        save_checkpoint(len(my_batches))  # the end of the pass: a crash below loses no streaming work
        t_ckpt += time.perf_counter() - t5
    pass_seconds = time.perf_counter() - pass_start
    t4 = time.perf_counter()
    agg.flush()
    agg.release()
    timings["capture (forward + hooks)"] = t_capture
    timings["isotropy statistics"] = t_iso
    timings["readouts (sampled tokens)"] = t_lens + time.perf_counter() - t4
    timings["decomposition statistics"] = t_dec
    if checkpoint is not None:
        timings["checkpoints"] = t_ckpt
    timings["pass overhead"] = max(0.0, pass_seconds - t_capture - t_iso - t_lens - t_dec - t_ckpt)

    # -- combine the ranks' states (no-ops in a single process) -----------------------------------
    rank_info = {"rank": env.rank, "batches": len(my_batches), "resumed_after_batches": start_at,
                 "pass_seconds": round(pass_seconds, 3), "peak_rss_mib": peak_rss_mib()}
    if env.active:
        with _stage(timings, "reduce over ranks"):
            iso.all_reduce(env)
            agg.all_reduce(env)
            dec.all_reduce(env)
            lens_per_text = all_reduce_sum(lens_per_text, env)
            ranks = all_gather_objects(rank_info, env)
    else:
        ranks = [rank_info]
    if not env.is_main:
        if checkpoint is not None:
            checkpoint.remove(env)  # rank 0 keeps its end-of-pass state until the report is built
        return None
    decomposition = dec.table()
    lens_per_text_list = [int(round(v)) for v in lens_per_text.tolist()]

    # -- examples: every position, with the top-k tokens ------------------------------------------
    log(f"affinity map of {len(example_texts)} example text(s)")
    with _stage(timings, "examples"):
        examples_df, example_meta = _example_table(model, agg, frame, example_texts)

    log("basis coherence and leverage")
    with _stage(timings, "basis coherence"):
        coherence = basis_coherence(basis, sample=min(COHERENCE_SAMPLE, basis.d_vocab), seed=seed)

    with _stage(timings, "tables"):
        formation = agg.table(frame=frame)
        iso_df = iso.result()
        vocab_len = len(model.tokenizer)
        corpus_df = pd.DataFrame(
            {
                "text": range(len(plan.rows)),
                "n_tokens": [len(r) for r in plan.rows],
                "lens_tokens": lens_per_text_list,
                "preview": [t[:80] for t in plan.texts],
            }
        )

    # -- figures -------------------------------------------------------------------------------
    with _stage(timings, "figures"):
        figures: dict[str, Any] = {}
        for i, meta in enumerate(example_meta):
            sub = examples_df[examples_df["example"] == i]
            figures[f"affinity_map_{i + 1}"] = plot_affinity_map(sub, meta, frame=frame)
        figures["prediction_formation"] = plot_prediction_formation(formation, d_vocab=model.d_vocab)
        figures["isotropy"] = plot_isotropy_overview(iso_df)
        figures["outlier_dimensions"] = _styled(plots.plot_outlier_dimensions(iso_df), height=420)
        figures["coherence_histogram"] = _styled(plots.plot_coherence_histogram(coherence), height=420)
        figures["leverage"] = _styled(plots.plot_leverage(coherence), height=420)
        figures["components"] = side_by_side(
            plots.plot_components_by_layer(decomposition, "spim_mean"),
            plots.plot_components_by_layer(decomposition, "cos_mean"),
            title="Residual decomposition by layer: share (spim) and cosine of each kind of component",
            subtitles=("spim: share of the residual (sum over the kind's components)", "cosine with the residual (mean over the kind's components)"),
            y_titles=("spim", "cosine"),
        )

    timings["total (build_report)"] = time.perf_counter() - started
    timings = {k: round(v, 3) for k, v in timings.items()}
    tables = {
        "examples": examples_df,
        "prediction_formation": formation,
        "isotropy": iso_df,
        "decomposition": decomposition,
        "coherence_summary": coherence.summary,
        "coherence_histogram": coherence.histogram,
        "leverage_extremes": coherence.leverage_extremes,
        "corpus": corpus_df,
        "timings": _timings_table(timings),
    }
    rss = peak_rss_mib()
    figures["timings"] = plot_timings(tables["timings"], peak_rss=rss)
    summary = {
        "generator": GENERATOR,
        "report_format": REPORT_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": _model_facts(model, vocab_len),
        "frame": frame,
        "seed": seed,
        "parameters": {
            "frame": frame,
            "layers": layer_list if layers is not None else "all",
            "max_tokens": max_tokens,
            "lens_tokens": lens_tokens,
            "batch_size": batch_size,
            "seed": seed,
            "corpus": corpus_name,
            "examples": "given" if examples is not None else f"first {len(example_texts)} corpus texts",
            "example_max_tokens": EXAMPLE_MAX_TOKENS,
            "coherence_sample": int(coherence.meta.get("sample", 0)),
            "quantile_capacity": QUANTILE_CAPACITY,
            "isotropy": {k: iso_df.attrs.get(k) for k in ("zeta", "star_reference", "k_outliers")},
            "readouts": {name: READOUT_STYLE[name][0] if name in READOUT_STYLE else name for name in agg.names},
        },
        "bos_rule": {"prepend_bos": model.prepend_bos, "description": BOS_DESCRIPTION},
        "versions": versions(),
        "tokens": {
            "texts_given": plan.n_available,
            "texts_used": len(plan.texts),
            "texts_truncated_to_context": plan.n_truncated,
            "first_text_cut_to_budget": plan.cut_first,
            "corpus_tokens": n_tokens,
            "lens_tokens": n_lens,
            "quantile_tokens": int(agg.n_kept),
            "example_tokens": int(sum(m["n_tokens"] for m in example_meta)),
            "mean_final_entropy_bits": float(agg.final_entropy.mean[0, 0]),
        },
        "timings_s": timings,
        "peak_rss_mib": rss,
        "ranks": {
            "world_size": env.world_size,
            "backend": env.backend,
            "sharding": "batch b of the length-sorted plan -> rank b % world_size",
            "per_rank": ranks,
        },
        "highlights": _highlights(formation, iso_df, decomposition, coherence.summary),
        "figures": {key: _figure_description(key) for key in figures},
    }
    report = Report(tables=tables, figures=figures, summary=summary)
    report.sections = _sections(report, example_texts, example_meta)
    if checkpoint is not None:
        checkpoint.remove(env)
    return report


# ---------------------------------------------------------------------------------- helpers


def _cached_tuned_lens(model: HookedModel) -> Lens | None:
    try:
        from ..lenses.tuned import find_cached_tuned_lens

        return find_cached_tuned_lens(model)
    except Exception:  # an optional extra must never break the report
        return None


def _logger(progress: bool) -> Callable[[str], None]:
    def log(message: str) -> None:
        if progress:
            tqdm.write(f"vsem-lens: {message}", file=sys.stderr)

    return log


@contextlib.contextmanager
def _stage(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def _timings_table(timings: dict[str, float]) -> pd.DataFrame:
    return pd.DataFrame({"stage": list(timings), "seconds": [float(v) for v in timings.values()]})


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB.

    Example:
        >>> peak_rss_mib() > 0
        True
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def versions() -> dict[str, str]:
    """Versions of the packages that determine the results.

    Example:
        >>> {"torch", "transformers", "transformer-lens", "vsem-lens"} <= set(versions())
        True
    """
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("vsem-lens", "torch", "transformers", "transformer-lens", "plotly", "numpy", "pandas"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _model_facts(model: HookedModel, vocab_len: int) -> dict[str, Any]:
    seen, n_params = set(), 0
    for p in model.bridge.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n_params += p.numel()
    return {
        "name": model.name,
        "n_layers": model.n_layers,
        "d_model": model.d_model,
        "d_vocab": model.d_vocab,
        "tokenizer_vocab": vocab_len,
        "n_ctx": model.n_ctx,
        "n_parameters": n_params,
        "dtype": str(model.dtype).replace("torch.", ""),
        "device": str(model.device),
        "fingerprint": model.fingerprint,
        "prepend_bos": model.prepend_bos,
    }


def _styled(fig: Any, *, height: int | None = None) -> Any:
    from .figures import style

    return style(fig, height=height)


def _example_table(
    model: HookedModel, agg: LensAggregator, frame: str, texts: list[str]
) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Lens and affinity readouts of every position of the example texts (with the top-k tokens) as a
    tidy table, through the aggregator's own readout kernel (no second set of vocabulary buffers).
    """
    vocab = vocabulary_strings(model)
    frames, metas = [], []
    for i, text in enumerate(texts):
        ids = model.token_ids([text], max_length=model.n_ctx)[0]
        tokens = model.pad([ids[: min(EXAMPLE_MAX_TOKENS, model.n_ctx)]])
        batch = next(iter_capture(model, tokens, layers=agg.capture_layers, batch_size=1))
        rows, last = agg._rows_of(batch.layers)
        finals, out = agg.kernel.read(batch.acts["resid_post"], rows, last, k=EXAMPLE_TOP_K, names=("lens", "affinity"))
        n_layers, n_tok = len(agg.layers), batch.n_tokens
        aff = {key: value.cpu() for key, value in out["affinity"].items()}
        lens = {key: value.cpu() for key, value in out["lens"].items()}
        cols: dict[str, Any] = {
            "example": i,
            "layer": torch.tensor(agg.layers).repeat_interleave(n_tok).numpy(),
            "position": batch.positions.repeat(n_layers).numpy(),
            "token_id": batch.token_ids.repeat(n_layers).numpy(),
            "final_id": finals["final_ids"].cpu().repeat(n_layers).numpy(),
        }
        aff_ids = aff["top_ids"].reshape(n_layers * n_tok, -1).tolist()
        cols["affinity_top1"] = [vocab[row[0]] for row in aff_ids]
        cols["affinity_top_tokens"] = [[vocab[j] for j in row] for row in aff_ids]
        cols["affinity_top_scores"] = aff["top_scores"].reshape(n_layers * n_tok, -1).tolist()
        cols["affinity_final_cos"] = aff["final_score"].reshape(-1).numpy()
        cols["affinity_final_rank"] = aff["final_rank"].reshape(-1).numpy()
        cols["lens_top1"] = [vocab[j] for j in lens["top_ids"][..., 0].reshape(-1).tolist()]
        cols["lens_final_rank"] = lens["final_rank"].reshape(-1).numpy()
        cols["lens_final_prob"] = lens["final_prob"].reshape(-1).numpy()
        cols["lens_kl_bits"] = lens["kl_bits"].reshape(-1).numpy()
        df = pd.DataFrame(cols)
        df.insert(4, "token", [vocab[j] for j in df["token_id"]])
        df.insert(6, "final_token", [vocab[j] for j in df["final_id"]])
        frames.append(df)
        metas.append({"index": i, "text": text, "n_tokens": n_tok, "n_tokens_full": len(ids)})
    table = pd.concat(frames, ignore_index=True)
    table["frame"] = frame
    return table, metas


def _highlights(formation: pd.DataFrame, iso: pd.DataFrame, dec: pd.DataFrame, coh: pd.DataFrame) -> list[str]:
    """A few plain-language findings computed from the tables (shown at the top of the page)."""
    out = []
    lens = formation[formation["readout"] == "lens"].sort_values("layer")
    if len(lens):
        zero = (lens["rank_median"] == 0).tolist()
        if zero and zero[-1]:
            first = len(zero) - next(i for i, z in enumerate(reversed(zero)) if not z) if not all(zero) else 0
            out.append(
                f"The logit lens's top-1 matches the model's prediction for most sampled tokens (median rank 1) "
                f"from layer {int(lens['layer'].iloc[first])} on."
            )
        below = lens[lens["kl_bits_mean"] < 1.0]
        if len(below):
            out.append(f"Mean KL(final || logit lens) falls below 1 bit at layer {int(below['layer'].iloc[0])}.")
        mid = lens.iloc[len(lens) // 2]
        out.append(
            f"At layer {int(mid['layer'])} the logit lens agrees with the final top-1 on "
            f"{100 * mid['top1_agreement']:.0f}% of sampled tokens."
        )
    aff = formation[formation["readout"] == "affinity"].sort_values("layer")
    if len(aff):
        best = aff.loc[aff["top1_agreement"].idxmax()]
        out.append(
            f"Vocabulary affinity agrees best with the final prediction at layer {int(best['layer'])} "
            f"({100 * best['top1_agreement']:.0f}% top-1 agreement)."
        )
    raw = iso[(iso["frame"] == "raw") & (iso["site"] == "resid_post")]
    if len(raw):
        low = raw.loc[raw["isoscore"].idxmin()]
        out.append(
            f"The raw residual is least isotropic at layer {int(low['layer'])} (IsoScore {low['isoscore']:.3f}, "
            f"participation ratio {low['participation_ratio']:.1f}); its top outlier dimension there is "
            f"{low['outlier_dims'][0]} ({100 * low['outlier_shares'][0]:.0f}% of the variance)."
        )
    if len(coh) == 2 and "which" in coh:
        s = coh.set_index("which")
        out.append(
            f"Mean |cosine| between token vectors: {s.loc['semantic_basis', 'mean_abs_cos']:.3f} for semantic bases "
            f"vs {s.loc['unembedding', 'mean_abs_cos']:.3f} for unembedding columns."
        )
    return out


FIGURE_DESCRIPTIONS = {
    "affinity_map": "Heatmap, layer x position of one example text: cell text = top-1 token by vocabulary affinity "
    "(cosine to the semantic bases); colour = cosine of the residual with the basis vector of the model's final "
    "prediction; hover = top-k affinity tokens with cosines, logit lens top-1, ranks.",
    "prediction_formation": "Per layer over the sampled tokens, for the logit lens and vocabulary affinity: rank of the "
    "model's final top-1 token (median, IQR band), top-1 agreement, its probability (mean, IQR band) and "
    "KL(final || readout) in bits (mean, IQR band).",
    "isotropy": "IsoScore, IsoScore*, average cosine and top-k outlier variance share per layer in the raw and "
    "final-norm frames, and the participation ratio (effective dimensions).",
    "outlier_dimensions": "Variance share of the top-k coordinate dimensions per layer (dropdown: frame).",
    "coherence_histogram": "Histogram of pairwise cosines of a token sample: semantic basis vectors vs unembedding "
    "columns.",
    "leverage": "Leverage P_ii of every token (diagonal of the projector pinv(W_U) W_U), sorted, extremes marked.",
    "components": "Per layer, the share of the residual (spim = <x_k, e>/||e||^2, summed per kind) and the mean cosine "
    "with the residual of the embedding, attention, MLP and remainder components.",
    "timings": "Wall time per stage of the run.",
}


def _figure_description(key: str) -> str:
    return FIGURE_DESCRIPTIONS.get(re.sub(r"_\d+$", "", key), "")


def _sections(report: Report, example_texts: list[str], example_meta: list[dict[str, Any]]) -> list[Section]:
    s = report.summary
    p, tok = s["parameters"], s["tokens"]
    frame = p["frame"]
    frame_words = {
        "final_norm": "after the model's own final norm (the logit-lens convention)",
        "raw": "as it is (raw frame, no final norm)",
        "tuned": "through the tuned lens",
    }[frame]
    maps = [k for k in report.figures if k.startswith("affinity_map_")]
    iso_attrs = p.get("isotropy", {})
    coh_n = p.get("coherence_sample")
    captions = {}
    for key, meta in zip(maps, example_meta):
        shown = f"first {meta['n_tokens']} of {meta['n_tokens_full']} tokens" if meta["n_tokens_full"] > meta["n_tokens"] else f"{meta['n_tokens']} tokens"
        captions[key] = f"Example {meta['index'] + 1} ({shown}): {meta['text']}"
    return [
        Section(
            "affinity-map",
            "1. Layerwise affinity map",
            "Each panel is one example text: columns are input positions (the input token below, the model's "
            "next-token prediction on top), rows are layers (the residual stream after each block, read "
            f"{frame_words}). The text in a cell is the vocabulary token whose semantic basis vector "
            "(a row of pinv(W_U)) has the highest cosine with the residual: what the layer says in the model's "
            "own vocabulary coordinates. The colour is the cosine with the basis vector of the token the model "
            "finally predicts at that position, so warm cells show where the eventual prediction is already "
            "present. Hover a cell for the top-5 tokens by affinity with their cosines, the logit lens's top-1 "
            "and the ranks of the final prediction. Affinity is a whitened, per-token-normalised logit lens, so "
            "in early layers its top-1 often differs from the logit lens's.",
            maps,
            captions,
        ),
        Section(
            "prediction",
            "2. When does the prediction form?",
            f"For {tok['lens_tokens']:,} tokens sampled uniformly from the corpus (seed {p['seed']}), every "
            "layer's residual is read out over the whole vocabulary and compared with the model's own next-token "
            "distribution at the same position. Top left: rank of the model's final top-1 token in the readout "
            "(1 = the readout's top-1 already agrees; line = median, band = interquartile range; log scale). Top "
            "right: fraction of tokens whose readout top-1 equals the final prediction. Bottom: the probability "
            "the readout gives to that token and KL(final || readout) in bits (line = mean, band = interquartile "
            "range). The layer where the rank drops to 1 and the KL falls is where the prediction forms. "
            "Vocabulary affinity is a softmax over cosines in [-1, 1] (no temperature, as in Gu et al.), so its "
            "probabilities stay near 1/V and its KL near log2 V minus the final entropy: read affinity by rank "
            "and agreement, not by probability.",
            ["prediction_formation"],
        ),
        Section(
            "isotropy",
            "3. Isotropy by layer",
            f"Isotropy of the residual stream over all {tok['corpus_tokens']:,} corpus tokens, layer by layer, in "
            "the raw residual and after the model's final norm. IsoScore (Rudman et al. 2022) is 1 when the "
            "variance is spread evenly over all d_model dimensions and 0 when a single direction holds it; "
            f"IsoScore* shrinks the covariance by zeta = {iso_attrs.get('zeta')} toward an isotropic reference "
            f"({iso_attrs.get('star_reference')}) and is steadier; the participation ratio is the effective number "
            "of dimensions (IsoScore = (PR - 1)/(d - 1)). The average cosine between token vectors is shown because "
            "it is common, but it measures a shared mean direction, not isotropy. Below: the coordinate dimensions "
            "with the largest variance share per layer (outlier dimensions; the menu switches frames), which drive "
            "IsoScore toward 0; the final norm's gain can damp or amplify them.",
            ["isotropy", "outlier_dimensions"],
        ),
        Section(
            "disentanglement",
            "4. Disentanglement",
            f"Basis view: pairwise cosines between the semantic basis vectors of {coh_n:,} random tokens and between "
            "the unembedding columns of the same tokens. The pseudoinverse whitens the unembedding, so semantic "
            "bases are usually closer to orthogonal (a distribution concentrated near 0). Leverage P_ii = s_i . w_i "
            "is each token's diagonal entry of the projector pinv(W_U) W_U; it sums to d_model, and low-leverage "
            "tokens are hard to express in the residual stream. Component view (Mickus et al. 2022; Mickus & "
            "Vazquez 2023): the residual after block l is the sum of the embedding and every attention and MLP "
            "output up to l; spim_k = <x_k, e>/||e||^2 is each kind's share of the residual (the kinds sum to 1), "
            "and the cosine shows how aligned a kind's components are with the residual.",
            ["coherence_histogram", "leverage", "components"],
        ),
        Section(
            "run-card",
            "5. Run card",
            "What was run and what it cost. Times are wall-clock seconds on this machine; the peak memory is the "
            "process's peak resident set size (model weights included).",
            ["timings"],
        ),
    ]


# ---------------------------------------------------------------------------------- atomic writes


def _is_report_dir(path: Path) -> bool:
    try:
        summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and summary.get("generator") == GENERATOR


def _check_replaceable(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"--out {str(out)!r} exists and is a file; choose a directory path for the report.")
    if any(out.iterdir()) and not _is_report_dir(out):
        raise InputError(
            f"--out {str(out)!r} exists and is not a vsem-lens report (no summary.json written by vsem-lens); "
            "refusing to replace it. Choose another directory or remove it."
        )


def _remove_stale_temporaries(out: Path) -> None:
    """Remove temporary report directories left by killed runs (their process no longer exists)."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?:tmp|old)-(\d+)-[0-9a-f]{{8}}$")
    for sibling in out.parent.iterdir():
        match = pattern.match(sibling.name)
        if not match or not sibling.is_dir():
            continue
        pid = int(match.group(1))
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(sibling, ignore_errors=True)
        except PermissionError:
            pass  # another user's live process


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directory entries (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Move the finished report ``tmp`` to ``out``, replacing an earlier report only at the last moment."""
    if not out.exists():
        os.rename(tmp, out)
        return
    if _rename_exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the earlier report
        return
    # Fallback (non-Linux): two renames; the earlier report survives as a hidden sibling until the end.
    old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _csv_ready(df: pd.DataFrame) -> pd.DataFrame:
    """Lists/arrays in cells become JSON strings, so a CSV round-trips them unambiguously."""
    out = df.copy()
    for column in out.columns:
        if out[column].dtype == object and len(out) and any(isinstance(v, (list, tuple, np.ndarray)) for v in out[column]):
            out[column] = [json.dumps(_jsonable(v), ensure_ascii=False) for v in out[column]]
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, Tensor):
        return _jsonable(value.tolist())
    return value
