"""Task-space matrices: pivot a tidy similarity or transfer table into a square phenomenon x phenomenon
matrix, order it by hierarchical clustering, plot it, and compare it with a hypothesis matrix.

Example:
    >>> m = task_space_matrix(gradient_similarity(grads), "cosine")   # doctest: +SKIP
    >>> plot_task_space(m, title="gradient cosine").show()             # doctest: +SKIP
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import pandas as pd
from scipy.cluster.hierarchy import leaves_list, linkage
from scipy.spatial.distance import pdist, squareform
from scipy.stats import pearsonr, spearmanr

from ..core.errors import InputError


def task_space_matrix(
    table: pd.DataFrame, value: str = "cosine", *, scope: str | None = "overall", row: str | None = None, col: str | None = None
) -> pd.DataFrame:
    """Pivot a tidy similarity/transfer table into a square phenomenon x phenomenon matrix.

    Works on :func:`gradient_similarity` output (``scope`` selects overall or a block) and on
    :attr:`TransferResult.transfer` (rows: trained on, columns: evaluated on; pass ``scope=None``).

    Example:
        >>> task_space_matrix(sim, "cosine").shape  # doctest: +SKIP
        (9, 9)
    """
    if scope is not None and "scope" in table:
        if scope not in set(table["scope"]):
            raise InputError(f"scope {scope!r} is not in the table; it has {sorted(set(table['scope']))}.")
        table = table[table["scope"] == scope]
    row = row or ("phenomenon_a" if "phenomenon_a" in table else "trained_on")
    col = col or ("phenomenon_b" if "phenomenon_b" in table else "evaluated_on")
    if value not in table:
        raise InputError(f"column {value!r} is not in the table; choose one of {list(table.columns)}.")
    order = list(dict.fromkeys(table[row]))
    cols = list(dict.fromkeys(table[col]))
    return table.pivot(index=row, columns=col, values=value).loc[order, cols]


def _as_square(matrix: pd.DataFrame | Mapping[str, Mapping[str, float]], what: str) -> pd.DataFrame:
    if isinstance(matrix, Mapping):
        matrix = pd.DataFrame(matrix).T
    if not isinstance(matrix, pd.DataFrame):
        raise InputError(f"{what} must be a pandas DataFrame (or a dict of dicts) with phenomena as index and columns.")
    if list(matrix.index) != list(matrix.columns):
        if set(matrix.index) != set(matrix.columns):
            raise InputError(f"{what} must have the same phenomena as rows and columns.")
        matrix = matrix.loc[:, list(matrix.index)]
    values = matrix.to_numpy(dtype=float)
    if not np.isfinite(values).all():
        raise InputError(f"{what} has NaN/inf entries; fill them before comparing or clustering.")
    return matrix.astype(float)


def cluster_order(matrix: pd.DataFrame, *, method: str = "average") -> list[str]:
    """Leaf order of a hierarchical clustering of the phenomena (scipy).

    A symmetric matrix with unit diagonal is treated as a similarity (distance ``1 - s``); any other
    matrix (e.g. a transfer matrix) is clustered by the Euclidean distance between the phenomena's
    profiles (their row and column concatenated).

    Example:
        >>> cluster_order(pd.DataFrame([[1, .9, 0], [.9, 1, 0], [0, 0, 1]], index=list("abc"), columns=list("abc")))
        ['c', 'a', 'b']
    """
    m = _as_square(matrix, "the matrix")
    labels = list(m.index)
    if len(labels) < 3:
        return labels
    values = m.to_numpy()
    if np.allclose(values, values.T) and np.allclose(np.diag(values), 1.0):
        dist = np.clip(1.0 - values, 0.0, None)
        np.fill_diagonal(dist, 0.0)
        condensed = squareform((dist + dist.T) / 2, checks=False)
    else:
        condensed = pdist(np.concatenate([values, values.T], axis=1))
    order = leaves_list(linkage(condensed, method=method))
    return [labels[i] for i in order]


def plot_task_space(
    matrix: pd.DataFrame,
    *,
    title: str = "task space",
    cluster: bool = True,
    zmid: float | None = None,
    colorscale: str = "RdBu",
    value_label: str = "value",
):
    """Plotly heatmap of a task-space matrix, rows/columns in clustered order (plotly is imported on
    first use: it is slow to import and only plots need it).

    Example:
        >>> fig = plot_task_space(task_space_matrix(sim, "cosine"), title="gradient cosine")  # doctest: +SKIP
        >>> fig.write_html("task_space.html", include_plotlyjs="cdn")                         # doctest: +SKIP
    """
    import plotly.graph_objects as go  # slow to import and only needed for plots

    m = _as_square(matrix, "the matrix")
    order = cluster_order(m) if cluster else list(m.index)
    m = m.loc[order, order]
    values = m.to_numpy()
    if zmid is None:
        zmid = 0.0 if values.min() < 0 else None
    fig = go.Figure(
        go.Heatmap(
            z=values, x=order, y=order, colorscale=colorscale, zmid=zmid, reversescale=True,
            colorbar={"title": value_label},
            text=np.round(values, 3), texttemplate="%{text}",
            hovertemplate="row %{y}<br>column %{x}<br>" + value_label + " %{z:.4f}<extra></extra>",
        )
    )
    fig.update_layout(title=title, yaxis={"autorange": "reversed"}, width=760, height=680,
                      xaxis={"tickangle": -40}, margin={"l": 200, "b": 180})
    return fig


def compare_with_hypothesis(
    matrix: pd.DataFrame,
    hypothesis: pd.DataFrame | Mapping[str, Mapping[str, float]],
    *,
    n_permutations: int = 999,
    seed: int = 0,
) -> dict[str, float]:
    """Compare a task space with a hypothesis matrix over the shared phenomena.

    Both matrices are symmetrised (``(M + M^T) / 2``; a no-op for similarities) and their strictly
    upper triangles compared: Spearman and Pearson correlation, and a Mantel permutation p-value for
    Spearman (rows and columns of the hypothesis permuted together, ``n_permutations`` times; one-sided,
    larger = more similar). At least 3 shared phenomena are needed.

    Example:
        >>> hyp = pd.DataFrame(1.0, index=names, columns=names)             # doctest: +SKIP
        >>> compare_with_hypothesis(task_space_matrix(sim), hyp)             # doctest: +SKIP
        {'n_phenomena': 9, 'n_cells': 36, 'spearman': 0.41, 'pearson': 0.38, 'mantel_p': 0.03}
    """
    m = _as_square(matrix, "the task-space matrix")
    h = _as_square(hypothesis, "the hypothesis matrix")
    shared = [name for name in m.index if name in set(h.index)]
    if len(shared) < 3:
        raise InputError(
            f"the hypothesis shares {len(shared)} phenomena with the matrix ({shared}); at least 3 are needed. "
            f"Matrix phenomena: {list(m.index)}."
        )
    a = m.loc[shared, shared].to_numpy()
    b = h.loc[shared, shared].to_numpy()
    a, b = (a + a.T) / 2, (b + b.T) / 2
    iu = np.triu_indices(len(shared), k=1)
    x, y = a[iu], b[iu]
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        raise InputError("one of the matrices is constant off the diagonal; a correlation is undefined.")
    rho = float(spearmanr(x, y).statistic)
    r = float(pearsonr(x, y).statistic)
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(n_permutations):
        perm = rng.permutation(len(shared))
        bp = b[np.ix_(perm, perm)]
        if float(spearmanr(x, bp[iu]).statistic) >= rho - 1e-12:
            hits += 1
    return {
        "n_phenomena": len(shared),
        "n_cells": int(x.size),
        "spearman": rho,
        "pearson": r,
        "mantel_p": (hits + 1) / (n_permutations + 1) if n_permutations > 0 else math.nan,
    }


__all__ = ["cluster_order", "compare_with_hypothesis", "plot_task_space", "task_space_matrix"]
