r"""BLiMP-style minimal pairs: a seeded generator written for vsem-lens, a file loader, and scoring.

A minimal pair is a grammatical sentence and an ungrammatical one that differ in one word, labelled
with the linguistic phenomenon the difference tests (Warstadt et al. 2020, "BLiMP"). The generator
below uses its own vocabulary lists and templates (nothing is copied from BLiMP). Every pair differs in
exactly one whitespace-separated word, the *critical word*, whose index is stored with the pair
(``critical``), so the pairs can be checked mechanically.

Phenomena (:data:`PHENOMENA`):

================================ ====================================================================
``sv_agreement_relative_clause`` subject-verb number agreement across an object relative clause
                                 (the clause's noun is an attractor): *The pilot that the guards
                                 praised is / \*are tired.*
``sv_agreement_prepositional``   subject-verb agreement across a prepositional phrase attractor
``det_noun_agreement``           demonstrative-noun number agreement: *these old boxes / \*box*
``anaphor_agreement``            reflexive gender/number agreement: *Mary hurt herself / \*himself.*
``npi_licensing``                *ever* needs a licensor: *No / \*The doctor has ever seen the map.*
``irregular_past_participle``    past participle after *had*, past tense without it: *had written /
                                 \*had wrote*; *wrote / \*written the letter*
``argument_structure``           transitive vs intransitive verbs with a direct object: *praised /
                                 \*sneezed the dog*
``wh_island``                    extraction out of an embedded question: *What did Ann forget that /
                                 \*whether Tom broke?*
``existential_quantifiers``      quantifiers allowed after existential *there*: *There were many /
                                 \*most dogs in the park.*
================================ ====================================================================

Scoring (:func:`minimal_pair_accuracy`): the log-probability of a sentence is the sum of its tokens'
log-probabilities; a pair is correct when the grammatical sentence is strictly more probable
(ties count as wrong, as in BLiMP). By default a BOS token is prepended for scoring (``prepend_bos=True``)
so that the first word is scored too: minimal pairs may differ in their first word (``npi_licensing``).
With ``prepend_bos=False`` the model's own tokenisation rule is used and the first token is not scored.
:func:`minimal_pair_accuracy_by_layer` reads the same log-probabilities from every layer through a lens
(``final_norm``: the logit lens; ``tuned``: a tuned lens), chunked so no [layers, tokens, vocab] tensor
exists; :func:`preference_onset` says at which layer the preference appears.

Example:
    >>> pairs = generate_minimal_pairs(n_per_phenomenon=3, seed=0)
    >>> len(pairs), pairs[0].phenomenon
    (27, 'sv_agreement_relative_clause')
    >>> acc = minimal_pair_accuracy(model, pairs)        # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..core.errors import DataError, InputError, check_positive_int
from ..core.io import atomic_write, iter_jsonl_objects, read_user_file
from ..core.models import HookedModel, Tokens
from ..lenses.base import Lens
from ..lenses.frames import resolve_frame

DEFAULT_FILE = "minimal_pairs.jsonl"
DEFAULT_SEED = 0
DEFAULT_PER_PHENOMENON = 200


@dataclass(frozen=True)
class MinimalPair:
    """One minimal pair: ``good`` (grammatical) and ``bad`` differ in the word at index ``critical``.

    ``critical`` is ``None`` for user pairs whose difference was not annotated.

    Example:
        >>> MinimalPair("anaphor_agreement", "Mary hurt herself.", "Mary hurt himself.", 2).bad
        'Mary hurt himself.'
    """

    phenomenon: str
    good: str
    bad: str
    critical: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the JSONL row format)."""
        return asdict(self)


