"""Minimal pairs: generator, snapshot, loader, and scoring against plain HF log-probabilities."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

import vsem_lens as vl
from vsem_lens.core.errors import DataError, InputError
from vsem_lens.taskspace import minimal_pairs as mp
from vsem_lens.taskspace import pairs as pair_data
from vsem_lens.taskspace import templates as pair_templates


def _strip(word: str) -> str:
    return re.sub(r"[.?!,]+$", "", word)


# ---------------------------------------------------------------------------------- generator
def test_generator_is_deterministic_and_seed_dependent():
    a = pair_templates.generate_minimal_pairs(30, seed=3)
    b = pair_templates.generate_minimal_pairs(30, seed=3)
    c = pair_templates.generate_minimal_pairs(30, seed=4)
    assert a == b
    assert a != c
    # one phenomenon's pairs do not depend on which other phenomena are generated
    only = pair_templates.generate_minimal_pairs(30, seed=3, phenomena=["wh_island"])
    assert only == [p for p in a if p.phenomenon == "wh_island"]


def test_snapshot_equals_regeneration():
    shipped = pair_data.load_minimal_pairs()
    assert shipped == pair_templates.generate_minimal_pairs(pair_templates.DEFAULT_PER_PHENOMENON, seed=pair_templates.DEFAULT_SEED)


def test_snapshot_size_and_no_duplicates():
    pairs = pair_data.load_minimal_pairs()
    counts = pd.Series([p.phenomenon for p in pairs]).value_counts()
    assert len(counts) >= 8 and counts.min() >= 200
    assert len({(p.good, p.bad) for p in pairs}) == len(pairs)
    # no sentence is grammatical in one pair and ungrammatical in another
    assert not {p.good for p in pairs} & {p.bad for p in pairs}


def test_pairs_differ_only_in_the_critical_word():
    for pair in pair_data.load_minimal_pairs():
        good, bad = pair.good.split(), pair.bad.split()
        assert len(good) == len(bad)
        diff = [i for i, (g, b) in enumerate(zip(good, bad)) if g != b]
        assert diff == [pair.critical], pair


SG_PL_VERBS = {sg: pl for sg, pl in pair_templates.INTRANSITIVE_PRESENT} | {"is": "are"}
PL_SG_VERBS = {pl: sg for sg, pl in SG_PL_VERBS.items()}
SINGULAR_AGENTS = {sg for sg, _ in pair_templates.AGENTS}
PLURAL_AGENTS = {pl for _, pl in pair_templates.AGENTS}
SINGULAR_THINGS = {sg for sg, _ in pair_templates.THINGS}
PLURAL_THINGS = {pl for _, pl in pair_templates.THINGS}


def _check_contrast(pair: pair_data.MinimalPair) -> None:
    """The critical words form the intended contrast, and the good one is the grammatical one."""
    words = pair.good.split()
    i = pair.critical
    good, bad = _strip(words[i]), _strip(pair.bad.split()[i])
    name = pair.phenomenon
    if name.startswith("sv_agreement"):
        head = words[1]  # "The <head> ..."
        if head in SINGULAR_AGENTS:
            assert SG_PL_VERBS[good] == bad
        else:
            assert head in PLURAL_AGENTS and PL_SG_VERBS[good] == bad
    elif name == "det_noun_agreement":
        det = next(w for w in reversed(words[:i]) if w in {"this", "that", "these", "those"})
        if det in {"this", "that"}:
            assert good in SINGULAR_THINGS and bad in PLURAL_THINGS
        else:
            assert good in PLURAL_THINGS and bad in SINGULAR_THINGS
        assert (good, bad) in set(pair_templates.THINGS) | {(pl, sg) for sg, pl in pair_templates.THINGS}
    elif name == "anaphor_agreement":
        subject = words[: i - 1]  # the words before the verb
        if len(subject) == 1 and subject[0] in pair_templates.FEMALE_NAMES:
            expected = "herself"
        elif len(subject) == 1 and subject[0] in pair_templates.MALE_NAMES:
            expected = "himself"
        else:
            expected = "themselves"
        assert good == expected and bad in {"herself", "himself", "themselves", "itself"} - {expected}
    elif name == "npi_licensing":
        assert i == 0 and good == "No" and bad in pair_templates.NPI_BAD_DETERMINERS and "ever" in words
    elif name == "irregular_past_participle":
        forms = {past: pp for past, pp, _ in pair_templates.IRREGULAR}
        if words[i - 1] == "had":
            assert forms[bad] == good
        else:
            assert forms[good] == bad
    elif name == "argument_structure":
        assert good in pair_templates.SOCIAL_VERBS and bad in pair_templates.INTRANSITIVE_PAST
    elif name == "wh_island":
        assert words[0] == "What" and good == "that" and bad in pair_templates.ISLAND_BAD
    elif name == "existential_quantifiers":
        be = words[1]
        if be in {"are", "were"}:
            assert good in pair_templates.EXISTENTIAL_GOOD_PL and bad in pair_templates.EXISTENTIAL_BAD_PL
        else:
            assert good in pair_templates.EXISTENTIAL_GOOD_SG and bad in pair_templates.EXISTENTIAL_BAD_SG
    else:  # pragma: no cover - a new phenomenon needs a check here
        raise AssertionError(f"no contrast check for {name}")


def test_pairs_contrast_the_intended_words():
    for pair in pair_data.load_minimal_pairs():
        _check_contrast(pair)


# ---------------------------------------------------------------------------------- loader
def test_loader_reads_user_files_and_filters(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [
        {"phenomenon": "agr", "good": "The cat sleeps.", "bad": "The cat sleep.", "extra": 1},
        {"phenomenon": "npi", "good": "No cat ever sleeps.", "bad": "The cat ever sleeps."},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    pairs = pair_data.load_minimal_pairs(path)
    assert [p.phenomenon for p in pairs] == ["agr", "npi"] and pairs[0].critical is None
    assert pair_data.load_minimal_pairs(path, phenomena=["npi"]) == pairs[1:]
    with pytest.raises(InputError, match="not in the file"):
        pair_data.load_minimal_pairs(path, phenomena=["islands"])


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "line 2: not valid JSON"),
        ('["a", "b"]', "line 2: expected a JSON object"),
        ('{"good": "A b.", "phenomenon": "x"}', "line 2: missing field 'bad'"),
        ('{"good": "A b.", "bad": "", "phenomenon": "x"}', "line 2: field 'bad' must be a non-empty string"),
        ('{"good": "A b.", "bad": "A b.", "phenomenon": "x"}', "line 2: 'good' and 'bad' are the same"),
        ('{"good": "A b.", "bad": "A c.", "phenomenon": "x", "critical": -1}', "line 2: 'critical'"),
    ],
)
def test_loader_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"good": "A b.", "bad": "A c.", "phenomenon": "x"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(message)):
        pair_data.load_minimal_pairs(path)


def test_loader_rejects_missing_and_wrong_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        pair_data.load_minimal_pairs(tmp_path / "nope.jsonl")
    other = tmp_path / "pairs.csv"
    other.write_text("good,bad\n", encoding="utf-8")
    with pytest.raises(InputError, match=".jsonl"):
        pair_data.load_minimal_pairs(other)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="no minimal pairs"):
        pair_data.load_minimal_pairs(empty)


# ---------------------------------------------------------------------------------- scoring
TINY_PAIRS = [
    pair_data.MinimalPair("agr", "The cat sat.", "The cat sit."),
    pair_data.MinimalPair("agr", "A dog is here.", "A dog are here."),
    pair_data.MinimalPair("agr", "Hello world.", "Hello worlds."),
    pair_data.MinimalPair("npi", "No cat ever sat.", "The cat ever sat."),
    pair_data.MinimalPair("npi", "She sold apples.", "She sell apples."),
]


@pytest.fixture(scope="module")
def plain_hf(tiny_tokenizer):
    """A fresh, unwrapped copy of the tiny model (same seed), eager attention like the bridge's."""
    from conftest import make_tiny_hf

    hf = make_tiny_hf(tiny_tokenizer)
    hf.config._attn_implementation = "eager"
    return hf


