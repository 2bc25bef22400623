"""Tasks: embedded tasks, file/dataset loaders, splits, and every bad-input error."""

from __future__ import annotations

import json

import pytest

import vsem_lens as vl
from vsem_lens.calibration.datasets import TextClassificationTask
from vsem_lens.calibration.shipped_tasks import EMBEDDED_TASKS, embedded_task_names, load_task
from vsem_lens.calibration.splits import ensure_splits
from vsem_lens.calibration.task_files import load_task_file


@pytest.mark.parametrize("name", embedded_task_names())
def test_embedded_tasks_load_with_three_disjoint_splits(name):
    task = load_task(name)
    assert set(task.split_names) == {"train", "validation", "test"}
    assert set(task.labels) == set(EMBEDDED_TASKS[name]["verbalizer"])
    for split in ("train", "validation", "test"):
        part = task.split(split)
        assert set(part.labels) == set(task.label_names), f"{name}/{split} misses a class"
    # No text (case/whitespace-normalised) in two splits: test scores are not inflated by leakage.
    seen: dict[str, str] = {}
    for text, split in zip(task.texts, task.splits):
        key = " ".join(text.lower().split())
        assert seen.setdefault(key, split) == split, f"{name}: {text!r} occurs in {seen[key]} and {split}"
    assert task.cross_split_duplicates() == []
    assert "{text}" in task.template and not task.template.endswith(" ")


def test_topic_and_question_are_present():
    assert {"topic", "question"} <= set(embedded_task_names())


