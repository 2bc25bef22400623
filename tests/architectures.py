"""The architecture matrix: tiny random causal LMs, one per architecture vsem-lens is tested on.

Each :class:`ArchSpec` builds, in memory and in milliseconds, a 2-layer model of one Hugging Face
architecture (hidden size 64, 4 heads, 2 KV heads where the architecture has grouped-query attention,
a small MLP, the test tokenizer's vocabulary, 128 positions), seeded, in eval mode and float32. The LM
head (the output embedding, untied from the input embedding) is scaled by :data:`HEAD_SCALE` so the
logits reach tens: large enough that a missing logit softcap or scale would show in every check.

``tests/test_architectures.py`` runs :data:`CHECKS` on every entry of :data:`ARCHITECTURES` against
plain Hugging Face, and ``docs/hooks.py`` renders ``docs/architectures.md`` from the same objects
(``architectures_page()``), so the documented matrix is the tested one. This module is plain Python (no
pytest) and builds nothing on import: the docs build imports it by path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

#: Factor applied to the LM head's weight (and bias) of every tiny model.
HEAD_SCALE = 50.0
#: Shape of every tiny model.
N_LAYERS, D_MODEL, N_HEADS, N_KV_HEADS, D_MLP, N_POSITIONS = 2, 64, 4, 2, 128, 128
HEAD_DIM = D_MODEL // N_HEADS

#: The checks run on every architecture, and what each compares (rendered in docs/architectures.md).
CHECKS: dict[str, str] = {
    "resid_post": "every layer's captured `resid_post` equals Hugging Face's `hidden_states[l + 1]` "
    "(the last layer after `model.final_norm`, since HF's last hidden state is already normed)",
    "logit_lens_last": "the logit lens of the last layer (`logit_lens(h, model, layer=-1)`, frame "
    "`final_norm`) equals HF's `.logits`, output-logit transform included (softcap, scale)",
    "final_entropy": "`layerwise_affinity`'s `final_entropy_bits` equals the entropy (bits) of "
    "softmax(HF logits), and `final_id` equals HF's argmax",
    "basis": "`SemanticBasis.from_model(model).vectors` [d_vocab, d_model] equals "
    "`torch.linalg.pinv(W_U)` computed in float64",
    "finite": "every numeric column of `layerwise_affinity` and `isotropy_by_layer` is finite",
    "padding": "a right-padded batch of texts of different lengths gives the same `resid_post` at "
    "real positions as each text captured alone",
}


#: Names of the checks, in column order.
CHECK_NAMES: tuple[str, ...] = tuple(CHECKS)


@dataclass(frozen=True)
class ArchSpec:
    """One architecture of the matrix.

    Attributes:
        name: short name (test id and table row).
        family: the ``transformers`` model type (``config.model_type``).
        hf_class: the class built (a ``*ForCausalLM`` / ``*LMHeadModel``).
        build: ``build(tokenizer)`` -> a tiny random model on that tokenizer (eval, float32).
        notes: what is special about this entry (shown in the docs table).
    """

    name: str
    family: str
    hf_class: str
    build: Callable[[Any], Any]
    notes: str = ""


def _ids(tokenizer) -> dict[str, Any]:
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _finish(model_cls, config, *, seed: int = 0):
    """Build ``model_cls(config)`` seeded, scale its (untied) LM head by HEAD_SCALE, eval, float32."""
    import torch

    config.architectures = [model_cls.__name__]
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    if head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr():
        raise AssertionError(f"{model_cls.__name__}: the LM head is tied to the input embedding; untie it")
    with torch.no_grad():
        head.weight.mul_(HEAD_SCALE)
        if getattr(head, "bias", None) is not None:
            head.bias.mul_(HEAD_SCALE)
    return model


def _llama_like(config_cls, model_cls, tokenizer, **extra):
    """Config of the Llama family (RMSNorm, rotary, gated MLP, GQA)."""
    kwargs = dict(
        hidden_size=D_MODEL,
        intermediate_size=D_MLP,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV_HEADS,
        max_position_embeddings=N_POSITIONS,
        tie_word_embeddings=False,
        **_ids(tokenizer),
    )
    kwargs.update(extra)
    return _finish(model_cls, config_cls(**kwargs))


# ---------------------------------------------------------------------------------- builders


def build_gpt2(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_embd=D_MODEL, n_layer=N_LAYERS, n_head=N_HEADS, n_inner=D_MLP, n_positions=N_POSITIONS,
        tie_word_embeddings=False, **_ids(tokenizer),
    )
    return _finish(GPT2LMHeadModel, config)


def build_gpt_neo(tokenizer):
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    config = GPTNeoConfig(
        hidden_size=D_MODEL, num_layers=N_LAYERS, num_heads=N_HEADS, intermediate_size=D_MLP,
        max_position_embeddings=N_POSITIONS, attention_types=[[["global", "local"], 1]], window_size=8,
        tie_word_embeddings=False, **_ids(tokenizer),
    )
    return _finish(GPTNeoForCausalLM, config)


def build_gptj(tokenizer):
    from transformers import GPTJConfig, GPTJForCausalLM

    config = GPTJConfig(
        n_embd=D_MODEL, n_layer=N_LAYERS, n_head=N_HEADS, n_inner=D_MLP, n_positions=N_POSITIONS,
        rotary_dim=8, tie_word_embeddings=False, **_ids(tokenizer),
    )
    return _finish(GPTJForCausalLM, config)


def build_gpt_neox(tokenizer):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        hidden_size=D_MODEL, num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS, intermediate_size=D_MLP,
        max_position_embeddings=N_POSITIONS, rotary_pct=0.25, use_parallel_residual=True,
        tie_word_embeddings=False, **_ids(tokenizer),
    )
    return _finish(GPTNeoXForCausalLM, config)


def build_opt(tokenizer):
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        hidden_size=D_MODEL, num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS, ffn_dim=D_MLP,
        max_position_embeddings=N_POSITIONS, word_embed_proj_dim=D_MODEL, tie_word_embeddings=False,
        **_ids(tokenizer),
    )
    return _finish(OPTForCausalLM, config)


def build_bloom(tokenizer):
    from transformers import BloomConfig, BloomForCausalLM

    config = BloomConfig(hidden_size=D_MODEL, n_layer=N_LAYERS, n_head=N_HEADS, tie_word_embeddings=False,
                         **_ids(tokenizer))
    return _finish(BloomForCausalLM, config)


def build_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    return _llama_like(LlamaConfig, LlamaForCausalLM, tokenizer)


def build_mistral(tokenizer):
    from transformers import MistralConfig, MistralForCausalLM

    return _llama_like(MistralConfig, MistralForCausalLM, tokenizer, head_dim=HEAD_DIM, sliding_window=None)


def build_mixtral(tokenizer):
    from transformers import MixtralConfig, MixtralForCausalLM

    return _llama_like(MixtralConfig, MixtralForCausalLM, tokenizer, head_dim=HEAD_DIM, sliding_window=None,
                       num_local_experts=4, num_experts_per_tok=2)


def build_qwen2(tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _llama_like(Qwen2Config, Qwen2ForCausalLM, tokenizer)


def build_qwen3(tokenizer):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return _llama_like(Qwen3Config, Qwen3ForCausalLM, tokenizer, head_dim=HEAD_DIM)


def build_gemma(tokenizer):
    from transformers import GemmaConfig, GemmaForCausalLM

    return _llama_like(GemmaConfig, GemmaForCausalLM, tokenizer, head_dim=HEAD_DIM)


def build_gemma2(tokenizer):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return _llama_like(
        Gemma2Config, Gemma2ForCausalLM, tokenizer, head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM,
        final_logit_softcapping=30.0, attn_logit_softcapping=50.0, sliding_window=8,
    )


def build_gemma3(tokenizer):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return _llama_like(
        Gemma3TextConfig, Gemma3ForCausalLM, tokenizer, head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM,
        sliding_window=8, layer_types=["sliding_attention", "full_attention"],
    )


def build_phi(tokenizer):
    from transformers import PhiConfig, PhiForCausalLM

    config = PhiConfig(
        hidden_size=D_MODEL, intermediate_size=D_MLP, num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
        max_position_embeddings=N_POSITIONS, partial_rotary_factor=0.5, tie_word_embeddings=False,
        **_ids(tokenizer),
    )
    return _finish(PhiForCausalLM, config)


def build_phi3(tokenizer):
    from transformers import Phi3Config, Phi3ForCausalLM

    return _llama_like(Phi3Config, Phi3ForCausalLM, tokenizer, original_max_position_embeddings=N_POSITIONS)


def build_olmo(tokenizer):
    from transformers import OlmoConfig, OlmoForCausalLM

    return _llama_like(OlmoConfig, OlmoForCausalLM, tokenizer)


def build_olmo2(tokenizer):
    from transformers import Olmo2Config, Olmo2ForCausalLM

    return _llama_like(Olmo2Config, Olmo2ForCausalLM, tokenizer)


def build_falcon(tokenizer):
    from transformers import FalconConfig, FalconForCausalLM

    config = FalconConfig(
        hidden_size=D_MODEL, num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
        max_position_embeddings=N_POSITIONS, new_decoder_architecture=False, multi_query=True, parallel_attn=True, alibi=False, bias=False,
        tie_word_embeddings=False, **_ids(tokenizer),
    )
    return _finish(FalconForCausalLM, config)


def build_cohere(tokenizer):
    from transformers import CohereConfig, CohereForCausalLM

    return _llama_like(CohereConfig, CohereForCausalLM, tokenizer, logit_scale=0.25)


def build_cohere2(tokenizer):
    from transformers import Cohere2Config, Cohere2ForCausalLM

    return _llama_like(Cohere2Config, Cohere2ForCausalLM, tokenizer, logit_scale=0.25, sliding_window=8,
                       layer_types=["sliding_attention", "full_attention"])


def build_granite(tokenizer):
    from transformers import GraniteConfig, GraniteForCausalLM

    return _llama_like(GraniteConfig, GraniteForCausalLM, tokenizer, logits_scaling=4.0, embedding_multiplier=2.0,
                       residual_multiplier=0.5, attention_multiplier=1.0 / HEAD_DIM)


def build_stablelm(tokenizer):
    from transformers import StableLmConfig, StableLmForCausalLM

    return _llama_like(StableLmConfig, StableLmForCausalLM, tokenizer, partial_rotary_factor=0.25)


def build_codegen(tokenizer):
    from transformers import CodeGenConfig, CodeGenForCausalLM

    config = CodeGenConfig(
        n_embd=D_MODEL, n_layer=N_LAYERS, n_head=N_HEADS, n_inner=D_MLP, n_positions=N_POSITIONS, n_ctx=N_POSITIONS,
        rotary_dim=8, tie_word_embeddings=False, **_ids(tokenizer),
    )
    return _finish(CodeGenForCausalLM, config)


def build_gpt_bigcode(tokenizer):
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    config = GPTBigCodeConfig(
        n_embd=D_MODEL, n_layer=N_LAYERS, n_head=N_HEADS, n_inner=D_MLP, n_positions=N_POSITIONS, multi_query=True,
        tie_word_embeddings=False, **_ids(tokenizer),
    )
    return _finish(GPTBigCodeForCausalLM, config)


def build_starcoder2(tokenizer):
    from transformers import Starcoder2Config, Starcoder2ForCausalLM

    return _llama_like(Starcoder2Config, Starcoder2ForCausalLM, tokenizer, sliding_window=None)


ARCHITECTURES: list[ArchSpec] = [
    ArchSpec("gpt2", "gpt2", "GPT2LMHeadModel", build_gpt2, "learned positions, LayerNorm"),
    ArchSpec("gpt_neo", "gpt_neo", "GPTNeoForCausalLM", build_gpt_neo, "global + local attention layers"),
    ArchSpec("gptj", "gptj", "GPTJForCausalLM", build_gptj, "parallel attention + MLP, partial rotary, head bias"),
    ArchSpec("gpt_neox", "gpt_neox", "GPTNeoXForCausalLM", build_gpt_neox, "Pythia; parallel residual, rotary 25%"),
    ArchSpec("opt", "opt", "OPTForCausalLM", build_opt, "learned positions offset by 2"),
    ArchSpec("bloom", "bloom", "BloomForCausalLM", build_bloom, "ALiBi, embedding LayerNorm"),
    ArchSpec("llama", "llama", "LlamaForCausalLM", build_llama, "GQA 4/2"),
    ArchSpec("mistral", "mistral", "MistralForCausalLM", build_mistral, "GQA 4/2"),
    ArchSpec("mixtral", "mixtral", "MixtralForCausalLM", build_mixtral, "MoE, 4 experts, top-2"),
    ArchSpec("qwen2", "qwen2", "Qwen2ForCausalLM", build_qwen2, "GQA 4/2, QKV bias"),
    ArchSpec("qwen3", "qwen3", "Qwen3ForCausalLM", build_qwen3, "GQA 4/2, QK norm"),
    ArchSpec("gemma", "gemma", "GemmaForCausalLM", build_gemma, "Gemma 1; (1 + w) RMSNorm, scaled embeddings"),
    ArchSpec("gemma2", "gemma2", "Gemma2ForCausalLM", build_gemma2, "logit softcap 30, attention softcap 50"),
    ArchSpec("gemma3", "gemma3_text", "Gemma3ForCausalLM", build_gemma3, "Gemma3TextConfig; sliding + full layers"),
    ArchSpec("phi", "phi", "PhiForCausalLM", build_phi, "parallel attention + MLP, partial rotary, head bias"),
    ArchSpec("phi3", "phi3", "Phi3ForCausalLM", build_phi3, "fused QKV and gate-up projections"),
    ArchSpec("olmo", "olmo", "OlmoForCausalLM", build_olmo, "non-parametric LayerNorm"),
    ArchSpec("olmo2", "olmo2", "Olmo2ForCausalLM", build_olmo2, "post-norm blocks, QK norm"),
    ArchSpec("falcon", "falcon", "FalconForCausalLM", build_falcon, "multi-query, parallel attention"),
    ArchSpec("cohere", "cohere", "CohereForCausalLM", build_cohere, "logit_scale 0.25"),
    ArchSpec("cohere2", "cohere2", "Cohere2ForCausalLM", build_cohere2, "logit_scale 0.25; sliding + full layers"),
    ArchSpec("granite", "granite", "GraniteForCausalLM", build_granite,
             "logits_scaling 4; embedding/residual multipliers"),
    ArchSpec("stablelm", "stablelm", "StableLmForCausalLM", build_stablelm, "LayerNorm, partial rotary 25%"),
    ArchSpec("codegen", "codegen", "CodeGenForCausalLM", build_codegen, "fused QKV, parallel attention + MLP"),
    ArchSpec("gpt_bigcode", "gpt_bigcode", "GPTBigCodeForCausalLM", build_gpt_bigcode, "multi-query attention"),
    ArchSpec("starcoder2", "starcoder2", "Starcoder2ForCausalLM", build_starcoder2, "GQA 4/2, LayerNorm, biases"),
]

#: Architectures also run through ``vsem-lens report`` end to end (saved to a directory, ``--model DIR``).
REPORT_ARCHITECTURES: tuple[str, ...] = ("gpt2", "gemma2")
#: Architectures also checked in bfloat16 on CPU.
BF16_ARCHITECTURES: tuple[str, ...] = ("llama", "gemma2")
