"""`vsem-lens isotropy` and `vsem-lens basis` end to end on a tiny model saved as an HF directory."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import TINY_TEXTS

import vsem_lens as vl
from vsem_lens.cli import main


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(TINY_TEXTS) + "\n", encoding="utf-8")
    return path


def test_isotropy_cli_matches_the_python_api(tiny_model_dir, corpus, tmp_path, capsys):
    out = tmp_path / "iso.csv"
    rc = main(["isotropy", "--model", str(tiny_model_dir), "--corpus", str(corpus), "--frames", "raw",
               "--out", str(out), "--quiet"])
    assert rc == 0 and capsys.readouterr().out.strip() == str(out)
    table = pd.read_csv(out)
    model = vl.load_model(str(tiny_model_dir))
    expected = vl.isotropy_by_layer(model, TINY_TEXTS, frames="raw")
    assert list(table.layer) == list(expected.layer) == list(range(model.n_layers))
    assert torch.allclose(torch.tensor(table.isoscore.to_numpy()), torch.tensor(expected.isoscore.to_numpy()), atol=1e-9)
    assert (table.frame == "raw").all()


def test_isotropy_cli_prints_a_table(tiny_model_dir, corpus, capsys):
    assert main(["isotropy", "--model", str(tiny_model_dir), "--corpus", str(corpus), "--layers", "0,-1",
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "isoscore" in printed and len(printed.strip().splitlines()) == 1 + 2 * 2  # header + 2 layers x 2 frames


def test_basis_cli_saves_the_pseudoinverse(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "basis"
    assert main(["basis", "--model", str(tiny_model_dir), "--out", str(out), "--sample", "64",
                 "--words", "cat", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "semantic_basis" in printed and "unembedding" in printed and "cat" in printed
    model = vl.load_model(str(tiny_model_dir))
    saved = vl.SemanticBasis.load(out, model=model)
    reference = torch.linalg.pinv(model.W_U.double()).float()
    assert torch.allclose(saved.vectors, reference, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["isotropy", "--corpus", "{tmp}/missing.txt"], "missing.txt"),
        (["isotropy", "--layers", "0,x"], "--layers"),
        (["isotropy", "--frames", "diagonal"], "frame"),
        (["isotropy", "--batch-size", "0"], "--batch-size"),
        (["basis", "--frame", "diagonal"], "unknown frame"),
        (["basis", "--words", "cat,"], None),
        (["basis", "--sample", "-3"], "--sample"),
    ],
)
def test_cli_errors_are_one_clear_line(tiny_model_dir, corpus, tmp_path, capsys, argv, fragment):
    argv = [a.format(tmp=tmp_path) for a in argv] + ["--model", str(tiny_model_dir), "--quiet"]
    if argv[0] == "isotropy" and "--corpus" not in argv:
        argv += ["--corpus", str(corpus)]
    rc = main(argv)
    err = capsys.readouterr().err
    if fragment is None:  # a trailing comma is tolerated
        assert rc == 0
        return
    assert rc == 2 and err.startswith("vsem-lens: error:") and fragment in err and "Traceback" not in err
