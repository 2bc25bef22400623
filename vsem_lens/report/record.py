"""The built report as a record: its tables, figures, summary and sections, and how it is saved.

This module owns :class:`Report` (and :class:`Section`), the description of each table written to disk,
and the atomic save of a report folder: everything is written into a temporary sibling, then swapped
into place (:func:`~vsem_lens.core.io.rename_exchange` on Linux), and an existing folder is replaced only
if it holds a vsem-lens report.

Example:
    >>> report = build_report(model, texts)   # doctest: +SKIP
    >>> report.save("vsem-report")            # doctest: +SKIP
    PosixPath('/.../vsem-report')
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
from torch import Tensor

from ..core.errors import InputError, VsemLensError
from ..core.io import check_writable, remove_stale_temp_dirs, replace_dir, temp_dir_name
from .figures import plot_timings
from .html import render_page
from .timing import peak_rss_mib, timings_table

#: Written into ``summary.json``; marks a folder as a vsem-lens report (so it may be replaced).
GENERATOR = "vsem-lens report"
REPORT_FORMAT = 1


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
    #: Called once the report is safely on disk (``build_report`` deletes its checkpoint there, so a
    #: failed save leaves the streaming state for a resumed run).
    on_saved: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def to_html(self) -> str:
        """The whole report as one self-contained HTML page (plotly.js inlined, no external URL).

        Example:
            >>> html = report.to_html()                   # doctest: +SKIP
            >>> "cdn" in html.lower()                     # doctest: +SKIP
            False
        """
        return render_page(self, standalone=True)

    def _repr_html_(self) -> str:
        """Inline rendering in Jupyter: every figure, no CDN (plotly.js travels once per kernel, see ``notebook_scripts``)."""
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
        self.tables["timings"] = timings_table(self.summary["timings_s"])
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
            InputError: ``out_dir`` exists but is a file or a directory that is not a report, or it
                cannot be written (see :func:`check_report_destination`).
            ReportWriteError: writing failed midway (disk full, ...); an earlier report is untouched
                and a checkpointed run keeps its checkpoint, so the same command resumes.

        Example:
            >>> report.save("vsem-report")    # doctest: +SKIP
        """
        out = check_report_destination(out_dir)
        try:
            self._save(out)
        except OSError as exc:
            kept = " The run's checkpoint is kept: fix the cause and rerun the same command to resume." if self.on_saved else ""
            raise ReportWriteError(f"could not write the report to {out}: {exc}.{kept}") from exc
        if self.on_saved is not None:
            self.on_saved()
            self.on_saved = None
        return out

    def _save(self, out: Path) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_dirs(out.parent, out.name)  # left by killed runs
        tmp = out.parent / temp_dir_name(out.name)
        tmp.mkdir()
        try:
            self._write_into(tmp)
            replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

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


def _is_report_dir(path: Path) -> bool:
    try:
        summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and summary.get("generator") == GENERATOR


class ReportWriteError(VsemLensError):
    """The report could not be written (disk full, permissions changed midway, ...).

    An earlier report in the folder is untouched, and a checkpointed run keeps its checkpoint.

    Example:
        >>> try:
        ...     report.save("/full-disk/report")          # doctest: +SKIP
        ... except ReportWriteError as exc:               # doctest: +SKIP
        ...     print(exc)                                # doctest: +SKIP
    """


def check_report_destination(out_dir: str | os.PathLike) -> Path:
    """The absolute report folder for ``out_dir``, checked before any work is done.

    ``vsem-lens report`` calls this before loading the model, so a bad ``--out`` fails in a second,
    not after the whole streaming pass.

    Raises:
        InputError: ``out_dir`` is a file, a non-empty folder that is not a vsem-lens report, or not
            writable (the folder, or its nearest existing parent, denies writing).

    Example:
        >>> check_report_destination("vsem-report")            # doctest: +SKIP
        PosixPath('/home/me/vsem-report')
    """
    out = Path(out_dir).expanduser().absolute()
    _check_replaceable(out)
    return check_writable(out, kind="dir")


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


def _csv_ready(df: pd.DataFrame) -> pd.DataFrame:
    """Lists/arrays in cells become JSON strings, so a CSV round-trips them unambiguously."""
    out = df.copy()
    for column in out.columns:
        if out[column].dtype == object and len(out) and any(isinstance(v, (list, tuple, np.ndarray)) for v in out[column]):
            out[column] = [json.dumps(_jsonable(v), ensure_ascii=False) for v in out[column]]
    return out


def _jsonable(value: Any) -> Any:
    """``value`` with NumPy/torch values as plain Python ones and non-finite floats as ``None`` (for JSON)."""
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
