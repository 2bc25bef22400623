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
most :data:`~vsem_lens.readout.aggregator.QUANTILE_CAPACITY` tokens x layers of readout values for the quantiles.

Scale (docs/scale.md): every corpus-wide statistic is mergeable streaming state (isotropy moments,
readout running means/variances and kept quantile values, decomposition running means/variances),
so ``distributed=True`` under ``torchrun`` shards the length-sorted batches over ranks (batch ``b``
to rank ``b % world_size``) and combines the states with collective operations
(:mod:`vsem_lens.core.distributed`), and ``checkpoint_dir`` makes a run resumable: the state is written
atomically every ``checkpoint_every`` batches and a run started again with the same arguments
continues from it, ending with the numbers of an uninterrupted run (tested).

The readouts use the package's one readout engine (:class:`~vsem_lens.readout.kernel.ReadoutKernel`,
folded into corpus statistics by :class:`~vsem_lens.readout.aggregator.LensAggregator`): per chunk of
sampled tokens, all layers' residuals go through one ``[tokens x layers, d] @ [d, vocab]`` product into
a preallocated buffer, then cache-sized post-processing (rank count, cross-entropy with the final
distribution).

This module owns the sequence of steps; each step lives in its own module: the corpus plan
(:mod:`~vsem_lens.report.plan`), the streaming pass (:mod:`~vsem_lens.report.stream`), checkpoints
(:mod:`~vsem_lens.report.checkpoint`), the example texts (:mod:`~vsem_lens.report.examples`), the page
text (:mod:`~vsem_lens.report.text`) and the record and its save (:mod:`~vsem_lens.report.record`).

Example:
    >>> model = vl.load_model()                                    # doctest: +SKIP
    >>> report = vl.build_report(model, vl.load_corpus("default"))  # doctest: +SKIP
    >>> report.tables["prediction_formation"].head()               # doctest: +SKIP
    >>> report.save("vsem-report")                                  # doctest: +SKIP
