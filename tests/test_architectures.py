"""The architecture matrix: every check of ``architectures.CHECKS`` on every ``architectures.ARCHITECTURES``
entry, against plain Hugging Face, plus the CLI report and bfloat16 on a few architectures and the
generated docs page (docs/architectures.md) kept equal to the matrix.

The reference is always a *pristine* copy of the HF model (built again with the same seed): booting a
``TransformerBridge`` replaces the decoder layers of the HF model it wraps with bridge components, so the
wrapped object is no longer plain Hugging Face.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from architectures import ARCHITECTURES, BF16_ARCHITECTURES, CHECKS, REPORT_ARCHITECTURES, ArchSpec
from conftest import TINY_TEXTS

import vsem_lens as vl
from vsem_lens.cli import main
from vsem_lens.core.capture import iter_capture
from vsem_lens.core.models import HookedModel, Tokens
from vsem_lens.geometry import IsotropyState, isoscore

ROOT = Path(__file__).resolve().parents[1]
TEXTS = TINY_TEXTS[:4]
#: Three texts of different lengths for the padding check.
PAD_TEXTS = [TINY_TEXTS[2], TINY_TEXTS[3], TINY_TEXTS[0]]
IDS = [spec.name for spec in ARCHITECTURES]
BY_NAME = {spec.name: spec for spec in ARCHITECTURES}
LN2 = math.log(2.0)
#: Tolerance of bf16 comparisons with a differently computed reference, relative to the largest
#: magnitude: two bf16 units in the last place of the largest value (8 significant bits).
BF16_REL = 2.0**-6


@dataclass
class Built:
    """One architecture: the hooked model, a pristine HF twin and the twin's outputs on TEXTS."""

    spec: ArchSpec
    model: HookedModel
    reference: Any
    tokens: Tokens
    hidden_states: tuple[torch.Tensor, ...]
    logits: torch.Tensor

    @property
    def keep(self) -> torch.Tensor:
        return self.tokens.mask.bool()


def _build_pair(spec: ArchSpec, tokenizer, dtype: torch.dtype = torch.float32):
    """The model vsem-lens wraps and an identical, untouched HF copy (same seed, same weights)."""
    hf = spec.build(tokenizer).to(dtype)
    reference = spec.build(tokenizer).to(dtype)
    for (name, a), b in zip(hf.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), f"{spec.name}: the two builds differ at {name}; the builder is not seeded"
    return hf, reference


def _hf_forward(reference, tokens: Tokens):
    with torch.no_grad():
        return reference(tokens.ids, attention_mask=tokens.mask, output_hidden_states=True)


@pytest.fixture(scope="module")
def built(tiny_tokenizer):
    """``built(spec)``: each architecture is built, booted and run through HF once per module."""
    cache: dict[str, Built] = {}

    def get(spec: ArchSpec) -> Built:
        if spec.name not in cache:
            hf, reference = _build_pair(spec, tiny_tokenizer)
            model = vl.load_model((hf, tiny_tokenizer))
            tokens = model.tokenize(TEXTS)
            out = _hf_forward(reference, tokens)
            cache[spec.name] = Built(spec, model, reference, tokens, out.hidden_states, out.logits)
        return cache[spec.name]

    return get


