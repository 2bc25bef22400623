"""Shared fixtures: tiny random models built in memory (unit tests) and the embedded model (loaded once)."""

from __future__ import annotations

import os

# Nothing in the test suite may reach the network: set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

TINY_TEXTS = [
    "The capital of France is Paris.",
    "A cat sat on the mat and looked at the dog.",
    "def add(x, y): return x + y",
    "She sold three apples, two pears and a melon at the market.",
    "Hello world, this is a small test of the tokenizer.",
    "Numbers like 12, 345 and 6789 appear in text too.",
]


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer with a few hundred tokens, trained on TINY_TEXTS in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TINY_TEXTS * 5, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    fast.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def make_tiny_hf(tokenizer, *, n_layers: int = 3, seed: int = 0, tie: bool = True):
    """A tiny random Llama (the SmolLM2 architecture) on the tiny tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    # Random init gives near-uniform outputs; scale the final norm so distributions are peaked enough
    # for ranks and KL to be informative.
    with torch.no_grad():
        model.model.norm.weight.mul_(4.0)
    return model


@pytest.fixture(scope="session")
def tiny_hf(tiny_tokenizer):
    return make_tiny_hf(tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_model(tiny_hf, tiny_tokenizer):
    import vsem_lens as vl

    return vl.load_model((tiny_hf, tiny_tokenizer))


# The converted embedded model is shared with the user's real cache (converting it takes ~20 s);
# everything else the tests write (bases, lenses, features) goes to a per-session temporary cache.
_REAL_CACHE = os.environ.get("VSEM_LENS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vsem-lens")


@pytest.fixture(autouse=True)
def _fresh_notebook():
    """Each test starts as a fresh kernel: its first figure output carries plotly.js (report.html.notebook_scripts)."""
    from vsem_lens.report import resend_plotly

    resend_plotly()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    session_cache = tmp_path_factory.getbasetemp() / "vsem-cache"
    link = session_cache / "models"
    if not link.exists():
        real_models = os.path.join(_REAL_CACHE, "models")
        os.makedirs(real_models, exist_ok=True)
        os.makedirs(session_cache, exist_ok=True)
        link.symlink_to(real_models)
    monkeypatch.setenv("VSEM_LENS_CACHE", str(session_cache))


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct, loaded once per test session (converted once per machine)."""
    import vsem_lens as vl

    return vl.load_model("embedded")


@pytest.fixture(scope="session")
def executed_notebooks(tmp_path_factory):
    """The example notebooks, each executed at most once per session (see ``tests/_notebooks.py``)."""
    from _notebooks import ExecutedNotebooks

    return ExecutedNotebooks(tmp_path_factory.mktemp("executed-notebooks"))


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_tokenizer, tmp_path_factory):
    """A fresh tiny Llama saved as an HF directory, for CLI tests (``--model DIR``)."""
    path = tmp_path_factory.mktemp("tiny_model_dir")
    make_tiny_hf(tiny_tokenizer).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path
