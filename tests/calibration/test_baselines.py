"""Baselines: zero-shot readouts, cosine kNN, the logistic probe, ICL, LoRA/IA3 (tiny model only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tasks import separable, tiny_task

import vsem_lens as vl
from vsem_lens.calibration.baselines import parse_baselines, run_baselines
from vsem_lens.calibration.cosine_knn import CosineKNNClassifier
from vsem_lens.calibration.features import extract_features, label_token_ids
from vsem_lens.calibration.finetune import finetune_baseline, fresh_hf_model
from vsem_lens.calibration.icl import icl_baseline, icl_prefix
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
    knn = CosineKNNClassifier(k=5).fit(X, y)
    assert float((knn.predict(Xt) == yt).double().mean()) == 1.0
    # Ties between classes go to the more similar neighbours.
    tie = CosineKNNClassifier(k=2).fit(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
    assert tie.predict(torch.tensor([[0.2, 1.0]])).tolist() == [1]
    with pytest.raises(vl.core.InputError):
        CosineKNNClassifier(k=0)
    with pytest.raises(vl.core.InputError):
        LogisticRegressionProbe(l2=-1.0)


def _last_logits(model, prompt: str) -> torch.Tensor:
    return model.forward(model.tokenize([prompt]))[0, -1].double()


def test_cheap_baselines_equal_independent_computations(tiny_model):
    task = tiny_task()
    results = run_baselines(tiny_model, task, "zero-shot,affinity,knn,probe")
    table = results_table(results)
    assert table["method"].tolist() == ["zero-shot", "affinity", "cosine-knn", "probe"]
    assert (table["wall_time_s"] > 0).all()
    by_name = {r.method: r for r in results}
    splits = {s: task.split(s) for s in ("train", "validation", "test")}
    test = splits["test"]
    ids = label_token_ids(tiny_model, task.label_words)
    # zero-shot: argmax of the model's own last-position logits over the label tokens, one prompt at a time
    zero = [int(_last_logits(tiny_model, task.template.replace("{text}", t))[ids].argmax()) for t in test.texts]
    assert by_name["zero-shot"].predictions.tolist() == zero
    assert by_name["zero-shot"].accuracy == pytest.approx(np.mean(np.array(zero) == test.y.numpy()))
    # affinity: argmax cosine (float64, numpy) of the LM-head input to the label bases
    feats = {s: extract_features(tiny_model, t, cache=False, progress=False) for s, t in splits.items()}
    bases = vl.SemanticBasis.from_model(tiny_model).for_words(task.label_words).double().numpy()
    h = feats["test"].X.double().numpy()
    cos = (h / np.linalg.norm(h, axis=1, keepdims=True)) @ (bases / np.linalg.norm(bases, axis=1, keepdims=True)).T
    assert by_name["affinity"].predictions.tolist() == cos.argmax(1).tolist()
    # cosine kNN: a hand loop over neighbours with the k chosen on validation
    k = by_name["cosine-knn"].details["k"]
    train = feats["train"].X.double().numpy()
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    votes = []
    for row in h / np.linalg.norm(h, axis=1, keepdims=True):
        sims = train @ row
        nearest = np.argsort(-sims, kind="stable")[: min(k, len(train))]
        labels = splits["train"].y.numpy()[nearest]
        count = np.bincount(labels, minlength=2).astype(float) + 1e-6 * np.bincount(labels, sims[nearest], minlength=2)
        votes.append(int(count.argmax()))
    assert by_name["cosine-knn"].predictions.tolist() == votes
    assert by_name["probe"].details["l2"] > 0


def test_icl_prompt_and_baseline(tiny_model):
    # The tiny model has a 64-token context: a short template and short demonstrations.
    task = tiny_task().with_prompt(template="{text}\n:")
    prefix = icl_prefix(tiny_model, task, shots=1, seed=0, demo_max_tokens=14)
    assert prefix.count("\n: cat\n\n") == 1 and prefix.count("\n: apples\n\n") == 1
    assert prefix == icl_prefix(tiny_model, task, shots=1, seed=0, demo_max_tokens=14)
    result = icl_baseline(tiny_model, task, shots=1, demo_max_tokens=14, cache=False)
    assert result.details["prefix_tokens"] < tiny_model.n_ctx
    # independent: the prefix + each test prompt through the model, argmax over the label tokens
    ids = label_token_ids(tiny_model, task.label_words)
    prefix = icl_prefix(tiny_model, task, shots=1, seed=42, demo_max_tokens=14)
    test = task.split("test")
    expected = [int(_last_logits(tiny_model, prefix + t + "\n:")[ids].argmax()) for t in test.texts]
    assert result.predictions.tolist() == expected
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


def _train_loss(hf, model, task) -> float:
    """Cross-entropy over the label-token logits at the last prompt token, on the train split (float64)."""
    train = task.split("train")
    ids = label_token_ids(model, task.label_words)
    losses = []
    with torch.no_grad():
        for text, label in zip(train.texts, train.y.tolist()):
            tokens = model.tokenize([task.template.replace("{text}", text)])
            logits = hf(input_ids=tokens.ids).logits[0, -1, ids].double()
            losses.append(float(torch.logsumexp(logits, 0) - logits[label]))
    return float(np.mean(losses))


@pytest.mark.parametrize("method, lr, marker", [("lora", 5e-3, "lora_"), ("ia3", 5e-2, "ia3_")])
def test_lora_and_ia3_lower_the_loss_train_only_adapters_and_leave_the_model_alone(tiny_model, method, lr, marker):
    task = tiny_task()
    tokens = tiny_model.tokenize(task.prompts()[:3])
    before = tiny_model.forward(tokens)
    hf = fresh_hf_model(tiny_model)
    initial = {name: p.detach().clone() for name, p in hf.named_parameters()}
    loss_before = _train_loss(hf, tiny_model, task)
    result = finetune_baseline(tiny_model, task, method, epochs=3, lr=lr, batch_size=4, max_length=32,
                               hf_factory=lambda: hf)
    assert torch.equal(tiny_model.forward(tokens), before)  # the shared hooked model is untouched
    # peft wrapped `hf` in place: base weights keep their values, adapter weights moved
    after = dict(hf.named_parameters())
    adapters = [name for name in after if marker in name]
    assert adapters and result.details["trainable_params"] == sum(after[n].numel() for n in adapters)
    for name, value in after.items():
        base = name.replace(".base_layer", "")
        if marker in name:
            continue
        assert torch.equal(value, initial[base]), name
    assert any(not torch.equal(after[n], torch.ones_like(after[n])) and not torch.equal(after[n], torch.zeros_like(after[n]))
               for n in adapters)
    assert _train_loss(hf, tiny_model, task) < loss_before  # training lowered the training loss
    assert result.details["steps"] == 9
    with pytest.raises(vl.core.InputError, match="unknown fine-tuning"):
        finetune_baseline(tiny_model, task, "prefix")


def test_parse_baselines():
    assert parse_baselines("all") == ["zero-shot", "affinity", "cosine-knn", "knn-prompting", "probe", "icl", "lora", "ia3"]
    assert parse_baselines("none") == [] and parse_baselines("matmul,knn,cosine-knn") == ["zero-shot", "cosine-knn"]
    assert parse_baselines("kp") == ["knn-prompting"]
    with pytest.raises(vl.core.InputError, match="unknown baseline"):
        parse_baselines("zero-shot,svm")


def test_baselines_need_three_splits(tiny_model):
    task = tiny_task()
    with pytest.raises(vl.core.InputError, match="train/validation/test"):
        run_baselines(tiny_model, task.split("train"), "knn")
