"""Scale: torchrun (2 CPU ranks, gloo) equals one process; killed runs resume to the same numbers; big-model options."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_TEXTS

import vsem_lens as vl
from vsem_lens.core.distributed import SINGLE, DistEnv, all_reduce_moments, rank_device, shard, torchrun_env
from vsem_lens.core.errors import InputError
from vsem_lens.core.io import texts_digest
from vsem_lens.report.build import build_report, checkpoint_key

# 48 texts -> 16 batches of 3: enough batches for sharding and checkpoints, a few seconds per run.
CORPUS = [f"{text} (variant {i})" for i in range(8) for text in TINY_TEXTS]
ARGS = dict(lens_tokens=80, batch_size=3, seed=1, max_tokens=None)
# float64 statistics (and the corpus-independent basis coherence, whose float64 sums depend on the number
# of threads): within 1e-10. Readouts (float32 products, float64 accumulation): within 1e-6.
FLOAT64_TABLES = ("isotropy", "decomposition", "coherence_summary", "coherence_histogram", "leverage_extremes")
LENS_TABLES = ("prediction_formation", "examples")
EXACT_TABLES = ("corpus",)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run ~10x faster on one thread than on two oversubscribed ones (and the torchrun ranks
    use one thread each, as torchrun sets OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dir_model(tiny_model_dir):
    return vl.load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def reference(dir_model):
    """The uninterrupted single-process report."""
    return build_report(dir_model, CORPUS, **ARGS)


def _subprocess_env() -> dict[str, str]:
    # faulthandler: a rank that aborts (SIGABRT from C++) prints every thread's Python stack.
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    return env


def _cells_equal(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (np.isnan(a) and np.isnan(b)) or a == b
    return a == b


def assert_tables_close(left: dict[str, pd.DataFrame], right: dict[str, pd.DataFrame], *, lens_tol: float = 1e-6) -> None:
    for name in (*FLOAT64_TABLES, *LENS_TABLES, *EXACT_TABLES):
        x, y = left[name].reset_index(drop=True), right[name].reset_index(drop=True)
        assert list(x.columns) == list(y.columns) and len(x) == len(y), name
        tol = 1e-10 if name in FLOAT64_TABLES else lens_tol if name in LENS_TABLES else 0.0
        for column in x.columns:
            u, v = x[column], y[column]
            if u.dtype.kind == "f" or v.dtype.kind == "f":
                np.testing.assert_allclose(
                    u.to_numpy(dtype=float), v.to_numpy(dtype=float), rtol=tol, atol=tol, equal_nan=True,
                    err_msg=f"{name}.{column}",
                )
            elif len(u) and isinstance(u.iloc[0], (list, tuple)):
                if not isinstance(u.iloc[0][0], float):  # token lists, outlier dimension indices
                    assert u.tolist() == v.tolist(), f"{name}.{column}"
                else:
                    np.testing.assert_allclose(np.array(u.tolist(), float), np.array(v.tolist(), float),
                                               rtol=tol, atol=tol, err_msg=f"{name}.{column}")
            else:
                assert all(_cells_equal(a, b) for a, b in zip(u.tolist(), v.tolist())), f"{name}.{column}"


def _read_report_dir(path: Path) -> dict[str, pd.DataFrame]:
    tables = {}
    for name in (*FLOAT64_TABLES, *LENS_TABLES, *EXACT_TABLES):
        df = pd.read_csv(path / f"{name}.csv", keep_default_na=False, na_values=[""])
        for column in df.columns:
            values = df[column].tolist()
            if values and all(isinstance(v, str) and v.startswith("[") for v in values):
                df[column] = pd.Series([json.loads(v) for v in values], dtype=object)
        tables[name] = df
    return tables


# ---------------------------------------------------------------------------------- helpers (fast)


def test_shard_and_env_helpers(monkeypatch):
    ranks = [shard(list(range(11)), DistEnv(r, 3)) for r in range(3)]
    assert sorted(sum(ranks, [])) == list(range(11)) and ranks[1] == [1, 4, 7, 10]
    assert torchrun_env({}) is None
    assert torchrun_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == DistEnv(1, 2, 1)
    with pytest.raises(InputError):
        torchrun_env({"RANK": "2", "WORLD_SIZE": "2"})
    count, mean, m2 = all_reduce_moments(torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([2.0]), SINGLE)
    assert (count.item(), mean.item(), m2.item()) == (3.0, 1.0, 2.0)
    # The rank's GPU is known from torchrun's layout, before the process group exists.
    layout = torchrun_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert rank_device(layout, "cuda") == "cuda:1" and rank_device(layout, "cuda:0") == "cuda:0"
    assert rank_device(layout, "cpu") == "cpu" and rank_device(SINGLE, "cuda") == "cuda"
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert vl.core.distributed.init_distributed() is SINGLE


def test_distributed_needs_torchrun(dir_model, monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(InputError, match="torchrun"):
        build_report(dir_model, CORPUS, distributed=True, **ARGS)
    from vsem_lens.cli import main
    from vsem_lens.lenses.tuned import TunedLens

    with pytest.raises(InputError, match="torchrun"):
        TunedLens.fit(dir_model, CORPUS, distributed=True, progress=False)
    with pytest.raises(InputError, match="no process group"):  # a hand-made layout would train on half the data
        TunedLens.fit(dir_model, CORPUS, distributed=DistEnv(1, 2), progress=False)
    from _tasks import tiny_task

    with pytest.raises(InputError, match="no process group"):
        vl.calibration.extract_features(dir_model, tiny_task(), cache=False, progress=False, distributed=DistEnv(0, 2))
    for command in (["report"], ["lens", "train"], ["calibrate", "--task", "topic"]):
        assert main([*command, "--distributed", "--model", "embedded", "--quiet"]) == 2, command
        assert f"vsem_lens.cli {' '.join(command[:2 if command[0] == 'lens' else 1])} --distributed" in \
            capsys.readouterr().err


def test_checkpoint_key_tracks_arguments(dir_model):
    base = {"seed": 1, "batch_size": 3, "world_size": 1}
    key = checkpoint_key(dir_model, CORPUS, base)
    assert key == checkpoint_key(dir_model, list(CORPUS), dict(base))
    assert key != checkpoint_key(dir_model, CORPUS, {**base, "seed": 2})
    assert key != checkpoint_key(dir_model, CORPUS, {**base, "world_size": 2})
    assert key != checkpoint_key(dir_model, CORPUS[:-1], base)
    assert texts_digest(["ab", "c"]) != texts_digest(["a", "bc"])


# ---------------------------------------------------------------------------------- torchrun == one process


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(tiny_model_dir, reference, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS), encoding="utf-8")
    out = tmp_path / "report"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "vsem_lens.cli", "report", "--distributed", "--model", str(tiny_model_dir), "--corpus", str(corpus),
        "--max-tokens", "all", "--lens-tokens", "80", "--batch-size", "3", "--seed", "1", "--out", str(out),
        "--quiet", "--checkpoint-every", "3", "--checkpoint-dir", str(tmp_path / "ckpt"),
    ]
    proc = subprocess.run(command, env=_subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-12000:]  # room for a faulthandler dump
    summary = json.loads((out / "summary.json").read_text())
    ranks = summary["ranks"]
    assert ranks["world_size"] == 2 and ranks["backend"] == "gloo"
    assert [r["batches"] for r in ranks["per_rank"]] == [8, 8]
    assert summary["tokens"]["lens_tokens"] == 80 == summary["tokens"]["quantile_tokens"]
    # Only rank 0 wrote a report; the checkpoints were removed after the run.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "corpus.jsonl", "report"]
    assert not any((tmp_path / "ckpt").rglob("*.pt"))
    single_dir = tmp_path / "single"
    reference.save(single_dir)
    assert_tables_close(_read_report_dir(single_dir), _read_report_dir(out))


# ---------------------------------------------------------------------------------- resumable runs


class Stop(Exception):
    pass


def test_interrupted_run_resumes_to_the_same_numbers(dir_model, reference, tmp_path):
    calls = []

    def stop_after_5(done, total):
        calls.append(done)
        if done == 5:
            raise Stop

    with pytest.raises(Stop):
        build_report(dir_model, CORPUS, checkpoint_dir=tmp_path, checkpoint_every=2, on_batch=stop_after_5, **ARGS)
    files = list(tmp_path.rglob("rank0-of-1.pt"))
    assert len(files) == 1 and calls == [1, 2, 3, 4, 5]
    saved = torch.load(files[0], weights_only=True)
    assert saved["batches_done"] == 4  # the last checkpoint before the interruption

    resumed_calls = []
    resumed = build_report(
        dir_model, CORPUS, checkpoint_dir=tmp_path, checkpoint_every=2,
        on_batch=lambda done, total: resumed_calls.append(done), **ARGS,
    )
    assert resumed_calls == list(range(5, 17))
    assert resumed.summary["ranks"]["per_rank"][0]["resumed_after_batches"] == 4
    assert_tables_close(reference.tables, resumed.tables, lens_tol=1e-12)
    assert any(tmp_path.rglob("*.pt"))  # kept until the report is safely written...
    resumed.save(tmp_path / "report")
    assert not any(tmp_path.rglob("*.pt"))  # ...and removed then

    # Other arguments never pick up this run's checkpoint.
    with pytest.raises(Stop):
        build_report(dir_model, CORPUS, checkpoint_dir=tmp_path, checkpoint_every=2, on_batch=stop_after_5, **ARGS)
    other = build_report(dir_model, CORPUS, checkpoint_dir=tmp_path, checkpoint_every=2,
                         **{**ARGS, "seed": 2})
    assert other.summary["ranks"]["per_rank"][0]["resumed_after_batches"] == 0


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_numbers(tiny_model_dir, dir_model, reference, tmp_path):
    """A real SIGKILL (no cleanup, no finally) after 7 batches; the run started again resumes at batch 6."""
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        import vsem_lens as vl
        sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parents[1])!r}]
        from test_distributed import ARGS, CORPUS

        def kill(done, total):
            if done == 7:
                os.kill(os.getpid(), signal.SIGKILL)

        model = vl.load_model({str(tiny_model_dir)!r})
        vl.build_report(model, CORPUS, checkpoint_dir={str(tmp_path)!r}, checkpoint_every=3, on_batch=kill, **ARGS)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], env=_subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert len(list(tmp_path.rglob("rank0-of-1.pt"))) == 1
    assert not list(tmp_path.rglob(".*tmp*"))  # no half-written file is visible as a checkpoint
    resumed = build_report(dir_model, CORPUS, checkpoint_dir=tmp_path, checkpoint_every=3, **ARGS)
    assert resumed.summary["ranks"]["per_rank"][0]["resumed_after_batches"] == 6
    assert_tables_close(reference.tables, resumed.tables)


def test_corrupt_checkpoint_is_ignored(dir_model, reference, tmp_path):
    with pytest.raises(Stop):
        build_report(dir_model, CORPUS, checkpoint_dir=tmp_path, checkpoint_every=2,
                     on_batch=lambda d, t: (_ for _ in ()).throw(Stop) if d == 3 else None, **ARGS)
    (path,) = tmp_path.rglob("rank0-of-1.pt")
    path.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="unreadable checkpoint"):
        again = build_report(dir_model, CORPUS, checkpoint_dir=tmp_path, checkpoint_every=2, **ARGS)
    assert again.summary["ranks"]["per_rank"][0]["resumed_after_batches"] == 0
    assert_tables_close(reference.tables, again.tables, lens_tol=1e-12)


# ---------------------------------------------------------------------------------- big-model options


def test_device_map_and_half_precision(tiny_model_dir, reference):
    placed = vl.load_model(str(tiny_model_dir), device_map={"": "cpu"})
    assert placed.device.type == "cpu"
    with pytest.raises(vl.core.errors.ModelLoadError, match="in-memory"):
        vl.load_model((object(), object()), device_map="auto")
    half = vl.load_model(str(tiny_model_dir), dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    report = build_report(half, CORPUS, **ARGS)
    iso, ref = report.tables["isotropy"], reference.tables["isotropy"]
    assert (iso["n_tokens"] == ref["n_tokens"]).all()
    # bfloat16 activations (8-bit mantissa), float64 statistics: close to the float32 model's numbers.
    np.testing.assert_allclose(iso["isoscore"], ref["isoscore"], rtol=0.1)
    form = report.tables["prediction_formation"]
    assert np.isfinite(form["kl_bits_mean"]).all() and (form["n_tokens"] == 80).all()


# ---------------------------------------------------------------------------------- calibration features

FEATURE_WORKER = """
import sys, torch
sys.path.insert(0, {tests!r})
import vsem_lens as vl
from vsem_lens.cli import main
from vsem_lens.core.distributed import init_distributed
from _tasks import tiny_task
env = init_distributed()
model = vl.load_model({model!r})
feats = vl.calibration.extract_features(model, tiny_task(), batch_size=3, cache=False, progress=False, distributed=env)
if env.rank == 1:  # every rank holds the whole result; rank 1 proves it
    torch.save({{k: getattr(feats, k) for k in ("X", "X_mean", "X_max", "label_logits")}}, {out!r})
