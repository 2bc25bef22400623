"""Calibration heads, prompt features and the end-to-end classifier (tiny models; one embedded test)."""

from __future__ import annotations

import pytest
import torch
from _tasks import separable, tiny_task

import vsem_lens as vl
from vsem_lens.calibration import CalibratedModel, NeuralClusteringHead, classification_metrics
from vsem_lens.calibration.features import extract_features, label_token_ids
from vsem_lens.calibration.threads import torch_threads

pytestmark = pytest.mark.filterwarnings("ignore:label word")


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):  # tiny ops: one thread avoids OpenMP contention on the shared CPU
        yield


def _bases(k: int = 4, d: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(k, d, generator=torch.Generator().manual_seed(seed))


# -- the head ------------------------------------------------------------------------------------
def test_parameter_count_matches_the_paper_formula():
    d = 64
    assert NeuralClusteringHead(torch.eye(2, d)).n_parameters() == 33 * d * d // 8 + 2 * d  # + LayerNorm gain/bias
    head = NeuralClusteringHead(torch.eye(2, d))
    matrices = sum(p.numel() for p in head._build_module().parameters() if p.dim() == 2)
    assert matrices == 33 * d * d // 8
    assert NeuralClusteringHead(torch.eye(2, d), channel_attention=False).n_parameters() == 4 * d * d + 2 * d
    assert NeuralClusteringHead(torch.eye(2, d), head="prototype").n_parameters() == 8 * d * d


@pytest.mark.parametrize("kwargs, tokens", [({}, False), ({}, True), ({"channel_attention": False}, False),
                                             ({"head": "prototype"}, False)])
def test_head_separates_points_around_their_bases(kwargs, tokens):
    bases = _bases()
    X, y = separable(bases, 40, tokens=tokens)
    Xv, yv = separable(bases, 10, seed=1, tokens=tokens)
    Xt, yt = separable(bases, 25, seed=2, tokens=tokens)
    head = NeuralClusteringHead(bases, epochs=40, batch_size=32, **kwargs).fit(X, y, Xv, yv)
    assert head.score(Xt, yt) >= 0.98
    proba = head.predict_proba(Xt)
    assert torch.allclose(proba.sum(1), torch.ones(len(yt)), atol=1e-5)
    assert head.transform(Xt).shape == (len(yt), 32)
    assert head.history_ and head.best_epoch_ is not None


def test_prediction_is_argmax_cosine_to_the_fixed_bases():
    bases = _bases()
    X, y = separable(bases, 20)
    head = NeuralClusteringHead(bases, epochs=5, batch_size=32).fit(X, y)
    z = head.transform(X)
    cos = torch.nn.functional.normalize(z, dim=1) @ torch.nn.functional.normalize(bases, dim=1).T
    assert torch.equal(head.predict(X), cos.argmax(1))
    assert torch.equal(head.label_bases, bases)  # the centroids are never trained


def test_training_is_deterministic_and_seeded():
    bases = _bases()
    X, y = separable(bases, 20)
    a = NeuralClusteringHead(bases, epochs=6, batch_size=16).fit(X, y)
    b = NeuralClusteringHead(bases, epochs=6, batch_size=16).fit(X, y)
    c = NeuralClusteringHead(bases, epochs=6, batch_size=16, seed=7).fit(X, y)
    assert all(torch.equal(v, b._weights()[k]) for k, v in a._weights().items())
    assert not torch.equal(a._weights()["module.mlp.0.weight"], c._weights()["module.mlp.0.weight"])
    with torch.no_grad():  # fitting inside a caller's no_grad block trains the same head
        d = NeuralClusteringHead(bases, epochs=6, batch_size=16).fit(X, y)
    assert all(torch.equal(v, d._weights()[k]) for k, v in a._weights().items())


def test_save_load_round_trip(tmp_path):
    bases = _bases()
    X, y = separable(bases, 20, tokens=True)
    head = NeuralClusteringHead(bases, classes=list("abcd"), epochs=5, batch_size=16, metadata={"note": 1}).fit(X, y)
    head.save(tmp_path / "head")
    loaded = NeuralClusteringHead.load(tmp_path / "head")
    assert torch.equal(loaded.predict(X), head.predict(X))
    assert torch.equal(loaded.predict_proba(X), head.predict_proba(X))
    assert loaded.get_config() == head.get_config() and loaded.metadata == {"note": 1}
    assert loaded.predict_labels(X[:2]) == head.predict_labels(X[:2])
    assert sorted(p.name for p in (tmp_path / "head").iterdir()) == ["config.json", "weights.safetensors"]
    with pytest.raises(vl.core.ArtifactError, match="no saved head"):
        NeuralClusteringHead.load(tmp_path)
    (tmp_path / "head" / "weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(vl.core.ArtifactError, match="could not read"):
        NeuralClusteringHead.load(tmp_path / "head")


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("kwargs", [{}, {"head": "prototype", "learn_temperature": False}])
def test_resume_after_interruption_gives_identical_weights(tmp_path, kwargs):
    bases = _bases()
    X, y = separable(bases, 20, tokens=kwargs == {})
    Xv, yv = separable(bases, 5, seed=1, tokens=kwargs == {})
    settings = dict(epochs=8, batch_size=16, patience=3, **kwargs)
    full = NeuralClusteringHead(bases, **settings).fit(X, y, Xv, yv)

    def stop_after_3(epoch, record):
        if epoch == 3:
            raise _Interrupt

    first = NeuralClusteringHead(bases, checkpoint_dir=tmp_path / "ckpt", **settings)
    with pytest.raises(_Interrupt):
        first.fit(X, y, Xv, yv, callback=stop_after_3)
    resumed = NeuralClusteringHead(bases, checkpoint_dir=tmp_path / "ckpt", **settings).fit(X, y, Xv, yv)
    assert resumed.resumed_from_ == 3
    for key, value in full._weights().items():
        assert torch.equal(value, resumed._weights()[key]), key
    assert resumed.history_ == full.history_ and resumed.best_epoch_ == full.best_epoch_
    # A finished checkpoint resumes to the same result without training again.
    again = NeuralClusteringHead(bases, checkpoint_dir=tmp_path / "ckpt", **settings).fit(X, y, Xv, yv)
    assert torch.equal(again.predict(X), full.predict(X))
    # Another run's data in the same folder is refused (or restarted on request).
    with pytest.raises(vl.core.ArtifactError, match="another training run"):
        NeuralClusteringHead(bases, checkpoint_dir=tmp_path / "ckpt", **settings).fit(X[:-1], y[:-1], Xv, yv)
    NeuralClusteringHead(bases, checkpoint_dir=tmp_path / "ckpt", resume=False, **settings).fit(X[:-1], y[:-1])


def test_early_stopping_and_temperature():
    bases = _bases()
    X, y = separable(bases, 20, noise=0.05)
    head = NeuralClusteringHead(bases, epochs=200, batch_size=16, patience=2).fit(X, y, X, y)
    assert len(head.history_) < 200  # stops once validation accuracy stops improving
    fixed = NeuralClusteringHead(bases, epochs=3, temperature=0.1, learn_temperature=False).fit(X, y)
    assert abs(fixed.history_[-1]["temperature"] - 0.1) < 1e-6


def test_istar_regulariser_moves_isoscore_of_the_head_outputs_in_the_sign_of_lambda():
    from vsem_lens.geometry.metrics import isoscore  # tested against the isoscore package in tests/geometry

    bases = _bases()
    X, y = separable(bases, 20)
    iso = {}
    for weight in (0.0, 5.0, -5.0):  # same seed, data and schedule; only lambda differs
        head = NeuralClusteringHead(bases, epochs=15, batch_size=16, istar_weight=weight, istar_zeta=0.2).fit(X, y)
        assert head.score(X, y) == 1.0  # the regulariser does not break the classification
        iso[weight] = isoscore(head.transform(X))
    # lambda > 0 penalises 1 - IsoScore*: more isotropic outputs; lambda < 0 the reverse (measured: 0.44, 0.10, 0.01)
    assert iso[5.0] > 2 * iso[0.0] and iso[-5.0] < 0.5 * iso[0.0]


def test_matmul_similarity_uses_dot_products_with_the_bases():
    bases = _bases() * torch.tensor([[1.0], [3.0], [0.5], [2.0]])  # unequal norms: matmul and cosine differ
    X, y = separable(bases, 20)
    cos_head = NeuralClusteringHead(bases, epochs=3, batch_size=16).fit(X, y)
    dot_head = NeuralClusteringHead(bases, epochs=3, batch_size=16, similarity="matmul").fit(X, y)
    for head in (cos_head, dot_head):
        z = head.transform(X).double()
        if head.similarity == "matmul":
            expected = z @ bases.double().T
        else:
            expected = (z / z.norm(dim=1, keepdim=True)) @ (bases / bases.norm(dim=1, keepdim=True)).double().T
        assert torch.allclose(head.decision_function(X).double(), expected, atol=1e-5)
        scale = float(head.log_scale_.detach().exp().clamp(max=100.0))
        assert torch.allclose(head.predict_proba(X).double(), torch.softmax(scale * expected, dim=1), atol=1e-5)
        assert torch.equal(head.predict(X), expected.argmax(1))
    # the same seed gives the same initial module, so the difference comes from the score alone
    first = NeuralClusteringHead(bases, epochs=1, lr=1e-12, similarity="matmul").fit(X, y)
    assert not torch.allclose(first.decision_function(X), cos_head.decision_function(X))
    assert dot_head.get_config()["similarity"] == "matmul"
    with pytest.raises(vl.core.InputError, match="similarity"):
        NeuralClusteringHead(bases, similarity="euclid")


def test_bad_inputs_raise_clear_errors():
    bases = _bases()
    X, y = separable(bases, 5)
    with pytest.raises(vl.core.InputError, match="label_bases"):
        NeuralClusteringHead(torch.zeros(1, 4))
    with pytest.raises(vl.core.NumericalError):
        NeuralClusteringHead(torch.zeros(2, 4))
    with pytest.raises(vl.core.InputError, match="unknown head"):
        NeuralClusteringHead(bases, head="mlp")
    with pytest.raises(vl.core.InputError, match="epochs"):
        NeuralClusteringHead(bases, epochs=0)
    with pytest.raises(vl.core.InputError, match="classes"):
        NeuralClusteringHead(bases, classes=["a", "b"])
    head = NeuralClusteringHead(bases, epochs=1)
    with pytest.raises(vl.core.InputError, match="not fitted"):
        head.predict(X)
    with pytest.raises(vl.core.InputError, match=r"must be \[n, 32\]"):
        head.fit(X[:, :5], y)
    with pytest.raises(vl.core.InputError, match="class index"):
        head.fit(X, y + 10)
    with pytest.raises(vl.core.InputError, match="labels for"):
        head.fit(X, y[:-1])
    with pytest.raises(vl.core.InputError, match="both X_val and y_val"):
        head.fit(X, y, X)
    head.fit(X, y)
    with pytest.raises(vl.core.InputError, match="fitted on"):
        head.predict(torch.stack([X, X, X], dim=1))
    with pytest.raises(vl.core.NumericalError, match="NaN"):
        head.predict(X * float("nan"))


def test_metrics():
    m = classification_metrics([0, 1, 2, 2], [0, 2, 2, 2], 3)
    assert m["accuracy"] == 0.75
    assert abs(m["macro_f1"] - (1.0 + 0.0 + 0.8) / 3) < 1e-12


# -- features ------------------------------------------------------------------------------------
def _count_forwards(model):
    calls = []
    handle = model.bridge.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls, handle


def test_features_match_the_model_and_are_cached(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("VSEM_LENS_CACHE", str(tmp_path))  # an empty cache: other tests extract the same task
    task = tiny_task().split("train")
    calls, handle = _count_forwards(tiny_model)
    try:
        first = extract_features(tiny_model, task, batch_size=5, progress=False)
        n_calls = len(calls)
        assert n_calls == 3 and not first.from_cache
        again = extract_features(tiny_model, task, batch_size=5, progress=False)
        assert len(calls) == n_calls and again.from_cache  # cache hit: no forward pass
        assert torch.equal(again.X, first.X) and torch.equal(again.label_logits, first.label_logits)
        assert again.seconds == pytest.approx(first.seconds, abs=1e-5)
        other = extract_features(tiny_model, task, layer=0, frame="raw", progress=False)
        assert len(calls) > n_calls and other.key != first.key
    finally:
        handle.remove()
    # The same numbers as a plain forward: last real token, final norm, label-token logits.
    tokens = tiny_model.tokenize(task.prompts())
    logits = tiny_model.forward(tokens)
    last = tokens.mask.sum(1) - 1
    ids = label_token_ids(tiny_model, task.label_words)
    rows = torch.arange(len(task))
    assert torch.allclose(first.label_logits, logits[rows, last][:, ids], atol=1e-4)
    acts = vl.capture(tiny_model, task.prompts(), layers=[0, tiny_model.n_layers - 1])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), tokens.lengths.cumsum(0)[:-1]])
    h_last = acts.layer("resid_post", tiny_model.n_layers - 1)[offsets + last]
    assert torch.allclose(first.X, tiny_model.final_norm(h_last), atol=1e-5)
    h0 = acts.layer("resid_post", 0)
    assert torch.allclose(other.X, h0[offsets + last], atol=1e-5)
    means = torch.stack([h0[o : o + n].mean(0) for o, n in zip(offsets.tolist(), tokens.lengths.tolist())])
    assert torch.allclose(other.X_mean, means, atol=1e-5)
    maxima = torch.stack([h0[o : o + n].amax(0) for o, n in zip(offsets.tolist(), tokens.lengths.tolist())])
    assert torch.equal(other.X_max, maxima)
    assert first.head_input("tokens").shape == (len(task), 3, tiny_model.d_model)


