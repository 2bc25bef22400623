"""I-STAR fine-tuning: the loss against an independent HF + ``isoscore`` computation, the direction of
the regulariser's effect, lambda = 0 against a plain CE loop, resume after an interruption, bad input."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from _tasks import tiny_task
from conftest import TINY_TEXTS, make_tiny_hf

import vsem_lens as vl
from vsem_lens.calibration.datasets import TextClassificationTask
from vsem_lens.calibration.features import build_prompts, label_token_ids
from vsem_lens.calibration.istar_finetune import (
    IStarConfig,
    evaluate_labels,
    istar_finetune,
    istar_loss,
    training_covariance,
)
from vsem_lens.core.errors import ArtifactError, DataError, InputError, VsemLensError
from vsem_lens.geometry.metrics import isoscore

FAST = dict(epochs=1, batch_size=4, max_length=32)


@pytest.fixture(scope="module")
def task():
    return tiny_task(n_train=12, n_val=2, n_test=8)


def _block_outputs(hf, ids, mask):
    """Each HF decoder layer's output (the residual stream after the block) via plain PyTorch hooks."""
    outs = []
    handles = [layer.register_forward_hook(lambda m, i, o: outs.append(o[0] if isinstance(o, tuple) else o))
               for layer in hf.model.layers]
    try:
        logits = hf(input_ids=ids, attention_mask=mask).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits, outs


def test_loss_equals_ce_plus_lambda_one_minus_isoscore_star_from_hf(tiny_model, tiny_tokenizer, task):
    iso_pkg = importlib.import_module("IsoScore.IsoScore")
    hf = make_tiny_hf(tiny_tokenizer)  # the same weights as tiny_model's, never wrapped by a bridge
    prompts, _ = build_prompts(tiny_model, task.template, task.split("train").texts[:4], max_length=32)
    y = task.split("train").y[:4]
    label_ids = label_token_ids(tiny_model, task.label_words, warn=False)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 64, generator=g, dtype=torch.float64)
    c0 = a @ a.T / 64 + torch.eye(64, dtype=torch.float64)
    config = IStarConfig(weight=-3.0, zeta=0.3, layers=(0, 2)).checked(tiny_model.n_layers)
    tokens = tiny_model.tokenize(prompts)
    parts = istar_loss(tiny_model, tokens, y, label_ids, config, c0)

    with torch.no_grad():
        logits, blocks = _block_outputs(hf, tokens.ids, tokens.mask)
    last = tokens.mask.sum(dim=1) - 1
    ce = F.cross_entropy(logits[torch.arange(4), last][:, label_ids], y)
    keep = tokens.mask.bool()
    points = torch.cat([blocks[0][keep], blocks[2][keep]]).double().numpy()
    star = float(iso_pkg.IsoScore_star(points, c0.numpy(), 0.3))
    assert float(parts["ce"]) == pytest.approx(float(ce), abs=1e-5)
    assert float(parts["penalty"]) == pytest.approx(-3.0 * (1 - star), abs=1e-5)
    assert float(parts["loss"].detach()) == pytest.approx(float(ce) - 3.0 * (1 - star), abs=1e-5)
    assert float(parts["isoscore_star"]) == pytest.approx(star, abs=1e-6)


def test_gradients_flow_through_the_hooks_to_every_block(tiny_model, task):
    copy = vl.load_model((vl.core.loading.export_hf_model(tiny_model), tiny_model.tokenizer))
    label_ids = label_token_ids(copy, task.label_words, warn=False)
    prompts, _ = build_prompts(copy, task.template, task.split("train").texts[:4], max_length=32)
    config = IStarConfig(weight=1.0, layers=(0,)).checked(copy.n_layers)
    # CE reads only the last block; the penalty on layer 0 alone must reach block 0's weights.
    ce_only = IStarConfig(weight=0.0, layers=(0,)).checked(copy.n_layers)
    grads = {}
    for name, cfg in (("istar", config), ("ce", ce_only)):
        copy.bridge.zero_grad(set_to_none=True)
        istar_loss(copy, copy.tokenize(prompts), task.split("train").y[:4], label_ids, cfg, None)["loss"].backward()
        grads[name] = {n: p.grad.clone() for n, p in copy.named_parameters() if p.grad is not None}
    q0 = next(n for n in grads["istar"] if "layers.0." in n and "q_proj" in n)
    assert not torch.allclose(grads["istar"][q0], grads["ce"][q0])  # the penalty's gradient reached block 0
    assert any("embed" in n for n in grads["ce"])                  # tied LM head/embedding gets the CE gradient