# ------------------------------------------------------------------------------------ vocabulary
# (singular, plural) nouns for people and animals: subjects, objects of social verbs, attractors.
AGENTS = [
    ("author", "authors"), ("teacher", "teachers"), ("doctor", "doctors"), ("student", "students"),
    ("pilot", "pilots"), ("farmer", "farmers"), ("dancer", "dancers"), ("singer", "singers"),
    ("lawyer", "lawyers"), ("nurse", "nurses"), ("actor", "actors"), ("painter", "painters"),
    ("baker", "bakers"), ("driver", "drivers"), ("guard", "guards"), ("senator", "senators"),
    ("manager", "managers"), ("cousin", "cousins"), ("neighbor", "neighbors"), ("customer", "customers"),
    ("scientist", "scientists"), ("waiter", "waiters"), ("soldier", "soldiers"), ("child", "children"),
    ("woman", "women"), ("man", "men"), ("boy", "boys"), ("girl", "girls"), ("engineer", "engineers"),
    ("journalist", "journalists"), ("musician", "musicians"), ("surgeon", "surgeons"),
    ("tourist", "tourists"), ("professor", "professors"), ("athlete", "athletes"), ("chef", "chefs"),
    ("gardener", "gardeners"), ("librarian", "librarians"), ("sailor", "sailors"), ("banker", "bankers"),
    ("dog", "dogs"), ("cat", "cats"), ("horse", "horses"), ("mouse", "mice"), ("wolf", "wolves"),
    ("fox", "foxes"), ("rabbit", "rabbits"), ("monkey", "monkeys"), ("goose", "geese"), ("parrot", "parrots"),
]
# (singular, plural) nouns for things.
THINGS = [
    ("book", "books"), ("car", "cars"), ("painting", "paintings"), ("letter", "letters"),
    ("window", "windows"), ("cake", "cakes"), ("bicycle", "bicycles"), ("chair", "chairs"),
    ("report", "reports"), ("picture", "pictures"), ("box", "boxes"), ("dish", "dishes"), ("key", "keys"),
    ("lamp", "lamps"), ("door", "doors"), ("map", "maps"), ("photo", "photos"), ("shirt", "shirts"),
    ("table", "tables"), ("glass", "glasses"), ("knife", "knives"), ("shelf", "shelves"),
    ("computer", "computers"), ("bottle", "bottles"), ("coat", "coats"), ("hat", "hats"), ("cup", "cups"),
    ("ticket", "tickets"), ("boat", "boats"), ("basket", "baskets"), ("piano", "pianos"),
    ("mirror", "mirrors"), ("blanket", "blankets"), ("watch", "watches"), ("wallet", "wallets"),
    ("jacket", "jackets"), ("vase", "vases"), ("candle", "candles"), ("poster", "posters"), ("radio", "radios"),
]
FEMALE_NAMES = [
    "Mary", "Susan", "Emily", "Laura", "Rachel", "Anna", "Sarah", "Julia", "Helen", "Grace",
    "Megan", "Olivia", "Rose", "Diana", "Claire", "Lucy", "Nora", "Alice", "Eva", "Irene",
]
MALE_NAMES = [
    "John", "David", "Peter", "Thomas", "Mark", "Daniel", "James", "Robert", "Brian", "Kevin",
    "Steven", "Paul", "George", "Henry", "Frank", "Carl", "Adam", "Victor", "Oscar", "Martin",
]
NAMES = FEMALE_NAMES + MALE_NAMES
ADJECTIVES = [
    "happy", "tired", "busy", "famous", "angry", "ready", "nervous", "late", "quiet", "hungry",
    "lonely", "kind", "proud", "upset", "calm", "sick",
]
THING_ADJECTIVES = ["old", "new", "red", "small", "heavy", "cheap", "large", "wooden", "blue", "dusty"]
# Present tense (3rd singular, plural) of intransitive verbs.
INTRANSITIVE_PRESENT = [
    ("laughs", "laugh"), ("sleeps", "sleep"), ("smiles", "smile"), ("waits", "wait"), ("works", "work"),
    ("sings", "sing"), ("runs", "run"), ("swims", "swim"), ("complains", "complain"), ("wins", "win"),
    ("travels", "travel"), ("listens", "listen"), ("cries", "cry"), ("dances", "dance"), ("worries", "worry"),
    ("agrees", "agree"), ("rests", "rest"), ("hesitates", "hesitate"),
]
PRESENT_ADVERBS = ["", " often", " every day", " a lot", " again", " at night", " too much", " in silence"]
# Past tense transitive verbs that take a person or animal as object.
SOCIAL_VERBS = [
    "liked", "saw", "visited", "helped", "praised", "called", "met", "hired", "admired", "criticized",
    "followed", "trusted", "blamed", "thanked", "noticed", "interviewed", "remembered", "found", "hugged",
    "greeted", "chased", "examined", "ignored", "warned",
]
# Past tense transitive verbs that take a thing as object.
THING_VERBS = [
    "bought", "sold", "found", "cleaned", "moved", "liked", "borrowed", "painted", "repaired", "carried",
    "lost", "opened", "wanted", "noticed", "described", "ordered", "photographed", "brought", "kept", "hid",
    "broke", "fixed", "stole", "chose",
]
# Past tense verbs that cannot take a direct object.
INTRANSITIVE_PAST = [
    "arrived", "disappeared", "sneezed", "yawned", "fainted", "collapsed", "slept", "snored", "sighed",
    "giggled", "shivered", "emerged", "vanished", "coughed", "blushed", "frowned",
]
REFLEXIVE_VERBS = [
    "hurt", "saw", "praised", "blamed", "criticized", "admired", "helped", "described", "introduced",
    "defended", "dressed", "reminded", "tested", "surprised", "questioned", "scared", "protected",
    "photographed", "fooled", "congratulated",
]
REFLEXIVE_SUFFIXES = ["", " again", " yesterday", " last week", " at the party", " on purpose", " in public"]
# Past participles of transitive verbs (for NPI sentences), with nothing irregular required.
PARTICIPLES = [
    "seen", "bought", "painted", "sold", "repaired", "found", "borrowed", "broken", "lost", "stolen",
    "opened", "cleaned", "moved", "described", "drawn", "photographed", "touched", "carried", "hidden", "wanted",
]
NPI_BAD_DETERMINERS = ["The", "Every", "This", "That", "Some"]
NPI_ENDINGS = ["", " before", " here", " in this town", " at work"]
# Irregular verbs whose past tense differs from the past participle, with fitting objects.
IRREGULAR = [
    ("wrote", "written", ["letter", "report", "song", "story", "poem"]),
    ("broke", "broken", ["window", "glass", "chair", "plate", "lamp"]),
    ("drove", "driven", ["car", "truck", "bus", "van"]),
    ("ate", "eaten", ["cake", "apple", "sandwich", "soup", "pie"]),
    ("took", "taken", ["bus", "train", "photo", "key", "ticket"]),
    ("saw", "seen", ["movie", "painting", "ship", "accident", "play"]),
    ("stole", "stolen", ["car", "bicycle", "wallet", "painting", "necklace"]),
    ("chose", "chosen", ["book", "dress", "color", "seat", "gift"]),
    ("hid", "hidden", ["key", "letter", "money", "box", "gift"]),
    ("gave", "given", ["speech", "lecture", "talk", "concert"]),
    ("threw", "thrown", ["ball", "stone", "party", "bottle"]),
    ("drew", "drawn", ["map", "picture", "circle", "portrait", "plan"]),
    ("shook", "shaken", ["bottle", "box", "tree", "rug"]),
    ("rode", "ridden", ["horse", "bicycle", "camel", "elephant"]),
    ("sang", "sung", ["song", "hymn", "anthem", "lullaby"]),
    ("drank", "drunk", ["water", "coffee", "tea", "milk", "juice"]),
    ("knew", "known", ["answer", "truth", "rules", "secret"]),
    ("wore", "worn", ["coat", "hat", "dress", "uniform", "scarf"]),
    ("tore", "torn", ["paper", "shirt", "poster", "page"]),
    ("forgot", "forgotten", ["password", "name", "key", "umbrella"]),
    ("froze", "frozen", ["soup", "bread", "meat", "berries"]),
    ("began", "begun", ["project", "meeting", "journey", "lesson"]),
    ("flew", "flown", ["plane", "kite", "drone", "helicopter"]),
    ("spoke", "spoken", ["truth", "words", "lines"]),
    ("grew", "grown", ["tomatoes", "beans", "roses", "beard"]),
]
TIME_SUFFIXES = ["", " yesterday", " twice", " last year", " before noon", " again"]
ISLAND_VERBS = ["forget", "discover", "remember", "learn", "notice", "realize", "hear", "know", "say", "think"]
# Verbs of "say"/"think" type do not take embedded questions at all; they still give a good "that"
# sentence, and the "whether/why/when" version is ungrammatical for two reasons, which is fine for
# a minimal pair but noted here.
ISLAND_BAD = ["whether", "why", "when", "who"]
ISLAND_AUX = ["did", "does", "will", "could", "would"]
EXISTENTIAL_GOOD_PL = ["many", "some", "few", "several", "no", "two", "three", "four"]
EXISTENTIAL_BAD_PL = ["all", "most"]
EXISTENTIAL_GOOD_SG = ["a", "one", "no"]
EXISTENTIAL_BAD_SG = ["every", "each"]
LOCATIONS = [
    "in the garden", "near the station", "on the roof", "behind the house", "at the party",
    "under the bridge", "in the kitchen", "outside the school", "on the beach", "in the park",
    "next to the church", "around the lake", "in the hall", "on the stairs",
]
PREPOSITIONS = ["near", "behind", "beside", "next to", "with", "like", "without", "from"]


