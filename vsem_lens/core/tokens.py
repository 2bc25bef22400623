"""Token strings on their way into HTML and plotly markup: visible whitespace, escaped markup.

Plotly renders hover and cell text as HTML-like markup, so every vocabulary token that reaches a
figure or the page goes through one of these two functions (a token such as ``<jupyter_start>``
would otherwise vanish as an unknown tag, and ``<b>`` would turn the rest of the label bold).
"""

from __future__ import annotations

import html


def display_token(token: str, max_chars: int | None = None) -> str:
    """A token string made visible and safe for plotly text: whitespace marked, HTML escaped.

    Newlines become ``↵``, tabs ``→``, a whitespace-only token ``␣`` per space; strings longer than
    ``max_chars`` are cut with ``…``.

    Example:
        >>> display_token(" Paris")
        ' Paris'
        >>> display_token("  ")
        '␣␣'
        >>> display_token("<script>", max_chars=4)
        '&lt;sc…'
    """
    text = token.replace("\r\n", "↵").replace("\n", "↵").replace("\r", "↵").replace("\t", "→")
    if not text:
        text = "∅"
    elif not text.strip():
        text = "␣" * len(text)
    if max_chars is not None and len(text) > max_chars:
        text = text[: max(1, max_chars - 1)] + "…"
    return html.escape(text, quote=False)


def quoted_token(token: str) -> str:
    """A token as a quoted Python literal (leading spaces and escapes visible), safe for plotly hover text.

    Plotly renders hover text as HTML-like markup, so an unescaped ``<jupyter_start>`` would vanish
    as an unknown tag and ``<b>`` would turn the rest bold.

    Example:
        >>> quoted_token("<jupyter_start>"), quoted_token(" Paris")
        ("'&lt;jupyter_start&gt;'", "' Paris'")
    """
    return html.escape(repr(token), quote=False)
