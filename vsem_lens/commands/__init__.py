"""One module per CLI command; each exposes ``register(subparsers)`` (see :mod:`vsem_lens.cli`)."""
