r"""Basis coherence: how separated the semantic basis vectors are, against the raw unembedding.

The semantic basis ``S = pinv(W_U)`` [V, d] (Gu et al., arXiv 2401.16184) whitens the unembedding:
``s_i = G^{-1} u_i`` with ``G = U^T U``. :func:`basis_coherence` compares the pairwise cosines of a
random sample of semantic basis vectors with those of the *same* tokens' unembedding columns (rows of
``W_U.T``): mean and maximum absolute cosine (the mutual coherence *of the sample*, a lower bound of the
vocabulary's), quantiles, and a histogram. Also the leverage ``P_ii = s_i . u_i`` of every token (the
diagonal of the rank-d projector ``P = S W_U``; it sums to d), with the tokens at both extremes
(docs/concepts/disentanglement.md).

Example:
    >>> coh = basis_coherence(basis, sample=2048)                  # doctest: +SKIP
    >>> coh.summary[["which", "mean_abs_cos", "max_abs_cos"]]      # doctest: +SKIP
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..core.errors import ArtifactError, InputError, check_positive_int
from ..readout.basis import SemanticBasis
from ..readout.scores import vocabulary_strings

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


# Long only through its docstring: the histogram and leverage tables are built by the helpers below.
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
    if isinstance(sample, bool) or not isinstance(sample, int) or sample < 2:
        raise InputError(f"sample must be an integer >= 2, got {sample!r}.")
    for name, value in (("bins", bins), ("n_extremes", n_extremes), ("chunk", chunk)):
        check_positive_int(value, name)
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
        hist_rows.extend(_histogram_rows(which, stats["hist"], edges, stats["n_pairs"]))
    leverage = basis.leverage().cpu()
    lev_df, ext_df = _leverage_tables(leverage, vocabulary_strings(model), n_extremes)
    return BasisCoherence(
        summary=pd.DataFrame(summary_rows),
        histogram=pd.DataFrame(hist_rows),
        leverage=lev_df,
        leverage_extremes=ext_df,
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


def _histogram_rows(which: str, counts: Tensor, edges: Tensor, n_pairs: int) -> list[dict[str, Any]]:
    """The tidy histogram rows of one ``which`` (see :attr:`BasisCoherence.histogram`)."""
    return [
        {
            "which": which,
            "bin": b,
            "bin_left": float(edges[b]),
            "bin_right": float(edges[b + 1]),
            "bin_center": float(edges[b] + edges[b + 1]) / 2,
            "count": int(counts[b]),
            "fraction": float(counts[b]) / n_pairs,
        }
        for b in range(counts.numel())
    ]


def _leverage_tables(leverage: Tensor, strings: list[str], n_extremes: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The leverage of every token and the ``n_extremes`` tokens at each end (see :class:`BasisCoherence`)."""
    V = leverage.numel()
    lev_df = pd.DataFrame({"token_id": range(V), "token": strings, "leverage": leverage.numpy()})
    order = torch.argsort(leverage, descending=True, stable=True)
    n_ext = min(n_extremes, V)
    ext_rows = []
    for end, picks in (("high", order[:n_ext]), ("low", order.flip(0)[:n_ext])):
        for rank, i in enumerate(picks.tolist()):
            ext_rows.append({"end": end, "rank": rank, "token_id": i, "token": strings[i], "leverage": float(leverage[i])})
    return lev_df, pd.DataFrame(ext_rows)
