r"""A seeded generator of BLiMP-style minimal pairs written for vsem-lens: vocabulary lists, one template
per phenomenon and :func:`generate_minimal_pairs`.

The generator uses its own vocabulary lists and templates (nothing is copied from BLiMP). Every pair
differs in exactly one whitespace-separated word, the *critical word*, whose index is stored with the
pair (``critical``), so the pairs can be checked mechanically.

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

Example:
    >>> pairs = generate_minimal_pairs(n_per_phenomenon=3, seed=0)
    >>> len(pairs), pairs[0].phenomenon
    (27, 'sv_agreement_relative_clause')
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

from ..core.errors import InputError, check_positive_int
from .pairs import MinimalPair

DEFAULT_SEED = 0
DEFAULT_PER_PHENOMENON = 200


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


__all__ = ["DEFAULT_PER_PHENOMENON", "DEFAULT_SEED", "PHENOMENA", "TEMPLATES", "generate_minimal_pairs"]
