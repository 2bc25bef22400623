"""The ``vsem-lens`` command line: one module per command, each with ``register(subparsers)``."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
