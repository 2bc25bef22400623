"""Baselines: zero-shot readouts, kNN, the logistic probe, ICL, LoRA/IA3 (tiny model only)."""

from __future__ import annotations

import pytest
import torch
from _tasks import separable, tiny_task

import vsem_lens as vl
from vsem_lens.calibration.baselines import parse_baselines, run_baselines
from vsem_lens.calibration.finetune import finetune_baseline, fresh_hf_model
from vsem_lens.calibration.icl import icl_baseline, icl_prefix
from vsem_lens.calibration.knn import KNNClassifier
from vsem_lens.calibration.probe import LogisticRegressionProbe
from vsem_lens.calibration.results import results_table
from vsem_lens.calibration.threads import torch_threads

pytestmark = pytest.mark.filterwarnings("ignore:label word")


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def test_probe_and_knn_on_separable_points():
    bases = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    X, y = separable(bases, 30, noise=0.5)
    Xt, yt = separable(bases, 20, noise=0.5, seed=3)
    probe = LogisticRegressionProbe(l2=1e-2).fit(X, y)
    assert float((probe.predict(Xt) == yt).double().mean()) == 1.0
    warm = LogisticRegressionProbe(l2=1e-3).fit(X, y, warm_start=probe)
    cold = LogisticRegressionProbe(l2=1e-3).fit(X, y)
    assert torch.allclose(warm.decision_function(Xt).softmax(1), cold.decision_function(Xt).softmax(1), atol=1e-3)
    knn = KNNClassifier(k=5).fit(X, y)
    assert float((knn.predict(Xt) == yt).double().mean()) == 1.0
    # Ties between classes go to the more similar neighbours.
    tie = KNNClassifier(k=2).fit(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
    assert tie.predict(torch.tensor([[0.2, 1.0]])).tolist() == [1]
    with pytest.raises(vl.core.InputError):
        KNNClassifier(k=0)
    with pytest.raises(vl.core.InputError):
        LogisticRegressionProbe(l2=-1.0)


def test_cheap_baselines_on_the_tiny_model(tiny_model):
    task = tiny_task()
    results = run_baselines(tiny_model, task, "zero-shot,affinity,knn,probe")
    table = results_table(results)
    assert table["method"].tolist() == ["zero-shot", "affinity", "knn", "probe"]
    assert table["accuracy"].between(0, 1).all() and table["macro_f1"].between(0, 1).all()
    assert (table["wall_time_s"] > 0).all()
    by_name = {r.method: r for r in results}
    assert by_name["knn"].details["k"] in (1, 3, 5, 7, 9, 15, 25)
    assert by_name["probe"].details["l2"] > 0
    assert len(by_name["zero-shot"].predictions) == 8


def test_icl_prompt_and_baseline(tiny_model):
    # The tiny model has a 64-token context: a short template and short demonstrations.
    task = tiny_task().with_prompt(template="{text}\n:")
    prefix = icl_prefix(tiny_model, task, shots=1, seed=0, demo_max_tokens=14)
    assert prefix.count("\n: cat\n\n") == 1 and prefix.count("\n: apples\n\n") == 1
    assert prefix == icl_prefix(tiny_model, task, shots=1, seed=0, demo_max_tokens=14)
    result = icl_baseline(tiny_model, task, shots=1, demo_max_tokens=14)
    assert 0 <= result.accuracy <= 1 and result.details["prefix_tokens"] < tiny_model.n_ctx
    with pytest.raises(vl.core.InputError, match="leaving no room"):
        icl_baseline(tiny_model, task, shots=3, demo_max_tokens=14)
    with pytest.raises(vl.core.InputError, match="fewer than shots"):
        icl_prefix(tiny_model, task, shots=50)


def test_fresh_copy_equals_the_hooked_model(tiny_model):
    hf = fresh_hf_model(tiny_model).eval()
    tokens = tiny_model.tokenize(["The cat sat on the mat."])
    with torch.no_grad():
        ours = hf(tokens.ids).logits
    assert torch.allclose(ours, tiny_model.forward(tokens), atol=1e-4)
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(hf.parameters(), tiny_model.bridge.parameters()))


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_lora_and_ia3_train_a_copy_and_leave_the_model_alone(tiny_model, method):
    task = tiny_task()
    tokens = tiny_model.tokenize(task.prompts()[:3])
    before = tiny_model.forward(tokens)
    result = finetune_baseline(tiny_model, task, method, epochs=2, batch_size=4, max_length=32)
    assert torch.equal(tiny_model.forward(tokens), before)
    assert 0 <= result.accuracy <= 1 and result.wall_time_s > 0
    assert result.details["steps"] == 6 and result.details["trainable_params"] > 0
    assert result.details["final_train_loss"] == result.details["final_train_loss"]  # not NaN
    with pytest.raises(vl.core.InputError, match="unknown fine-tuning"):
        finetune_baseline(tiny_model, task, "prefix")


def test_parse_baselines():
    assert parse_baselines("all") == ["zero-shot", "affinity", "knn", "probe", "icl", "lora", "ia3"]
    assert parse_baselines("none") == [] and parse_baselines("matmul,knn,knn") == ["zero-shot", "knn"]
    with pytest.raises(vl.core.InputError, match="unknown baseline"):
        parse_baselines("zero-shot,svm")


def test_baselines_need_three_splits(tiny_model):
    task = tiny_task()
    with pytest.raises(vl.core.InputError, match="train/validation/test"):
        run_baselines(tiny_model, task.split("train"), "knn")
