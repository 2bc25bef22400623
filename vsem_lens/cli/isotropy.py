"""``vsem-lens isotropy``: isotropy of every layer's token states over a corpus, as a table.

One streaming pass (float64 moments per layer, site and frame; memory independent of the corpus
size): IsoScore, IsoScore*, average cosine, participation ratio and the outlier dimensions. Prints the
table, or writes it as CSV with ``--out`` (atomically).

Example:
    $ vsem-lens isotropy                                       # embedded model, default corpus
    $ vsem-lens isotropy --sites resid_post,mlp_out --frames raw --max-texts 100 --out iso.csv
"""

from __future__ import annotations

import argparse

import pandas as pd

from ..core.corpus import load_corpus
from ..core.io import atomic_write, check_writable
from ..geometry import isotropy_by_layer
from .common import CORPUS_HELP, add_model_arguments, load_model_from_args, messenger, parse_layers, parse_positive

COLUMNS = ["site", "frame", "layer", "n_tokens", "isoscore", "isoscore_star", "average_cosine", "participation_ratio"]


def _names(spec: str) -> list[str]:
    return [part.strip() for part in spec.split(",") if part.strip()]


def run(args: argparse.Namespace) -> int:
    """Load the model and corpus, compute the table, print or write it."""
    say = messenger(args.quiet)
    texts = load_corpus(args.corpus)
    if args.max_texts is not None:
        texts = texts[: parse_positive(args.max_texts, "--max-texts")]
    batch_size = parse_positive(args.batch_size, "--batch-size")
    layers = parse_layers(args.layers)
    if args.out:
        check_writable(args.out, kind="file")  # before any work
    model, _ = load_model_from_args(args, say)
    table = isotropy_by_layer(
        model, texts, sites=_names(args.sites), frames=_names(args.frames), layers=layers,
        batch_size=batch_size, max_length=args.max_length, progress=not args.quiet,
    )
    if args.out:
        path = atomic_write(args.out, lambda tmp: table.to_csv(tmp, index=False))
        say(f"isotropy of {len(texts)} texts written to {path}")
        print(str(path))
    else:
        with pd.option_context("display.max_rows", None, "display.width", 160):
            print(table[[c for c in COLUMNS if c in table.columns]].to_string(index=False, float_format="%.4g"))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``isotropy`` command."""
    parser = sub.add_parser(
        "isotropy",
        help="isotropy by layer (IsoScore, IsoScore*, average cosine, participation ratio)",
        description="Isotropy of every layer's token states over a corpus, streamed in one pass with float64 "
        "moments. Prints the table, or writes a CSV with --out.",
    )
    add_model_arguments(parser)
    parser.add_argument("--corpus", default="default", help=CORPUS_HELP)
    parser.add_argument("--max-texts", default=None, help="use only the first N texts of the corpus")
    parser.add_argument("--sites", default="resid_post",
                        help="comma-separated sites: resid_pre, resid_mid, resid_post, attn_out, mlp_out, embed")
    parser.add_argument("--frames", default="raw,final_norm",
                        help="comma-separated frames: raw, final_norm, tuned (tuned needs a cached tuned lens: "
                        "`vsem-lens lens train`)")
    parser.add_argument("--layers", default=None, help="comma-separated layer indices or 'all' (default)")
    parser.add_argument("--batch-size", default="8", help="texts per forward pass (default 8)")
    parser.add_argument("--max-length", type=int, default=None, help="truncate texts to this many tokens")
    parser.add_argument("--out", default=None, help="write the full table to this CSV file")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.set_defaults(func=run)