@pytest.mark.embedded
@pytest.mark.parametrize("name", list(EMBEDDED_TASKS))
def test_embedded_label_words_are_single_smollm2_tokens(embedded, name):
    for word in EMBEDDED_TASKS[name]["verbalizer"].values():
        assert len(embedded.tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1, word


def test_task_views_and_prompt():
    task = TextClassificationTask(
        "t", ["good film", "bad {plot}"], ["pos", "neg"], ["train", "test"], {"pos": "positive", "neg": "negative"},
        "Review: {text}\nSentiment:",
    )
    assert task.y.tolist() == [0, 1]
    assert task.prompts() == ["Review: good film\nSentiment:", "Review: bad {plot}\nSentiment:"]
    assert len(task.split("test")) == 1
    with pytest.raises(vl.core.InputError, match="no 'validation' split"):
        task.split("validation")


def test_jsonl_and_csv_files(tmp_path):
    jsonl = tmp_path / "t.jsonl"
    rows = [{"text": f"text {i}", "label": "a" if i % 2 else "b", "split": "train" if i < 6 else "test"} for i in range(8)]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    task = load_task_file(jsonl, split_column="split", verbalizer={"a": "yes", "b": "no"}, template="Q: {text}\nA:")
    assert len(task) == 8 and task.split_names == ["train", "test"] and task.name == "t"
    assert task.label_words == ["yes", "no"]
    csv_path = tmp_path / "r.csv"
    csv_path.write_text('body,sentiment\n"great, really",pos\nawful,neg\n"multi\nline",pos\n')
    task = load_task_file(csv_path, text_column="body", label_column="sentiment")
    assert task.texts == ["great, really", "awful", "multi\nline"]
    assert task.verbalizer == {"neg": "neg", "pos": "pos"} and set(task.splits) == {"train"}


def test_integer_labels_from_a_file(tmp_path):
    path = tmp_path / "ints.jsonl"
    path.write_text('{"text": "x", "label": 0}\n{"text": "y", "label": 1.0}\n')
    assert load_task_file(path, verbalizer={"0": "no", "1": "yes"}).labels == ["0", "1"]


@pytest.mark.parametrize(
    "content, suffix, match",
    [
        ('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"\n', ".jsonl", "line 2: not valid JSON"),
        ('{"text": "a", "label": "x"}\n[1, 2]\n', ".jsonl", "line 2: expected a JSON object"),
        ('{"text": "a", "label": "x"}\n\n{"label": "y"}\n', ".jsonl", r"line 3: no 'text' column"),
        ('{"text": "a", "label": "x"}\n{"text": "  ", "label": "y"}\n', ".jsonl", "line 2: empty text"),
        ('{"text": "a", "label": "x"}\n{"text": "b"}\n', ".jsonl", "line 2: missing label"),
        ('{"text": 5, "label": "x"}\n{"text": "b", "label": "y"}\n', ".jsonl", "line 1: 'text' is a int"),
        ('{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n', ".jsonl", "single class"),
        ("text,label\na,x\nb,y,extra\n", ".csv", "line 3: more fields"),
        ("text,label\na,x\n,y\n", ".csv", "line 3: empty text"),
        ("", ".csv", "empty"),
        ("", ".jsonl", "no examples"),
    ],
)
def test_bad_files_name_the_line(tmp_path, content, suffix, match):
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    with pytest.raises(vl.core.DataError, match=match):
        load_task_file(path)


@pytest.mark.parametrize("column,option", [("label", "--label-column"), ("text", "--text-column")])
def test_a_missing_column_is_one_error_naming_the_option(tmp_path, column, option):
    rows = [{"text": f"t{i}", "label": "xy"[i % 2], "sentiment": "xy"[i % 2], "body": f"t{i}"} for i in range(30)]
    for row in rows:
        del row[column]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    with pytest.raises(vl.core.DataError) as info:
        load_task_file(path)
    message = str(info.value)
    assert f"no {column!r} column" in message and option in message and "line" not in message


def test_label_missing_from_verbalizer_and_other_errors(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": "c", "label": "z"}\n')
    with pytest.raises(vl.core.DataError, match=r"\['z'\] are not in the verbalizer"):
        load_task_file(path, verbalizer={"x": "ex", "y": "why"})
    with pytest.raises(vl.core.DataError, match="missing split"):
        load_task_file(path, split_column="split")
    with pytest.raises(vl.core.InputError, match="exactly one {text} slot"):
        load_task_file(path, template="no slot")
    with pytest.raises(vl.core.InputError, match="does not exist"):
        load_task_file(tmp_path / "missing.jsonl")
    (tmp_path / "t.parquet").write_text("x")
    with pytest.raises(vl.core.InputError, match="unsupported extension"):
        load_task_file(tmp_path / "t.parquet")
    with pytest.raises(vl.core.InputError, match="unknown task"):
        load_task("nonsense")
    with pytest.raises(vl.core.DataError, match="share a label word"):
        TextClassificationTask("t", ["a", "b"], ["x", "y"], ["train"] * 2, {"x": "w", "y": "w"})
    with pytest.raises(vl.core.DataError, match="empty text"):
        TextClassificationTask("t", ["a", ""], ["x", "y"], ["train"] * 2, {"x": "w", "y": "v"})


def test_cross_split_duplicates_warn(tmp_path):
    path = tmp_path / "dup.jsonl"
    rows = [("same text", "x", "train"), ("same text", "x", "test"), ("other", "y", "train")]
    path.write_text("\n".join(json.dumps({"text": t, "label": lab, "split": s}) for t, lab, s in rows))
    with pytest.warns(UserWarning, match="more than one split"):
        task = load_task_file(path, split_column="split")
    assert task.cross_split_duplicates() == ["same text"]


def test_from_datasets_and_dataframe():
    datasets = pytest.importorskip("datasets")
    import pandas as pd

    features = datasets.Features({"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    train = datasets.Dataset.from_dict({"sentence": ["good", "bad", "fine"], "label": [1, 0, 1]}, features=features)
    test = datasets.Dataset.from_dict({"sentence": ["great", "awful"], "label": [1, 0]}, features=features)
    task = load_task_file(train, text_column="sentence", verbalizer={"neg": "negative", "pos": "positive"})
    assert task.labels == ["pos", "neg", "pos"] and task.name == "dataset"
    both = load_task_file(datasets.DatasetDict(train=train, test=test), text_column="sentence")
    assert both.splits == ["train"] * 3 + ["test"] * 2 and both.labels[-1] == "neg"
    frame = pd.DataFrame({"text": ["a", "b"], "label": ["x", "y"]})
    assert load_task_file(frame).texts == ["a", "b"]
    with pytest.raises(vl.core.InputError, match="cannot read a task"):
        load_task_file(42)


def test_splits_are_stratified_and_seeded():
    texts = [f"text {i}" for i in range(60)]
    task = TextClassificationTask("t", texts, ["a", "b", "c"] * 20, ["train"] * 60, {"a": "x", "b": "y", "c": "z"})
    one, two = task.with_splits(seed=1), task.with_splits(seed=1)
    assert one.splits == two.splits and one.splits != task.with_splits(seed=2).splits
    for split, n in (("validation", 3), ("test", 3), ("train", 14)):
        assert all(one.split(split).labels.count(c) == n for c in "abc")
    test = TextClassificationTask("t", ["new a", "new b"], ["a", "b"], ["x", "x"], {"a": "x", "b": "y", "c": "z"})
    merged = ensure_splits(task, test=test)
    assert merged.split("test").texts == ["new a", "new b"]
    assert len(merged.split("validation")) == 9 and len(merged.split("train")) == 51
    assert ensure_splits(one) is one