def _np(rng: random.Random, plural: bool, nouns=AGENTS) -> str:
    sg, pl = rng.choice(nouns)
    return pl if plural else sg


# --------------------------------------------------------------------------------- templates
# Each template returns (good words, bad words, critical index) for one random draw.
Draw = tuple[list[str], list[str], int]


def _predicate(rng: random.Random, plural: bool) -> tuple[str, str, str]:
    """(good verb, bad verb, rest): ``is/are ADJ`` or an intransitive present verb plus an adverb."""
    if rng.random() < 0.5:
        good, bad = ("are", "is") if plural else ("is", "are")
        return good, bad, " " + rng.choice(ADJECTIVES)
    sg, pl = rng.choice(INTRANSITIVE_PRESENT)
    good, bad = (pl, sg) if plural else (sg, pl)
    return good, bad, rng.choice(PRESENT_ADVERBS)


def _with_ending(prefix: list[str], good: str, bad: str, ending: str) -> Draw:
    """The pair ``prefix + good + ending`` / ``prefix + bad + ending`` (a full stop added), split into words."""
    return prefix + f"{good}{ending}.".split(), prefix + f"{bad}{ending}.".split(), len(prefix)


def _sv_agreement(rng: random.Random, modifier: Callable[[random.Random, bool], str]) -> Draw:
    """``The <head> <modifier> <predicate>.``: the verb agrees with the head across the modifier."""
    plural = rng.random() < 0.5
    head = _np(rng, plural)
    middle = modifier(rng, plural)
    good, bad, rest = _predicate(rng, plural)
    return _with_ending(f"The {head} {middle}".split(), good, bad, rest)