def test_feature_cache_key_tracks_bos_template_and_texts(tiny_model):
    from vsem_lens.calibration.features import feature_key

    task = tiny_task()
    ids = label_token_ids(tiny_model, task.label_words)
    base = feature_key(tiny_model, "t", task.texts, task.template, ids, 2, "final_norm", None)
    assert base != feature_key(tiny_model, "t", task.texts[:-1], task.template, ids, 2, "final_norm", None)
    assert base != feature_key(tiny_model, "t", task.texts, "X {text}", ids, 2, "final_norm", None)
    tiny_model.prepend_bos = True
    try:
        assert base != feature_key(tiny_model, "t", task.texts, task.template, ids, 2, "final_norm", None)
    finally:
        tiny_model.prepend_bos = False


def test_feature_errors(tiny_model):
    task = tiny_task()
    with pytest.raises(vl.core.InputError, match="frame"):
        extract_features(tiny_model, task, frame="tuned")
    with pytest.raises(vl.core.InputError, match="out of range"):
        extract_features(tiny_model, task, layer=99)
    with pytest.raises(vl.core.InputError, match="TextClassificationTask"):
        extract_features(tiny_model, ["text"])
    with pytest.raises(vl.core.InputError, match="empty"):
        extract_features(tiny_model, task, texts=["ok", " "])


