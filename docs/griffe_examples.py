"""Griffe extension for the API reference: treat ``Example:`` (singular) as Google style's ``Examples:``.

The package's docstrings use ``Example:`` followed by doctest lines; Griffe only parses the plural
section title into code blocks (``>>>``), so the singular would render doctests as plain text.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_SINGULAR = re.compile(r"^(\s*)Example:\s*$", flags=re.M)


class ExampleSections(griffe.Extension):
    """Rename ``Example:`` section titles to ``Examples:`` before docstrings are parsed."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:  # noqa: D102
        if obj.docstring is not None:
            obj.docstring.value = _SINGULAR.sub(r"\1Examples:", obj.docstring.value)