"""


from __future__ import annotations

import os
import sys
import time
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

import pandas as pd
from tqdm.auto import tqdm

from ..core.capture import check_layers
from ..core.distributed import all_gather_objects, resolve_env, shard
from ..core.errors import InputError, check_positive_int
from ..core.models import HookedModel, check_texts
from ..geometry import basis_coherence
from ..lenses.base import Lens
from ..lenses.frames import check_frame, lens_identity
from ..lenses.tuned import find_cached_tuned_lens
from ..readout import SemanticBasis
from ..readout.aggregator import QUANTILE_CAPACITY
from . import plots
from .checkpoint import Checkpoint, checkpoint_key
from .examples import EXAMPLE_MAX_TOKENS, example_table
from .figures import (
    READOUT_STYLE,
    plot_affinity_map,
    plot_isotropy_overview,
    plot_prediction_formation,
    plot_timings,
    side_by_side,
    style,
)
from .plan import CorpusPlan, plan_corpus
from .record import GENERATOR, REPORT_FORMAT, Report
from .stream import CHECKPOINT_STAGE, PASS_STAGES, CorpusStats, run_pass
from .text import BOS_DESCRIPTION, figure_description, highlights, model_facts, sections, versions
from .timing import StageTimer, peak_rss_mib, timings_table

__all__ = ["Report", "build_report", "checkpoint_key"]

#: Default number of sampled tokens whose every layer is read out over the whole vocabulary. Measured on
#: the embedded model (2 CPU cores): ~24 ms per token for 30 layers x 2 readouts, so 512 tokens cost
#: ~12 s, about 0.65x a plain forward pass over the default 8192-token budget. Statistical precision at
#: 512: standard error of a top-1 agreement rate <= 2.2 points, of a mean KL ~ 0.45 bits at mid layers
#: (std ~ 10 bits). Pass ``lens_tokens=2048`` (or ``"all"``) for tighter estimates.
DEFAULT_LENS_TOKENS = 512
#: Default token budget of the corpus (whole texts in corpus order until the budget is reached).
DEFAULT_MAX_TOKENS = 8192
#: Number of example texts taken from the corpus when none are given.
DEFAULT_N_EXAMPLES = 3
#: Tokens sampled for the pairwise-cosine histogram of the semantic bases.
COHERENCE_SAMPLE = 2048



# Long mostly by its docstring (every argument of the public entry point); the body is a sequence of named steps.
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
            and gives the numbers of an uninterrupted run. Removed once the report is saved
            (:meth:`Report.save`), so a failed write can still be resumed.
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
    started = time.perf_counter()
    timer = StageTimer()
    texts, layer_list, example_texts = _check_arguments(
        model, texts, frame, layers, max_tokens, lens_tokens, examples, batch_size, checkpoint_dir, checkpoint_every
    )
    env = resolve_env(distributed, device=model.device, command="report")
    log = _logger(progress and env.is_main)
    with timer.stage("basis"):
        basis = SemanticBasis.from_model(model, frame=frame)  # resolves (and checks) the frame's lens
        readouts, tuned = _readouts(model, basis, frame)
    with timer.stage("tokenize"):
        plan = plan_corpus(model, texts, max_tokens=max_tokens, lens_tokens=lens_tokens, batch_size=batch_size, seed=seed)
    _check_plan(plan, len(layer_list), env, log)

    # -- one streaming pass: isotropy and decomposition on every token, readouts on the sample ---
    stats = CorpusStats.for_run(model, basis, layer_list, readouts, n_texts=len(plan.rows))
    my_batches = shard(range(len(plan.batches)), env)
    checkpoint, start_at = None, 0
    if checkpoint_dir is not None:
        key_params = {
            "frame": frame, "layers": layer_list, "max_tokens": max_tokens, "lens_tokens": lens_tokens,
            "batch_size": batch_size, "seed": seed, "readouts": list(readouts),
            "tuned_lens": lens_identity(tuned), "world_size": env.world_size,
        }
        checkpoint = Checkpoint(checkpoint_dir, checkpoint_key(model, texts, key_params), env)
        start_at = _resume(checkpoint, stats, len(my_batches), log)
    pass_seconds = run_pass(
        model, plan, stats, my_batches, timer=timer, start_at=start_at, checkpoint=checkpoint,
        every=checkpoint_every or 50, progress=progress and env.is_main, on_batch=on_batch,
    )
    timer.add("pass overhead", max(0.0, pass_seconds - timer.total((*PASS_STAGES, CHECKPOINT_STAGE))))
    with timer.stage(PASS_STAGES[2]):  # the readouts of the last, partial chunk
        stats.lens.flush()
        stats.lens.release()

    # -- combine the ranks' states (no-ops in a single process) -----------------------------------
    rank_info = {"rank": env.rank, "batches": len(my_batches), "resumed_after_batches": start_at,
                 "pass_seconds": round(pass_seconds, 3), "peak_rss_mib": peak_rss_mib()}
    ranks = [rank_info]
    if env.active:
        with timer.stage("reduce over ranks"):
            stats.all_reduce(env)
            ranks = all_gather_objects(rank_info, env)
    if not env.is_main:
        if checkpoint is not None:
            checkpoint.remove(env)  # rank 0 keeps its end-of-pass state until the report is built
        return None

    report = _assemble(
        model, plan, stats, basis, timer, log, frame=frame, seed=seed, example_texts=example_texts,
        parameters={"frame": frame, "layers": layer_list if layers is not None else "all",
                    "max_tokens": max_tokens, "lens_tokens": lens_tokens, "batch_size": batch_size, "seed": seed,
                    "corpus": corpus_name,
                    "examples": "given" if examples is not None else f"first {len(example_texts)} corpus texts"},
        ranks={"world_size": env.world_size, "backend": env.backend,
               "sharding": "batch b of the length-sorted plan -> rank b % world_size", "per_rank": ranks},
        started=started,
    )
    if checkpoint is not None:  # deleted only once the report is safely written (Report.save)
        report.on_saved = lambda: checkpoint.remove(env)
    return report


# ---------------------------------------------------------------------------------- steps


def _check_arguments(
    model: HookedModel, texts: Any, frame: str, layers: Any, max_tokens: Any, lens_tokens: Any, examples: Any,
    batch_size: Any, checkpoint_dir: Any, checkpoint_every: Any,
) -> tuple[list[str], list[int], list[str]]:
    """Validate everything before the long pass; returns the texts, the layers and the example texts."""
    texts = check_texts(texts)
    check_frame(frame)
    layer_list = check_layers(layers, model.n_layers)
    if max_tokens is not None:
        check_positive_int(max_tokens, "max_tokens")
    if lens_tokens != "all":
        check_positive_int(lens_tokens, "lens_tokens")
    check_positive_int(batch_size, "batch_size")
    if checkpoint_every is not None:
        check_positive_int(checkpoint_every, "checkpoint_every")
        if checkpoint_dir is None:
            raise InputError("checkpoint_every needs checkpoint_dir (where to write the checkpoints).")
    example_texts = check_texts(examples) if examples is not None else texts[:DEFAULT_N_EXAMPLES]
    return texts, layer_list, example_texts


def _readouts(model: HookedModel, basis: SemanticBasis, frame: str) -> tuple[dict[str, tuple[str, Lens]], Lens | None]:
    """The report's readouts (logit lens and affinity in ``frame``, plus a cached tuned lens if any)."""
    readouts: dict[str, tuple[str, Lens]] = {"lens": ("lens", basis.lens), "affinity": ("affinity", basis.lens)}
    tuned = _cached_tuned_lens(model) if frame != "tuned" else None
    if tuned is not None:
        readouts["tuned_lens"] = ("lens", tuned)
    return readouts, tuned