def _relative_clause(rng: random.Random, plural: bool) -> str:
    if rng.random() < 0.7:  # attractor noun of the opposite number
        inner = "the " + _np(rng, not plural)
    else:
        inner = rng.choice(NAMES)
    return f"that {inner} {rng.choice(SOCIAL_VERBS)}"


def _prepositional_phrase(rng: random.Random, plural: bool) -> str:
    attractor = _np(rng, not plural, AGENTS if rng.random() < 0.6 else THINGS)
    return f"{rng.choice(PREPOSITIONS)} the {attractor}"


def _sv_relative(rng: random.Random) -> Draw:
    return _sv_agreement(rng, _relative_clause)


def _sv_prepositional(rng: random.Random) -> Draw:
    return _sv_agreement(rng, _prepositional_phrase)


def _det_noun(rng: random.Random) -> Draw:
    plural = rng.random() < 0.5
    det = rng.choice(["these", "those"] if plural else ["this", "that"])
    sg, pl = rng.choice(THINGS)
    good, bad = (pl, sg) if plural else (sg, pl)
    subject = rng.choice(NAMES) if rng.random() < 0.5 else "The " + _np(rng, rng.random() < 0.5)
    adjective = rng.choice(THING_ADJECTIVES) + " " if rng.random() < 0.5 else ""
    prefix = f"{subject} {rng.choice(THING_VERBS)} {det} {adjective}".split()
    return prefix + [good + "."], prefix + [bad + "."], len(prefix)


def _anaphor(rng: random.Random) -> Draw:
    kind = rng.random()
    if kind < 0.35:
        subject, good, bads = rng.choice(FEMALE_NAMES), "herself", ["himself", "themselves"]
    elif kind < 0.7:
        subject, good, bads = rng.choice(MALE_NAMES), "himself", ["herself", "themselves"]
    elif kind < 0.85:
        subject, good, bads = "The " + _np(rng, True), "themselves", ["himself", "herself", "itself"]
    else:
        a, b = rng.sample(NAMES, 2)
        subject, good, bads = f"{a} and {b}", "themselves", ["himself", "herself"]
    bad = rng.choice(bads)
    suffix = rng.choice(REFLEXIVE_SUFFIXES)
    prefix = f"{subject} {rng.choice(REFLEXIVE_VERBS)}".split()
    return _with_ending(prefix, good, bad, suffix)


def _npi(rng: random.Random) -> Draw:
    plural = rng.random() < 0.3
    noun = _np(rng, plural)
    aux = "have" if plural else "has"
    obj_sg, obj_pl = rng.choice(THINGS)
    obj = f"the {obj_pl if rng.random() < 0.4 else obj_sg}"
    bad = rng.choice([d for d in NPI_BAD_DETERMINERS if not (plural and d in ("Every", "This", "That"))])
    rest = f"{noun} {aux} ever {rng.choice(PARTICIPLES)} {obj}{rng.choice(NPI_ENDINGS)}.".split()
    return ["No"] + rest, [bad] + rest, 0


def _irregular(rng: random.Random) -> Draw:
    past, participle, objects = rng.choice(IRREGULAR)
    subject = rng.choice(NAMES) if rng.random() < 0.5 else "The " + _np(rng, rng.random() < 0.5)
    obj = f"the {rng.choice(objects)}{rng.choice(TIME_SUFFIXES)}."
    if rng.random() < 0.5:
        prefix = f"{subject} had".split()
        good, bad = participle, past
    else:
        prefix = subject.split()
        good, bad = past, participle
    return prefix + [good] + obj.split(), prefix + [bad] + obj.split(), len(prefix)


def _argument_structure(rng: random.Random) -> Draw:
    subject = rng.choice(NAMES) if rng.random() < 0.5 else "The " + _np(rng, rng.random() < 0.5)
    obj = f"the {_np(rng, rng.random() < 0.5)}{rng.choice(TIME_SUFFIXES)}."
    prefix = subject.split()
    return (
        prefix + [rng.choice(SOCIAL_VERBS)] + obj.split(),
        prefix + [rng.choice(INTRANSITIVE_PAST)] + obj.split(),
        len(prefix),
    )


def _wh_island(rng: random.Random) -> Draw:
    aux = rng.choice(ISLAND_AUX)
    matrix_subject = rng.choice(NAMES) if rng.random() < 0.6 else "the " + _np(rng, rng.random() < 0.5)
    inner_subject = rng.choice(NAMES) if rng.random() < 0.5 else "the " + _np(rng, rng.random() < 0.5)
    verb = rng.choice(ISLAND_VERBS)
    prefix = f"What {aux} {matrix_subject} {verb}".split()
    rest = f"{inner_subject} {rng.choice(THING_VERBS)}?".split()
    return prefix + ["that"] + rest, prefix + [rng.choice(ISLAND_BAD)] + rest, len(prefix)


