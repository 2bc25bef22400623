"""Every command checks its output path before loading the model: a bad --out costs a second, not a run."""

from __future__ import annotations

import pytest

from vsem_lens.cli import common, main


@pytest.mark.parametrize(
    "command",
    [
        ["report"],
        ["basis"],
        ["isotropy"],
        ["lens", "train"],
        ["calibrate", "--task", "sentiment"],
        ["istar", "--task", "sentiment"],
    ],
    ids=lambda c: c[0] if c[0] != "lens" else "lens train",
)
def test_bad_out_fails_before_the_model_loads(command, tiny_model_dir, tmp_path, capsys, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(common, "load_model", no_load)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    rc = main([*command, "--model", str(tiny_model_dir), "--out", str(blocker / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot be written" in err and "Traceback" not in err