def _hf_logprob(hf, tokenizer, text: str, *, bos: bool = False) -> float:
    """Independent reference: (BOS +) HF tokens, plain HF forward, one sentence at a time."""
    ids = ([tokenizer.bos_token_id] if bos else []) + tokenizer(text)["input_ids"]
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return float(sum(logp[t, ids[t + 1]] for t in range(len(ids) - 1)))


@pytest.mark.parametrize("bos", [None, True, False])
def test_accuracy_matches_plain_hf(plain_hf, tiny_tokenizer, tiny_model, bos):
    # None follows the model's rule: load_model's default, no BOS (the HF tokenisation)
    assert tiny_model.prepend_bos is False
    used = bool(bos)
    scores = mp.score_minimal_pairs(tiny_model, TINY_PAIRS, batch_size=3, prepend_bos=bos)
    ref_good = [_hf_logprob(plain_hf, tiny_tokenizer, p.good, bos=used) for p in TINY_PAIRS]
    ref_bad = [_hf_logprob(plain_hf, tiny_tokenizer, p.bad, bos=used) for p in TINY_PAIRS]
    np.testing.assert_allclose(scores.logp_good, ref_good, rtol=0, atol=1e-3)
    np.testing.assert_allclose(scores.logp_bad, ref_bad, rtol=0, atol=1e-3)
    assert (scores.prepend_bos == used).all()
    acc = mp.minimal_pair_accuracy(tiny_model, TINY_PAIRS, batch_size=2, prepend_bos=bos).set_index("phenomenon")
    margins = np.array(ref_good) - np.array(ref_bad)
    assert acc.loc["agr", "n_pairs"] == 3 and acc.loc["all", "n_pairs"] == 5
    assert acc.loc["agr", "accuracy"] == pytest.approx(np.mean(margins[:3] > 0))
    assert acc.loc["all", "accuracy"] == pytest.approx(np.mean(margins > 0))
    assert acc.loc["npi", "mean_margin"] == pytest.approx(margins[3:].mean(), abs=1e-3)
    assert list(acc.columns)[-1] == "prepend_bos" and (acc.prepend_bos == used).all()
    # the Wilson interval, against scipy's independent implementation
    from scipy.stats import binomtest

    low, high = binomtest(int(np.sum(margins > 0)), 5).proportion_ci(0.95, method="wilson")
    assert acc.loc["all", "accuracy_ci_low"] == pytest.approx(low, abs=1e-6)
    assert acc.loc["all", "accuracy_ci_high"] == pytest.approx(high, abs=1e-6)


