"""Quality checks on the packaged data files: the default corpus and every embedded task file.

The task checks are generic: any ``vsem_lens/data/tasks/*.jsonl`` file present is checked with the same
schema (``text``, ``label``, ``split``; extra fields such as ``domain`` are allowed).
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from importlib import resources
from itertools import combinations
from pathlib import Path

import pytest

DATA = Path(str(resources.files("vsem_lens") / "data"))
CORPUS = DATA / "corpus.jsonl"
TASK_FILES = sorted((DATA / "tasks").glob("*.jsonl"))
SPLITS = {"train", "validation", "test"}
GENRES = {"fact", "narrative", "dialogue", "code", "list", "instruction", "news", "opinion"}
MAX_JACCARD = 0.7
PREFIX_WORDS = 6

_PUNCT = re.compile(r"[^\w\s]")


def _words(text: str) -> list[str]:
    """Lowercased words with punctuation removed."""
    return _PUNCT.sub("", text.lower()).split()


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        assert line.strip(), f"{path.name}, line {number}: blank line"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:  # pragma: no cover - only on broken files
            pytest.fail(f"{path.name}, line {number}: invalid JSON ({exc.msg})")
        assert isinstance(record, dict), f"{path.name}, line {number}: not a JSON object"
        records.append(record)
    assert records, f"{path.name} is empty"
    return records


def _check_texts(records: list[dict], name: str) -> list[str]:
    texts = []
    for number, record in enumerate(records, start=1):
        text = record.get("text")
        assert isinstance(text, str), f"{name}, record {number}: 'text' is not a string"
        assert text.strip(), f"{name}, record {number}: empty text"
        assert text == text.strip(), f"{name}, record {number}: leading/trailing whitespace"
        texts.append(text)
    return texts


def _exact_duplicates(texts: list[str]) -> list[str]:
    return [text for text, count in Counter(texts).items() if count > 1]


def _near_duplicates(texts: list[str]) -> list[tuple[float, str, str]]:
    """Pairs whose word sets have Jaccard similarity above MAX_JACCARD (all pairs; a few hundred thousand)."""
    sets = [frozenset(_words(text)) for text in texts]
    found = []
    for i, j in combinations(range(len(texts)), 2):
        a, b = sets[i], sets[j]
        if not a or not b:
            continue
        # Jaccard <= min(|a|, |b|) / max(|a|, |b|): skip pairs whose sizes alone rule them out.
        if min(len(a), len(b)) <= MAX_JACCARD * max(len(a), len(b)):
            continue
        jaccard = len(a & b) / len(a | b)
        if jaccard > MAX_JACCARD:
            found.append((round(jaccard, 3), texts[i], texts[j]))
    return found


def _shared_prefixes(texts: list[str]) -> list[tuple[str, str]]:
    seen: dict[tuple[str, ...], str] = {}
    clashes = []
    for text in texts:
        key = tuple(_words(text)[:PREFIX_WORDS])
        if key in seen and seen[key] != text:
            clashes.append((seen[key], text))
        seen.setdefault(key, text)
    return clashes


def test_near_duplicate_detector():
    texts = [
        "The quick brown fox jumps over the lazy dog.",
        "the quick brown fox jumps over the lazy cat",
        "A completely different sentence about rivers and mountains.",
    ]
    found = _near_duplicates(texts)
    assert [(a, b) for _, a, b in found] == [(texts[0], texts[1])]
    assert _shared_prefixes(texts) == [(texts[0], texts[1])]


# ---------------------------------------------------------------------------------------------- corpus


def test_corpus_schema_and_size():
    records = _read_jsonl(CORPUS)
    texts = _check_texts(records, CORPUS.name)
    assert len(texts) >= 360
    for number, record in enumerate(records, start=1):
        assert set(record) == {"text", "genre"}, f"corpus record {number}: keys {sorted(record)}"
        assert record["genre"] in GENRES, f"corpus record {number}: unknown genre {record['genre']!r}"
    genres = Counter(record["genre"] for record in records)
    assert set(genres) == GENRES
    fair = len(records) / len(GENRES)
    assert min(genres.values()) >= fair / 2, genres
    words = sum(len(text.split()) for text in texts)
    assert 12_000 <= words <= 16_000, words


def test_corpus_no_duplicates():
    texts = _check_texts(_read_jsonl(CORPUS), CORPUS.name)
    assert _exact_duplicates(texts) == []
    assert _near_duplicates(texts) == []
    assert _shared_prefixes(texts) == []


def test_corpus_is_readable_by_the_corpus_loader():
    from vsem_lens.core.corpus import _parse, default_corpus_text

    texts = _parse("jsonl", default_corpus_text(), "default")
    assert len(texts) == len(_read_jsonl(CORPUS))


# ----------------------------------------------------------------------------------------------- tasks


def test_task_files_exist():
    assert TASK_FILES, "no embedded task files found"
    assert "sentiment.jsonl" in {path.name for path in TASK_FILES}


@pytest.mark.parametrize("path", TASK_FILES, ids=lambda p: p.stem)
def test_task_schema(path):
    records = _read_jsonl(path)
    _check_texts(records, path.name)
    for number, record in enumerate(records, start=1):
        missing = {"text", "label", "split"} - set(record)
        assert not missing, f"{path.name}, record {number}: missing {sorted(missing)}"
        assert isinstance(record["label"], str) and record["label"].strip(), f"{path.name}, record {number}: bad label"
    assert len(records) >= 600, f"{path.name}: only {len(records)} examples"
    assert len({record["label"] for record in records}) >= 2


@pytest.mark.parametrize("path", TASK_FILES, ids=lambda p: p.stem)
def test_task_splits(path):
    records = _read_jsonl(path)
    labels = sorted({record["label"] for record in records})
    by_split: dict[str, Counter] = defaultdict(Counter)
    for record in records:
        by_split[record["split"]][record["label"]] += 1
    assert set(by_split) == SPLITS, f"{path.name}: splits {sorted(by_split)}"
    for split, counts in by_split.items():
        assert set(counts) == set(labels), f"{path.name}/{split}: missing labels {set(labels) - set(counts)}"
        fair = sum(counts.values()) / len(labels)
        low = {label: n for label, n in counts.items() if n < fair / 2}
        assert not low, f"{path.name}/{split}: under-represented labels {low} (fair share {fair:.1f})"
    where: dict[str, set[str]] = defaultdict(set)
    for record in records:
        where[record["text"]].add(record["split"])
    leaked = [text for text, splits in where.items() if len(splits) > 1]
    assert leaked == [], f"{path.name}: texts in more than one split: {leaked[:3]}"


@pytest.mark.parametrize("path", TASK_FILES, ids=lambda p: p.stem)
def test_task_no_duplicates(path):
    texts = _check_texts(_read_jsonl(path), path.name)
    assert _exact_duplicates(texts) == []
    assert _near_duplicates(texts) == []
    assert _shared_prefixes(texts) == []


def test_no_text_shared_between_files():
    owners: dict[str, set[str]] = defaultdict(set)
    for path in [CORPUS, *TASK_FILES]:
        for record in _read_jsonl(path):
            owners[record["text"]].add(path.name)
    shared = {text: files for text, files in owners.items() if len(files) > 1}
    assert shared == {}


def test_sentiment_task_layout():
    path = DATA / "tasks" / "sentiment.jsonl"
    records = _read_jsonl(path)
    assert len(records) == 600
    for record in records:
        assert record["label"] in {"positive", "negative"}
        assert record["domain"] in {"film", "product", "restaurant"}
        assert 8 <= len(record["text"].split()) <= 40, record["text"]
    assert Counter(r["label"] for r in records) == {"positive": 300, "negative": 300}
    assert Counter(r["split"] for r in records) == {"train": 360, "validation": 120, "test": 120}
    for split in SPLITS:
        rows = [r for r in records if r["split"] == split]
        labels = Counter(r["label"] for r in rows)
        assert labels["positive"] == labels["negative"], (split, labels)
        domains = Counter(r["domain"] for r in rows)
        assert max(domains.values()) - min(domains.values()) <= len(rows) // 10, (split, domains)