def _rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    """``actual == expected`` up to ``rel`` times the largest magnitude of ``expected``."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = float(expected.abs().max().clamp_min(1e-12))
    err = float((actual - expected).abs().max())
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel:g} x {scale:.3g}"


# ---------------------------------------------------------------------------------- the matrix


@pytest.mark.parametrize("spec", ARCHITECTURES, ids=IDS)
def test_resid_post(spec, built):
    b = built(spec)
    model = b.model
    assert type(b.reference).__name__ == spec.hf_class and b.reference.config.model_type == spec.family
    assert model.n_layers == 2 and model.d_model == 64
    assert len(b.hidden_states) == model.n_layers + 1, "HF returned an unexpected number of hidden states"
    acts = vl.capture(model, TEXTS, sites=("resid_post",))
    resid = acts["resid_post"]
    assert resid.shape == (model.n_layers, int(b.keep.sum()), model.d_model)
    assert acts.layers == list(range(model.n_layers))
    for layer in range(model.n_layers):
        expected = b.hidden_states[layer + 1][b.keep]
        got = resid[layer]
        if layer == model.n_layers - 1:  # HF's last hidden state is after the final norm
            got = model.final_norm(got)
        _rel_close(got, expected, 1e-4, f"{spec.name} resid_post layer {layer}")


@pytest.mark.parametrize("spec", ARCHITECTURES, ids=IDS)
def test_logit_lens_last(spec, built):
    b = built(spec)
    model = b.model
    # The LM-head scaling made the pre-transform logits large, so a missing softcap or scale shows.
    with torch.no_grad():
        head = b.reference.get_output_embeddings()(b.hidden_states[-1])[b.keep]
    assert float(head.abs().max()) > 20, f"{spec.name}: logits too small for the check to fail"
    h_last = vl.capture(model, TEXTS).layer("resid_post", model.n_layers - 1)
    lens = vl.logit_lens(h_last, model, layer=-1)
    expected = b.logits[b.keep]
    assert lens.shape == expected.shape
    torch.testing.assert_close(lens.double(), expected.double(), atol=1e-3, rtol=0)


@pytest.mark.parametrize("spec", ARCHITECTURES, ids=IDS)
def test_final_entropy(spec, built):
    b = built(spec)
    model = b.model
    df = vl.layerwise_affinity(model, TEXTS, k=1)
    assert set(df["layer"]) == set(range(model.n_layers))
    logits = b.logits[b.keep].double()
    logp = torch.log_softmax(logits, dim=-1)
    entropy_bits = -(logp.exp() * logp).sum(-1) / LN2
    top2 = logits.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3  # the argmax is not a numerical tie
    assert bool(clear.any())
    for layer in range(model.n_layers):  # the final columns repeat at every layer
        rows = df[df["layer"] == layer].sort_values(["text", "position"])
        got = torch.tensor(rows["final_entropy_bits"].to_numpy(), dtype=torch.float64)
        torch.testing.assert_close(got, entropy_bits, atol=1e-4, rtol=1e-4)
        final_id = torch.tensor(rows["final_id"].to_numpy())
        assert torch.equal(final_id[clear], logits.argmax(-1)[clear]), f"{spec.name}: final_id != HF argmax"


@pytest.mark.parametrize("spec", ARCHITECTURES, ids=IDS)
def test_basis(spec, built):
    b = built(spec)
    model = b.model
    head = b.reference.get_output_embeddings().weight.detach()  # [vocab, d_model]
    torch.testing.assert_close(model.W_U, head.T, atol=0, rtol=0)  # W_U is HF's head, row convention
    basis = vl.SemanticBasis.from_model(model)
    expected = torch.linalg.pinv(model.W_U.double())
    assert basis.vectors.shape == (model.d_vocab, model.d_model) == expected.shape
    assert model.d_vocab == head.shape[0]
    _rel_close(basis.vectors, expected, 1e-5, f"{spec.name} semantic basis")


def _assert_finite_frame(df: pd.DataFrame, what: str) -> None:
    numeric = df.select_dtypes("number")
    assert numeric.shape[1] > 0
    values = torch.tensor(numeric.to_numpy(dtype="float64"))
    assert bool(torch.isfinite(values).all()), f"{what}: non-finite values in {list(numeric.columns)}"
    for column in df.columns:
        first = df[column].iloc[0]
        if isinstance(first, list) and first and isinstance(first[0], (int, float)):
            flat = torch.tensor([float(v) for row in df[column] for v in row], dtype=torch.float64)
            assert bool(torch.isfinite(flat).all()), f"{what}: non-finite values in {column}"


@pytest.mark.parametrize("spec", ARCHITECTURES, ids=IDS)
def test_finite(spec, built):
    model = built(spec).model
    aff = vl.layerwise_affinity(model, TEXTS, k=3)
    assert len(aff) == model.n_layers * int(built(spec).keep.sum())
    _assert_finite_frame(aff, f"{spec.name} layerwise_affinity")
    iso = vl.isotropy_by_layer(model, TEXTS)
    assert set(iso["frame"]) == {"raw", "final_norm"} and len(iso) == 2 * model.n_layers
    _assert_finite_frame(iso, f"{spec.name} isotropy_by_layer")
    assert iso["isoscore"].between(0, 1).all() and iso["isoscore_star"].between(0, 1).all()


@pytest.mark.parametrize("spec", ARCHITECTURES, ids=IDS)
def test_padding(spec, built):
    model = built(spec).model
    lengths = [len(row) for row in model.token_ids(PAD_TEXTS)]
    assert len(set(lengths)) == len(lengths), "the padding texts must have different lengths"
    batched = vl.capture(model, PAD_TEXTS, batch_size=len(PAD_TEXTS))["resid_post"]
    alone = torch.cat([vl.capture(model, [text])["resid_post"] for text in PAD_TEXTS], dim=1)
    assert batched.shape == alone.shape == (model.n_layers, sum(lengths), model.d_model)
    _rel_close(batched, alone, 1e-4, f"{spec.name} padded batch vs texts alone")


def test_every_check_has_a_test():
    """CHECKS (the docs' columns) and the test functions above name the same checks."""
    here = sys.modules[__name__]
    assert all(callable(getattr(here, f"test_{name}", None)) for name in CHECKS)
    assert {spec.name for spec in ARCHITECTURES} >= set(REPORT_ARCHITECTURES) | set(BF16_ARCHITECTURES)
    assert len(ARCHITECTURES) >= 20 and len(set(IDS)) == len(IDS)


# ---------------------------------------------------------------------------------- the CLI report


@pytest.mark.parametrize("name", REPORT_ARCHITECTURES)
def test_report_cli(name, tiny_tokenizer, tmp_path, capsys):
    model_dir = tmp_path / name
    BY_NAME[name].build(tiny_tokenizer).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TINY_TEXTS), encoding="utf-8")
    out = tmp_path / "report"
    rc = main(["report", "--model", str(model_dir), "--corpus", str(corpus), "--out", str(out), "--quiet",
               "--lens-tokens", "24", "--max-tokens", "200", "--text", TINY_TEXTS[0]])
    assert rc == 0
    assert capsys.readouterr().out.strip() == str(out / "index.html")
    for filename in ("index.html", "summary.json", "prediction_formation.csv", "isotropy.csv"):
        assert (out / filename).is_file(), filename
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["model"]["n_layers"] == 2 and summary["tokens"]["lens_tokens"] == 24
    formation = pd.read_csv(out / "prediction_formation.csv")
    last = formation[(formation["readout"] == "lens") & (formation["layer"] == 1)].iloc[0]
    # The lens at the last layer is the model's own distribution (softcap included for Gemma 2).
    assert last["top1_agreement"] == 1.0 and last["kl_bits_mean"] < 1e-4


