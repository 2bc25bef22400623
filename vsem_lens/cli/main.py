"""Command line entry point: ``vsem-lens <command> ...``.

Each command lives in its own module under :mod:`vsem_lens.cli` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a function ``(args) -> int``.
Errors the user can fix (:class:`~vsem_lens.core.errors.VsemLensError`) print one clear line and exit 2.

Example:
    $ vsem-lens report            # embedded model, embedded corpus -> ./vsem-report/
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from ..core.errors import VsemLensError
from . import basis, calibrate, isotropy, istar, lens, report

COMMAND_MODULES = (report, basis, isotropy, lens, calibrate, istar)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available command registered."""
    parser = argparse.ArgumentParser(
        prog="vsem-lens", description="Read a language model's latent space in vocabulary coordinates."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vsem-lens`` console script."""
    args = build_parser().parse_args(argv)
    if getattr(args, "model", "embedded") == "embedded":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the embedded model never needs the network
    try:
        return int(args.func(args) or 0)
    except VsemLensError as exc:
        print(f"vsem-lens: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vsem-lens: interrupted; earlier outputs are left as they were.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
