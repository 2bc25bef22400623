"""The one logits path (``vsem_lens.core.logits``): the model's output-logit transform reaches every readout,
final distribution, tuned-lens gradient, sentence log-probability and label logit; models vsem-lens cannot
read are refused with a clear error. Reference: plain Hugging Face on a tiny Gemma 2 with a logit softcap."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_TEXTS

import vsem_lens as vl
from vsem_lens.core.logits import Unembedding, effective_transform
from vsem_lens.lenses.training import TrainingConfig, TunedLensTrainer
from vsem_lens.taskspace import minimal_pairs as mp

CAP = 30.0


@pytest.fixture(scope="module")
def gemma2_hf(tiny_tokenizer):
    """A tiny Gemma 2 whose LM head is scaled so its raw logits reach far past the softcap."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        final_logit_softcapping=CAP, tie_word_embeddings=False,
        bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    hf = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        hf.lm_head.weight.mul_(200.0)
    return hf


@pytest.fixture(scope="module")
def gemma2(gemma2_hf, tiny_tokenizer):
    return vl.load_model((gemma2_hf, tiny_tokenizer))


def _hf_logits(hf, model, texts):
    tokens = model.tokenize(texts)
    with torch.no_grad():
        return hf(tokens.ids, attention_mask=tokens.mask).logits, tokens


def test_unembedding_unit():
    torch.manual_seed(0)
    W, b, h = torch.randn(8, 20), torch.randn(20), torch.randn(5, 8)
    softcap = lambda x: CAP * torch.tanh(x / CAP)  # noqa: E731
    assert effective_transform(lambda x: x) is None and effective_transform(None) is None
    assert effective_transform(softcap) is softcap
    head = Unembedding(W, b, softcap)
    plain = softcap(h @ W + b)
    torch.testing.assert_close(head(h), plain)
    out = torch.empty(5, 20)
    assert head(h, out=out) is out
    torch.testing.assert_close(out, plain)
    torch.testing.assert_close(head.columns([3, 17])(h), plain[:, [3, 17]])
    assert Unembedding(W, torch.zeros(20), None).b_U is None  # a zero bias is skipped
    pre, grad = h @ W + b, torch.randn(5, 20)
    torch.testing.assert_close(head.transform_backward(pre, grad), grad * (1 - torch.tanh(pre / CAP) ** 2))
    assert Unembedding(W, b, None).transform_backward(pre, grad) is grad


def test_transform_is_found_and_only_where_the_model_has_one(gemma2, tiny_model):
    assert tiny_model.output_transform is None  # Llama: identity, nothing extra on the hot path
    x = torch.tensor([-100.0, 10.0, 100.0])
    torch.testing.assert_close(gemma2.output_transform(x), CAP * torch.tanh(x / CAP))


def test_logit_lens_and_final_distribution_equal_hf_under_a_softcap(gemma2, gemma2_hf):
    texts = TINY_TEXTS[:3]
    ref, tokens = _hf_logits(gemma2_hf, gemma2, texts)
    keep = tokens.mask.bool()
    assert ref[keep].abs().max() > 0.8 * CAP  # the softcap really bites: without it the check fails
    last_layer = gemma2.n_layers - 1
    acts = vl.capture(gemma2, texts, layers=[last_layer])
    lens = vl.logit_lens(acts.layer("resid_post", last_layer), gemma2, layer=last_layer)
    torch.testing.assert_close(lens, ref[keep], atol=2e-4, rtol=1e-4)
    raw = gemma2.final_norm(acts.layer("resid_post", last_layer)) @ gemma2.W_U
    assert (raw - ref[keep]).abs().max() > 5.0  # what the old hand-written path computed
    df = vl.layerwise_affinity(gemma2, texts[0], k=2)
    last = df[df.layer == gemma2.n_layers - 1].sort_values("position")
    logp = torch.log_softmax(ref[0, : len(last)].double(), dim=-1)
    entropy_bits = -(logp.exp() * logp).sum(-1) / torch.log(torch.tensor(2.0, dtype=torch.float64))
    torch.testing.assert_close(torch.tensor(last.final_entropy_bits.values, dtype=torch.float64), entropy_bits,
                               atol=1e-4, rtol=1e-4)
    assert last.lens_kl_bits.abs().max() < 1e-4 and (last.lens_final_rank == 0).all()