# `vsem-lens calibrate --distributed` on the same process group (it leaves the group at the end).
sys.exit(main({calibrate!r}))
"""


def _write_task_file(path: Path) -> Path:
    from _tasks import tiny_task

    task = tiny_task()
    path.write_text("\n".join(json.dumps({"text": t, "label": lab, "split": s})
                              for t, lab, s in zip(task.texts, task.labels, task.splits)))
    return path


def test_torchrun_feature_extraction_equals_one_process(tiny_model_dir, dir_model, tmp_path, monkeypatch):
    """Features from 2 ranks equal one process's; `calibrate --distributed` (features shared, head on rank 0)
    writes the same head and metrics as a single-process `calibrate`."""
    from _tasks import tiny_task

    from vsem_lens.calibration import CalibratedModel
    from vsem_lens.cli import main

    out, script = tmp_path / "features.pt", tmp_path / "worker.py"
    task_file = _write_task_file(tmp_path / "tiny.jsonl")
    calibrate = ["calibrate", "--task", str(task_file), "--split-column", "split", "--model", str(tiny_model_dir),
                 "--verbalizer", "animal=cat,food=apples", "--epochs", "3", "--baselines", "zero-shot,knn", "--quiet"]
    script.write_text(FEATURE_WORKER.format(tests=str(Path(__file__).parents[1]), model=str(tiny_model_dir), out=str(out),
                                            calibrate=[*calibrate, "--distributed", "--out", str(tmp_path / "two")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    env = dict(_subprocess_env(), VSEM_LENS_CACHE=str(tmp_path / "cache-two"))
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-12000:]  # room for a faulthandler dump
    assert proc.stdout.split() == [str(tmp_path / "two")]  # only rank 0 printed (and wrote)
    got = torch.load(out, weights_only=True)
    single = vl.calibration.extract_features(dir_model, tiny_task(), batch_size=3, cache=False, progress=False)
    for name, value in got.items():
        assert torch.allclose(value, getattr(single, name), atol=1e-5), name

    assert len(list((tmp_path / "cache-two" / "features").glob("*.safetensors"))) == 3  # rank 0 cached the splits
    monkeypatch.setenv("VSEM_LENS_CACHE", str(tmp_path / "cache-one"))  # compute again, do not read rank 0's cache
    assert main([*calibrate, "--out", str(tmp_path / "one")]) == 0
    one, two = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("one", "two"))
    assert one["test"] == two["test"] and one["split_sizes"] == two["split_sizes"]
    assert [b["accuracy"] for b in one["baselines"]] == [b["accuracy"] for b in two["baselines"]]
    heads = [CalibratedModel.load(tmp_path / run / "head", model=dir_model).head for run in ("one", "two")]
    weights = [head._weights() for head in heads]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------------- tuned-lens training (DDP)

LENS_FIT = dict(steps=6, tokens_per_step=32, seed=2, progress=False)
# 5 tokens per step = one text prefix per step, so rank 1 has no tokens at all (it still joins DDP's all-reduce).
LENS_FIT_ONE_ROW = dict(steps=3, tokens_per_step=5, seed=2, progress=False)

LENS_WORKER = """
import gc, sys, torch
gc.disable()  # a DDP wrapper left in a reference cycle would live until exit: fit must free it by refcount
sys.path.insert(0, {tests!r})
from vsem_lens.cli import main
import vsem_lens as vl
from vsem_lens.core.distributed import init_distributed
from vsem_lens.lenses.tuned import TunedLens
texts = {texts!r}
env = init_distributed()
model = vl.load_model({model!r})
steps = []  # rank 0 alone calls the callback
lenses = {{
    "one_row": TunedLens.fit(model, texts, distributed=True, **{one_row!r}),
    "resumed": TunedLens.fit(model, texts, distributed=env, checkpoint_dir={checkpoints!r},
                             callback=lambda step, info: steps.append(step), **{fit!r}),
}}
assert steps == ([3, 4, 5, 6] if env.rank == 0 else []), steps
from torch.nn.parallel import DistributedDataParallel
assert not any(isinstance(o, DistributedDataParallel) for o in gc.get_objects()), "a DDP wrapper outlived fit"
if env.rank == 1:  # every rank returns the whole lens; rank 1 proves it
    torch.save({{k: {{"weight": v.weight, "bias": v.bias, "kl": torch.tensor(v.history_.kl_bits.to_numpy())}}
                for k, v in lenses.items()}}, {out!r})
