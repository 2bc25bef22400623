"""Benchmark: streaming ``vsem_lens.geometry.metrics.isoscore`` vs the PyPI ``isoscore`` package (CPU).

Both sides see the same float32 points [N, 576] (SmolLM2's d_model): an anisotropic cloud with a few
outlier dimensions, one with a mean of 300, generated chunk by chunk from a seed. Ours streams the
chunks (8192 rows each) through a float64 :class:`~vsem_lens.core.moments.Moments` and never holds all the
points; the package needs them all in memory (``IsoScore(points)`` then copies them and
``torch.cov`` centres a further copy, in float32). Each measurement runs in its own subprocess so
peak-RSS figures are clean; peak RSS growth is sampled every 2 ms by a background thread (psutil).

Run:  python benchmarks/bench_isoscore.py            (about 1-2 minutes on 2 cores)
      python benchmarks/bench_isoscore.py --sizes 200000 --dim 576

The package is skipped at a size whose extrapolated peak memory would exceed half of the
available RAM (this machine is shared; extrapolated linearly from its measured peak at the smallest size).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import warnings

CHUNK = 8192


# ---------------------------------------------------------------------------------- worker side


class PeakRSS:
    """Track the peak resident set size of this process with a background sampling thread."""

    def __init__(self, interval: float = 0.002) -> None:
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rss(self) -> int:
        return self._proc.memory_info().rss

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self._interval)

    def reset(self) -> int:
        """Restart peak tracking from the current RSS; returns it."""
        now = self.rss()
        self.peak = now
        return now

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())
        return self.peak


def make_chunk(i: int, rows: int, dim: int, seed: int):
    """Chunk ``i`` of the benchmark cloud (deterministic in (seed, i), so both sides see the same points)."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + i)
    scales = torch.logspace(-1, 1, dim)
    scales[:3] = 30.0  # outlier dimensions dominate the variance, as in residual streams
    x = torch.randn(rows, dim, generator=g) * scales
    x[:, 0] += 300.0
    return x  # float32


def chunk_sizes(n_points: int):
    return [min(CHUNK, n_points - s) for s in range(0, n_points, CHUNK)]


def worker_ours(n_points: int, dim: int, seed: int) -> dict:
    import torch

    from vsem_lens.core.moments import Moments
    from vsem_lens.geometry.metrics import isoscore

    torch.set_grad_enabled(False)
    mem = PeakRSS()
    base = mem.reset()
    m = Moments(dim)
    t_compute = 0.0
    t0 = time.perf_counter()
    for i, rows in enumerate(chunk_sizes(n_points)):
        x = make_chunk(i, rows, dim, seed)
        t = time.perf_counter()
        m.update(x)
        t_compute += time.perf_counter() - t
    t = time.perf_counter()
    value = isoscore(m)
    t_compute += time.perf_counter() - t
    t_total = time.perf_counter() - t0
    peak = mem.stop()
    return {"value": value, "seconds": t_compute, "seconds_incl_generation": t_total,
            "peak_mb": (peak - base) / 2**20, "peak_call_mb": (peak - base) / 2**20}


def worker_package(n_points: int, dim: int, seed: int) -> dict:
    import torch
    from IsoScore.IsoScore import IsoScore

    torch.set_grad_enabled(False)
    mem = PeakRSS()
    base = mem.reset()
    points = torch.empty(n_points, dim, dtype=torch.float32)  # the package needs everything at once
    start = 0
    for i, rows in enumerate(chunk_sizes(n_points)):
        points[start : start + rows] = make_chunk(i, rows, dim, seed)
        start += rows
    before_call = mem.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = time.perf_counter()
        value = float(IsoScore(points.numpy()))  # numpy: avoids its torch.tensor(tensor) warning, same copy
        seconds = time.perf_counter() - t
    peak = mem.stop()
    return {"value": value, "seconds": seconds, "peak_mb": (peak - base) / 2**20,
            "peak_call_mb": (peak - before_call) / 2**20}


# ---------------------------------------------------------------------------------- driver side


def run_worker(kind: str, n_points: int, dim: int, seed: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind,
           "--sizes", str(n_points), "--dim", str(dim), "--seed", str(seed)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} worker failed (N={n_points}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200_000, 2_000_000])
    parser.add_argument("--dim", type=int, default=576)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=["ours", "package"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        fn = worker_ours if args.worker == "ours" else worker_package
        print(json.dumps(fn(args.sizes[0], args.dim, args.seed)))
        return

    import psutil
    import torch

    print(f"IsoScore benchmark: float32 points, dim {args.dim}, chunks of {CHUNK} rows, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{psutil.virtual_memory().available / 2**30:.1f} GiB RAM available")
    mb_per_point = None  # package peak MB per point, learned at the first size
    for n in sorted(args.sizes):
        data_mb = n * args.dim * 4 / 2**20
        print(f"\nN = {n:,} points ({data_mb:,.0f} MiB of float32 data)")
        ours = run_worker("ours", n, args.dim, args.seed)
        print(f"  ours (streaming Moments, float64): {ours['seconds']:7.2f} s compute "
              f"({ours['seconds_incl_generation']:.2f} s incl. generating the chunks), "
              f"peak RSS growth {ours['peak_mb']:8.1f} MiB, IsoScore {ours['value']:.10f}")
        available_mb = psutil.virtual_memory().available / 2**20
        if mb_per_point is not None and mb_per_point * n > 0.5 * available_mb:
            print(f"  package: SKIPPED - it would need ~{mb_per_point * n / 1024:.1f} GiB peak "
                  f"(extrapolated from the smaller run) of {available_mb / 1024:.1f} GiB available; "
                  f"ours needed {ours['peak_mb']:.0f} MiB.")
            continue
        pkg = run_worker("package", n, args.dim, args.seed)
        mb_per_point = pkg["peak_mb"] / n
        print(f"  package IsoScore (all in memory):  {pkg['seconds']:7.2f} s compute, "
              f"peak RSS growth {pkg['peak_mb']:8.1f} MiB incl. data "
              f"({pkg['peak_call_mb']:.1f} MiB during the call), IsoScore {pkg['value']:.10f}")
        print(f"  time ratio ours/package = {ours['seconds'] / pkg['seconds']:.2f} (>1: ours slower); "
              f"peak memory ratio package/ours = {pkg['peak_mb'] / max(ours['peak_mb'], 1e-9):.1f}x; "
              f"|ours - package| = {abs(ours['value'] - pkg['value']):.3e}")


if __name__ == "__main__":
    main()