def test_tuned_lens_gradient_goes_through_the_transform(gemma2):
    cfg = TrainingConfig(steps=1, tokens_per_step=24, token_chunk=10).resolved()
    trainer = TunedLensTrainer(gemma2, TINY_TEXTS[:3], cfg)
    tr = trainer.translators
    torch.manual_seed(0)
    with torch.no_grad():
        tr.weight.normal_(std=0.05)
        tr.bias.normal_(std=0.05)
    resid = trainer._capture(0)
    kl = trainer._accumulate_gradients(resid) / resid.shape[1]

    def logits(h):  # independent: HF's own transform, written out
        return CAP * torch.tanh((gemma2.final_norm(h) @ gemma2.W_U) / CAP)

    log_p = torch.log_softmax(logits(resid[-1]), dim=-1)
    A, b = tr.weight.detach().clone().requires_grad_(), tr.bias.detach().clone().requires_grad_()
    for layer in range(gemma2.n_layers - 1):
        h = resid[layer]
        log_q = torch.log_softmax(logits(h + h @ A[layer].T + b[layer]), dim=-1)
        loss = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
        gA, gb = torch.autograd.grad(loss, (A, b))
        torch.testing.assert_close(tr.weight.grad[layer], gA[layer], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(tr.bias.grad[layer], gb[layer], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(kl[layer].float(), loss.detach(), rtol=1e-4, atol=1e-6)


def test_sentence_logprobs_by_layer_equal_hf_at_the_last_layer(gemma2, gemma2_hf, tiny_tokenizer):
    text = "The cat sat on the mat."
    ids = [tiny_tokenizer.bos_token_id] + tiny_tokenizer(text)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(gemma2_hf(torch.tensor([ids])).logits[0].double(), dim=-1)
    ref = float(sum(logp[t, ids[t + 1]] for t in range(len(ids) - 1)))
    by_layer = mp.layer_sentence_logprobs(gemma2, [text], token_chunk=4, prepend_bos=True)  # the reference scores after BOS
    assert float(by_layer[-1, 0]) == pytest.approx(ref, abs=1e-3)
    assert float(mp.sentence_logprobs(gemma2, [text], prepend_bos=True)[0]) == pytest.approx(ref, abs=1e-3)


def test_label_logits_of_features_equal_hf(gemma2, gemma2_hf):
    from vsem_lens.calibration.datasets import TextClassificationTask
    from vsem_lens.calibration.features import extract_features, label_token_ids

    texts = ["a cat and a dog", "apples and pears", "the market", "numbers 12 and 345"]
    task = TextClassificationTask("t", texts, ["a", "b", "a", "b"], ["train"] * 4, {"a": "cat", "b": "market"},
                                  "Text: {text}\nAnswer:")
    feats = extract_features(gemma2, task, batch_size=3, progress=False, cache=False)
    ref, tokens = _hf_logits(gemma2_hf, gemma2, task.prompts())
    last = tokens.mask.sum(1) - 1
    ids = label_token_ids(gemma2, task.label_words)
    torch.testing.assert_close(feats.label_logits, ref[torch.arange(4), last][:, ids], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["bert", "t5", "no_lm_head", "not_a_model"])
def test_models_vsem_lens_cannot_read_are_refused(kind, tiny_tokenizer):
    import transformers as tf

    V = len(tiny_tokenizer)
    build = {
        "bert": lambda: tf.BertForMaskedLM(tf.BertConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                                         num_hidden_layers=1, num_attention_heads=2)),
        "t5": lambda: tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=V, d_model=32, d_ff=64, num_layers=1,
                                                                num_heads=2, d_kv=16)),
        "no_lm_head": lambda: tf.GPT2Model(tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=2)),
        "not_a_model": lambda: torch.nn.Linear(2, 2),
    }[kind]
    message = {"bert": "encoder-only", "t5": "encoder-decoder", "no_lm_head": "AutoModelForCausalLM",
               "not_a_model": "not a Hugging Face model"}[kind]
    with pytest.raises(vl.core.ModelLoadError, match=message) as err:
        vl.load_model((build(), tiny_tokenizer))
    assert "decoder-only causal language models" in str(err.value)


def test_in_memory_config_without_architectures_boots(tiny_tokenizer):
    """A config built in memory names no class; TransformerLens's fallback table lacks Falcon."""
    from transformers import FalconConfig, FalconForCausalLM

    hf = FalconForCausalLM(FalconConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, num_hidden_layers=2,
                                        num_attention_heads=4)).eval()
    assert not hf.config.architectures
    model = vl.load_model((hf, tiny_tokenizer))
    assert model.n_layers == 2 and hf.config.architectures == ["FalconForCausalLM"]