# The CLI on the same process group (rank 0 writes the lens; the command leaves the group at the end).
sys.exit(main(["lens", "train", "--distributed", "--model", {model!r}, "--corpus", {corpus!r}, "--steps", "6",
               "--tokens-per-step", "32", "--seed", "2", "--no-cache", "--out", {cli_out!r}, "--quiet"]))
"""


def test_torchrun_tuned_lens_equals_one_process(tiny_model_dir, dir_model, tmp_path):
    """DDP over 2 ranks trains the lens one process trains (to float32 rounding), also with an empty rank,
    when resuming a 1-process checkpoint, and through `vsem-lens lens train --distributed`."""
    from vsem_lens.lenses.tuned import TunedLens

    texts = CORPUS[:12]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(texts), encoding="utf-8")
    checkpoints = tmp_path / "checkpoints"

    def stop_after_3(step, info):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # one process trains 2 steps (checkpointed), then dies
        TunedLens.fit(dir_model, texts, checkpoint_dir=checkpoints, checkpoint_every=2, callback=stop_after_3,
                      **LENS_FIT)
    out, cli_out, script = tmp_path / "lenses.pt", tmp_path / "cli-lens", tmp_path / "worker.py"
    script.write_text(LENS_WORKER.format(
        tests=str(Path(__file__).parents[1]), texts=texts, model=str(tiny_model_dir), one_row=LENS_FIT_ONE_ROW, fit=LENS_FIT,
        checkpoints=str(checkpoints), out=str(out), corpus=str(corpus), cli_out=str(cli_out),
    ))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    proc = subprocess.run(command, env=_subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-12000:]  # room for a faulthandler dump
    assert proc.stdout.split() == [str(cli_out)]  # only rank 0 printed (and wrote)

    got = torch.load(out, weights_only=True)
    single = {"one_row": TunedLens.fit(dir_model, texts, **LENS_FIT_ONE_ROW),
              "resumed": TunedLens.fit(dir_model, texts, **LENS_FIT)}
    for name, lens in single.items():
        assert lens.weight.abs().max() > 1e-3, name  # the translators did move
        torch.testing.assert_close(got[name]["weight"], lens.weight, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(got[name]["bias"], lens.bias, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(got[name]["kl"], torch.tensor(lens.history_.kl_bits.to_numpy()), rtol=1e-5, atol=1e-7)
    from_cli = TunedLens.load(cli_out, model=dir_model)
    torch.testing.assert_close(from_cli.weight, single["resumed"].weight, rtol=1e-4, atol=1e-6)
    assert from_cli.metadata["summary"]["world_size"] == 2