def _iso_heldout(model) -> float:
    acts = vl.capture(model, TINY_TEXTS, layers=None)
    return isoscore(acts["resid_post"].reshape(-1, model.d_model).double())


def test_positive_lambda_raises_and_negative_lowers_isotropy_on_heldout_text(tiny_model, task):
    common = dict(FAST, epochs=3, lr=3e-3, zeta=0.2, c0="identity")
    iso = {w: _iso_heldout(istar_finetune(tiny_model, task, IStarConfig(weight=w, **common), progress=False).model)
           for w in (-5.0, 0.0, 5.0)}
    assert iso[5.0] > iso[0.0] > iso[-5.0]


def test_lambda_zero_equals_plain_cross_entropy_fine_tuning(tiny_model, tiny_tokenizer, task):
    config = IStarConfig(weight=0.0, lr=1e-3, max_grad_norm=None, seed=3, **FAST)
    ours = istar_finetune(tiny_model, task, config, progress=False).model

    # An independent loop on a fresh HF copy: same prompts, same seeded order, AdamW, CE on the label logits.
    hf = make_tiny_hf(tiny_tokenizer).train()
    train = task.split("train")
    prompts, _ = build_prompts(tiny_model, task.template, train.texts, max_length=32)
    label_ids = label_token_ids(tiny_model, task.label_words, warn=False)
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-3, weight_decay=0.0)
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(3 * 1_000_003)).tolist()
    for start in range(0, len(prompts), 4):
        batch = order[start : start + 4]
        enc = tiny_model.tokenize([prompts[i] for i in batch])
        logits = hf(input_ids=enc.ids, attention_mask=enc.mask).logits
        last = enc.mask.sum(dim=1) - 1
        loss = F.cross_entropy(logits[torch.arange(len(batch)), last][:, label_ids], train.y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    theirs = dict(hf.named_parameters())
    for name, param in vl.core.loading.export_hf_model(ours).named_parameters():
        assert torch.allclose(param, theirs[name], atol=2e-5), name


def test_label_readout_equals_an_independent_hf_argmax(tiny_model, tiny_tokenizer, task):
    hf = make_tiny_hf(tiny_tokenizer)  # the same weights, never wrapped by a bridge
    test = task.split("test")
    ids = label_token_ids(tiny_model, task.label_words, warn=False)
    expected = []
    with torch.no_grad():
        for text in test.texts:
            enc = tiny_model.tokenize([task.template.replace("{text}", text)])
            expected.append(int(hf(input_ids=enc.ids).logits[0, -1, ids].argmax()))
    ours = evaluate_labels(tiny_model, task, max_length=tiny_model.n_ctx)
    assert ours.predictions.tolist() == expected
    assert ours.accuracy == pytest.approx(sum(p == y for p, y in zip(expected, test.y.tolist())) / len(expected))


def test_interrupted_run_resumes_to_the_same_weights(tiny_model, task, tmp_path):
    config = IStarConfig(weight=-2.0, lr=1e-3, **dict(FAST, epochs=2))
    straight = istar_finetune(tiny_model, task, config, progress=False)

    class Killed(Exception):
        pass

    def kill_at_5(step, row):
        if step == 5:  # mid-epoch 2 (3 steps per epoch): C0 must come back from the checkpoint
            raise Killed

    with pytest.raises(Killed):
        istar_finetune(tiny_model, task, config, checkpoint_dir=tmp_path, checkpoint_every=2, progress=False,
                       callback=kill_at_5)
    resumed = istar_finetune(tiny_model, task, config, checkpoint_dir=tmp_path, checkpoint_every=2, progress=False)
    assert len(resumed.history) == len(straight.history) == 6
    a, b = dict(straight.model.named_parameters()), dict(resumed.model.named_parameters())
    for name in a:
        assert torch.equal(a[name], b[name]), name
    with pytest.raises(ArtifactError, match="another run"):
        istar_finetune(tiny_model, task, IStarConfig(weight=-1.0, **FAST), checkpoint_dir=tmp_path, progress=False)


def test_saved_model_loads_back_with_the_same_readout(tiny_model, task, tmp_path):
    result = istar_finetune(tiny_model, task, IStarConfig(weight=-1.0, lr=1e-3, **FAST), progress=False)
    out = result.save(tmp_path / "run")
    assert (out / "model" / "model.safetensors").is_file()
    assert not list((out / "model").glob("*.bin"))
    loaded = vl.load_model(out / "model")
    toks = loaded.tokenize(TINY_TEXTS[:2])
    assert torch.allclose(loaded.forward(toks), result.model.forward(toks), atol=1e-5)
    summary = (out / "istar.json").read_text()
    assert '"weight": -1.0' in summary and "accuracy" in summary


def test_lora_trains_only_adapters_and_merges_them(tiny_model, task):
    before = {n: p.detach().clone() for n, p in vl.core.loading.export_hf_model(tiny_model).named_parameters()}
    result = istar_finetune(tiny_model, task, IStarConfig(weight=-1.0, lr=5e-3, method="lora", **FAST), progress=False)
    after = dict(vl.core.loading.export_hf_model(result.model).named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("q_proj" in n or "v_proj" in n for n in changed)  # peft's Llama targets


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(weight=math.nan), "lambda"),
        (dict(weight=math.inf), "lambda"),
        (dict(zeta=1.5), "zeta"),
        (dict(zeta=-0.1), "zeta"),
        (dict(layers=(7,)), "layer"),
        (dict(c0="pca"), "c0"),
        (dict(method="prefix"), "method"),
        (dict(lr=0.0), "lr"),
        (dict(c0_texts=1, layers=(0,)), "d_model"),
    ],
)
def test_bad_input_is_a_clear_error(tiny_model, task, kwargs, match):
    with pytest.raises(InputError, match=match):
        istar_finetune(tiny_model, task, IStarConfig(**{**FAST, **kwargs}), progress=False)


