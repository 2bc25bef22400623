"""MkDocs hook: fill generated parts of pages at build time.

- ``<!-- cli-help: report -->`` (or ``lens train``) becomes the ``--help`` text of that command, taken
  from the installed parser, so the CLI pages never drift from the code.
- ``<!-- include-study: analyses/NAME -->`` becomes the study's README.md when it exists (its relative
  links are rewritten to repository paths, since those files are not part of the site), and a short
  note otherwise, so ``mkdocs build --strict`` passes whether or not a study has been written yet.
"""

from __future__ import annotations

import io
import re
from contextlib import redirect_stdout
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = re.compile(r"<!--\s*cli-help:\s*([a-z -]+?)\s*-->")
STUDY = re.compile(r"<!--\s*include-study:\s*(\S+?)\s*-->")
LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")


def cli_help(command: str) -> str:
    """The ``--help`` text of ``vsem-lens <command>``."""
    import os

    from vsem_lens.cli import build_parser

    os.environ["COLUMNS"] = "100"
    buf = io.StringIO()
    with redirect_stdout(buf):
        try:
            build_parser().parse_args([*command.split(), "--help"])
        except SystemExit:
            pass
    text = buf.getvalue().strip() or f"(vsem-lens {command} is not available in this build)"
    return f"```text\n{text}\n```"


def _rewrite_link(match: re.Match, folder: str) -> str:
    bang, text, target = match.groups()
    if re.match(r"^[a-z][a-z0-9+.-]*:|^#|^/", target):
        return match.group(0)  # absolute URL, anchor or site-absolute path: keep
    path = (Path(folder) / target.split("#")[0]).as_posix()
    path = re.sub(r"[^/]+/\.\./", "", path)
    label = text or path
    return f"{label} (`{path}`)" if not bang else f"*(figure `{path}` in the repository)*"


def study(folder: str) -> str:
    """The README of ``folder``, or a titled note when it is missing."""
    readme = ROOT / folder / "README.md"
    if not readme.is_file():
        title = Path(folder).name.replace("_", " ").capitalize()
        return (
            f"# {title}\n\n!!! note \"Not written yet\"\n    This study lives in `{folder}/`; its README "
            "(method, commands and numbers) appears here once it is in the repository."
        )
    text = readme.read_text(encoding="utf-8")
    text = LINK.sub(lambda m: _rewrite_link(m, folder), text)
    return f"{text}\n\n---\n*This page is `{folder}/README.md` of the repository.*\n"


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: D103 - MkDocs hook signature
    markdown = CLI.sub(lambda m: cli_help(m.group(1)), markdown)
    return STUDY.sub(lambda m: study(m.group(1)), markdown)
