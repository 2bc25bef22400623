"""Device and dtype: strings are checked against this machine, and the weights really go where asked."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_hf

import vsem_lens as vl
from vsem_lens.core import loading
from vsem_lens.core.devices import check_device, check_dtype, same_device
from vsem_lens.core.errors import InputError, ModelLoadError


@pytest.mark.parametrize("bad", ["tpu", "nonsense:7", "", "cpu:x", 3, None, True, "meta"])
def test_bad_device_strings_are_input_errors(bad):
    with pytest.raises(InputError, match="device"):
        check_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("absent", ["cuda", "cuda:0", "mps"])
def test_absent_backend_says_so(absent):
    with pytest.raises(InputError, match="no (cuda|mps) device is available here"):
        check_device(absent)


def test_device_index_beyond_the_count():
    with pytest.raises(InputError, match="1 cpu device"):
        check_device("cpu:1")
    assert check_device("cpu:0") == torch.device("cpu", 0)


def test_same_device_rules():
    assert same_device(torch.device("cpu"), torch.device("cpu:0"))
    assert same_device(torch.device("cuda", 1), torch.device("cuda"))
    assert not same_device(torch.device("cuda", 1), torch.device("cuda", 0))
    assert not same_device(torch.device("cpu"), torch.device("cuda"))


@pytest.mark.parametrize("spec,expected", [("bf16", torch.bfloat16), ("float16", torch.float16), (torch.float64, torch.float64)])
def test_check_dtype(spec, expected):
    assert check_dtype(spec) == expected


@pytest.mark.parametrize("bad", ["int8", torch.int64, 32, None])
def test_bad_dtype(bad):
    with pytest.raises(InputError, match="dtype"):
        check_dtype(bad)


def _params(model):
    return list(model.parameters())


def test_pair_is_converted_to_the_requested_dtype(tiny_tokenizer):
    model = vl.load_model((make_tiny_hf(tiny_tokenizer), tiny_tokenizer), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert {p.dtype for p in _params(model) if p.is_floating_point()} == {torch.bfloat16}
    acts = vl.capture(model, ["hello world"], sites=("resid_post",))
    assert acts.layer("resid_post", 0).dtype == torch.bfloat16


def test_pair_keeps_its_own_dtype_by_default(tiny_tokenizer):
    hf = make_tiny_hf(tiny_tokenizer).to(torch.float64)
    model = vl.load_model((hf, tiny_tokenizer))
    assert model.dtype == torch.float64


@pytest.mark.parametrize("device", ["meta", "nonsense:7"])
def test_load_model_refuses_bad_devices_before_work(tiny_tokenizer, device):
    with pytest.raises(InputError):
        vl.load_model((make_tiny_hf(tiny_tokenizer), tiny_tokenizer), device=device)


def test_placement_is_checked_after_booting(tiny_tokenizer, monkeypatch):
    # A model that stays in float64 while float32 was asked for must not pass as float32.
    monkeypatch.setattr(loading, "_place", lambda hf_model, device, dtype: (torch.device("cpu"), torch.float32))
    hf = make_tiny_hf(tiny_tokenizer).to(torch.float64)
    with pytest.raises(ModelLoadError, match="after loading"):
        vl.load_model((hf, tiny_tokenizer), dtype=torch.float32)


def test_device_and_placement_together_are_refused(tiny_model_dir):
    with pytest.raises(ModelLoadError, match="not both"):
        vl.load_model(str(tiny_model_dir), device="cpu", device_map="cpu")


@pytest.mark.parametrize("command", [["report", "--out", "REPORT"], ["isotropy"], ["basis", "--out", "BASIS"]])
@pytest.mark.parametrize("device", ["nonsense:7", "tpu", "meta"])
def test_commands_refuse_a_bad_device_before_loading(tiny_model_dir, tmp_path, capsys, monkeypatch, command, device):
    from vsem_lens.cli import common, main

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the device was checked")

    monkeypatch.setattr(common, "load_model", no_load)
    argv = [part.replace("REPORT", str(tmp_path / "r")).replace("BASIS", str(tmp_path / "b")) for part in command]
    assert main([*argv, "--model", str(tiny_model_dir), "--device", device]) != 0
    err = capsys.readouterr().err
    assert "--device" in err and "Traceback" not in err


def test_commands_say_where_the_model_runs(tiny_model_dir, tmp_path, capsys):
    from vsem_lens.cli import main

    assert main(["basis", "--model", str(tiny_model_dir), "--out", str(tmp_path / "b"), "--sample", "16"]) == 0
    assert "on cpu, float32" in capsys.readouterr().err
