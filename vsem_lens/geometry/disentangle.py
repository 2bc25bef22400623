r"""Disentanglement: how separated the semantic bases are, and how the residual is built from components.

Two views (docs/concepts/disentanglement.md).

**Basis view** (:func:`basis_coherence`). The semantic basis ``S = pinv(W_U)`` [V, d] (Gu et al., arXiv
2401.16184) whitens the unembedding: ``s_i = G^{-1} u_i`` with ``G = U^T U``. We compare the pairwise
cosines of a random sample of semantic basis vectors with those of the *same* tokens' unembedding
columns (rows of ``W_U.T``): mean and maximum absolute cosine (the mutual coherence *of the sample*, a
lower bound of the vocabulary's), quantiles, and a histogram. Also the leverage ``P_ii = s_i . u_i``
of every token (the diagonal of the rank-d projector ``P = S W_U``; it sums to d), with the tokens at
both extremes.

**Component view** (:func:`decomposition_by_layer`; Mickus, Paperno & Constant 2022, "How to Dissect a
Muppet"; Mickus & Vazquez, "Why bother with geometry? On the relevance of linear decompositions of
Transformer embeddings", BlackboxNLP 2023). The residual after block ``l`` is a sum of components,
``e = x_embed + sum_{j <= l} (x_attn_j + x_mlp_j) + remainder``; for Llama-style models (no biases,
pre-norm) the remainder is zero up to float rounding, and we report it rather than assume it. Per
component ``k``, token and layer: ``spim_k = <x_k, e> / ||e||^2`` (sums to 1 over the components),
``cos_k = cos(x_k, e)``, ``dist_k = ||x_k - e||`` and ``norm_ratio_k = ||x_k|| / ||e||``, summarised
over tokens by mean and standard deviation (streamed; no token is kept).

:func:`affinity_sparsity_by_layer` measures how concentrated each layer's vocabulary readout is: the
entropy of the softmax over vocabulary affinities (cosines, no temperature, as in the paper) and over
the logit lens, the probability mass of the top k, and the top-1 cosine.

Example:
    >>> coh = basis_coherence(basis, sample=2048)                  # doctest: +SKIP
    >>> coh.summary[["which", "mean_abs_cos", "max_abs_cos"]]      # doctest: +SKIP
    >>> dec = decomposition_by_layer(model, corpus, layers=[5, 29])  # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..core.capture import ActivationBatch, check_layers, iter_capture
from ..core.errors import ArtifactError, InputError, check_positive_int
from ..core.models import HookedModel
from ..core.stats import RunningScalars, Stat
from ..lenses.base import Lens
from ..readout.affinity import basis_and_lens, vocab_affinity, vocabulary_strings
from ..readout.basis import SemanticBasis

LN2 = math.log(2.0)
QUANTILES = (0.5, 0.9, 0.99, 0.999)
#: Resolution of the fine histograms the coherence quantiles are read from (|cos| in [0, 1]).
FINE_BINS = 20_000


# ---------------------------------------------------------------------------------- basis view


@dataclass
class BasisCoherence:
    """Result of :func:`basis_coherence`: tables ready for plotting and reporting.

    Attributes:
        summary: one row per ``which`` in (``semantic_basis``, ``unembedding``): ``n_vectors``,
            ``n_pairs``, ``mean_cos``, ``mean_abs_cos``, ``max_abs_cos`` (mutual coherence over the
            sample), the token pair reaching it (``max_pair_ids``, ``max_pair_tokens``) and quantiles
            ``q50_abs_cos`` ... ``q999_abs_cos`` of |cos| (read from a 20,000-bin histogram:
            resolution 5e-5).
        histogram: tidy ``which, bin, bin_left, bin_right, bin_center, count, fraction`` of the signed
            pairwise cosines (``bins`` equal bins over [-1, 1]).
        leverage: ``token_id, token, leverage`` for every token (``P_ii``; sums to d_model).
        leverage_extremes: ``end`` (``high``/``low``), ``rank``, ``token_id``, ``token``, ``leverage``.
        sample_ids: the sampled token ids (sorted), the same for both ``which``.
        seed: the sampling seed.

    Example:
        >>> coh = basis_coherence(basis, sample=1024)   # doctest: +SKIP
        >>> coh["summary"] is coh.summary               # doctest: +SKIP
        True
    """

    summary: pd.DataFrame
    histogram: pd.DataFrame
    leverage: pd.DataFrame
    leverage_extremes: pd.DataFrame
    sample_ids: Int[Tensor, " sample"]
    seed: int
    d_model: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return getattr(self, name)

    def _repr_html_(self) -> str:
        """Jupyter rendering: the summary table and the tokens at both leverage extremes."""
        import html

        summary_cols = [c for c in ("which", "n_vectors", "n_pairs", "mean_cos", "mean_abs_cos", "max_abs_cos",
                                    "max_pair_tokens", "q50_abs_cos", "q99_abs_cos") if c in self.summary]
        parts = [
            f"<div><b>BasisCoherence</b> ({len(self.sample_ids)} sampled tokens, seed {self.seed}, "
            f"d_model {self.d_model})",
            self.summary[summary_cols].to_html(index=False, float_format=lambda v: f"{v:.4g}"),
        ]
        extremes = self.leverage_extremes
        if len(extremes) and "end" in extremes:
            for end in ("high", "low"):
                rows = extremes[extremes["end"] == end].head(5)
                tokens = ", ".join(f"{html.escape(repr(t))} ({v:.3f})" for t, v in zip(rows["token"], rows["leverage"]))
                parts.append(f"<p>{end} leverage P<sub>ii</sub>: {tokens}</p>")
        parts.append("</div>")
        return "\n".join(parts)

    def as_dict(self) -> dict[str, Any]:
        """Plain dict of the tables (e.g. for JSON reports).

        Example:
            >>> sorted(coh.as_dict())  # doctest: +SKIP
            ['histogram', 'leverage', 'leverage_extremes', 'meta', 'sample_ids', 'seed', 'summary']
        """
        return {
            "summary": self.summary,
            "histogram": self.histogram,
            "leverage": self.leverage,
            "leverage_extremes": self.leverage_extremes,
            "sample_ids": self.sample_ids.tolist(),
            "seed": self.seed,
            "meta": dict(self.meta),
        }


def pairwise_cosine_stats(
    vectors: Float[Tensor, "n d"], *, bins: int = 100, chunk: int = 1024
) -> dict[str, Any]:
    """Statistics of the cosines of all distinct pairs ``i < j`` of rows, computed in row chunks.

    Memory is ``chunk x n`` (never n x n at once); float64 throughout. Zero rows have cosine 0 with
    everything.

    Returns:
        dict with ``n_pairs``, ``mean_cos``, ``mean_abs_cos``, ``max_abs_cos``, ``max_pair`` (row
        indices), ``quantiles`` (of |cos|, {q: value}), ``hist`` (counts over ``bins`` bins of [-1, 1]).

    Example:
        >>> out = pairwise_cosine_stats(torch.eye(3, dtype=torch.float64))
        >>> out["n_pairs"], out["max_abs_cos"]
        (3, 0.0)
    """
    if vectors.ndim != 2 or vectors.shape[0] < 2:
        raise InputError(f"need at least 2 vectors [n, d], got shape {tuple(vectors.shape)}.")
    x = vectors.detach().to(torch.float64)
    norms = x.norm(dim=1, keepdim=True)
    unit = torch.where(norms > 0, x / norms.clamp_min(1e-300), 0.0)
    n = unit.shape[0]
    total = total_abs = 0.0
    best, best_pair = -1.0, (0, 1)
    hist = torch.zeros(bins, dtype=torch.float64)
    fine = torch.zeros(FINE_BINS, dtype=torch.float64)
    for start in range(0, n - 1, chunk):
        stop = min(n, start + chunk)
        # Rows start..stop against columns start..n; keep the strict upper triangle j > i.
        block = unit[start:stop] @ unit[start:].T  # [c, n - start]
        rows = torch.arange(stop - start).unsqueeze(1)
        cols = torch.arange(n - start).unsqueeze(0)
        values = block[cols > rows]
        if values.numel() == 0:
            continue
        abs_values = values.abs()
        total += float(values.sum())
        total_abs += float(abs_values.sum())
        # Flattened argmax of |block| restricted to the upper triangle.
        masked = torch.where(cols > rows, block.abs(), -1.0)
        flat = int(masked.argmax())
        value = float(masked.reshape(-1)[flat])
        if value > best:
            best = value
            i, j = divmod(flat, masked.shape[1])
            best_pair = (start + i, start + j)
        hist += torch.histc(values.clamp(-1.0, 1.0), bins=bins, min=-1.0, max=1.0)
        fine += torch.histc(abs_values.clamp(0.0, 1.0), bins=FINE_BINS, min=0.0, max=1.0)
    n_pairs = n * (n - 1) // 2
    return {
        "n_pairs": n_pairs,
        "mean_cos": total / n_pairs,
        "mean_abs_cos": total_abs / n_pairs,
        "max_abs_cos": best,
        "max_pair": best_pair,
        "quantiles": {q: _hist_quantile(fine, q) for q in QUANTILES},
        "hist": hist,
    }


def _hist_quantile(counts: Tensor, q: float) -> float:
    """Quantile of values in [0, 1] from a fine histogram, linear within the bin."""
    cdf = counts.cumsum(0)
    target = q * float(cdf[-1])
    k = int(torch.searchsorted(cdf, torch.tensor([target], dtype=cdf.dtype)).item())
    k = min(k, counts.numel() - 1)
    before = float(cdf[k - 1]) if k > 0 else 0.0
    inside = float(counts[k])
    frac = (target - before) / inside if inside > 0 else 0.0
    return (k + min(max(frac, 0.0), 1.0)) / counts.numel()


def basis_coherence(
    basis: SemanticBasis,
    *,
    sample: int = 4096,
    seed: int = 0,
    bins: int = 100,
    n_extremes: int = 20,
    chunk: int = 1024,
) -> BasisCoherence:
    """How separated the semantic basis vectors are, against the raw unembedding, plus token leverage.

    Draws ``sample`` token ids without replacement (all tokens if the vocabulary is smaller),
    deterministically from ``seed``, and computes the cosines of all pairs of their semantic basis
    vectors (rows of ``S = pinv(W_U)``) and of their unembedding columns (rows of ``W_U.T``), in row
    chunks (never a V x V or even a full sample x sample matrix). ``max_abs_cos`` is the mutual
    coherence *over the sample* (a lower bound of the vocabulary's). The leverage ``P_ii`` is computed
    for every token.

    Args:
        basis: a :class:`~vsem_lens.readout.basis.SemanticBasis` with its model attached.
        sample: number of tokens to sample (>= 2).
        seed: sampling seed (results are identical for the same seed).
        bins: number of histogram bins over [-1, 1].
        n_extremes: how many tokens to list at each leverage extreme.
        chunk: rows per cosine block.

    Example:
        >>> coh = basis_coherence(vl.SemanticBasis.from_model(model), sample=2048)  # doctest: +SKIP
        >>> coh.summary.set_index("which").max_abs_cos                                # doctest: +SKIP
        >>> coh.leverage_extremes.head()                                              # doctest: +SKIP
    """
    if not isinstance(basis, SemanticBasis):
        raise InputError(f"basis_coherence expects a SemanticBasis, got {type(basis).__name__}.")
    if basis.model is None:
        raise ArtifactError("this basis has no model attached; load it with SemanticBasis.load(path, model=model).")
    for name, value, low in (("sample", sample, 2), ("bins", bins, 1), ("n_extremes", n_extremes, 1), ("chunk", chunk, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"{name} must be an integer >= {low}, got {value!r}.")
    model = basis.model
    V = basis.d_vocab
    generator = torch.Generator().manual_seed(int(seed))
    ids = torch.randperm(V, generator=generator)[: min(sample, V)].sort().values
    W_U = model.W_U
    sources = {
        "semantic_basis": basis.vectors[ids.to(basis.vectors.device)],
        "unembedding": W_U.T[ids.to(W_U.device)],
    }
    summary_rows, hist_rows = [], []
    edges = torch.linspace(-1.0, 1.0, bins + 1, dtype=torch.float64)
    for which, vectors in sources.items():
        stats = pairwise_cosine_stats(vectors.cpu(), bins=bins, chunk=chunk)
        pair_ids = [int(ids[stats["max_pair"][0]]), int(ids[stats["max_pair"][1]])]
        row = {
            "which": which,
            "n_vectors": int(ids.numel()),
            "n_pairs": stats["n_pairs"],
            "mean_cos": stats["mean_cos"],
            "mean_abs_cos": stats["mean_abs_cos"],
            "max_abs_cos": stats["max_abs_cos"],
            "max_pair_ids": pair_ids,
            "max_pair_tokens": [vocabulary_strings(model)[i] for i in pair_ids],
        }
        for q, value in stats["quantiles"].items():
            row[f"q{str(q)[2:]:0<2}_abs_cos"] = value
        summary_rows.append(row)
        counts = stats["hist"]
        for b in range(bins):
            hist_rows.append(
                {
                    "which": which,
                    "bin": b,
                    "bin_left": float(edges[b]),
                    "bin_right": float(edges[b + 1]),
                    "bin_center": float(edges[b] + edges[b + 1]) / 2,
                    "count": int(counts[b]),
                    "fraction": float(counts[b]) / stats["n_pairs"],
                }
            )
    leverage = basis.leverage().cpu()
    strings = vocabulary_strings(model)
    lev_df = pd.DataFrame({"token_id": range(V), "token": strings, "leverage": leverage.numpy()})
    order = torch.argsort(leverage, descending=True, stable=True)
    n_ext = min(n_extremes, V)
    ext_rows = []
    for end, picks in (("high", order[:n_ext]), ("low", order.flip(0)[:n_ext])):
        for rank, i in enumerate(picks.tolist()):
            ext_rows.append({"end": end, "rank": rank, "token_id": i, "token": strings[i], "leverage": float(leverage[i])})
    return BasisCoherence(
        summary=pd.DataFrame(summary_rows),
        histogram=pd.DataFrame(hist_rows),
        leverage=lev_df,
        leverage_extremes=pd.DataFrame(ext_rows),
        sample_ids=ids,
        seed=int(seed),
        d_model=basis.d_model,
        meta={
            "sample": int(ids.numel()),
            "d_vocab": V,
            "d_model": basis.d_model,
            "leverage_sum": float(leverage.sum()),
            "mean_leverage": basis.d_model / V,
            "note": "max_abs_cos is the mutual coherence over the sampled tokens, not the whole vocabulary",
        },
    )


# ---------------------------------------------------------------------------------- component view

_DECOMP_STATS = ("spim", "cos", "dist", "norm_ratio")
#: Sites a decomposition needs in each captured batch.
DECOMPOSITION_SITES = ("embed", "attn_out", "mlp_out", "resid_post")


class DecompositionAccumulator(Stat):
    """Streaming residual decomposition: feed captured batches, read the tidy table (see
    :func:`decomposition_by_layer` for the indicators and the columns).

    Each batch must hold :data:`DECOMPOSITION_SITES` for the blocks :attr:`capture_layers`
    (``0..max(layers)``); extra sites or layers are ignored, so one capture can serve several analyses.
    Only running means and variances are kept (no token), in float64.

    Args:
        n_layers: the model's number of layers.
        layers: residual layers to decompose (``None`` = all).
        token_chunk: tokens per float64 working block (bounds memory to
            ``(2 n_layers + 2) x token_chunk x d_model`` doubles).

    Example:
        >>> acc = DecompositionAccumulator(model.n_layers, layers=[5, 29])             # doctest: +SKIP
        >>> for batch in iter_capture(model, corpus, sites=DECOMPOSITION_SITES,        # doctest: +SKIP
        ...                           layers=acc.capture_layers):
        ...     acc.update(batch)
        >>> acc.table().query("layer == 29").head()                                  # doctest: +SKIP
    """

    def __init__(self, n_layers: int, layers: int | Sequence[int] | None = None, *, token_chunk: int = 256):
        check_positive_int(token_chunk, "token_chunk")
        self.targets = check_layers(layers, n_layers)
        #: Blocks whose outputs the batches must hold.
        self.capture_layers = list(range(max(self.targets) + 1))
        self.token_chunk = token_chunk
        self.n_comp = 2 * len(self.capture_layers) + 1  # embed, attn_0, mlp_0, attn_1, mlp_1, ...
        # Streams: [target layer, component (the remainder in the last slot)].
        shape = (len(self.targets), self.n_comp + 1)
        self.running = {name: RunningScalars(shape) for name in _DECOMP_STATS}
        self.max_abs = torch.zeros(len(self.targets), dtype=torch.float64)
        self.max_rel = torch.zeros(len(self.targets), dtype=torch.float64)

    def update(self, batch: ActivationBatch) -> "DecompositionAccumulator":
        """Fold one captured batch in; returns ``self``."""
        missing = [site for site in DECOMPOSITION_SITES if site not in batch.acts]
        if missing:
            raise InputError(f"the batch lacks sites {missing}; capture with sites={DECOMPOSITION_SITES}.")
        absent = sorted(set(self.capture_layers) - set(batch.layers))
        if absent:
            raise InputError(f"the batch lacks layers {absent}; capture with layers={self.capture_layers}.")
        index = [batch.layers.index(j) for j in self.capture_layers]
        acts = batch.acts
        attn, mlp = acts["attn_out"], acts["mlp_out"]
        if index == list(range(len(index))):  # the usual leading block of layers: views, no copy
            attn, mlp = attn[: len(index)], mlp[: len(index)]
        else:
            attn, mlp = attn[index], mlp[index]
        resid_rows = torch.tensor([batch.layers.index(layer) for layer in self.targets])
        # Components used by each target layer: embed + attn/mlp of blocks 0..layer.
        target_slot = {layer: i for i, layer in enumerate(self.targets)}
        n_comp = self.n_comp
        for start in range(0, batch.n_tokens, self.token_chunk):
            span = slice(start, start + self.token_chunk)
            # Components in residual order: embed, attn_0, mlp_0, attn_1, mlp_1, ... [n_comp, T, d].
            comps = torch.empty(n_comp, *acts["embed"][0, span].shape, dtype=torch.float64)
            comps[0] = acts["embed"][0, span]
            comps[1::2] = attn[:, span]
            comps[2::2] = mlp[:, span]
            comp_norm = comps.norm(dim=-1)  # [n_comp, T]
            # Residual reconstructed after each block: embed + sum_{j<=l} (attn_j + mlp_j). An in-place
            # running sum (torch.cumsum over the leading axis is several times slower here).
            # Only the target layers' snapshots are kept.
            reconstructed = torch.empty(len(self.targets), *comps.shape[1:], dtype=torch.float64)
            running_sum = comps[0].clone()
            for j in range(len(self.capture_layers)):
                running_sum += comps[2 * j + 1]
                running_sum += comps[2 * j + 2]
                if j in target_slot:
                    reconstructed[target_slot[j]] = running_sum
            # All target layers at once: every (layer, component) stream gets a value per token; the
            # streams of components after a layer (k >= 2 layer + 3) are computed too but never reported.
            e = acts["resid_post"][resid_rows.to(acts["resid_post"].device), span].to(torch.float64)  # [L, T, d]
            e_sq = (e * e).sum(-1)  # [L, T]
            if not bool((e_sq > 0).all()):
                bad = self.targets[int((e_sq <= 0).any(dim=1).nonzero()[0])]
                raise InputError(
                    f"a residual at layer {bad} is all zeros, so its decomposition is undefined; check the model."
                )
            e_norm = e_sq.sqrt()
            remainder = e - reconstructed  # [L, T, d]
            rem_norm = remainder.norm(dim=-1)  # [L, T]
            self.max_abs = torch.maximum(self.max_abs, remainder.abs().amax(dim=(1, 2)))
            self.max_rel = torch.maximum(self.max_rel, (rem_norm / e_norm).amax(dim=1))
            dots = torch.cat(
                [torch.einsum("ltd,ktd->lkt", e, comps), (remainder * e).sum(-1).unsqueeze(1)], dim=1
            )  # [L, n_comp + 1, T]
            norms = torch.cat([comp_norm.expand(len(self.targets), -1, -1), rem_norm.unsqueeze(1)], dim=1)
            e_sq, e_norm = e_sq.unsqueeze(1), e_norm.unsqueeze(1)
            values = {
                "spim": dots / e_sq,
                "cos": torch.where(norms > 0, dots / (norms * e_norm).clamp_min(1e-300), 0.0),
                "dist": (norms.square() - 2 * dots + e_sq).clamp_min(0.0).sqrt(),
                "norm_ratio": norms / e_norm,
            }
            for name, tensor in values.items():
                self.running[name].update(tensor)
        return self

    def state_dict(self) -> dict[str, Any]:
        """The streaming state as plain tensors (for checkpoints; ``torch.load(weights_only=True)``)."""
        return {
            "targets": list(self.targets),
            "running": {name: r.state_dict() for name, r in self.running.items()},
            "max_abs": self.max_abs.clone(),
            "max_rel": self.max_rel.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (same target layers)."""
        if list(state["targets"]) != self.targets:
            raise InputError("the saved decomposition state tracks other layers than this accumulator.")
        for name, saved in state["running"].items():
            self.running[name].load_state_dict(saved)
        self.max_abs, self.max_rel = state["max_abs"].clone(), state["max_rel"].clone()

    def merge(self, other: "DecompositionAccumulator") -> "DecompositionAccumulator":
        """Fold an accumulator over other tokens (same layers) into this one; returns ``self``."""
        if not isinstance(other, DecompositionAccumulator) or other.targets != self.targets:
            raise InputError("DecompositionAccumulator.merge expects an accumulator over the same layers.")
        for name, running in self.running.items():
            running.merge(other.running[name])
        self.max_abs = torch.maximum(self.max_abs, other.max_abs)
        self.max_rel = torch.maximum(self.max_rel, other.max_rel)
        return self

    def result(self) -> pd.DataFrame:
        """The tidy table over every token folded in so far (see :meth:`table`)."""
        return self.table()

    def all_reduce(self, env: Any) -> None:
        """Combine the state of every ``torch.distributed`` rank in place; every rank gets it."""
        from ..core.distributed import all_reduce_max

        if not env.active:
            return
        for running in self.running.values():
            running.all_reduce(env)
        self.max_abs = all_reduce_max(self.max_abs, env)
        self.max_rel = all_reduce_max(self.max_rel, env)

    def table(self) -> pd.DataFrame:
        """The tidy table over every token folded in so far (columns: :func:`decomposition_by_layer`)."""
        rows = []
        names = ["embed"] + [f"{kind}_{j}" for j in self.capture_layers for kind in ("attn", "mlp")]
        for t, layer in enumerate(self.targets):
            n_used = 2 * layer + 3
            for slot in list(range(n_used)) + [self.n_comp]:
                if slot == self.n_comp:
                    component, kind, comp_layer = "remainder", "remainder", layer
                else:
                    component = names[slot]
                    kind = component.split("_")[0]
                    comp_layer = -1 if slot == 0 else (slot - 1) // 2
                row = {
                    "layer": layer,
                    "component": component,
                    "component_layer": comp_layer,
                    "kind": kind,
                    "n_tokens": int(self.running["spim"].count[t, slot]),
                }
                for name in _DECOMP_STATS:
                    row[f"{name}_mean"] = float(self.running[name].mean[t, slot])
                    row[f"{name}_std"] = float(self.running[name].std()[t, slot])
                row["reconstruction_error"] = float(self.max_abs[t])
                row["reconstruction_rel_error"] = float(self.max_rel[t])
                rows.append(row)
        return pd.DataFrame(rows)


def decomposition_by_layer(
    model: HookedModel,
    texts: str | Sequence[str],
    *,
    layers: int | Sequence[int] | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    token_chunk: int = 256,
    progress: bool = False,
) -> pd.DataFrame:
    """Decompose each layer's residual into its components and measure each one's contribution.

    The residual after block ``l`` (``resid_post``) is ``e = embed + sum_{j<=l} (attn_j + mlp_j) +
    remainder``; ``remainder = e - sum`` is reported as a component. For Llama-style models (no biases,
    rotary positions) it is float rounding (~1e-6 of ``||e||`` on SmolLM2); for models with learned
    positional embeddings (GPT-2 style) it also holds the positional embedding, which no captured
    site includes. One streaming pass captures ``embed``,
    ``attn_out``, ``mlp_out`` and ``resid_post`` for blocks ``0..max(layers)``; per token the four
    indicators of Mickus & Vazquez (2023) are computed in float64 and folded into running means and
    variances, so no token is kept. ``spim`` sums to exactly 1 over the components (remainder
    included), per token and hence in the means. The work per batch is a
    :class:`DecompositionAccumulator`, which a streaming analysis that already captures these sites
    (the report) can feed directly.

    Args:
        model: a :class:`~vsem_lens.core.models.HookedModel`.
        texts: one text or a list of texts.
        layers: residual layers to decompose (``None`` = all).
        batch_size, max_length, progress: as in :func:`~vsem_lens.core.capture.iter_capture`.
        token_chunk: tokens per float64 working block (bounds memory to
            ``(2 n_layers + 2) x token_chunk x d_model`` doubles).

    Returns:
        A tidy DataFrame, one row per (layer, component): ``layer, component`` (``embed``,
        ``attn_3``, ``mlp_3``, ``remainder``), ``component_layer`` (the block index; -1 for the
        embedding, ``layer`` for the remainder), ``kind`` (``embed``/``attn``/``mlp``/``remainder``),
        ``n_tokens``, ``spim_mean, spim_std, cos_mean, cos_std, dist_mean, dist_std,
        norm_ratio_mean, norm_ratio_std`` (std: sample std over tokens, ddof=1), and per layer
        ``reconstruction_error`` (max abs difference between the sum of components and
        ``resid_post`` over tokens and dimensions) and ``reconstruction_rel_error`` (max over tokens of
        ``||remainder|| / ||e||``).

    Example:
        >>> dec = decomposition_by_layer(model, corpus, layers=[29])                  # doctest: +SKIP
        >>> dec.groupby("kind").spim_mean.sum()                                       # doctest: +SKIP
    """
    acc = DecompositionAccumulator(model.n_layers, layers, token_chunk=token_chunk)
    for batch in iter_capture(
        model,
        texts,
        sites=DECOMPOSITION_SITES,
        layers=acc.capture_layers,
        batch_size=batch_size,
        max_length=max_length,
        progress=progress,
    ):
        acc.update(batch)
    return acc.table()


# ---------------------------------------------------------------------------------- affinity sparsity


def _softmax_stats(scores: Float[Tensor, "token vocab"], k: int) -> tuple[dict[str, Tensor], Tensor]:
    """Entropy (bits), top-k mass and top-1 probability of softmax(scores), row by row (float32 is fine);
    and the top-1 score itself (from the same top-k pass).
    """
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # [T, 1]
    top = scores.topk(k, dim=-1).values  # [T, k]
    p = (scores - lse).exp_()  # the only [T, vocab] buffer
    # H = -sum p log p = lse - sum p * scores (one batched dot per row, no p log p buffer).
    expected = torch.bmm(p.unsqueeze(1), scores.unsqueeze(2)).reshape(-1)
    entropy = (lse.squeeze(1) - expected) / LN2
    top_p = (top - lse).exp()
    return {"entropy_bits": entropy, "topk_mass": top_p.sum(-1), "top1_prob": top_p[:, 0]}, top[:, 0]


def affinity_sparsity_by_layer(
    model: HookedModel,
    texts: str | Sequence[str],
    *,
    frame: str | Lens = "final_norm",
    k: int = 10,
    layers: int | Sequence[int] | None = None,
    basis: SemanticBasis | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    token_chunk: int = 256,
    progress: bool = False,
) -> pd.DataFrame:
    """Per layer, how concentrated the vocabulary readout of the residual is.

    For each token and layer, the residual ``h_l`` (``resid_post``) is mapped into ``frame`` and read
    out two ways over the whole vocabulary: vocabulary affinity (cosines to every semantic basis vector;
    softmax without temperature, as in Gu et al.) and the logit lens (the model's logits of ``lens(h)``, in the same
    frame; the usual logit lens in the default ``final_norm`` frame). Reported per (layer, readout):
    the entropy in bits of the softmax (at most ``log2(d_vocab)``; since cosines lie in [-1, 1], the
    affinity softmax is always close to uniform and its entropy close to that maximum, which is the
    paper's setting, not a bug), the probability mass of the top ``k`` tokens, the top-1 probability
    and (affinity only) the top-1 cosine, each as mean and sample std over tokens. Tokens are processed
    in chunks of ``token_chunk`` (memory ``token_chunk x d_vocab``); a [layers, tokens, vocab] tensor
    is never built.

    Returns:
        A tidy DataFrame: ``layer, readout`` (``affinity``/``lens``), ``frame, k, n_tokens,
        max_entropy_bits, entropy_bits_mean, entropy_bits_std, topk_mass_mean, topk_mass_std,
        top1_prob_mean, top1_prob_std, top1_cosine_mean, top1_cosine_std`` (NaN for the lens).

    Example:
        >>> df = affinity_sparsity_by_layer(model, corpus, k=10)             # doctest: +SKIP
        >>> df.pivot(index="layer", columns="readout", values="entropy_bits_mean")  # doctest: +SKIP
    """
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= model.d_vocab:
        raise InputError(f"k must be an integer between 1 and {model.d_vocab}, got {k!r}.")
    check_positive_int(token_chunk, "token_chunk")
    layer_list = check_layers(layers, model.n_layers)
    frame_name = frame.frame if isinstance(frame, Lens) else frame
    if basis is not None and not isinstance(basis, SemanticBasis):
        raise InputError(f"basis must be a SemanticBasis, got {type(basis).__name__}.")
    basis, lens = basis_and_lens(model, frame, basis)
    keys = ("entropy_bits", "topk_mass", "top1_prob", "top1_cosine")
    running = {key: RunningScalars((len(layer_list), 2)) for key in keys}  # readout 0 affinity, 1 lens
    for batch in iter_capture(
        model, texts, layers=layer_list, batch_size=batch_size, max_length=max_length, progress=progress
    ):
        resid = batch.acts["resid_post"]
        with torch.no_grad():
            for start in range(0, batch.n_tokens, token_chunk):
                for t, layer in enumerate(layer_list):
                    h = lens(resid[t, start : start + token_chunk], layer)
                    affinity = vocab_affinity(h, basis)
                    out, top1_cosine = _softmax_stats(affinity, k)
                    out["top1_cosine"] = top1_cosine  # the top-k pass already found the maximum
                    del affinity
                    for key, value in out.items():
                        running[key].update(value, (t, 0))
                    lens_out, _ = _softmax_stats(model.unembed(h), k)
                    for key, value in lens_out.items():
                        running[key].update(value, (t, 1))
    rows = []
    for t, layer in enumerate(layer_list):
        for r, readout in enumerate(("affinity", "lens")):
            row = {
                "layer": layer,
                "readout": readout,
                "frame": frame_name,
                "k": k,
                "n_tokens": int(running["entropy_bits"].count[t, r]),
                "max_entropy_bits": math.log2(model.d_vocab),
            }
            for key in keys:
                nan = readout == "lens" and key == "top1_cosine"
                row[f"{key}_mean"] = float("nan") if nan else float(running[key].mean[t, r])
                row[f"{key}_std"] = float("nan") if nan else float(running[key].std()[t, r])
            rows.append(row)
    return pd.DataFrame(rows)
