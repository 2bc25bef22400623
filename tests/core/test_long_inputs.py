"""Long inputs: SDPA attention in captures (equal to eager and to plain HF), truncation announced or
refused, the memory estimate and its warning, out-of-memory errors that name the flags to lower."""

from __future__ import annotations

import importlib
import types
import warnings

import pytest
import torch
from architectures import ARCHITECTURES
from conftest import TINY_TEXTS, make_tiny_hf

import vsem_lens as vl
from vsem_lens.core import memory
from vsem_lens.core.attention import sdpa_attention, supports_sdpa
from vsem_lens.core.errors import InputError, MemoryLimitError

BY_NAME = {spec.name: spec for spec in ARCHITECTURES}
SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out")
#: What the CPU allocator raises when an allocation fails (torch 2.x, Linux).
CPU_OOM = (
    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to "
    "allocate 9663676416 bytes. Error code 12 (Cannot allocate memory)"
)


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Counts calls of torch's SDPA kernel (what HF's "sdpa" attention runs)."""
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    return calls


# llama: the SmolLM2 architecture (the bridge recomputes attention); gpt2: fused QKV; gpt_neox:
# parallel residual, partial rotary; qwen3: QK norm, an adapter that asks for eager; gemma2: no SDPA
# kernel in transformers, stays eager.
@pytest.mark.parametrize("name", ["llama", "gpt2", "gpt_neox", "qwen3", "gemma2"])
def test_sdpa_capture_equals_eager_and_hf(name, tiny_tokenizer, sdpa_calls):
    hf, reference = BY_NAME[name].build(tiny_tokenizer), BY_NAME[name].build(tiny_tokenizer)
    model = vl.load_model((hf, tiny_tokenizer))
    texts = TINY_TEXTS[:4]  # different lengths: the batch is right-padded
    eager = vl.capture(model, texts, sites=SITES, batch_size=4, attention="eager")
    assert not sdpa_calls
    fast = vl.capture(model, texts, sites=SITES, batch_size=4)
    assert bool(sdpa_calls) == (name != "gemma2") == supports_sdpa(model)
    for site in SITES:
        torch.testing.assert_close(fast[site], eager[site], rtol=0, atol=1e-5)
    # Against plain HF (its default attention, SDPA where it has it), text by text without padding.
    for doc, text in enumerate(texts):
        tokens = model.tokenize(text)
        with torch.no_grad():
            hidden = reference(tokens.ids, output_hidden_states=True).hidden_states
        rows = torch.tensor((fast.tokens.doc == doc).to_numpy())
        for layer in range(model.n_layers - 1):  # HF's last hidden state is after the final norm
            torch.testing.assert_close(fast["resid_post"][layer][rows], hidden[layer + 1][0], rtol=0, atol=1e-5)
    # Nothing of the switch survives the call: the bridge's attention and HF's eager mode are back.
    assert hf.config._attn_implementation == "eager"
    assert not any("forward" in module.__dict__ for module in model.bridge.modules())


def test_logits_use_sdpa_and_equal_hf_with_gradients(tiny_tokenizer, sdpa_calls):
    """HookedModel.logits (minimal pairs, FTGD, I-STAR) runs SDPA too, with autograd, and equals HF."""
    hf, reference = BY_NAME["llama"].build(tiny_tokenizer), BY_NAME["llama"].build(tiny_tokenizer)
    model = vl.load_model((hf, tiny_tokenizer))
    tokens = model.tokenize(TINY_TEXTS[:3])
    with torch.enable_grad():
        logits = model.logits(tokens)
        logits.sum().backward()
    assert sdpa_calls and logits.requires_grad
    assert any(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        expected = reference(tokens.ids, attention_mask=tokens.mask).logits
    mask = tokens.mask.bool()
    torch.testing.assert_close(logits.detach()[mask], expected[mask], rtol=0, atol=1e-4)
    assert hf.config._attn_implementation == "eager"


def test_sdpa_is_undone_when_the_forward_fails(tiny_model, tiny_hf):
    with pytest.raises(ZeroDivisionError), sdpa_attention(tiny_model) as active:
        assert active and tiny_hf.config._attn_implementation == "sdpa"
        raise ZeroDivisionError
    assert tiny_hf.config._attn_implementation == "eager"
    assert not any("forward" in module.__dict__ for module in tiny_model.bridge.modules())


def test_attention_argument_is_checked(tiny_model):
    with pytest.raises(InputError, match="attention must be one of sdpa, eager"):
        vl.capture(tiny_model, "Hello", attention="flash")


# ---------------------------------------------------------------------------------- truncation


def test_truncation_is_announced_with_counts(tiny_model, tiny_tokenizer):
    lengths = [len(tiny_tokenizer(text)["input_ids"]) for text in TINY_TEXTS]
    limit = sorted(lengths)[2]
    n_cut = sum(n > limit for n in lengths)
    dropped = sum(n - limit for n in lengths if n > limit)
    assert 0 < n_cut < len(TINY_TEXTS)
    with pytest.warns(UserWarning) as caught:
        acts = vl.capture(tiny_model, TINY_TEXTS, max_length=limit, batch_size=2)
    notices = [str(w.message) for w in caught if "max_length" in str(w.message)]
    assert notices == [
        f"{n_cut} of {len(TINY_TEXTS)} texts were longer than max_length={limit} tokens and were cut to it: "
        f"{dropped:,} tokens dropped."
    ]
    assert len(acts.tokens) == sum(min(n, limit) for n in lengths)


def test_no_notice_when_nothing_is_cut(tiny_model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vl.capture(tiny_model, TINY_TEXTS, max_length=tiny_model.n_ctx)


def test_text_longer_than_the_context_is_refused_without_max_length(tiny_model):
    long_text = " ".join(TINY_TEXTS * 20)
    with pytest.raises(InputError, match=r"more than the model's context of 64; split it, or pass max_length=64"):
        vl.capture(tiny_model, ["Hello", long_text])


def test_max_length_is_validated(tiny_model):
    with pytest.raises(InputError, match="max_length must be a positive integer"):
        vl.capture(tiny_model, "Hello", max_length=2.5)


# ---------------------------------------------------------------------------------- memory


def _smollm2_like():
    """A stand-in with SmolLM2-135M's shapes (only what the estimate reads)."""
    cfg = types.SimpleNamespace(n_heads=9, d_mlp=1536)
    return types.SimpleNamespace(bridge=types.SimpleNamespace(cfg=cfg), dtype=torch.float32, d_model=576, d_vocab=49152)


