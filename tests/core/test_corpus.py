"""load_corpus: the packaged default corpus, .txt/.jsonl/.csv files, and clear errors naming the line."""

from __future__ import annotations

import json

import pytest

from vsem_lens.core.corpus import load_corpus
from vsem_lens.core.errors import DataError, InputError, VsemLensError


def test_txt_one_text_per_non_empty_line(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("first text\n\n   \nsecond text  \r\nthird\n", encoding="utf-8")
    assert load_corpus(path) == ["first text", "second text  ", "third"]


def test_jsonl_text_field_and_blank_lines(tmp_path):
    path = tmp_path / "c.jsonl"
    rows = [{"text": "Hello <b>world</b>.", "genre": "x"}, {"text": "Zweiter Text \u00e9\u00e8"}]
    path.write_text("\n".join(json.dumps(r) for r in rows[:1]) + "\n\n" + json.dumps(rows[1]) + "\n", encoding="utf-8")
    assert load_corpus(str(path)) == ["Hello <b>world</b>.", "Zweiter Text \u00e9\u00e8"]


def test_csv_text_column(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text('id,text,label\n1,"A text, with a comma",a\n2,"Multi\nline",b\n\n', encoding="utf-8")
    assert load_corpus(path) == ["A text, with a comma", "Multi\nline"]


def test_utf8_bom_is_ignored(tmp_path):
    path = tmp_path / "c.csv"
    path.write_bytes("\ufefftext\nhello\n".encode("utf-8"))
    assert load_corpus(path) == ["hello"]


def test_default_corpus():
    from importlib import resources

    if not resources.files("vsem_lens").joinpath("data", "corpus.jsonl").is_file():
        pytest.skip("vsem_lens/data/corpus.jsonl (the default corpus) has not landed yet")
    texts = load_corpus("default")
    assert len(texts) >= 100
    assert all(isinstance(t, str) and t.strip() for t in texts)


@pytest.mark.parametrize(
    ("name", "content", "error", "fragment"),
    [
        ("empty.txt", "\n  \n", DataError, "contains no texts"),
        ("empty.jsonl", "", DataError, "contains no texts"),
        ("bad.jsonl", '{"text": "ok"}\n\n{"text": broken}\n', DataError, "line 3: not valid JSON"),
        ("nofield.jsonl", '{"text": "ok"}\n{"body": "x"}\n', DataError, 'line 2: no "text" field (fields: body)'),
        ("notstr.jsonl", '{"text": 3}\n', DataError, 'line 1: "text" is a int'),
        ("list.jsonl", '["text"]\n', DataError, "line 1: expected a JSON object"),
        ("emptytext.jsonl", '{"text": "a"}\n{"text": "  "}\n', DataError, "line 2"),
        ("nocol.csv", "id,body\n1,hello\n", DataError, "no \"text\" column (columns: 'id', 'body')"),
        ("emptycell.csv", "text,x\nhello,1\n,2\n", DataError, "line 3"),
        ("headeronly.csv", "text\n", DataError, "contains no texts"),
        ("corpus.md", "hello\n", InputError, "unsupported extension '.md'"),
    ],
)
def test_errors_name_the_problem(tmp_path, name, content, error, fragment):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(error) as info:
        load_corpus(path)
    assert fragment in str(info.value)
    assert isinstance(info.value, VsemLensError)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_corpus(tmp_path / "nope.jsonl")
    with pytest.raises(InputError, match="is a directory"):
        load_corpus(tmp_path)


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_corpus(path)