def _existential(rng: random.Random) -> Draw:
    plural = rng.random() < 0.65
    past = rng.random() < 0.5
    if plural:
        be = "were" if past else "are"
        good, bad = rng.choice(EXISTENTIAL_GOOD_PL), rng.choice(EXISTENTIAL_BAD_PL)
    else:
        be = "was" if past else "is"
        good, bad = rng.choice(EXISTENTIAL_GOOD_SG), rng.choice(EXISTENTIAL_BAD_SG)
    noun = _np(rng, plural, AGENTS if rng.random() < 0.6 else THINGS)
    prefix = f"There {be}".split()
    rest = f"{noun} {rng.choice(LOCATIONS)}.".split()
    return prefix + [good] + rest, prefix + [bad] + rest, len(prefix)


#: Phenomenon name -> template (one random draw per call).
TEMPLATES: dict[str, Callable[[random.Random], Draw]] = {
    "sv_agreement_relative_clause": _sv_relative,
    "sv_agreement_prepositional": _sv_prepositional,
    "det_noun_agreement": _det_noun,
    "anaphor_agreement": _anaphor,
    "npi_licensing": _npi,
    "irregular_past_participle": _irregular,
    "argument_structure": _argument_structure,
    "wh_island": _wh_island,
    "existential_quantifiers": _existential,
}
PHENOMENA: tuple[str, ...] = tuple(TEMPLATES)


def generate_minimal_pairs(
    n_per_phenomenon: int = DEFAULT_PER_PHENOMENON,
    *,
    seed: int = DEFAULT_SEED,
    phenomena: Sequence[str] | None = None,
) -> list[MinimalPair]:
    """Generate unique minimal pairs, ``n_per_phenomenon`` for each phenomenon, deterministically.

    Each phenomenon draws from its own ``random.Random(f"{seed}:{phenomenon}")`` (string seeds are
    hashed with SHA-512 by Python, so the output does not depend on ``PYTHONHASHSEED``), so adding a
    phenomenon never changes the others. Draws that repeat an earlier pair are skipped.

    Args:
        n_per_phenomenon: pairs per phenomenon (each template allows many thousands).
        seed: the seed; the shipped snapshot uses :data:`DEFAULT_SEED`.
        phenomena: a subset of :data:`PHENOMENA` (default: all, in that order).

    Example:
        >>> pairs = generate_minimal_pairs(2, phenomena=["anaphor_agreement"])
        >>> [p.phenomenon for p in pairs]
        ['anaphor_agreement', 'anaphor_agreement']
    """
    check_positive_int(n_per_phenomenon, "n_per_phenomenon")
    names = list(PHENOMENA) if phenomena is None else list(phenomena)
    for name in names:
        if name not in TEMPLATES:
            raise InputError(f"unknown phenomenon {name!r}; choose from {', '.join(PHENOMENA)}.")
    out: list[MinimalPair] = []
    for name in names:
        rng = random.Random(f"{seed}:{name}")
        seen: set[tuple[str, str]] = set()
        attempts = 0
        while len(seen) < n_per_phenomenon:
            attempts += 1
            if attempts > 50 * n_per_phenomenon + 1000:
                raise InputError(
                    f"could only generate {len(seen)} distinct pairs for {name!r}; ask for fewer."
                )
            good_words, bad_words, critical = TEMPLATES[name](rng)
            good, bad = " ".join(good_words), " ".join(bad_words)
            if (good, bad) in seen:
                continue
            seen.add((good, bad))
            out.append(MinimalPair(name, good, bad, critical))
    return out


def write_minimal_pairs(pairs: Iterable[MinimalPair], path: str | os.PathLike) -> Path:
    """Write pairs as JSONL (one object per line: phenomenon, good, bad, critical).

    Example:
        >>> write_minimal_pairs(generate_minimal_pairs(1), "/tmp/pairs.jsonl").name
        'pairs.jsonl'
    """
    text = "".join(json.dumps(pair.to_dict(), ensure_ascii=False) + "\n" for pair in pairs)
    return atomic_write(path, lambda tmp: tmp.write_bytes(text.encode("utf-8")))


def snapshot_path() -> Path:
    """Path of the shipped snapshot (``vsem_lens/data/minimal_pairs.jsonl``) in a source checkout."""
    return Path(__file__).parent / "data" / DEFAULT_FILE


# ------------------------------------------------------------------------------------ loading
def load_minimal_pairs(
    spec: str | os.PathLike = "default", *, phenomena: Sequence[str] | None = None
) -> list[MinimalPair]:
    """Load minimal pairs: the shipped snapshot (``"default"``) or a user JSONL file.

    A user file has one JSON object per line with string fields ``good``, ``bad`` and ``phenomenon``
    (an optional integer ``critical`` word index; other fields are ignored; blank lines are skipped).

    Args:
        spec: ``"default"`` or a path to a ``.jsonl`` file.
        phenomena: keep only these phenomena (each must occur in the file).

    Raises:
        InputError: the file does not exist or is not a ``.jsonl`` file.
        DataError: a row is malformed; the message gives the line number and what to fix.

    Example:
        >>> pairs = load_minimal_pairs()
        >>> len(pairs) >= 8 * 200
        True
    """
    if isinstance(spec, str) and spec == "default":
        content = resources.files("vsem_lens").joinpath("data", DEFAULT_FILE).read_text(encoding="utf-8")
        pairs = _parse(content, "the packaged minimal pairs")
    else:
        path, content = read_user_file(
            spec, "minimal-pair file", (".jsonl",),
            "a .jsonl file (one JSON object per line with 'good', 'bad' and 'phenomenon')",
        )
        pairs = _parse(content, repr(str(path)))
    if phenomena is not None:
        present = {p.phenomenon for p in pairs}
        missing = [name for name in phenomena if name not in present]
        if missing:
            raise InputError(f"phenomena {missing} are not in the file; it has {sorted(present)}.")
        keep = set(phenomena)
        pairs = [p for p in pairs if p.phenomenon in keep]
    return pairs