def test_estimate_matches_the_measured_peaks_on_smollm2():
    """Peak RSS growth measured by benchmarks/bench_long_input.py on SmolLM2 (all 30 layers' resid_post,
    one text): 896 MiB with SDPA at 8,192 tokens, 2,042 MiB with eager attention at 4,096 tokens."""
    model = _smollm2_like()
    sdpa = memory.capture_memory(model, 1, 8192, n_tokens=8192, n_buffers=30, attention="sdpa")
    eager = memory.capture_memory(model, 1, 4096, n_tokens=4096, n_buffers=30, attention="eager")
    assert sdpa["total"] / 2**20 == pytest.approx(896, rel=0.15)
    assert eager["total"] / 2**20 == pytest.approx(2042, rel=0.15)
    # The 4 x 9k-token batch (cut to the 8,192-token context) asked for 9.7 GB for one matrix.
    four = memory.capture_memory(model, 4, 8192, n_tokens=4 * 8192, n_buffers=30, attention="eager")
    assert four["attention"] > 3 * 9.6e9


def test_warning_before_a_batch_that_does_not_fit(tiny_model, monkeypatch):
    monkeypatch.setattr(importlib.import_module("vsem_lens.core.capture"), "free_memory", lambda device: 1024)
    with pytest.warns(UserWarning, match=r"needs ~.* GiB .* but 0.0 GiB are free; lower the batch size \(--batch-size"):
        vl.capture(tiny_model, TINY_TEXTS, batch_size=2)


@pytest.mark.parametrize(
    "error",
    [RuntimeError(CPU_OOM), torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB"), MemoryError()],
    ids=["cpu", "cuda", "python"],
)
def test_out_of_memory_becomes_a_clear_error(tiny_tokenizer, error):
    hf = make_tiny_hf(tiny_tokenizer)
    model = vl.load_model((hf, tiny_tokenizer))

    def fail(module, inputs, output):
        raise error

    handle = hf.model.layers[1].mlp.register_forward_hook(fail)
    with pytest.raises(MemoryLimitError) as caught:
        vl.capture(model, TINY_TEXTS, batch_size=4)
    message = str(caught.value)
    assert "texts 0..3 (4 x" in message and "--batch-size" in message and "--max-length" in message
    assert isinstance(caught.value, MemoryError) and caught.value.__cause__ is error
    assert hf.config._attn_implementation == "eager"  # the attention switch was undone
    handle.remove()


def test_other_runtime_errors_pass_through(tiny_tokenizer):
    hf = make_tiny_hf(tiny_tokenizer)
    model = vl.load_model((hf, tiny_tokenizer))

    def fail(module, inputs, output):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    hf.model.layers[0].mlp.register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        vl.capture(model, "Hello")