def test_long_texts_are_shortened_keeping_the_template(tiny_model):
    from vsem_lens.calibration.features import build_prompts

    long = " ".join(["The cat sat on the mat."] * 40)
    prompts, shortened = build_prompts(tiny_model, "Text: {text}\nLabel:", [long, "short"], max_length=40)
    assert shortened == 1 and prompts[0].endswith("...\nLabel:") and prompts[1] == "Text: short\nLabel:"
    assert tiny_model.tokenize(prompts[0]).lengths[0] <= 40


# -- end to end ----------------------------------------------------------------------------------
def test_calibrated_model_end_to_end(tiny_model, tmp_path):
    task = tiny_task()
    cm = CalibratedModel.fit(tiny_model, task, epochs=5, batch_size=8, progress=False)
    texts = ["A cat on the mat.", "Apples and pears."]
    labels = cm.predict(texts)
    assert set(labels) <= {"animal", "food"} and len(labels) == 2
    assert cm.representation(texts).shape == (2, tiny_model.d_model)
    test = task.split("test")
    metrics = cm.evaluate(test)
    by_hand = sum(p == t for p, t in zip(cm.predict(test.texts), test.labels)) / len(test.labels)
    assert metrics["accuracy"] == pytest.approx(by_hand)
    # the representation is the head applied to the features of the same prompt
    feats = extract_features(tiny_model, task.split("test").subset([0, 1]), cache=False, progress=False)
    assert torch.allclose(cm.representation(test.texts[:2]), cm.head.transform(feats.head_input(cm.pool)), atol=1e-5)
    cm.save(tmp_path / "head")
    loaded = CalibratedModel.load(tmp_path / "head", model=tiny_model)
    assert loaded.predict(texts) == labels and loaded.layer == tiny_model.n_layers - 1
    assert torch.equal(loaded.predict_proba(texts), cm.predict_proba(texts))


