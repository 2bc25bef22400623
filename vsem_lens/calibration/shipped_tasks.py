"""The tasks shipped with vsem-lens and their loader.

Embedded tasks (``vsem_lens/data/tasks/*.jsonl``, splits ``train``/``validation``/``test``):

============ ===================================== ==============================================
task         labels -> words                       template
============ ===================================== ==============================================
sentiment    positive, negative                    ``Review: {text}\\nSentiment:``
topic        world -> international, sports ->     ``Article: {text}\\nTopic:``
             sport, business, science
question     abbreviation, description ->          ``Question: {text}\\nAnswer type:``
             definition, entity -> object, human
             -> person, location -> place, number
             -> numeric
============ ===================================== ==============================================

The topic and question label words were picked among a few natural single-token candidates per label
(e.g. world: world/politics/international/news) by zero-shot next-token accuracy on the
**validation** split of SmolLM2-135M-Instruct (test never looked at): the literal label names are poor
words for this model (topic 0.75 vs 0.88, question 0.25 vs 0.71 on validation). This favours the
zero-shot baselines slightly, which makes the comparison with calibrated heads conservative.

Example:
    >>> task = load_task("topic")
    >>> task.label_names, task.verbalizer["sports"]
    (['world', 'sports', 'business', 'science'], 'sport')
    >>> train = task.split("train"); len(train)
    360
    >>> print(task.prompt("Stocks rallied on Friday."))
    Article: Stocks rallied on Friday.
    Topic:
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from ..core.errors import DataError, InputError
from .datasets import TextClassificationTask
from .task_files import load_task_file, parse_jsonl_records, task_from_records

#: Embedded tasks: file, template and verbalizer (label -> word; every " " + word is one SmolLM2 token).
EMBEDDED_TASKS: dict[str, dict[str, Any]] = {
    "sentiment": {
        "file": "sentiment.jsonl",
        "template": "Review: {text}\nSentiment:",
        "verbalizer": {"positive": "positive", "negative": "negative"},
    },
    "topic": {
        "file": "topic.jsonl",
        "template": "Article: {text}\nTopic:",
        "verbalizer": {"world": "international", "sports": "sport", "business": "business", "science": "science"},
    },
    "question": {
        "file": "question.jsonl",
        "template": "Question: {text}\nAnswer type:",
        "verbalizer": {
            "abbreviation": "abbreviation",
            "description": "definition",
            "entity": "object",
            "human": "person",
            "location": "place",
            "number": "numeric",
        },
    },
}


def embedded_task_names() -> list[str]:
    """Names of the embedded tasks whose data file is installed.

    Example:
        >>> "topic" in embedded_task_names()
        True
    """
    folder = resources.files("vsem_lens") / "data" / "tasks"
    return [name for name, spec in EMBEDDED_TASKS.items() if (folder / spec["file"]).is_file()]


def load_task(name: str, *, template: str | None = None, verbalizer: Mapping[str, str] | None = None) -> TextClassificationTask:
    """Load an embedded task (``sentiment``, ``topic`` or ``question``) with its prompt and verbalizer.

    Args:
        name: the task name, or a path to a ``.jsonl``/``.csv`` file (then see :func:`load_task_file`).
        template, verbalizer: override the task's prompt template / label words.

    Example:
        >>> task = load_task("question")
        >>> task.verbalizer["human"], task.template
        ('person', 'Question: {text}\\nAnswer type:')
    """
    if isinstance(name, os.PathLike):
        return load_task_file(name, template=template, verbalizer=verbalizer)
    if not isinstance(name, str):
        raise InputError(f"task name must be a string or a path, got {type(name).__name__}.")
    if name not in EMBEDDED_TASKS:
        if Path(name).suffix.lower() in (".jsonl", ".csv", ".json"):
            return load_task_file(name, template=template, verbalizer=verbalizer)
        raise InputError(f"unknown task {name!r}; choose one of {', '.join(EMBEDDED_TASKS)} or pass a .jsonl/.csv file.")
    spec = EMBEDDED_TASKS[name]
    resource = resources.files("vsem_lens") / "data" / "tasks" / spec["file"]
    if not resource.is_file():
        raise DataError(f"the embedded task file {spec['file']} is not installed; reinstall vsem-lens.")
    content = resource.read_text(encoding="utf-8")
    records = parse_jsonl_records(content, f"embedded task {spec['file']}")
    return task_from_records(
        records,
        name=name,
        where=f"embedded task {spec['file']}",
        text_column="text",
        label_column="label",
        split_column="split",
        verbalizer=dict(verbalizer) if verbalizer is not None else dict(spec["verbalizer"]),
        template=template if template is not None else spec["template"],
        metadata_columns=("domain",),
    )


__all__ = ["EMBEDDED_TASKS", "embedded_task_names", "load_task"]