def test_a_model_loaded_with_bos_scores_with_bos(plain_hf, tiny_hf, tiny_tokenizer):
    bos_model = vl.load_model((tiny_hf, tiny_tokenizer), prepend_bos=True)
    scores = mp.score_minimal_pairs(bos_model, TINY_PAIRS[:2])
    ref = [_hf_logprob(plain_hf, tiny_tokenizer, p.good, bos=True) for p in TINY_PAIRS[:2]]
    np.testing.assert_allclose(scores.logp_good, ref, rtol=0, atol=1e-3)
    assert scores.prepend_bos.all()
    by_layer = mp.minimal_pair_accuracy_by_layer(bos_model, TINY_PAIRS[:2], layers=[0])
    assert by_layer.prepend_bos.all()
    # and the override goes the other way
    assert not mp.score_minimal_pairs(bos_model, TINY_PAIRS[:2], prepend_bos=False).prepend_bos.any()


def test_bos_on_a_tokenizer_without_bos_is_a_clear_error(tiny_model, tiny_hf, tiny_tokenizer):
    import copy

    def no_bos():
        tok = copy.deepcopy(tiny_tokenizer)
        tok.bos_token = None
        assert tok.bos_token_id is None
        return tok

    # TransformerLens installs EOS as a stand-in BOS on such a tokenizer; the model keeps the real answer
    model = vl.load_model((tiny_hf, no_bos()))
    assert model.bos_token_id is None and model.prepend_bos is False
    with pytest.raises(InputError, match="has no BOS token"):
        mp.score_minimal_pairs(model, TINY_PAIRS[:2], prepend_bos=True)
    with pytest.raises(InputError, match="has no BOS token"):
        model.tokenize(["The cat."], prepend_bos=True)
    # the model's own rule (no BOS) still works
    assert not mp.score_minimal_pairs(model, TINY_PAIRS[:2]).prepend_bos.any()
    with pytest.raises(InputError, match="True, False or None"):
        model.resolve_bos("yes")
    # and a model cannot be loaded with a BOS rule its tokenizer cannot follow
    with pytest.raises(InputError, match="has no BOS token"):
        vl.load_model((tiny_hf, no_bos()), prepend_bos=True)


def test_without_bos_the_first_token_is_context(plain_hf, tiny_tokenizer, tiny_model):
    text = "The cat sat."
    ids = tiny_tokenizer(text)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(plain_hf(torch.tensor([ids])).logits[0].double(), -1)
    ref = float(sum(logp[t, ids[t + 1]] for t in range(len(ids) - 1)))
    got = mp.sentence_logprobs(tiny_model, [text], prepend_bos=False)
    assert float(got[0]) == pytest.approx(ref, abs=1e-3)


