"""Fault sweep: corrupt each kind of artifact vsem-lens caches or saves, in turn; every one ends in a clear
error or a rebuild, never in a wrong number.

Each artifact is damaged the same two ways: a NaN written into a tensor, and a finite, plausible change
of one value (the dangerous one: nothing but a content check can see it).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import TINY_TEXTS
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import vsem_lens as vl
from vsem_lens.core.errors import ArtifactError
from vsem_lens.report.build import build_report

FAULTS = {
    "nan": lambda t: t.view(-1).__setitem__(0, float("nan")),
    "nudge": lambda t: t.view(-1).__setitem__(0, t.view(-1)[0] + 0.125),
}


def _damage_safetensors(path, fault):
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    tensors = load_file(str(path))
    name = max((k for k in tensors if tensors[k].is_floating_point()), key=lambda k: tensors[k].numel())
    FAULTS[fault](tensors[name])
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("fault", FAULTS)
def test_basis(tiny_model, tmp_path, fault):
    saved = vl.SemanticBasis.from_model(tiny_model, cache=False).save(tmp_path / "basis")
    _damage_safetensors(saved / "basis.safetensors", fault)
    with pytest.raises(ArtifactError):
        vl.SemanticBasis.load(saved, model=tiny_model)


@pytest.mark.parametrize("fault", FAULTS)
def test_tuned_lens(tiny_model, tmp_path, fault):
    lens = vl.TunedLens.fit(tiny_model, TINY_TEXTS, steps=2, tokens_per_step=32, progress=False)
    saved = lens.save(tmp_path / "lens")
    _damage_safetensors(saved / "weights.safetensors", fault)
    with pytest.raises(ArtifactError):
        vl.TunedLens.load(saved, model=tiny_model)


@pytest.mark.parametrize("fault", FAULTS)
def test_report_checkpoint_is_ignored_not_resumed(tiny_model, tmp_path, fault):
    ckpt = tmp_path / "ckpt"
    clean = build_report(tiny_model, TINY_TEXTS, lens_tokens=20, checkpoint_dir=ckpt, progress=False)
    (path,) = list(ckpt.rglob("*.pt"))
    payload = torch.load(path, weights_only=True)
    isotropy = payload["stats"]["isotropy"]
    tensor = next(v for v in _tensors(isotropy) if v.is_floating_point() and v.numel() > 1)
    FAULTS[fault](tensor)
    torch.save(payload, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = build_report(tiny_model, TINY_TEXTS, lens_tokens=20, checkpoint_dir=ckpt, progress=False)
    assert any("damaged checkpoint" in str(w.message) for w in caught)
    assert again.tables["isotropy"]["isoscore"].equals(clean.tables["isotropy"]["isoscore"])


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
