"""GPU smoke test: everything runs on the GPU, and agrees with the CPU. One command for users with a GPU.

    python benchmarks/gpu_smoke.py                 # embedded model on cuda, compared with cpu
    python benchmarks/gpu_smoke.py --model DIR     # any model vsem-lens loads

Checks, each printed with its GPU/CPU time ratio:

1. load: every weight on the GPU in the requested dtype;
2. capture: activations are produced on the GPU and equal the CPU's (float32 tolerance);
3. readouts: the logit-lens and affinity readouts of all layers on the GPU: same top-1 as the CPU on
   (almost) every row, KL within tolerance;
4. report: ``build_report`` on the GPU, its tables equal to the CPU's within tolerance;
5. tuned lens: a few training steps on the GPU, the translators stay on the GPU;
6. I-STAR: two fine-tuning steps of a copy of the model on the GPU (hooks with gradients, penalty, C0);
7. with two or more GPUs: a 2-rank NCCL ``vsem-lens report --distributed`` through torchrun.

Not run in CI (there is no GPU there); exits with status 2 and a message when CUDA is not available.
``--device cpu`` runs the same checks CPU-against-CPU (a dry run of this script itself).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vsem_lens as vl  # noqa: E402

TEXTS = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Photosynthesis converts light energy into chemical energy stored in sugars.",
    "She opened the door slowly, unsure of what she would find inside.",
    "def add(a, b):\n    return a + b",
]


def timed(fn, device: str):
    """``(result, seconds)`` of ``fn()``, synchronising the GPU so the time is the work's, not the launch's."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SystemExit(f"FAILED: {message}")
    print(f"  ok  {message}")


def ratio(name: str, device_s: float, cpu_s: float, device: str) -> None:
    print(f"  {name}: {device} {device_s:.3f} s, cpu {cpu_s:.3f} s, ratio {device_s / cpu_s:.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=3, help="tuned-lens training steps")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device is available here; run it on a machine with a GPU "
              "(or pass --device cpu for a dry run).", file=sys.stderr)
        return 2
    device = str(vl.core.devices.check_device(args.device))

    print("[1] load")
    model, load_s = timed(lambda: vl.load_model(args.model, device=device), device)
    cpu_model = vl.load_model(args.model, device="cpu")
    kinds = {p.device.type for p in model.parameters()}
    check(kinds == {torch.device(device).type}, f"every weight on {device} (found {sorted(kinds)}), loaded in {load_s:.1f} s")

    print("[2] capture")
    acts, gpu_s = timed(lambda: vl.capture(model, TEXTS, sites=("resid_post",)), device)
    cpu_acts, cpu_s = timed(lambda: vl.capture(cpu_model, TEXTS, sites=("resid_post",)), "cpu")
    last = model.n_layers - 1
    produced = acts.layer("resid_post", last)
    check(produced.device.type == torch.device(device).type, f"activations produced on {produced.device}")
    diff = (produced.float().cpu() - cpu_acts.layer("resid_post", last).float()).abs().max().item()
    check(diff < 1e-3 * max(1.0, cpu_acts.layer("resid_post", last).abs().max().item()), f"equal to the CPU's (max diff {diff:.2e})")
    ratio("capture", gpu_s, cpu_s, device)

    print("[3] readouts (logit lens + affinity, all layers)")

    def readouts(m):
        return [out.readouts for out in vl.iter_layer_readouts(m, TEXTS, k=1)]

    mine, gpu_s = timed(lambda: readouts(model), device)
    ref, cpu_s = timed(lambda: readouts(cpu_model), "cpu")
    for name in ("lens", "affinity"):
        top = torch.cat([b[name]["top_ids"][..., 0].cpu().reshape(-1) for b in mine])
        top_ref = torch.cat([b[name]["top_ids"][..., 0].reshape(-1) for b in ref])
        agree = (top == top_ref).float().mean().item()
        check(agree > 0.99, f"{name}: top-1 equal to the CPU's on {agree:.1%} of rows (near-ties may differ)")
    ratio("readouts", gpu_s, cpu_s, device)

    print("[4] report")
    report, gpu_s = timed(lambda: vl.build_report(model, TEXTS, lens_tokens=64, progress=False), device)
    cpu_report, cpu_s = timed(lambda: vl.build_report(cpu_model, TEXTS, lens_tokens=64, progress=False), "cpu")
    iso, iso_ref = report.tables["isotropy"], cpu_report.tables["isotropy"]
    gap = (iso["isoscore"] - iso_ref["isoscore"]).abs().max()
    check(gap < 1e-3, f"isotropy table equal to the CPU's (max IsoScore diff {gap:.1e})")
    ratio("report", gpu_s, cpu_s, device)

    print("[5] tuned lens")
    lens, gpu_s = timed(lambda: vl.TunedLens.fit(model, TEXTS, steps=args.steps, progress=False), device)
    check(lens.weight.device.type == torch.device(device).type, f"translators trained on {lens.weight.device}")
    print(f"  {args.steps} steps in {gpu_s:.2f} s")

    print("[6] I-STAR fine-tuning (two steps)")
    from vsem_lens.calibration.istar_finetune import IStarConfig, istar_finetune

    # Arbitrary labels on the smoke texts, with label words every BPE vocabulary has as one token.
    texts = TEXTS * 4
    task = vl.calibration.TextClassificationTask(
        "smoke", texts, ["x", "y"] * (len(texts) // 2), ["train"] * (len(texts) - 4) + ["test"] * 4,
        {"x": "the", "y": "a"}, "Text: {text}\nWord:")
    result, gpu_s = timed(lambda: istar_finetune(model, task, IStarConfig(weight=-5.0), progress=False), device)
    placed = {p.device.type for p in result.model.parameters()}
    check(placed == {torch.device(device).type}, f"fine-tuned copy on {sorted(placed)}")
    check(bool(result.history.loss.notna().all()), f"{len(result.history)} finite steps in {gpu_s:.2f} s")

    print("[7] 2-rank NCCL report")
    if not device.startswith("cuda") or torch.cuda.device_count() < 2:
        print("  skipped: needs two CUDA devices")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(TEXTS * 8))
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "vsem_lens.cli", "report",
                   "--model", args.model, "--device", "cuda", "--distributed", "--corpus", str(corpus),
                   "--out", str(Path(tmp) / "report"), "--quiet"]
        done = subprocess.run(command, capture_output=True, text=True)
        check(done.returncode == 0, f"torchrun report exited {done.returncode}{': ' + done.stderr[-500:] if done.returncode else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