def test_by_layer_last_layer_equals_final_scores(tiny_model):
    scores = mp.score_minimal_pairs(tiny_model, TINY_PAIRS)
    by_layer = mp.minimal_pair_accuracy_by_layer(tiny_model, TINY_PAIRS, frame="final_norm", batch_size=3, token_chunk=7)
    assert sorted(by_layer.layer.unique()) == list(range(tiny_model.n_layers))
    last = by_layer[(by_layer.layer == tiny_model.n_layers - 1)].set_index("phenomenon")
    assert last.loc["npi", "mean_margin"] == pytest.approx(scores.margin[3:].mean(), abs=1e-4)
    assert last.loc["all", "accuracy"] == pytest.approx(scores.correct.mean())
    assert set(by_layer.frame) == {"final_norm"}
    # an untrained (identity) tuned lens is exactly the final_norm frame
    tuned = mp.minimal_pair_accuracy_by_layer(
        tiny_model, TINY_PAIRS, frame="tuned", lens=vl.TunedLens.identity(tiny_model)
    )
    np.testing.assert_allclose(tuned.mean_margin, by_layer.mean_margin, atol=1e-4)
    assert set(tuned.frame) == {"tuned"}


class _Doubled(vl.lenses.Lens):
    """A custom frame: twice the final-norm output (logits of ``2 x`` sharpen, margins change)."""

    frame = "doubled"

    def __init__(self, model):
        self.model = model

    def forward(self, h, layer):
        return 2 * self.model.final_norm(h)


def test_by_layer_through_a_custom_lens_equals_the_hand_transform(tiny_model):
    lens = _Doubled(tiny_model)
    layers = [0, tiny_model.n_layers - 1]
    got = mp.layer_sentence_logprobs(tiny_model, ["The cat sleeps.", "Dogs bark."], frame=lens, layers=layers)
    tokens = tiny_model.tokenize(["The cat sleeps.", "Dogs bark."])  # the model's rule, like the function
    acts = vl.capture(tiny_model, tokens, layers=layers)
    unembedding = tiny_model.unembedding()
    for li, layer in enumerate(layers):
        h = acts.layer("resid_post", layer)
        with torch.no_grad():
            logp = torch.log_softmax(unembedding(lens(h, layer)).double(), -1)
        start = 0
        for doc, n in enumerate(tokens.lengths.tolist()):
            ids = tokens.ids[doc, :n]
            ref = float(sum(logp[start + t, ids[t + 1]] for t in range(n - 1)))
            assert float(got[li, doc]) == pytest.approx(ref, abs=1e-3)
            start += n
    table = mp.minimal_pair_accuracy_by_layer(tiny_model, TINY_PAIRS, frame=lens, layers=layers)
    assert set(table.frame) == {"doubled"}


def test_by_layer_accepts_a_tuned_lens_object(tiny_model):
    identity = vl.TunedLens.identity(tiny_model)
    by_object = mp.minimal_pair_accuracy_by_layer(tiny_model, TINY_PAIRS, frame=identity, layers=[0, 1])
    by_name = mp.minimal_pair_accuracy_by_layer(tiny_model, TINY_PAIRS, frame="tuned", lens=identity, layers=[0, 1])
    np.testing.assert_allclose(by_object.mean_margin, by_name.mean_margin)
    assert set(by_object.frame) == {"tuned"}


def test_by_layer_without_a_tuned_lens_says_what_to_do(tiny_model):
    with pytest.raises(InputError, match="tuned lens"):
        mp.minimal_pair_accuracy_by_layer(tiny_model, TINY_PAIRS, frame="tuned")


def test_preference_onset():
    rows = []
    for layer, acc in enumerate([0.4, 0.8, 0.6, 0.85, 0.9]):
        rows.append({"layer": layer, "phenomenon": "a", "accuracy": acc})
    for layer in range(5):
        rows.append({"layer": layer, "phenomenon": "b", "accuracy": 0.5})
    onset = mp.preference_onset(pd.DataFrame(rows), margin=0.05).set_index("phenomenon")
    assert onset.loc["a", "onset_layer"] == 3 and onset.loc["a", "best_layer"] == 4
    assert np.isnan(onset.loc["b", "onset_layer"])


def test_scoring_rejects_bad_input(tiny_model):
    with pytest.raises(InputError, match="no minimal pairs"):
        mp.score_minimal_pairs(tiny_model, [])
    with pytest.raises(InputError, match="not a MinimalPair"):
        mp.score_minimal_pairs(tiny_model, [("a", "b")])
    with pytest.raises(InputError, match="batch_size"):
        mp.score_minimal_pairs(tiny_model, TINY_PAIRS, batch_size=0)


@pytest.mark.embedded
def test_embedded_model_prefers_grammatical_sentences(embedded):
    pairs = [p for p in pair_data.load_minimal_pairs() if p.phenomenon in ("anaphor_agreement", "det_noun_agreement")]
    pairs = pairs[:8] + [p for p in pairs if p.phenomenon == "det_noun_agreement"][:8]
    acc = mp.minimal_pair_accuracy(embedded, pairs).set_index("phenomenon")
    assert acc.loc["all", "n_pairs"] == 16
    assert acc.loc["all", "accuracy"] >= 0.75
