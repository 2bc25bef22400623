"""kNN prompting (Xu et al. 2023): KL kNN over next-token distributions, against scipy and hand loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tasks import tiny_task
from scipy.special import rel_entr
from scipy.stats import entropy

import vsem_lens as vl
from vsem_lens.calibration.baselines import run_baselines
from vsem_lens.calibration.features import build_prompts
from vsem_lens.calibration.icl import icl_demonstrations, icl_prefix
from vsem_lens.calibration.knn_prompting import (
    KNNPromptingClassifier,
    kl_anchor_to_query,
    knn_prompting_baseline,
    next_token_log_probs,
)
from vsem_lens.calibration.threads import torch_threads

pytestmark = pytest.mark.filterwarnings("ignore:label word")


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def _random_log_probs(n: int, v: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(3 * torch.randn(n, v, generator=g), dim=1)


def test_kl_equals_scipy_entropy_anchor_first():
    anchors, queries = _random_log_probs(7, 50, 0), _random_log_probs(4, 50, 1)
    dist = kl_anchor_to_query(anchors, queries, chunk=3)  # chunks must not matter
    p, q = anchors.double().exp().numpy(), queries.double().exp().numpy()
    expected = np.array([[entropy(p[i], q[j]) for i in range(7)] for j in range(4)])  # KL(anchor || query)
    assert dist.shape == (4, 7)
    np.testing.assert_allclose(dist.numpy(), expected, rtol=1e-5, atol=1e-8)
    # and not the reverse direction
    reverse = np.array([[rel_entr(q[j], p[i]).sum() for i in range(7)] for j in range(4)])
    assert not np.allclose(dist.numpy(), reverse, rtol=1e-3)


def test_classifier_equals_an_independent_vote():
    anchors, queries = _random_log_probs(30, 40, 2), _random_log_probs(12, 40, 3)
    y = torch.arange(30) % 3
    for k in (1, 3, 5):
        pred = KNNPromptingClassifier(k=k, n_classes=3).fit(anchors, y).predict(queries)
        p, q = anchors.double().exp().numpy(), queries.double().exp().numpy()
        expected = []
        for j in range(12):
            kl = np.array([entropy(p[i], q[j]) for i in range(30)])
            nearest = np.argsort(kl, kind="stable")[:k]
            counts = np.bincount(y.numpy()[nearest], minlength=3)
            expected.append(int(np.argmax(counts)))  # ties: lowest class index
        assert pred.tolist() == expected, k


def test_classifier_must_be_right_on_clustered_distributions():
    # Anchors of class c put their mass on token c; queries are noisy versions of one class.
    g = torch.Generator().manual_seed(4)
    centres = torch.eye(3, 20) * 6
    y = torch.arange(3).repeat(10)
    anchors = torch.log_softmax(centres[y] + 0.5 * torch.randn(30, 20, generator=g), dim=1)
    yq = torch.tensor([2, 0, 1, 1, 0, 2])
    queries = torch.log_softmax(centres[yq] + 0.5 * torch.randn(6, 20, generator=g), dim=1)
    assert KNNPromptingClassifier(k=3).fit(anchors, y).predict(queries).tolist() == yq.tolist()
    with pytest.raises(vl.core.InputError):
        KNNPromptingClassifier(k=0)
    with pytest.raises(vl.core.InputError, match="one label each"):
        KNNPromptingClassifier().fit(anchors, y[:5])


def test_next_token_log_probs_equal_the_models_last_position_logits(tiny_model):
    prompts = ["The cat sat on the mat.", "Apples", "A dog looked at the cat and the mat again."]
    got = next_token_log_probs(tiny_model, prompts, batch_size=2)
    for i, prompt in enumerate(prompts):
        logits = tiny_model.forward(tiny_model.tokenize([prompt]))[0, -1]
        assert torch.allclose(got[i], torch.log_softmax(logits.float(), dim=-1), atol=1e-4)
    assert got.dtype == torch.float32 and got.shape == (3, tiny_model.d_vocab)


def test_baseline_equals_a_hand_run_and_excludes_demonstrations(tiny_model):
    task = tiny_task().with_prompt(template="{text}\n:")
    result = knn_prompting_baseline(tiny_model, task, shots=1, k=3, demo_max_tokens=14, batch_size=3)
    train, test = task.split("train"), task.split("test")
    demos = icl_demonstrations(task, shots=1, seed=42)
    keep = [i for i in range(len(train.texts)) if i not in demos]
    prefix = icl_prefix(tiny_model, task, shots=1, seed=42, demo_max_tokens=14)
    prompts = lambda texts: build_prompts(tiny_model, prefix + task.template, texts)[0]  # noqa: E731
    anchors = [torch.log_softmax(tiny_model.forward(tiny_model.tokenize([p]))[0, -1].double(), -1)
               for p in prompts([train.texts[i] for i in keep])]
    expected = []
    for q in prompts(test.texts):
        lq = torch.log_softmax(tiny_model.forward(tiny_model.tokenize([q]))[0, -1].double(), -1)
        kl = torch.stack([(a.exp() * (a - lq)).sum() for a in anchors])
        nearest = kl.argsort(stable=True)[:3]
        expected.append(int(torch.bincount(train.y[keep][nearest], minlength=2).argmax()))
    assert result.predictions.tolist() == expected
    assert result.method == "knn-prompting" and result.details["n_anchors"] == len(train.texts) - 2
    assert result.accuracy == pytest.approx(float((torch.tensor(expected) == test.y).double().mean()))
    (via_runner,) = run_baselines(tiny_model, task, "kp")
    assert via_runner.method == "knn-prompting"


def test_max_anchors_is_a_class_balanced_subsample_without_demonstrations(tiny_model):
    from vsem_lens.calibration.knn_prompting import _balanced_subsample

    labels = ["a"] * 6 + ["b"] * 3
    picked = _balanced_subsample(list(range(9)), labels, 5, seed=0)
    assert len(picked) == 5 and sum(labels[i] == "b" for i in picked) == 2  # turns: a, b, a, b, a
    assert picked == _balanced_subsample(list(range(9)), labels, 5, seed=0)
    task = tiny_task().with_prompt(template="{text}\n:")
    result = knn_prompting_baseline(tiny_model, task, shots=1, k=1, demo_max_tokens=14, max_anchors=4)
    assert result.details["n_anchors"] == 4