def _parse(content: str, where: str) -> list[MinimalPair]:
    pairs = []
    for number, obj in iter_jsonl_objects(content, where):
        for key in ("good", "bad", "phenomenon"):
            value = obj.get(key)
            if key not in obj:
                raise DataError(
                    f"{where}, line {number}: missing field {key!r}; every row needs 'good', 'bad' and "
                    "'phenomenon'."
                )
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{where}, line {number}: field {key!r} must be a non-empty string.")
        if obj["good"] == obj["bad"]:
            raise DataError(f"{where}, line {number}: 'good' and 'bad' are the same sentence; fix or remove it.")
        critical = obj.get("critical")
        if critical is not None and (isinstance(critical, bool) or not isinstance(critical, int) or critical < 0):
            raise DataError(f"{where}, line {number}: 'critical' must be a word index (integer >= 0) or absent.")
        pairs.append(MinimalPair(obj["phenomenon"], obj["good"], obj["bad"], critical))
    if not pairs:
        raise DataError(f"{where} contains no minimal pairs.")
    return pairs


def _check_pairs(pairs: Sequence[MinimalPair]) -> list[MinimalPair]:
    if isinstance(pairs, MinimalPair):
        pairs = [pairs]
    pairs = list(pairs)
    if not pairs:
        raise InputError("no minimal pairs were given; pass a non-empty list (see load_minimal_pairs).")
    for index, pair in enumerate(pairs):
        if not isinstance(pair, MinimalPair):
            raise InputError(
                f"pair {index} is a {type(pair).__name__}, not a MinimalPair; load pairs with "
                "load_minimal_pairs or build MinimalPair(phenomenon, good, bad)."
            )
    return pairs


# ------------------------------------------------------------------------------------ scoring
def _batches(n: int, batch_size: int) -> Iterable[slice]:
    check_positive_int(batch_size, "batch_size")
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


def _token_logprobs(
    logits: Float[Tensor, "batch pos d_vocab"], tokens: Tokens
) -> Float[Tensor, "batch pos_minus_1"]:
    """Log p(token_{t+1} | <= t) at every real next token (0 elsewhere), without a log-softmax buffer."""
    ids = tokens.ids.to(logits.device)
    mask = tokens.mask.to(logits.device)
    head = logits[:, :-1].float()
    target = head.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    lp = target - torch.logsumexp(head, dim=-1)
    return lp * mask[:, 1:].to(lp.dtype)


def _text_logprobs(
    model: HookedModel, texts: Sequence[str], *, prepend_bos: bool | None = None, max_length: int | None = None
) -> tuple[Float[Tensor, "text pos_minus_1"], Tokens]:
    """Tokenise ``texts``, run the model (in the caller's grad mode) and return the log-probability of
    every real next token (0 at padding), with the tokens.
    """
    tokens = model.tokenize(list(texts), prepend_bos=prepend_bos, max_length=max_length)
    logits = model.bridge(tokens.ids.to(model.device), attention_mask=tokens.mask.to(model.device))
    return _token_logprobs(logits, tokens), tokens


def sentence_logprobs(
    model: HookedModel,
    sentences: Sequence[str],
    *,
    batch_size: int = 32,
    prepend_bos: bool = True,
) -> Float[Tensor, " sentence"]:
    """Sum of token log-probabilities (nats, float64) of each sentence under the model.

    With ``prepend_bos=True`` (default) every token of the sentence is scored given a BOS token;
    otherwise the first token is only context.

    Example:
        >>> sentence_logprobs(model, ["The cat sleeps.", "The cat sleep."])  # doctest: +SKIP
        tensor([-21.3, -24.9], dtype=torch.float64)
    """
    out = torch.empty(len(sentences), dtype=torch.float64)
    for span in _batches(len(sentences), batch_size):
        with torch.no_grad():
            lp, _ = _text_logprobs(model, sentences[span], prepend_bos=prepend_bos)
        out[span] = lp.sum(dim=1).double().cpu()
    return out