def test_one_class_task_and_missing_split_are_refused(tiny_model, task):
    with pytest.raises(DataError, match="single class"):
        TextClassificationTask("one", ["a", "b"], ["x", "x"], ["train", "test"], {"x": "cat"}, "{text}")
    no_test = task.subset([i for i, s in enumerate(task.splits) if s != "test"])
    with pytest.raises(VsemLensError, match="test"):
        istar_finetune(tiny_model, no_test, IStarConfig(**FAST), progress=False)


def test_c0_is_the_covariance_of_the_training_states(tiny_model, task):
    prompts, _ = build_prompts(tiny_model, task.template, task.split("train").texts, max_length=32)
    c0 = training_covariance(tiny_model, prompts, [0, 2])
    acts = vl.capture(tiny_model, prompts, layers=[0, 2])["resid_post"].reshape(-1, 64).double()
    assert torch.allclose(c0, torch.cov(acts.T), atol=1e-9)


def test_cli_istar_then_report_on_the_fine_tuned_model(tiny_model_dir, task, tmp_path, capsys):
    import json

    from vsem_lens.cli import main

    data = tmp_path / "tiny.jsonl"
    data.write_text("\n".join(json.dumps({"text": t, "label": lab, "split": s})
                              for t, lab, s in zip(task.texts, task.labels, task.splits)))
    out = tmp_path / "run"
    args = ["istar", "--task", str(data), "--split-column", "split", "--model", str(tiny_model_dir),
            "--verbalizer", "animal=cat,food=apples", "--template", "Text: {text}\\nLabel:", "--lambda", "-2",
            "--lr", "1e-3", "--batch-size", "4", "--out", str(out), "--quiet"]
    assert main(args) == 0
    summary = json.loads((out / "istar.json").read_text())
    assert summary["config"]["weight"] == -2.0 and summary["steps"] == 3
    before = evaluate_labels(vl.load_model(str(tiny_model_dir)), task, max_length=64)
    assert summary["test_before"]["accuracy"] == pytest.approx(before.accuracy) and summary["test"]["method"] == "istar"
    assert len((out / "history.csv").read_text().splitlines()) == 4
    assert not (out / "checkpoint").exists()
    capsys.readouterr()
    report = tmp_path / "report"
    assert main(["report", "--model", str(out / "model"), "--corpus", str(data), "--out", str(report), "--quiet"]) == 0
    assert (report / "summary.json").is_file()
    # bad input: a clear error, no traceback
    assert main([*args[:-3], "--lambda", "nan", "--out", str(tmp_path / "bad"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "lambda" in err and "Traceback" not in err
