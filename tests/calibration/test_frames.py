"""Every calibration analysis that reads an intermediate layer takes ``frame: str | Lens``: a custom lens gives
what transforming by hand gives, and the tuned frame (by name with ``lens=``, or a TunedLens object) is accepted."""

from __future__ import annotations

import pytest
import torch
from _tasks import tiny_task

import vsem_lens as vl
from vsem_lens.calibration import CalibratedModel, run_baselines
from vsem_lens.calibration.cosine_knn import cosine_knn_baseline
from vsem_lens.calibration.features import extract_features
from vsem_lens.calibration.threads import torch_threads
from vsem_lens.calibration.zero_shot import zero_shot_affinity
from vsem_lens.core.errors import ArtifactError, InputError
from vsem_lens.lenses import FinalNormLens, Lens, RawLens, TunedLens
from vsem_lens.lenses.frames import lens_identity

pytestmark = pytest.mark.filterwarnings("ignore:label word", "ignore:word")


class Affine(Lens):
    """``2 * final_norm(h) + 1``: elementwise increasing, so last token, mean and max all commute with it."""

    frame = "affine"

    def __init__(self, model):
        self.model = model

    def forward(self, h, layer):
        return 2 * self.model.final_norm(h) + 1


@pytest.fixture(autouse=True)
def _one_thread_private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VSEM_LENS_CACHE", str(tmp_path))  # no tuned lens cached, no shared feature files
    with torch_threads(1):
        yield


def _perturbed(model) -> TunedLens:
    lens = TunedLens.identity(model)
    return TunedLens(model, lens.weight, lens.bias + 0.1)


def test_features_through_a_custom_lens_equal_the_hand_transform(tiny_model):
    task = tiny_task().split("train")
    layer = 1
    plain = extract_features(tiny_model, task, layer=layer, frame="final_norm", cache=False, progress=False)
    raw = extract_features(tiny_model, task, layer=layer, frame="raw", cache=False, progress=False)
    lens = Affine(tiny_model)
    custom = extract_features(tiny_model, task, layer=layer, frame=lens, cache=False, progress=False)
    assert torch.allclose(custom.X, lens(raw.X, layer), atol=1e-5)
    for name in ("X", "X_mean", "X_max"):
        assert torch.allclose(getattr(custom, name), 2 * getattr(plain, name) + 1, atol=1e-5)
    assert torch.equal(custom.label_logits, plain.label_logits)  # the model's own logits: frame-independent
    assert custom.frame == "affine"
    with pytest.raises(InputError, match="cache=False"):
        extract_features(tiny_model, task, layer=layer, frame=lens, progress=False)


def test_features_in_the_tuned_frame(tiny_model):
    task = tiny_task().split("train")
    plain = extract_features(tiny_model, task, layer=1, progress=False)
    identity = TunedLens.identity(tiny_model)
    by_name = extract_features(tiny_model, task, layer=1, frame="tuned", lens=identity, progress=False)
    as_object = extract_features(tiny_model, task, layer=1, frame=identity, progress=False)
    assert torch.allclose(by_name.X, plain.X, atol=1e-5) and torch.equal(by_name.X, as_object.X)
    assert by_name.frame == as_object.frame == "tuned"
    assert by_name.key == as_object.key != plain.key  # cached under the lens's weights, not as final_norm
    other = extract_features(tiny_model, task, layer=1, frame=_perturbed(tiny_model), progress=False)
    assert other.key != by_name.key and not other.from_cache
    with pytest.raises(InputError, match="tuned lens"):
        extract_features(tiny_model, task, frame="tuned", progress=False)


def test_lens_identity():
    assert lens_identity(RawLens()) == "raw"
    assert lens_identity(FinalNormLens(None)) == "final_norm"


def test_calibrated_model_through_a_custom_lens(tiny_model, tmp_path):
    task = tiny_task()
    lens = Affine(tiny_model)
    cm = CalibratedModel.fit(tiny_model, task, layer=1, frame=lens, cache=False, progress=False, epochs=3)
    test = task.split("test")
    feats = extract_features(tiny_model, test, layer=1, frame=lens, cache=False, progress=False)
    expected = cm.head.predict_labels(feats.head_input("tokens"))
    assert cm.predict(test.texts) == expected
    assert cm.frame == "affine"
    with pytest.raises(InputError, match="custom lens"):
        cm.save(tmp_path / "head")


def test_calibrated_model_in_the_tuned_frame_saves_its_lens_identity(tiny_model, tmp_path):
    task = tiny_task()
    identity = TunedLens.identity(tiny_model)
    cm = CalibratedModel.fit(tiny_model, task, layer=1, frame=identity, progress=False, epochs=3)
    plain = CalibratedModel.fit(tiny_model, task, layer=1, progress=False, epochs=3)
    texts = task.split("test").texts
    assert torch.allclose(cm.predict_proba(texts), plain.predict_proba(texts), atol=1e-4)
    cm.save(tmp_path / "head")
    back = CalibratedModel.load(tmp_path / "head", model=tiny_model, lens=identity)
    assert back.frame == "tuned" and back.predict(texts) == cm.predict(texts)
    with pytest.raises(ArtifactError, match="another 'tuned' lens"):
        CalibratedModel.load(tmp_path / "head", model=tiny_model, lens=_perturbed(tiny_model))
    with pytest.raises(InputError, match="tuned lens"):
        CalibratedModel.load(tmp_path / "head", model=tiny_model)  # none given, none cached


def test_run_baselines_through_a_custom_lens_and_the_tuned_frame(tiny_model):
    task = tiny_task()
    lens = Affine(tiny_model)
    (knn,) = run_baselines(tiny_model, task, "knn", layer=1, frame=lens, cache=False)
    feats = {s: extract_features(tiny_model, task.split(s), layer=1, frame=lens, cache=False, progress=False)
             for s in ("train", "validation", "test")}
    by_hand = cosine_knn_baseline(feats["train"], task.split("train").y, feats["validation"], task.split("validation").y,
                           feats["test"], task.split("test").y, n_classes=task.n_classes)
    assert torch.equal(knn.predictions, by_hand.predictions) and knn.details["k"] == by_hand.details["k"]
    plain = run_baselines(tiny_model, task, "knn,probe", layer=1)
    tuned = run_baselines(tiny_model, task, "knn,probe", layer=1, frame="tuned", lens=TunedLens.identity(tiny_model))
    for a, b in zip(plain, tuned):
        assert a.accuracy == pytest.approx(b.accuracy)
    with pytest.raises(InputError, match="cache=False"):
        run_baselines(tiny_model, task, "knn", layer=1, frame=lens)


def test_affinity_still_needs_final_norm_features(tiny_model):
    feats = extract_features(tiny_model, tiny_task().split("test"), frame=vl.lenses.RawLens(), progress=False)
    with pytest.raises(InputError, match="final_norm"):
        zero_shot_affinity(feats, torch.eye(2, tiny_model.d_model), torch.zeros(len(feats), dtype=torch.long))