def score_minimal_pairs(
    model: HookedModel,
    pairs: Sequence[MinimalPair],
    *,
    batch_size: int = 32,
    prepend_bos: bool = True,
) -> pd.DataFrame:
    """Per-pair log-probabilities: ``phenomenon, good, bad, logp_good, logp_bad, margin, correct``.

    ``margin = logp_good - logp_bad`` (nats); ``correct`` is ``margin > 0``.

    Example:
        >>> score_minimal_pairs(model, pairs[:2]).margin.round(1).tolist()  # doctest: +SKIP
    """
    pairs = _check_pairs(pairs)
    sentences = [p.good for p in pairs] + [p.bad for p in pairs]
    scores = sentence_logprobs(model, sentences, batch_size=batch_size, prepend_bos=prepend_bos).numpy()
    n = len(pairs)
    df = pd.DataFrame(
        {
            "phenomenon": [p.phenomenon for p in pairs],
            "good": [p.good for p in pairs],
            "bad": [p.bad for p in pairs],
            "logp_good": scores[:n],
            "logp_bad": scores[n:],
        }
    )
    df["margin"] = df.logp_good - df.logp_bad
    df["correct"] = df.margin > 0
    return df


def _wilson(k: np.ndarray, n: np.ndarray, z: float = 1.959964) -> tuple[np.ndarray, np.ndarray]:
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return centre - half, centre + half


def summarize_pair_scores(scores: pd.DataFrame, by: Sequence[str] = ()) -> pd.DataFrame:
    """Accuracy per phenomenon (and per ``by`` columns) from per-pair scores, plus an ``all`` row.

    Columns: ``*by, phenomenon, n_pairs, accuracy, accuracy_ci_low, accuracy_ci_high`` (Wilson 95%),
    ``n_ties, mean_margin, median_margin``.

    Example:
        >>> summarize_pair_scores(score_minimal_pairs(model, pairs))  # doctest: +SKIP
    """
    by = list(by)
    frames = [scores, scores.assign(phenomenon="all")]
    data = pd.concat(frames, ignore_index=True)
    grouped = data.groupby(by + ["phenomenon"], sort=False)
    out = grouped.agg(
        n_pairs=("margin", "size"),
        accuracy=("correct", "mean"),
        n_ties=("margin", lambda m: int((m == 0).sum())),
        mean_margin=("margin", "mean"),
        median_margin=("margin", "median"),
    ).reset_index()
    low, high = _wilson(out.accuracy.to_numpy() * out.n_pairs.to_numpy(), out.n_pairs.to_numpy().astype(float))
    out.insert(out.columns.get_loc("accuracy") + 1, "accuracy_ci_low", low)
    out.insert(out.columns.get_loc("accuracy") + 2, "accuracy_ci_high", high)
    return out


def minimal_pair_accuracy(
    model: HookedModel,
    pairs: Sequence[MinimalPair] | str | os.PathLike = "default",
    *,
    batch_size: int = 32,
    prepend_bos: bool = True,
) -> pd.DataFrame:
    """Minimal-pair accuracy per phenomenon: is the grammatical sentence more probable?

    A sentence's log-probability is the sum of its tokens' log-probabilities (see the module
    docstring for the BOS rule); a pair counts as correct when ``logp(good) > logp(bad)``.

    Args:
        model: a :class:`~vsem_lens.core.models.HookedModel`.
        pairs: a list of :class:`MinimalPair`, ``"default"`` (the shipped pairs) or a JSONL path.
        batch_size: sentences per forward pass.
        prepend_bos: score the first token too by conditioning on BOS (default).

    Returns:
        One row per phenomenon plus ``all``: ``phenomenon, n_pairs, accuracy, accuracy_ci_low,
        accuracy_ci_high, n_ties, mean_margin, median_margin`` (margins in nats).

    Example:
        >>> acc = minimal_pair_accuracy(model, load_minimal_pairs())  # doctest: +SKIP
        >>> acc.set_index("phenomenon").accuracy.round(2)              # doctest: +SKIP
    """
    if isinstance(pairs, (str, os.PathLike)):
        pairs = load_minimal_pairs(pairs)
    scores = score_minimal_pairs(model, pairs, batch_size=batch_size, prepend_bos=prepend_bos)
    return summarize_pair_scores(scores)


def layer_sentence_logprobs(
    model: HookedModel,
    sentences: Sequence[str],
    *,
    frame: str | Lens = "final_norm",
    lens: Lens | None = None,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    token_chunk: int = 256,
    prepend_bos: bool = True,
) -> Float[Tensor, "layer sentence"]:
    """Sentence log-probabilities read from each layer's residual (``resid_post``) through a lens.

    Per layer the lens logits are the model's logits of ``lens(h_l)`` (its one logits path,
    :meth:`~vsem_lens.core.models.HookedModel.unembedding`; float32 for half-precision models) for
    ``token_chunk`` tokens at a time; only ``logsumexp`` and the logit of the actual next token are
    kept, so memory is ``token_chunk x d_vocab`` and no [layers, tokens, vocab] tensor is built.

    Example:
        >>> layer_sentence_logprobs(model, ["The cat sleeps."]).shape  # doctest: +SKIP
        torch.Size([30, 1])
    """
    from ..core.capture import check_layers, iter_capture

    layer_list = check_layers(layers, model.n_layers)
    lens_obj = resolve_frame(frame, model, lens=lens)
    check_positive_int(token_chunk, "token_chunk")
    out = torch.zeros(len(layer_list), len(sentences), dtype=torch.float64)
    unembedding = model.unembedding()
    for span in _batches(len(sentences), batch_size):
        tokens = model.tokenize(list(sentences[span]), prepend_bos=prepend_bos)
        lengths = tokens.lengths
        for batch in iter_capture(model, tokens, layers=layer_list, batch_size=tokens.ids.shape[0]):
            doc, pos = batch.doc_index, batch.positions
            has_next = pos + 1 < lengths[doc]
            select = has_next.nonzero().squeeze(1)
            doc_s, pos_s = doc[select], pos[select]
            targets = tokens.ids[doc_s, pos_s + 1].to(model.device)
            resid = batch.acts["resid_post"][:, select.to(model.device)]
            with torch.no_grad():
                for li, layer in enumerate(layer_list):
                    for start in range(0, select.numel(), token_chunk):
                        part = slice(start, start + token_chunk)
                        logits = unembedding(lens_obj(resid[li, part], layer))
                        lp = logits.gather(1, targets[part].unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, -1)
                        out[li].index_add_(0, doc_s[part] + span.start, lp.double().cpu())
    return out


