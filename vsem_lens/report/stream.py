"""The report's one streaming pass over the corpus: every corpus-wide statistic fed batch by batch.

One capture per batch (``resid_post`` and the block outputs) feeds the isotropy state (every token),
the lens aggregator (the seeded readout sample), the residual decomposition (every token) and the
count of sampled tokens per text. All four are :class:`~vsem_lens.core.stats.Stat`\\ s, held by name in
:class:`CorpusStats`, so checkpoints (:class:`~vsem_lens.report.checkpoint.Checkpoint`) and the
cross-rank reduction treat them alike.

Example:
    >>> stats = CorpusStats.for_run(model, basis, layers, readouts, n_texts=len(plan.rows))   # doctest: +SKIP
    >>> run_pass(model, plan, stats, range(len(plan.batches)), timer=StageTimer())             # doctest: +SKIP
    >>> stats.lens.result(frame="final_norm")                                                  # doctest: +SKIP
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..core.capture import ActivationBatch, iter_capture
from ..core.distributed import all_reduce_sum
from ..core.models import HookedModel
from ..core.stats import Stat
from ..geometry import DECOMPOSITION_SITES, DecompositionAccumulator, IsotropyState
from ..lenses.base import Lens
from ..readout import LensAggregator, SemanticBasis
from .checkpoint import Checkpoint
from .plan import CorpusPlan
from .timing import StageTimer

#: Timed stages of one batch of the pass, in the order of the timings table.
PASS_STAGES = ("capture (forward + hooks)", "isotropy statistics", "readouts (sampled tokens)",
               "decomposition statistics")
CHECKPOINT_STAGE = "checkpoints"


class TextCounts(Stat):
    """Sampled (readout) tokens per text of the plan, as float64 counts (mergeable, checkpointable).

    Example:
        >>> counts = TextCounts(3); counts.update(torch.tensor([0, 2, 2])); counts.result()
        [1, 0, 2]
    """

    def __init__(self, n_texts: int) -> None:
        self.counts = torch.zeros(n_texts, dtype=torch.float64)

    def update(self, docs: Tensor) -> None:
        """Count one token per entry of ``docs`` (text indices)."""
        self.counts += torch.bincount(docs, minlength=len(self.counts)).to(torch.float64)

    def merge(self, other: TextCounts) -> TextCounts:
        """Add ``other``'s counts; returns ``self``."""
        self.counts = self.counts + other.counts
        return self

    def all_reduce(self, env: Any) -> None:
        """Sum the counts of every rank in place."""
        if env.active:
            self.counts = all_reduce_sum(self.counts, env)

    def state_dict(self) -> dict[str, Tensor]:
        """``counts`` (a copy)."""
        return {"counts": self.counts.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`state_dict` output."""
        self.counts = state["counts"].clone()

    def result(self) -> list[int]:
        """The count of every text."""
        return [int(round(v)) for v in self.counts.tolist()]


@dataclass
class CorpusStats:
    """The corpus-wide streaming statistics of a report, by name (the names are the checkpoint keys).

    Example:
        >>> stats = CorpusStats.for_run(model, basis, range(30), readouts, n_texts=12)   # doctest: +SKIP
        >>> sorted(stats.named())                                                        # doctest: +SKIP
        ['decomposition', 'isotropy', 'lens', 'lens_per_text']
    """

    isotropy: IsotropyState
    lens: LensAggregator
    decomposition: DecompositionAccumulator
    lens_per_text: TextCounts

    @classmethod
    def for_run(
        cls, model: HookedModel, basis: SemanticBasis, layers: list[int], readouts: dict[str, tuple[str, Lens]],
        *, n_texts: int,
    ) -> CorpusStats:
        """Empty statistics of ``layers``: isotropy in the raw and final-norm frames, the readouts of ``readouts``.

        Example:
            >>> CorpusStats.for_run(model, basis, [0, 5], readouts, n_texts=4).lens.layers   # doctest: +SKIP
            [0, 5]
        """
        return cls(
            isotropy=IsotropyState.for_model(model, sites=("resid_post",), frames=("raw", "final_norm"), layers=layers),
            lens=LensAggregator(model, basis, layers=layers, readouts=readouts),
            decomposition=DecompositionAccumulator(model.n_layers, layers),
            lens_per_text=TextCounts(n_texts),
        )

    def named(self) -> dict[str, Stat]:
        """Every statistic by name (checkpoints and the cross-rank reduction go through this)."""
        return {"isotropy": self.isotropy, "lens": self.lens, "decomposition": self.decomposition,
                "lens_per_text": self.lens_per_text}

    @property
    def capture_layers(self) -> list[int]:
        """The layers one capture must hold for every statistic."""
        return sorted(set(self.lens.capture_layers) | set(self.decomposition.capture_layers))

    def update(self, batch: ActivationBatch, plan: CorpusPlan, text_ids: list[int], timer: StageTimer) -> None:
        """Feed one captured batch of the plan (texts ``text_ids``) to every statistic, timing each."""
        with timer.stage(PASS_STAGES[1]):
            self.isotropy.update(batch)
        with timer.stage(PASS_STAGES[2]):
            docs = torch.tensor(text_ids, dtype=torch.long)[batch.doc_index]
            global_index = torch.tensor(plan.offsets, dtype=torch.long)[docs] + batch.positions
            select = plan.lens_mask[global_index]
            if bool(select.any()):
                self.lens_per_text.update(docs[select])
                resid = batch.acts["resid_post"][:, select.to(batch.acts["resid_post"].device)]
                self.lens.update(resid, batch.layers, keep=plan.keep_mask[global_index][select])
        with timer.stage(PASS_STAGES[3]):
            self.decomposition.update(batch)

    def all_reduce(self, env: Any) -> None:
        """Combine every statistic over the ranks (flush the lens aggregator first)."""
        for stat in self.named().values():
            stat.all_reduce(env)


def run_pass(
    model: HookedModel,
    plan: CorpusPlan,
    stats: CorpusStats,
    batches: Sequence[int],
    *,
    timer: StageTimer,
    start_at: int = 0,
    checkpoint: Checkpoint | None = None,
    every: int = 50,
    progress: bool = False,
    on_batch: Callable[[int, int], None] | None = None,
) -> float:
    """Feed the plan's batches ``batches[start_at:]`` to ``stats``; checkpoint every ``every`` batches and
    at the end; returns the wall time of the pass (the aggregator's last chunk is read by the caller).

    Example:
        >>> seconds = run_pass(model, plan, stats, range(len(plan.batches)), timer=timer)   # doctest: +SKIP
    """
    timer.declare(*PASS_STAGES, *([CHECKPOINT_STAGE] if checkpoint is not None else []))
    pass_start = time.perf_counter()
    bar = tqdm(
        total=len(batches), initial=start_at, desc="report", unit="batch",
        disable=not progress, file=sys.stderr, leave=False,
    )
    for done, b in enumerate(batches[start_at:], start=start_at + 1):
        text_ids = plan.batches[b]
        tokens = model.pad([plan.rows[i] for i in text_ids])
        with timer.stage(PASS_STAGES[0]):
            (batch,) = iter_capture(
                model, tokens, sites=DECOMPOSITION_SITES, layers=stats.capture_layers, batch_size=len(text_ids)
            )
        stats.update(batch, plan, text_ids, timer)
        del batch
        if checkpoint is not None and done % every == 0 and done < len(batches):
            with timer.stage(CHECKPOINT_STAGE):
                checkpoint.save(done, stats.named())
        bar.update(1)
        if on_batch is not None:
            on_batch(done, len(batches))
    bar.close()
    if checkpoint is not None and start_at < len(batches):
        with timer.stage(CHECKPOINT_STAGE):
            checkpoint.save(len(batches), stats.named())  # the end of the pass: a crash later loses no streaming work
    return time.perf_counter() - pass_start
