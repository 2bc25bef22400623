"""Tuned lens: exact identity start and last layer, training lowers held-out KL, gradients, persistence,
resume, cache + frame='tuned' everywhere, validation errors, and the CLI (tiny random Llama)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_TEXTS, make_tiny_hf

import vsem_lens as vl
from vsem_lens.lenses.training import TrainingConfig, TunedLensTrainer, assign_rows
from vsem_lens.lenses.tuned import TunedLens, find_cached_tuned_lens, tuned_lens_cache_path

TRAIN, HELD_OUT = TINY_TEXTS[:4], TINY_TEXTS[4:]
FAST = dict(steps=6, tokens_per_step=32, progress=False)


@pytest.fixture(scope="module")
def trained(tiny_model):
    return TunedLens.fit(tiny_model, TRAIN, steps=20, tokens_per_step=32, progress=False)


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """A cache of this test's own (the session cache is shared by every test)."""
    monkeypatch.setenv("VSEM_LENS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def heldout_kl(model, lens):
    out = list(vl.iter_layer_readouts(model, HELD_OUT, frame=lens, readouts=("lens",)))
    assert len(out) == 1
    return out[0].readouts["lens"]["kl_bits"].mean(dim=1)  # [layer]


def test_identity_start_is_final_norm_exactly(tiny_model):
    lens = TunedLens.identity(tiny_model)
    h = torch.randn(5, tiny_model.d_model)
    for layer in range(tiny_model.n_layers):
        assert torch.equal(lens(h, layer), tiny_model.final_norm(h))
    assert lens.frame == "tuned" and lens.n_layers == tiny_model.n_layers


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fit_lowers_heldout_kl(tiny_model, optimizer):
    lens = TunedLens.fit(tiny_model, TRAIN, steps=20, tokens_per_step=32, optimizer=optimizer, progress=False)
    before = heldout_kl(tiny_model, TunedLens.identity(tiny_model))
    after = heldout_kl(tiny_model, lens)
    assert after[:-1].mean() < 0.85 * before[:-1].mean()
    # The training curve is recorded per step and layer.
    hist = lens.history_
    assert len(hist) == 20 * (tiny_model.n_layers - 1)
    curve = hist.groupby("step").kl_bits.mean()
    assert curve.iloc[-5:].mean() < curve.iloc[0]


def test_global_clip_scales_every_translator_alike(tiny_model):
    """clip="global": one factor max_norm / ||all gradients|| for every translator (tuned-lens's
    clip_grad_norm_); per translator: each its own factor, and the two runs differ."""
    kwargs = dict(steps=3, tokens_per_step=32, max_grad_norm=1e-3, progress=False)
    per = TunedLens.fit(tiny_model, TRAIN, **kwargs).history_
    glob = TunedLens.fit(tiny_model, TRAIN, clip="global", **kwargs).history_
    by_step = glob.groupby("step").grad_scale
    assert (by_step.max() - by_step.min()).abs().max() < 1e-12  # one factor per step
    assert (glob.grad_scale < 1).all() and (per.grad_scale < 1).all()  # the tiny max norm clips every step
    # step 0 (same start, same tokens): global factor = 1 / sqrt(sum_l 1 / factor_l^2) of the per-translator ones
    f_l = per[per.step == 0].grad_scale.to_numpy()
    expected = 1.0 / float((1.0 / f_l**2).sum()) ** 0.5
    assert glob[glob.step == 0].grad_scale.iloc[0] == pytest.approx(expected, rel=1e-3)
    assert glob[glob.step == 0].kl_bits.tolist() == pytest.approx(per[per.step == 0].kl_bits.tolist())


def test_last_layer_is_exact(tiny_model, trained):
    h = torch.randn(7, tiny_model.d_model)
    last = tiny_model.n_layers - 1
    assert torch.equal(trained(h, last), tiny_model.final_norm(h))
    assert torch.equal(trained(h, -1), tiny_model.final_norm(h))
    assert trained.translate(h, last) is h
    assert trained.weight.abs().sum() > 0  # the other translators did move
    # forward = final norm of the affine translator, with A in the nn.Linear convention.
    expected = tiny_model.final_norm(h + h @ trained.weight[0].T + trained.bias[0])
    torch.testing.assert_close(trained(h, 0), expected)


def test_manual_gradient_matches_autograd(tiny_model):
    """The hand-written backward through the unembedding (q - p) equals autograd on the plain KL."""
    cfg = TrainingConfig(steps=1, tokens_per_step=40, token_chunk=16).resolved()
    trainer = TunedLensTrainer(tiny_model, TRAIN, cfg)
    tr = trainer.translators
    torch.manual_seed(0)
    with torch.no_grad():
        tr.weight.normal_(std=0.05)
        tr.bias.normal_(std=0.05)
    resid = trainer._capture(0)
    assert resid.shape[1] == 40
    kl = trainer._accumulate_gradients(resid) / 40
    # Only the translators receive gradients, never the model's own (final-norm) parameters.
    assert all(p.grad is None for p in tiny_model.bridge.parameters())
    W, b_U = tiny_model.W_U, tiny_model.b_U
    log_p = torch.log_softmax(tiny_model.final_norm(resid[-1]) @ W + b_U, dim=-1)
    A, b = tr.weight.detach().clone().requires_grad_(), tr.bias.detach().clone().requires_grad_()
    for layer in range(tiny_model.n_layers - 1):
        h = resid[layer]
        log_q = torch.log_softmax(tiny_model.final_norm(h + h @ A[layer].T + b[layer]) @ W + b_U, dim=-1)
        loss = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
        gA, gb = torch.autograd.grad(loss, (A, b))
        torch.testing.assert_close(tr.weight.grad[layer], gA[layer], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(tr.bias.grad[layer], gb[layer], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(kl[layer].float(), loss.detach(), rtol=1e-4, atol=1e-6)


def test_rows_are_shared_out_by_tokens():

    assert assign_rows([9, 5, 4, 3], 2) == [0, 1, 1, 0]
    assert assign_rows([7], 3) == [0]
    assert assign_rows([4, 4, 4], 1) == [0, 0, 0]


def test_token_chunk_does_not_change_the_result(tiny_model):
    big = TunedLens.fit(tiny_model, TRAIN, token_chunk=256, **FAST)
    small = TunedLens.fit(tiny_model, TRAIN, token_chunk=5, **FAST)
    torch.testing.assert_close(big.weight, small.weight, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(big.bias, small.bias, rtol=1e-4, atol=1e-6)


def test_deterministic_under_seed(tiny_model):
    a = TunedLens.fit(tiny_model, TRAIN, seed=3, **FAST)
    b = TunedLens.fit(tiny_model, TRAIN, seed=3, **FAST)
    c = TunedLens.fit(tiny_model, TRAIN, seed=4, **FAST)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert not torch.equal(a.weight, c.weight)


def test_save_load_round_trip(tiny_model, tiny_tokenizer, trained, tmp_path):
    path = trained.save(tmp_path / "lens")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "weights.safetensors"]
    config = json.loads((path / "config.json").read_text())
    assert config["fingerprint"] == tiny_model.fingerprint and config["training"]["steps"] == 20
    loaded = TunedLens.load(path, model=tiny_model)
    h = torch.randn(4, 3, tiny_model.d_model)
    for layer in range(tiny_model.n_layers):
        assert torch.equal(loaded(h, layer), trained(h, layer))
    assert loaded.config == trained.config
    other = vl.load_model((make_tiny_hf(tiny_tokenizer, seed=7), tiny_tokenizer))
    with pytest.raises(vl.core.ArtifactError, match="another model"):
        TunedLens.load(path, model=other)
    with pytest.raises(vl.core.ArtifactError, match="no tuned lens"):
        TunedLens.load(tmp_path / "nowhere", model=tiny_model)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "weights.safetensors"))
    tensors["layer_translators.0.bias"][1] = float("nan")
    save_file(tensors, str(path / "weights.safetensors"))
    with pytest.raises(vl.core.ArtifactError, match="non-finite"):
        TunedLens.load(path, model=tiny_model)
    tensors["layer_translators.0.bias"][1] = 0.5
    save_file(tensors, str(path / "weights.safetensors"))
    with pytest.raises(vl.core.ArtifactError, match="digest"):
        TunedLens.load(path, model=tiny_model)
    (path / "weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(vl.core.ArtifactError, match="could not read"):
        TunedLens.load(path, model=tiny_model)


def test_resume_gives_the_same_weights(tiny_model, tmp_path):
    full = TunedLens.fit(tiny_model, TRAIN, **FAST)

    class Interrupted(Exception):
        pass

    def stop_at_3(step, info):
        if step == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        TunedLens.fit(tiny_model, TRAIN, checkpoint_dir=tmp_path, checkpoint_every=2, callback=stop_at_3, **FAST)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 2
    steps_run = []
    resumed = TunedLens.fit(
        tiny_model, TRAIN, checkpoint_dir=tmp_path, checkpoint_every=2,
        callback=lambda step, info: steps_run.append(step), **FAST,
    )
    assert steps_run == [3, 4, 5, 6]
    assert torch.equal(resumed.weight, full.weight) and torch.equal(resumed.bias, full.bias)
    assert resumed.history_.equals(full.history_)
    # A checkpoint from other hyper-parameters is refused, not silently mixed in.
    with pytest.raises(vl.core.ArtifactError, match="other hyper-parameters"):
        TunedLens.fit(tiny_model, TRAIN, checkpoint_dir=tmp_path, steps=6, tokens_per_step=32, lr=0.05, progress=False)
    with pytest.raises(vl.core.ArtifactError, match="another corpus"):
        TunedLens.fit(tiny_model, HELD_OUT, checkpoint_dir=tmp_path, **FAST)


def test_cache_makes_frame_tuned_work_everywhere(tiny_model, trained, private_cache):
    assert find_cached_tuned_lens(tiny_model) is None
    with pytest.raises(vl.core.InputError, match="lens train"):
        vl.layerwise_affinity(tiny_model, HELD_OUT[0], frame="tuned")
    trained.save(tuned_lens_cache_path(tiny_model))
    cached = find_cached_tuned_lens(tiny_model)
    assert isinstance(cached, TunedLens) and torch.equal(cached.weight, trained.weight)
    assert find_cached_tuned_lens(tiny_model) is cached  # memoised until the files change

    basis = vl.SemanticBasis.from_model(tiny_model, frame="tuned", cache=False)
    h = torch.randn(3, tiny_model.d_model)
    assert basis.frame == "tuned" and torch.equal(basis.project(h, 0), trained(h, 0))
    explicit = vl.SemanticBasis.from_model(tiny_model, frame="tuned", lens=trained, cache=False)
    assert torch.equal(explicit.project(h, 1), trained(h, 1))

    by_name = vl.layerwise_affinity(tiny_model, HELD_OUT, frame="tuned", k=3)
    by_lens = vl.layerwise_affinity(tiny_model, HELD_OUT, frame=trained, k=3)
    assert set(by_name.frame) == set(by_lens.frame) == {"tuned"}
    cols = ["lens_kl_bits", "affinity_kl_bits", "lens_final_rank", "affinity_final_rank"]
    assert by_name[cols].equals(by_lens[cols])
    logits = vl.logit_lens(h, tiny_model, layer=0, frame="tuned")
    torch.testing.assert_close(logits, tiny_model.unembed(trained(h, 0)))


def test_layerwise_affinity_last_layer_equals_final_norm(tiny_model, trained):
    tuned = vl.layerwise_affinity(tiny_model, HELD_OUT, frame=trained, k=3)
    plain = vl.layerwise_affinity(tiny_model, HELD_OUT, frame="final_norm", k=3)
    last = tiny_model.n_layers - 1
    cols = ["lens_top1", "lens_kl_bits", "lens_final_rank", "affinity_top1", "affinity_kl_bits", "affinity_final_rank"]
    t, p = tuned[tuned.layer == last], plain[plain.layer == last]
    assert t[cols].reset_index(drop=True).equals(p[cols].reset_index(drop=True))
    # ... while the intermediate layers differ (the translators are not the identity).
    assert not tuned[tuned.layer == 0].lens_kl_bits.reset_index(drop=True).equals(
        plain[plain.layer == 0].lens_kl_bits.reset_index(drop=True)
    )
    assert tuned[tuned.layer < last].lens_kl_bits.mean() < plain[plain.layer < last].lens_kl_bits.mean()


def test_validation_errors(tiny_model, tiny_tokenizer, trained, private_cache):
    h = torch.randn(2, tiny_model.d_model)
    with pytest.raises(vl.core.InputError, match="out of range"):
        trained(h, tiny_model.n_layers)
    with pytest.raises(vl.core.InputError, match="width"):
        trained(torch.randn(2, tiny_model.d_model + 1), 0)
    with pytest.raises(vl.core.InputError, match="unknown frame"):
        vl.layerwise_affinity(tiny_model, HELD_OUT[0], frame="tunned")
    with pytest.raises(vl.core.InputError, match="lens train"):
        vl.SemanticBasis.from_model(tiny_model, frame="tuned", cache=False)
    other = vl.load_model((make_tiny_hf(tiny_tokenizer, seed=7), tiny_tokenizer))
    with pytest.raises(vl.core.ArtifactError, match="another model"):
        vl.layerwise_affinity(other, HELD_OUT[0], frame=trained)
    with pytest.raises(vl.core.ArtifactError, match="another model"):
        vl.SemanticBasis.from_model(other, frame="tuned", lens=trained, cache=False)
    for bad, match in [
        ({"optimizer": "rmsprop"}, "unknown optimizer"),
        ({"steps": 0}, "steps must be a positive integer"),
        ({"lr": -1.0}, "lr must be"),
        ({"warmup_steps": 10, "steps": 5}, "warmup_steps"),
        ({"unembed_dtype": "float16"}, "unembed_dtype"),
        ({"clip": "per_layer"}, "clip must be"),
        ({"learning_rate": 0.1}, "unknown hyper-parameter"),
    ]:
        with pytest.raises(vl.core.InputError, match=match):
            TunedLens.fit(tiny_model, TRAIN, progress=False, **bad)
    with pytest.raises(vl.core.InputError, match="empty"):
        TunedLens.fit(tiny_model, ["  "], progress=False)


def test_lr_schedule():
    sgd = TrainingConfig(steps=4).resolved()
    assert [sgd.lr_at(s) for s in range(4)] == pytest.approx([0.1, 0.075, 0.05, 0.025])
    adam = TrainingConfig(optimizer="adam", steps=10).resolved()
    assert adam.warmup_steps == 2 and adam.lr == 1e-3
    assert [adam.lr_at(s) for s in (0, 1, 2, 9)] == pytest.approx([5e-4, 1e-3, 1e-3, 1.25e-4])


def test_bfloat16_unembedding_trains_too(tiny_model):
    lens = TunedLens.fit(tiny_model, TRAIN, steps=20, tokens_per_step=32, unembed_dtype="bfloat16", progress=False)
    before = heldout_kl(tiny_model, TunedLens.identity(tiny_model))
    assert heldout_kl(tiny_model, lens)[:-1].mean() < 0.9 * before[:-1].mean()


def test_cli_train(tiny_model_dir, tmp_path, capsys, private_cache):
    from vsem_lens.cli import main

    model_dir = tiny_model_dir
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TINY_TEXTS))
    out = tmp_path / "lens-out"
    argv = ["lens", "train", "--model", str(model_dir), "--corpus", str(corpus), "--steps", "4",
            "--tokens-per-step", "32", "--optimizer", "adam", "--seed", "1", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out.split()
    model = vl.load_model(str(model_dir))
    cache_path = tuned_lens_cache_path(model)
    assert printed == [str(cache_path), str(out)]
    from_out = TunedLens.load(out, model=model)
    from_cache = find_cached_tuned_lens(model)
    assert torch.equal(from_out.weight, from_cache.weight)
    assert from_out.config.optimizer == "adam" and from_out.config.steps == 4 and from_out.config.seed == 1
    assert not any((cache_path.parent / ".checkpoints").glob("*/checkpoint.pt"))  # removed after success
    # Bad options fail cleanly (exit 2, one line).
    assert main(["lens", "train", "--model", str(model_dir), "--corpus", str(corpus), "--steps", "0", "--quiet"]) == 2
    assert "steps must be a positive integer" in capsys.readouterr().err
    assert main(["lens", "train", "--corpus", str(tmp_path / "missing.txt"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["lens", "train", "--no-cache", "--quiet"]) == 2


@pytest.mark.embedded
def test_embedded_tuned_lens_short_fit(embedded):
    texts = [
        "The capital of France is Paris, and the capital of Italy is Rome.",
        "Water boils at one hundred degrees Celsius at sea level.",
        "She opened the door, looked outside, and saw that it was raining.",
    ]
    # float32: CPUs without native bfloat16 emulate it slowly; the bfloat16 path is tested on the tiny model.
    lens = TunedLens.fit(embedded, texts, steps=3, tokens_per_step=48, progress=False)
    h = torch.randn(2, embedded.d_model)
    assert torch.equal(lens(h, embedded.n_layers - 1), embedded.final_norm(h))
    curve = lens.history_.groupby("step").kl_bits.mean()
    assert curve.iloc[-1] < curve.iloc[0]
    df = vl.layerwise_affinity(embedded, "The capital of France is", frame=lens, layers=[0, 29], k=1)
    assert set(df.frame) == {"tuned"} and df[df.layer == 29].lens_top1.iloc[-1] == " Paris"
