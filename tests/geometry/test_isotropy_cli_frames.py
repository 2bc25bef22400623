"""`vsem-lens isotropy --frames tuned` reads the cached tuned lens of the model, like the Python API."""

from __future__ import annotations

import pandas as pd
import torch
from conftest import TINY_TEXTS

import vsem_lens as vl
from vsem_lens.cli import main
from vsem_lens.lenses.tuned import TunedLens, tuned_lens_cache_path


def test_isotropy_cli_tuned_frame(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VSEM_LENS_CACHE", str(tmp_path / "cache"))
    model = vl.load_model(str(tiny_model_dir))
    gen = torch.Generator().manual_seed(5)
    n_tr, d = model.n_layers - 1, model.d_model
    lens = TunedLens(model, 0.3 * torch.randn(n_tr, d, d, generator=gen), 0.3 * torch.randn(n_tr, d, generator=gen))
    lens.save(tuned_lens_cache_path(model))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TINY_TEXTS) + "\n", encoding="utf-8")
    out = tmp_path / "iso.csv"
    rc = main(["isotropy", "--model", str(tiny_model_dir), "--corpus", str(corpus), "--frames", "raw,tuned",
               "--out", str(out), "--quiet"])
    assert rc == 0 and capsys.readouterr().out.strip() == str(out)
    table = pd.read_csv(out)
    expected = vl.isotropy_by_layer(model, TINY_TEXTS, frames=("raw", lens))
    assert list(table.frame) == list(expected.frame) and set(table.frame) == {"raw", "tuned"}
    assert torch.allclose(torch.tensor(table.isoscore.to_numpy()), torch.tensor(expected.isoscore.to_numpy()), atol=1e-9)
