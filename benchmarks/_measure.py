"""Shared helpers for the benchmarks: peak-RSS tracking, medians of interleaved repeats, the embedded corpus.

Not a test module. Each benchmark prints ratios measured in one run, so that a noisy shared CPU moves
both sides of a ratio together.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Callable


class PeakRSS:
    """Peak resident set size of this process, sampled by a background thread (psutil)."""

    def __init__(self, interval: float = 0.002) -> None:
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.base = self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self._interval)

    def __enter__(self) -> "PeakRSS":
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def extra_mib(self) -> float:
        """Peak growth over the RSS at entry, in MiB."""
        return (self.peak - self.base) / 2**20


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int = 3, warmup: int = 1) -> dict[str, float]:
    """Median wall time of each function, running them round-robin so load changes hit all of them."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def corpus_texts(n: int | None = None) -> list[str]:
    """Texts of the embedded corpus (vsem_lens/data/corpus.jsonl), or a fallback when it is absent."""
    path = Path(__file__).resolve().parents[1] / "vsem_lens" / "data" / "corpus.jsonl"
    if path.is_file():
        texts = [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
    else:
        texts = [f"Sentence number {i} talks about rivers, mountains, code and people." for i in range(512)]
    return texts if n is None else (texts * (n // len(texts) + 1))[:n]


def run_cli(cli_args: list[str], *, ranks: int = 1) -> float:
    """Run ``vsem-lens <cli_args>`` in a fresh process (``ranks > 1``: ``torchrun ... --distributed``);
    return its wall time in seconds, raise with its stderr when it fails."""
    import subprocess
    import sys

    cli = ["-m", "vsem_lens.cli", *cli_args]
    if ranks > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                   *cli, "--distributed"]
    else:
        command = [sys.executable, *cli]
    start = time.perf_counter()
    proc = subprocess.run(command, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    return wall


def token_batch(tokenizer, n_texts: int, n_tok: int):
    """[n_texts, n_tok] token ids of the corpus text concatenated: every row exactly n_tok real tokens."""
    import torch

    ids = tokenizer(" ".join(corpus_texts(400)))["input_ids"]
    return torch.tensor(ids[: n_texts * n_tok]).reshape(n_texts, n_tok)


def repeat_to_tokens(texts: list[str], lengths: list[int], n_tokens: int) -> list[str]:
    """Whole texts, cycling through ``texts`` (with token counts ``lengths``), until ``n_tokens`` are reached."""
    out, total = [], 0
    while total < n_tokens:
        for text, n in zip(texts, lengths):
            out.append(text)
            total += n
            if total >= n_tokens:
                break
    return out