def _resume(checkpoint: Checkpoint, stats: CorpusStats, n_batches: int, log: Callable[[str], None]) -> int:
    """Load a saved state into ``stats``; the number of this rank's batches already done (0: start afresh)."""
    start_at = checkpoint.restore(stats.named())
    if start_at:
        log(f"resuming from checkpoint {checkpoint.path} after {start_at} of {n_batches} batches")
    return start_at


def _cached_tuned_lens(model: HookedModel) -> Lens | None:
    try:
        return find_cached_tuned_lens(model)
    except Exception:  # an optional extra must never break the report
        return None


def _check_plan(plan: CorpusPlan, n_layers: int, env: Any, log: Callable[[str], None]) -> None:
    """Refuse a corpus too small for a report; log what will be read."""
    if plan.n_tokens < 2:
        raise InputError(f"the corpus has {plan.n_tokens} token(s) within the budget; the report needs at least 2.")
    log(
        f"{len(plan.texts)} of {plan.n_available} texts, {plan.n_tokens} tokens; full-vocabulary readouts on "
        f"{int(plan.lens_mask.sum())} sampled tokens x {n_layers} layers"
        + (f"; {env.world_size} ranks" if env.active else "")
    )


def _logger(progress: bool) -> Callable[[str], None]:
    def log(message: str) -> None:
        if progress:
            tqdm.write(f"vsem-lens: {message}", file=sys.stderr)

    return log


