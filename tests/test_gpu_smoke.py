"""benchmarks/gpu_smoke.py: refuses clearly without a GPU, and its checks pass as a CPU dry run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_smoke.py"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_without_cuda_it_says_so():
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=ENV)
    assert done.returncode == 2 and "no CUDA device" in done.stderr


def test_dry_run_on_cpu_passes_every_check(tiny_model_dir):
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--model", str(tiny_model_dir), "--steps", "1"],
                          capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.count("  ok  ") >= 6 and "FAILED" not in done.stdout
