"""``vsem-lens basis``: compute a model's semantic basis, save it, and summarise its geometry.

The basis is ``pinv(W_U)`` (one vector per vocabulary token, Gu et al. arXiv 2401.16184), computed
by a float64 Gram solve and saved as ``basis.safetensors`` + ``basis.json`` (atomically). The summary
compares the pairwise cosines of the semantic bases with those of the raw unembedding columns
(mean |cos|, mutual coherence) and lists the tokens of highest and lowest leverage; ``--words``
prints the basis norm and leverage of given words.

Example:
    $ vsem-lens basis --out smollm2-basis
    $ vsem-lens basis --words Paris,London,the --frame raw
"""

from __future__ import annotations

import argparse

import pandas as pd

from ..core.io import check_writable
from ..geometry import basis_coherence
from ..lenses.frames import check_frame
from ..readout.basis import SemanticBasis
from .common import add_model_arguments, load_model_from_args, messenger, parse_positive


def run(args: argparse.Namespace) -> int:
    """Compute (or load from the cache) the basis; save it to ``--out``; print the summary."""
    say = messenger(args.quiet)
    frame = check_frame(args.frame)
    sample = parse_positive(args.sample, "--sample")
    words = [w.strip() for w in args.words.split(",") if w.strip()] if args.words else []
    if args.out:
        check_writable(args.out, kind="dir")  # before any work
    model, _ = load_model_from_args(args, say)
    basis = SemanticBasis.from_model(model, frame=frame)
    if words:
        ids = basis.token_ids_for_words(words)  # validates the words before any long computation
    if args.out:
        say(f"basis [{basis.d_vocab} x {basis.d_model}] saved to {basis.save(args.out)}")
    coherence = basis_coherence(basis, sample=sample, seed=args.seed)
    with pd.option_context("display.width", 160):
        print(coherence.summary.to_string(index=False, float_format="%.4g"))
        print()
        print(coherence.leverage_extremes.to_string(index=False, float_format="%.4g"))
        if words:
            norms = basis.vectors[ids].double().norm(dim=-1).tolist()
            leverage = coherence.leverage.set_index("token_id").loc[ids, "leverage"].tolist()
            table = pd.DataFrame({"word": words, "token_id": ids, "basis_norm": norms, "leverage": leverage})
            print()
            print(table.to_string(index=False, float_format="%.4g"))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``basis`` command."""
    parser = sub.add_parser(
        "basis",
        help="compute, save and summarise the semantic basis (pinv of the unembedding)",
        description="Compute a model's semantic basis (one vector per vocabulary token, pinv(W_U)), save it with "
        "--out, and print its coherence against the raw unembedding and the tokens of extreme leverage.",
    )
    add_model_arguments(parser)
    parser.add_argument("--frame", default="final_norm", help="raw | final_norm | tuned (default final_norm)")
    parser.add_argument("--out", default=None, help="save basis.safetensors + basis.json to this directory")
    parser.add_argument("--words", default=None, help="comma-separated words whose basis norm and leverage to print")
    parser.add_argument("--sample", default="4096", help="tokens sampled for pairwise cosines (default 4096)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the token sample (default 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.set_defaults(func=run)