# ---------------------------------------------------------------------------------- bfloat16


@pytest.mark.parametrize("name", BF16_ARCHITECTURES)
def test_bfloat16(name, tiny_tokenizer):
    hf, reference = _build_pair(BY_NAME[name], tiny_tokenizer, torch.bfloat16)
    model = vl.load_model((hf, tiny_tokenizer), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    tokens = model.tokenize(TEXTS)
    keep = tokens.mask.bool()
    resid = vl.capture(model, TEXTS)["resid_post"]
    assert resid.dtype == torch.bfloat16
    # Captures run HF's SDPA attention (eager where the class has no SDPA kernel, e.g. Gemma 2): against
    # the default reference the states agree exactly, against an eager one up to bf16 rounding (a few
    # units in the last place).
    for implementation, rel in ((None, 1e-6), ("eager", BF16_REL)):
        if implementation is not None:
            reference.set_attn_implementation(implementation)
        out = _hf_forward(reference, tokens)
        for layer in range(model.n_layers):
            got = resid[layer] if layer < model.n_layers - 1 else model.final_norm(resid[layer])
            assert got.dtype == torch.bfloat16
            _rel_close(got, out.hidden_states[layer + 1][keep], rel,
                       f"{name} bf16 resid_post layer {layer} ({implementation or 'default'} attention)")

    _assert_finite_frame(vl.layerwise_affinity(model, TEXTS, k=3), f"{name} bf16 layerwise_affinity")
    iso = vl.isotropy_by_layer(model, TEXTS)
    _assert_finite_frame(iso, f"{name} bf16 isotropy_by_layer")

    # The streamed statistics are float64 whatever the model's dtype, and equal float64 statistics of
    # the captured bf16 points.
    state = IsotropyState.for_model(model)
    for batch in iter_capture(model, TEXTS, layers=state.layers):
        state.update(batch)
    for tensor in (state.mean, state.m2, state.cos_total):
        assert tensor.dtype == torch.float64
    pd.testing.assert_frame_equal(state.result(), iso)
    for layer in range(model.n_layers):
        row = iso[(iso["frame"] == "raw") & (iso["layer"] == layer)].iloc[0]
        assert row["isoscore"] == pytest.approx(isoscore(resid[layer].double()), rel=1e-9, abs=1e-12)


# ---------------------------------------------------------------------------------- the docs page


def _hooks():
    spec = importlib.util.spec_from_file_location("vsem_lens_docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_page_is_generated_from_the_matrix():
    """docs/architectures.md is exactly what docs/hooks.py renders from ARCHITECTURES and CHECKS
    (regenerate it with ``python docs/hooks.py``)."""
    expected = _hooks().architectures_page()
    page = (ROOT / "docs" / "architectures.md").read_text(encoding="utf-8")
    assert page == expected, "docs/architectures.md is stale: run `python docs/hooks.py` to regenerate it"
    for spec in ARCHITECTURES:
        assert f"`{spec.hf_class}`" in page
    assert "architectures.md" in (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
