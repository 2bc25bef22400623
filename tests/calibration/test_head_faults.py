"""Faults of saved heads: damaged weights are refused, classify never prints NaN, a head never picks a download."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from _tasks import separable, tiny_task
from safetensors.torch import load_file, save_file

import vsem_lens as vl
from vsem_lens.calibration import CalibratedModel, NeuralClusteringHead
from vsem_lens.cli import main


@pytest.fixture(scope="module")
def saved_run(tiny_model_dir, tmp_path_factory):
    """A `vsem-lens calibrate` output folder on the tiny model."""
    task = tiny_task()
    root = tmp_path_factory.mktemp("calibrate")
    data = root / "tiny.jsonl"
    data.write_text("\n".join(json.dumps({"text": t, "label": lab, "split": s})
                              for t, lab, s in zip(task.texts, task.labels, task.splits)))
    out = root / "run"
    assert main(["calibrate", "--task", str(data), "--split-column", "split", "--model", str(tiny_model_dir),
                 "--verbalizer", "animal=cat,food=apples", "--template", "Text: {text}\\nLabel:", "--epochs", "2",
                 "--baselines", "zero-shot", "--out", str(out), "--quiet"]) == 0
    return out


@pytest.mark.parametrize("fault,message", [("nan", "non-finite"), ("edit", "digest")])
def test_damaged_head_weights_are_refused(tmp_path, fault, message):
    bases = torch.nn.functional.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    X, y = separable(bases, 10)
    NeuralClusteringHead(bases, epochs=2, batch_size=8).fit(X, y).save(tmp_path / "head")
    weights = load_file(str(tmp_path / "head" / "weights.safetensors"))
    name = next(k for k in weights if k != "label_bases" and weights[k].is_floating_point() and weights[k].numel() > 1)
    weights[name].view(-1)[0] = float("nan") if fault == "nan" else weights[name].view(-1)[0] + 0.01
    save_file(weights, str(tmp_path / "head" / "weights.safetensors"))
    with pytest.raises(vl.core.ArtifactError, match=message):
        NeuralClusteringHead.load(tmp_path / "head")


def test_classify_json_never_prints_nan(saved_run, capsys, monkeypatch):
    monkeypatch.setattr(CalibratedModel, "predict_proba", lambda self, texts: torch.full((len(texts), 2), float("nan")))
    capsys.readouterr()
    assert main(["classify", "--head", str(saved_run), "--json", "The cat sat."]) == 2
    captured = capsys.readouterr()
    assert "NaN" not in captured.out and "non-finite probabilities" in captured.err


def test_a_head_never_makes_vsem_lens_download_a_model(saved_run, tmp_path, capsys, monkeypatch):
    import shutil

    head = tmp_path / "head"
    shutil.copytree(saved_run / "head", head)
    config = json.loads((head / "config.json").read_text())
    config["metadata"]["model"] = "someone/not-on-this-machine"
    (head / "config.json").write_text(json.dumps(config))

    def refuse(*args, **kwargs):
        raise AssertionError("a model named by a head folder was fetched from the network")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    capsys.readouterr()
    assert main(["classify", "--head", str(head), "The cat sat."]) == 2
    err = capsys.readouterr().err
    assert "named by a saved artifact" in err and "Traceback" not in err


def test_a_damaged_feature_cache_is_recomputed(tiny_model, tmp_path, monkeypatch):
    from vsem_lens.calibration.features import extract_features

    monkeypatch.setenv("VSEM_LENS_CACHE", str(tmp_path))
    task = tiny_task().split("train")
    first = extract_features(tiny_model, task, progress=False)
    (entry,) = list(tmp_path.rglob("*.safetensors"))
    from safetensors import safe_open

    with safe_open(str(entry), framework="pt") as handle:
        meta = handle.metadata()
    tensors = load_file(str(entry))
    tensors["X"][0, 0] += 1.0  # finite and plausible, but not what the model computes
    save_file(tensors, str(entry), metadata=meta)
    with pytest.warns(UserWarning, match="recomputing features: .*digest"):
        again = extract_features(tiny_model, task, progress=False)
    assert not again.from_cache and torch.equal(again.X, first.X)