def test_cli_calibrate_and_classify(tiny_model, tiny_model_dir, tmp_path, capsys):
    from vsem_lens.cli import main

    model_dir = tiny_model_dir
    task = tiny_task()
    data = tmp_path / "tiny.jsonl"
    import json

    data.write_text("\n".join(json.dumps({"text": t, "label": lab, "split": s})
                              for t, lab, s in zip(task.texts, task.labels, task.splits)))
    out = tmp_path / "run"
    code = main(["calibrate", "--task", str(data), "--split-column", "split", "--model", str(model_dir),
                 "--verbalizer", "animal=cat,food=apples", "--template", "Text: {text}\\nLabel:", "--epochs", "3",
                 "--baselines", "zero-shot,affinity,knn,probe", "--out", str(out), "--quiet"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split_sizes"] == {"train": 12, "validation": 6, "test": 8}
    assert [b["method"] for b in metrics["baselines"]] == ["zero-shot", "affinity", "cosine-knn", "probe"]
    import pandas as pd

    table = pd.read_csv(out / "baselines.csv")
    assert table["method"].tolist()[0] == "head:clustering"
    # the zero-shot row equals an independent argmax of the model's logits over the label tokens
    test = task.split("test")
    ids = label_token_ids(tiny_model, task.label_words)
    prompts = [f"Text: {t}\nLabel:" for t in test.texts]
    pred = [int(tiny_model.forward(tiny_model.tokenize([p]))[0, -1, ids].argmax()) for p in prompts]
    expected = sum(int(p == t) for p, t in zip(pred, test.y.tolist())) / len(pred)
    assert table.set_index("method").loc["zero-shot", "accuracy"] == pytest.approx(expected)
    assert not (out / "checkpoint").exists()
    capsys.readouterr()
    assert main(["classify", "--head", str(out), "--json", "The cat sat.", "Three apples."]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [set(r["probabilities"]) for r in rows] == [{"animal", "food"}] * 2
    # --model overrides the recorded model spec (same weights): the same probabilities.
    assert main(["classify", "--head", str(out), "--model", str(model_dir), "--json", "The cat sat.", "Three apples."]) == 0
    assert json.loads(capsys.readouterr().out) == rows
    assert main(["classify", "--head", str(tmp_path), "text"]) == 2
    assert main(["calibrate", "--task", str(data), "--baselines", "bogus", "--out", str(out)]) == 2


# -- the embedded model ---------------------------------------------------------------------------
@pytest.mark.embedded
def test_embedded_head_beats_affinity_zero_shot(embedded):
    """A head on a small slice (48 train / 16 validation / 48 test) of the embedded sentiment task.

    What is true and meaningful on SmolLM2-135M (analyses/semantic_calibration/README.md): cosine
    affinity to the two label bases is at chance (0.50 on this slice: every example gets the same
    label) because the prompts' shared component dominates it after whitening; the model's matmul
    logits are good (0.92 here); a head trained on 48 examples (0.88-0.96 over seeds 42, 1, 2; 0.88-0.94
    on topic) beats affinity by a wide margin and matches the matmul zero-shot within a small
    tolerance, i.e. training recovers what the cosine readout loses. The same thresholds hold on topic.
    """
    from vsem_lens.calibration import load_task
    from vsem_lens.calibration.zero_shot import zero_shot_affinity, zero_shot_matmul

    task = load_task("sentiment")
    parts = {}
    for split, n in (("train", 48), ("validation", 16), ("test", 48)):
        part = task.split(split)
        per_class = n // task.n_classes
        keep = [i for c in task.label_names for i in [j for j, lab in enumerate(part.labels) if lab == c][:per_class]]
        parts[split] = part.subset(keep)
    feats = {s: extract_features(embedded, t, progress=False) for s, t in parts.items()}
    bases = vl.SemanticBasis.from_model(embedded).for_words(task.label_words)
    head = NeuralClusteringHead(bases, classes=task.label_names, epochs=60, batch_size=16)
    head.fit(feats["train"].head_input(), parts["train"].y, feats["validation"].head_input(), parts["validation"].y)
    calibrated = head.score(feats["test"].head_input(), parts["test"].y)
    affinity = zero_shot_affinity(feats["test"], bases, parts["test"].y).accuracy
    matmul = zero_shot_matmul(feats["test"], parts["test"].y).accuracy
    chance = 1.0 / task.n_classes
    assert affinity < chance + 0.25  # the documented failure of raw cosine affinity on this model
    assert calibrated >= affinity + 0.3
    assert calibrated >= matmul - 0.1
