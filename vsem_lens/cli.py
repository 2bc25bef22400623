"""Command line: ``vsem-lens report | basis ...``.

Example:
    $ vsem-lens report            # embedded model, embedded corpus -> ./vsem-report/
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from .errors import VsemLensError


def _summary(args: argparse.Namespace) -> int:
    """Short layerwise summary of one sentence (what `report` prints with --summary)."""
    from .affinity import layerwise_affinity
    from .models import load_model

    model = load_model(args.model)
    text = args.text[0] if args.text else "The capital of France is"
    df = layerwise_affinity(model, text, frame=args.frame, k=1)
    last = df[df.position == df.position.max()]
    print(f"{model!r}\nText: {text!r}  (final prediction: {last.final_token.iloc[0]!r}, frame: {args.frame})")
    print(f"{'layer':>5}  {'logit lens top-1':<18} {'KL bits':>8} {'rank':>6}   {'affinity top-1':<18} {'rank':>6}")
    for row in last.itertuples():
        print(
            f"{row.layer:>5}  {row.lens_top1!r:<18} {row.lens_kl_bits:>8.2f} {row.lens_final_rank:>6}   "
            f"{row.affinity_top1!r:<18} {row.affinity_final_rank:>6}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vsem-lens", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    report = sub.add_parser("report", help="layerwise semantic report")
    report.add_argument("--model", default="embedded", help="embedded | hub name | local dir | .gguf")
    report.add_argument("--text", action="append", default=[], help="example text (repeatable)")
    report.add_argument("--frame", default="final_norm", choices=["raw", "final_norm", "tuned"])
    report.add_argument("--out", default="vsem-report", help="output directory")
    report.set_defaults(func=_summary)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vsem-lens`` console script."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1") if _embedded_only(argv) else None
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except VsemLensError as exc:
        print(f"vsem-lens: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vsem-lens: interrupted; earlier outputs are left as they were.", file=sys.stderr)
        return 130


def _embedded_only(argv: Sequence[str] | None) -> bool:
    argv = list(sys.argv[1:] if argv is None else argv)
    return "--model" not in argv or argv[argv.index("--model") + 1 : argv.index("--model") + 2] == ["embedded"]


if __name__ == "__main__":
    sys.exit(main())
