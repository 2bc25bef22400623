"""``vsem-lens report``: layerwise semantic report (for now: a short layerwise summary of one text)."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    """Print a layerwise summary of one sentence: logit-lens and affinity top-1 per layer."""
    from ..affinity import layerwise_affinity
    from ..models import load_model

    model = load_model(args.model)
    text = args.text[0] if args.text else "The capital of France is"
    df = layerwise_affinity(model, text, frame=args.frame, k=1)
    last = df[df.position == df.position.max()]
    print("report not built yet; layerwise summary of one text:")
    print(f"{model!r}\nText: {text!r}  (final prediction: {last.final_token.iloc[0]!r}, frame: {args.frame})")
    print(f"{'layer':>5}  {'logit lens top-1':<18} {'KL bits':>8} {'rank':>6}   {'affinity top-1':<18} {'rank':>6}")
    for row in last.itertuples():
        print(
            f"{row.layer:>5}  {row.lens_top1!r:<18} {row.lens_kl_bits:>8.2f} {row.lens_final_rank:>6}   "
            f"{row.affinity_top1!r:<18} {row.affinity_final_rank:>6}"
        )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``report`` command."""
    parser = sub.add_parser("report", help="layerwise semantic report")
    parser.add_argument("--model", default="embedded", help="embedded | hub name | local dir | .gguf")
    parser.add_argument("--text", action="append", default=[], help="example text (repeatable)")
    parser.add_argument("--frame", default="final_norm", choices=["raw", "final_norm", "tuned"])
    parser.add_argument("--out", default="vsem-report", help="output directory")
    parser.set_defaults(func=run)
