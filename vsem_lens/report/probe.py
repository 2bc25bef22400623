"""Probe a prompt in a notebook: one call from text to a layer x position picture of each readout.

``probe(model, "The capital of France is")`` reads every layer's residual at every position through
the logit lens and through vocabulary affinity (in any frame, a tuned lens or your own
:class:`~vsem_lens.lenses.base.Lens` included) and returns a :class:`Probe`: it draws itself in Jupyter
(side-by-side heatmaps of each readout's top-1 token, coloured by how the readout scores the model's
final prediction, hover for the top-k; offline, plotly.js included once per notebook), and gives the tidy
table (:meth:`Probe.to_frame`: :func:`~vsem_lens.readout.affinity.layerwise_affinity`'s table) and plotly
figures (:meth:`Probe.figure`: the report's affinity map, :func:`~vsem_lens.report.figures.plot_affinity_map`,
for any text).

Example:
    >>> p = probe(model, "The capital of France is")                      # doctest: +SKIP
    >>> p                                                                   # doctest: +SKIP
    >>> p.to_frame().query("layer == 29")[["token", "lens_top1", "affinity_top1"]]   # doctest: +SKIP
"""

from __future__ import annotations

import html
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any, Sequence

import pandas as pd
import plotly.graph_objects as go

from ..core.errors import InputError, check_positive_int
from ..core.models import HookedModel, check_texts
from ..lenses.base import Lens
from ..lenses.frames import frame_name, resolve_frame
from ..readout import SemanticBasis, layerwise_affinity
from .examples import EXAMPLE_TOP_K as MAP_TOP_K
from .figures import MAP_READOUTS, plot_affinity_map
from .html import CSS, notebook_scripts

#: Prompts are cut to this many tokens by default (one heatmap column per token).
PROBE_MAX_TOKENS = 64
#: The basis of each probed model, kept while the model lives: a notebook probes the same model again
#: and again, and loading and checking the basis from disk (plus its unit vectors) costs about a second.
_BASES: "weakref.WeakKeyDictionary[HookedModel, SemanticBasis]" = weakref.WeakKeyDictionary()


def _basis(model: HookedModel) -> SemanticBasis:
    basis = _BASES.get(model)
    if basis is None or basis.fingerprint != model.fingerprint:
        basis = _BASES[model] = SemanticBasis.from_model(model)
    return basis


@dataclass
class Probe:
    """The readouts of one or more prompts at every layer and position (see :func:`probe`).

    Attributes:
        table: :func:`~vsem_lens.readout.affinity.layerwise_affinity`'s table, one row per (example,
            layer, position), with ``text`` named ``example`` and ``affinity_final_score`` named
            ``affinity_final_cos`` as in the report's examples table.
        metas: per prompt ``{"index", "text", "n_tokens", "n_tokens_full"}``.
        frame: the frame's name.
        readouts: the readouts drawn, left to right.

    Example:
        >>> p = probe(model, ["Paris is", "Rome is"])    # doctest: +SKIP
        >>> p.figure(1, readout="lens").show()            # doctest: +SKIP
    """

    table: pd.DataFrame = field(repr=False)
    metas: list[dict[str, Any]]
    frame: str
    readouts: tuple[str, ...]

    def to_frame(self) -> pd.DataFrame:
        """The tidy table (a copy)."""
        return self.table.copy()

    def figure(self, index: int = 0, readout: str = "affinity") -> go.Figure:
        """The heatmap of prompt ``index`` for ``readout`` (``"affinity"`` or ``"lens"``)."""
        if not 0 <= int(index) < len(self.metas):
            raise InputError(f"index {index} is out of range: this probe holds {len(self.metas)} prompt(s).")
        if readout not in MAP_READOUTS:
            raise InputError(f"readout must be one of {', '.join(MAP_READOUTS)}, got {readout!r}.")
        rows = self.table[self.table["example"] == int(index)]
        return plot_affinity_map(rows, self.metas[int(index)], frame=self.frame, readout=readout)

    def __repr__(self) -> str:
        texts = ", ".join(repr(m["text"][:40]) for m in self.metas[:3]) + (", ..." if len(self.metas) > 3 else "")
        return f"Probe({len(self.metas)} prompt(s): {texts}; frame {self.frame!r}; readouts {', '.join(self.readouts)})"

    def _repr_html_(self) -> str:
        prefix = f"vsem-probe-{uuid.uuid4().hex[:8]}"
        figures, blocks = {}, []
        for meta in self.metas:
            cells = []
            for readout in self.readouts:
                div_id = f"{prefix}-{meta['index']}-{readout}"
                figures[div_id] = self.figure(meta["index"], readout)
                cells.append(f'<div class="figure" id="{div_id}" data-figure="{readout}"></div>')
            caption = html.escape(meta["text"] if len(meta["text"]) <= 200 else meta["text"][:199] + "…")
            blocks.append(f'<p class="caption"><b>Prompt {meta["index"] + 1}:</b> {caption}</p>'
                          f'<div class="cards">{"".join(cells)}</div>')
        return (f'<div class="vsem-report" id="{prefix}"><style>{CSS}</style>{"".join(blocks)}'
                f"{notebook_scripts(figures)}</div>")


def probe(
    model: HookedModel,
    texts: str | Sequence[str],
    *,
    frame: str | Lens = "final_norm",
    lens: Lens | None = None,
    readouts: Sequence[str] = ("lens", "affinity"),
    layers: int | Sequence[int] | None = None,
    max_tokens: int = PROBE_MAX_TOKENS,
) -> Probe:
    """Read one prompt (or a few) through the logit lens and vocabulary affinity at every layer and position.

    Args:
        model: the hooked model.
        texts: a prompt or a list of prompts (tokenised by the model's rule, cut to ``max_tokens``).
        frame: ``final_norm`` (default; the logit-lens convention), ``raw``, ``tuned`` or a
            :class:`~vsem_lens.lenses.base.Lens` applied to each layer's residual before both readouts.
        lens: the tuned lens for ``frame="tuned"`` (default: the one cached for the model).
        readouts: which heatmaps to draw, left to right (``lens``, ``affinity``); the table has both.
        layers: layer indices (``None`` = all).
        max_tokens: tokens per prompt (one heatmap column each).

    Returns:
        A :class:`Probe` (renders itself in Jupyter).

    Example:
        >>> probe(model, "The Eiffel Tower is in the city of")   # doctest: +SKIP
    """
    texts = check_texts(texts)
    max_tokens = check_positive_int(max_tokens, "max_tokens")
    readouts = tuple(readouts)
    if not readouts or any(r not in MAP_READOUTS for r in readouts):
        raise InputError(f"readouts must be a non-empty selection of {', '.join(MAP_READOUTS)}, got {readouts!r}.")
    resolved = resolve_frame(frame, model, lens=lens)
    table = layerwise_affinity(model, texts, frame=resolved, k=MAP_TOP_K, layers=layers, basis=_basis(model),
                               max_length=max_tokens)
    # The report's map columns: one example per text, the final prediction's cosine named as the report does.
    table = table.rename(columns={"text": "example", "affinity_final_score": "affinity_final_cos"})
    full = model.token_ids(texts, max_length=2**62)  # lengths before the cut, for the titles
    metas = [{"index": i, "text": text, "n_tokens": min(len(ids), max_tokens), "n_tokens_full": len(ids)}
             for i, (text, ids) in enumerate(zip(texts, full))]
    return Probe(table, metas, frame_name(frame), readouts)


__all__ = ["Probe", "probe"]