def _assemble(
    model: HookedModel, plan: CorpusPlan, stats: CorpusStats, basis: SemanticBasis, timer: StageTimer,
    log: Callable[[str], None], *, frame: str, seed: int, example_texts: list[str], parameters: dict[str, Any],
    ranks: dict[str, Any], started: float,
) -> Report:
    """Tables, figures, summary and sections of the reduced statistics (rank 0 only)."""
    log(f"affinity map of {len(example_texts)} example text(s)")
    with timer.stage("examples"):
        examples_df, example_meta = example_table(model, stats.lens, frame, example_texts)
    log("basis coherence and leverage")
    with timer.stage("basis coherence"):
        coherence = basis_coherence(basis, sample=min(COHERENCE_SAMPLE, basis.d_vocab), seed=seed)
    with timer.stage("tables"):
        tables = {
            "examples": examples_df,
            "prediction_formation": stats.lens.result(frame=frame),
            "isotropy": stats.isotropy.result(),
            "decomposition": stats.decomposition.result(),
            "coherence_summary": coherence.summary,
            "coherence_histogram": coherence.histogram,
            "leverage_extremes": coherence.leverage_extremes,
            "corpus": pd.DataFrame({
                "text": range(len(plan.rows)),
                "n_tokens": [len(r) for r in plan.rows],
                "lens_tokens": stats.lens_per_text.result(),
                "preview": [t[:80] for t in plan.texts],
            }),
        }
    with timer.stage("figures"):
        figures = _figures(tables, example_meta, coherence, frame=frame, d_vocab=model.d_vocab)
    timer.add("total (build_report)", time.perf_counter() - started)
    timings = timer.rounded()
    tables["timings"] = timings_table(timings)
    rss = peak_rss_mib()
    figures["timings"] = plot_timings(tables["timings"], peak_rss=rss)
    summary = _summary(model, plan, stats, tables, parameters, example_meta, coherence_sample=coherence.meta)
    summary.update({
        "timings_s": timings,
        "peak_rss_mib": rss,
        "ranks": ranks,
        "highlights": highlights(tables["prediction_formation"], tables["isotropy"], tables["decomposition"],
                                 coherence.summary),
        "figures": {key: figure_description(key) for key in figures},
    })
    report = Report(tables=tables, figures=figures, summary=summary)
    report.sections = sections(report, example_meta)
    return report


def _figures(
    tables: dict[str, pd.DataFrame], example_meta: list[dict[str, Any]], coherence: Any, *, frame: str, d_vocab: int
) -> dict[str, Any]:
    """Every figure of the page but the timings (drawn last, once the run's timings are known)."""
    examples_df, iso_df, decomposition = tables["examples"], tables["isotropy"], tables["decomposition"]
    figures: dict[str, Any] = {}
    for i, meta in enumerate(example_meta):
        sub = examples_df[examples_df["example"] == i]
        figures[f"affinity_map_{i + 1}"] = plot_affinity_map(sub, meta, frame=frame)
    figures["prediction_formation"] = plot_prediction_formation(tables["prediction_formation"], d_vocab=d_vocab)
    figures["isotropy"] = plot_isotropy_overview(iso_df)
    figures["outlier_dimensions"] = style(plots.plot_outlier_dimensions(iso_df), height=420)
    figures["coherence_histogram"] = style(plots.plot_coherence_histogram(coherence), height=420)
    figures["leverage"] = style(plots.plot_leverage(coherence), height=420)
    figures["components"] = side_by_side(
        plots.plot_components_by_layer(decomposition, "spim_mean"),
        plots.plot_components_by_layer(decomposition, "cos_mean"),
        title="Residual decomposition by layer: share (spim) and cosine of each kind of component",
        subtitles=("spim: share of the residual (sum over the kind's components)",
                   "cosine with the residual (mean over the kind's components)"),
        y_titles=("spim", "cosine"),
    )
    return figures


def _summary(
    model: HookedModel, plan: CorpusPlan, stats: CorpusStats, tables: dict[str, pd.DataFrame],
    parameters: dict[str, Any], example_meta: list[dict[str, Any]], *, coherence_sample: dict[str, Any],
) -> dict[str, Any]:
    """The run facts of ``summary.json`` (timings, ranks, highlights and figures are added by the caller)."""
    iso_df = tables["isotropy"]
    agg = stats.lens
    return {
        "generator": GENERATOR,
        "report_format": REPORT_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model_facts(model, len(model.tokenizer)),
        "frame": parameters["frame"],
        "seed": parameters["seed"],
        "parameters": {
            **parameters,
            "example_max_tokens": EXAMPLE_MAX_TOKENS,
            "coherence_sample": int(coherence_sample.get("sample", 0)),
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
            "tokens_dropped_to_context": plan.n_dropped,
            "first_text_cut_to_budget": plan.cut_first,
            "corpus_tokens": plan.n_tokens,
            "lens_tokens": int(plan.lens_mask.sum()),
            "quantile_tokens": int(agg.n_kept),
            "example_tokens": int(sum(m["n_tokens"] for m in example_meta)),
            "mean_final_entropy_bits": float(agg.final_entropy.mean[0, 0]),
        },
    }