def minimal_pair_accuracy_by_layer(
    model: HookedModel,
    pairs: Sequence[MinimalPair] | str | os.PathLike = "default",
    *,
    frame: str | Lens = "final_norm",
    lens: Lens | None = None,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    token_chunk: int = 256,
    prepend_bos: bool = True,
) -> pd.DataFrame:
    """Minimal-pair accuracy per layer and phenomenon, reading each layer through a lens.

    Args:
        frame: ``"final_norm"`` (logit lens: the model's final norm then the unembedding) or
            ``"tuned"`` (a trained :class:`~vsem_lens.lenses.tuned.TunedLens`, given as ``lens=`` or found
            in the cache; see :func:`~vsem_lens.lenses.frames.resolve_frame`), or a :class:`Lens`.
            ``"raw"`` skips the final norm (rarely meaningful for log-probabilities).
        layers: layers to read (default all); the last layer in the ``final_norm`` frame equals
            :func:`minimal_pair_accuracy`.

    Returns:
        Rows ``layer, phenomenon, n_pairs, accuracy, accuracy_ci_low, accuracy_ci_high, n_ties,
        mean_margin, median_margin, frame`` (``phenomenon == "all"`` pools every pair).

    Example:
        >>> by_layer = minimal_pair_accuracy_by_layer(model, pairs, frame="final_norm")  # doctest: +SKIP
        >>> preference_onset(by_layer)                                                    # doctest: +SKIP
    """
    if isinstance(pairs, (str, os.PathLike)):
        pairs = load_minimal_pairs(pairs)
    pairs = _check_pairs(pairs)
    from ..core.capture import check_layers

    layer_list = check_layers(layers, model.n_layers)
    sentences = [p.good for p in pairs] + [p.bad for p in pairs]
    logp = layer_sentence_logprobs(
        model, sentences, frame=frame, lens=lens, layers=layer_list, batch_size=batch_size,
        token_chunk=token_chunk, prepend_bos=prepend_bos,
    ).numpy()
    n = len(pairs)
    frames = []
    for li, layer in enumerate(layer_list):
        margin = logp[li, :n] - logp[li, n:]
        frames.append(
            pd.DataFrame({"layer": layer, "phenomenon": [p.phenomenon for p in pairs], "margin": margin, "correct": margin > 0})
        )
    out = summarize_pair_scores(pd.concat(frames, ignore_index=True), by=["layer"])
    out["frame"] = frame.frame if isinstance(frame, Lens) else frame
    return out


def preference_onset(by_layer: pd.DataFrame, *, threshold: float | None = None, margin: float = 0.05) -> pd.DataFrame:
    """The layer at which each phenomenon's preference for the grammatical sentence appears.

    ``onset_layer`` is the first layer from which the accuracy stays at or above ``threshold`` for
    every later layer read; by default ``threshold = final accuracy - margin`` (the layer where the
    final preference is (nearly) reached). It is ``NaN`` when the final accuracy is not above chance
    (0.5), i.e. there is no preference to find.

    Example:
        >>> preference_onset(by_layer)[["phenomenon", "onset_layer"]]  # doctest: +SKIP
    """
    rows = []
    for phenomenon, group in by_layer.groupby("phenomenon", sort=False):
        group = group.sort_values("layer")
        acc = group.accuracy.to_numpy()
        layers = group.layer.to_numpy()
        final = float(acc[-1])
        level = final - margin if threshold is None else float(threshold)
        onset = math.nan
        if final > 0.5:
            above = acc >= level
            # first index from which every later layer is above
            for i in range(len(acc)):
                if above[i:].all():
                    onset = int(layers[i])
                    break
        rows.append({"phenomenon": phenomenon, "final_accuracy": final, "threshold": level,
                     "onset_layer": onset, "best_layer": int(layers[int(np.argmax(acc))]),
                     "best_accuracy": float(acc.max())})
    return pd.DataFrame(rows)
