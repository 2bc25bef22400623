"""load_model accepts a TransformerBridge the user booted: the same object, the same activations."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_TEXTS, make_tiny_hf

import vsem_lens as vl
from vsem_lens.core.errors import ModelLoadError


@pytest.fixture(scope="module")
def user_bridge(tiny_tokenizer):
    from transformer_lens.model_bridge import TransformerBridge

    hf = make_tiny_hf(tiny_tokenizer)
    hf.config.architectures = [type(hf).__name__]
    return TransformerBridge.boot_transformers(tiny_tokenizer.name_or_path, hf_model=hf, tokenizer=tiny_tokenizer,
                                               device="cpu")


def test_a_booted_bridge_is_shared_and_gives_the_same_activations(user_bridge, tiny_model, tiny_tokenizer):
    model = vl.load_model(user_bridge)
    assert model.bridge is user_bridge  # shared, not copied
    ours = vl.capture(model, TINY_TEXTS, layers=None)["resid_post"]
    reference = vl.capture(tiny_model, TINY_TEXTS, layers=None)["resid_post"]  # same weights, booted by load_model
    assert torch.allclose(ours, reference, atol=1e-5)
    # TransformerLens's own cache of the same bridge agrees with the capture
    _, cache = user_bridge.run_with_cache(model.tokenize(TINY_TEXTS[:1]).ids)
    assert torch.allclose(cache["blocks.1.hook_resid_post"][0], vl.capture(model, TINY_TEXTS[:1])["resid_post"][1], atol=1e-5)
    assert vl.load_model((user_bridge, tiny_tokenizer)).bos_token_id == tiny_tokenizer.bos_token_id


def test_a_bridge_is_not_moved_behind_the_users_back(user_bridge):
    with pytest.raises(ModelLoadError, match="bridge.to"):
        vl.load_model(user_bridge, dtype="float64")
    with pytest.raises(ModelLoadError, match="booted"):
        vl.load_model(user_bridge, n_ctx=32)
