"""``vsem-lens report``: the layerwise semantic report of a model over a corpus, as a self-contained folder.

With no arguments: the embedded SmolLM2-135M-Instruct, the embedded default corpus, output in
``./vsem-report`` (``index.html``, one CSV per table, ``summary.json``). The folder is written
atomically: an interrupted run leaves an earlier report untouched.

Example:
    $ vsem-lens report
    $ vsem-lens report --corpus my_texts.jsonl --layers 0,10,20,29 --lens-tokens 2048 --out my-report
    $ vsem-lens report --text "The capital of France is" --max-tokens 4000 --quiet
"""

from __future__ import annotations

import argparse
import json

from ..core.corpus import load_corpus
from ..core.devices import check_dtype
from ..core.distributed import destroy
from ..core.errors import InputError
from ..lenses.frames import check_frame
from ..report.build import DEFAULT_LENS_TOKENS, DEFAULT_MAX_TOKENS, build_report
from ..report.figures import total_seconds
from ..report.record import check_report_destination
from .common import (
    add_distributed_argument,
    add_model_arguments,
    load_model_from_args,
    messenger,
    parse_layers,
    parse_positive,
    start_distributed,
)

DEFAULT_CHECKPOINT_DIR = ".vsem-checkpoints"
def parse_dtype(spec: str):
    """Parse ``--dtype`` into a torch dtype.

    Example:
        >>> str(parse_dtype("bf16"))
        'torch.bfloat16'
    """
    return check_dtype(spec, "--dtype")


def parse_placement(device_map: str | None, n_devices: str | None, max_memory: str | None) -> dict:
    """Parse ``--device-map`` (auto | balanced | sequential | cpu | JSON dict), ``--n-devices`` and
    ``--max-memory`` (``0=20GiB,1=20GiB,cpu=64GiB``) into :func:`~vsem_lens.core.loading.load_model` keywords.

    Example:
        >>> parse_placement("auto", None, "0=20GiB,cpu=64GiB")
        {'device_map': 'auto', 'max_memory': {0: '20GiB', 'cpu': '64GiB'}}
    """
    out: dict = {}
    if device_map:
        text = device_map.strip()
        if text.startswith("{"):
            try:
                out["device_map"] = json.loads(text)
            except ValueError:
                raise InputError(f"--device-map is not valid JSON: {device_map!r}.") from None
        else:
            out["device_map"] = text
    if n_devices:
        out["n_devices"] = int(parse_positive(n_devices, "--n-devices"))
    if max_memory:
        budget: dict = {}
        for part in max_memory.split(","):
            dev, sep, amount = part.partition("=")
            if not sep or not amount.strip():
                raise InputError(f"--max-memory expects DEVICE=AMOUNT pairs such as 0=20GiB,cpu=64GiB; got {part!r}.")
            dev = dev.strip()
            budget[int(dev) if dev.isdigit() else dev] = amount.strip()
        out["max_memory"] = budget
    return out


def run(args: argparse.Namespace) -> int:
    """Load the model and corpus, build the report, write it; prints where it went."""
    quiet = bool(args.quiet)
    # Validate cheap options before loading anything.
    check_frame(args.frame)
    layers = parse_layers(args.layers)
    max_tokens = parse_positive(args.max_tokens, "--max-tokens", allow_all=True)
    lens_tokens = parse_positive(args.lens_tokens, "--lens-tokens", allow_all=True)
    batch_size = parse_positive(args.batch_size, "--batch-size")
    texts = load_corpus(args.corpus)
    checkpoint_every = parse_positive(args.checkpoint_every, "--checkpoint-every") if args.checkpoint_every else None
    checkpoint_dir = args.checkpoint_dir
    if checkpoint_every is not None and checkpoint_dir is None:
        checkpoint_dir = DEFAULT_CHECKPOINT_DIR
    dtype = parse_dtype(args.dtype)
    placement = parse_placement(args.device_map, args.n_devices, args.max_memory)
    if args.distributed and placement:
        raise InputError("--distributed runs one model copy per rank; do not combine it with --device-map/--n-devices.")
    out = check_report_destination(args.out)  # before any work: a bad --out must not cost the whole pass
    env, device = start_distributed(args, "report")
    quiet = quiet or not env.is_main

    say = messenger(quiet)
    where = f"device_map={placement}" if placement else device
    say(f"loading model {args.model!r} on {where}")
    # With placement options load_model ignores `device` (the device map decides).
    model, load_seconds = load_model_from_args(args, say, device=device, dtype=dtype, **placement)
    try:
        report = build_report(
            model,
            texts,
            frame=args.frame,
            layers=layers,
            max_tokens=None if max_tokens == "all" else max_tokens,
            lens_tokens=lens_tokens,
            examples=args.text or None,
            batch_size=int(batch_size),
            seed=args.seed,
            progress=not quiet,
            corpus_name=str(args.corpus),
            distributed=env if env.active else False,
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=checkpoint_every,
        )
    finally:
        destroy(env)
    if report is None:  # a rank other than 0 of a distributed run: rank 0 writes the report
        return 0
    report.add_timing("load_model", load_seconds)
    out = report.save(out)
    total = total_seconds(report.summary["timings_s"])
    tokens = report.summary["tokens"]
    say(
        f"report of {tokens['corpus_tokens']:,} tokens ({tokens['lens_tokens']:,} read out) written to "
        f"{out}/index.html in {total:.1f} s, peak memory {report.summary['peak_rss_mib']:,.0f} MiB"
    )
    if quiet:
        print(out / "index.html")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``report`` command."""
    parser = sub.add_parser(
        "report",
        help="layerwise semantic report (HTML + CSV + JSON)",
        description="Layerwise semantic report of a model over a corpus: affinity maps, when the prediction "
        "forms, isotropy, disentanglement, run card. Writes a self-contained folder (index.html opens offline).",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--corpus", default="default", help="default (packaged corpus) | FILE.txt | FILE.jsonl (\"text\") | FILE.csv (\"text\")"
    )
    parser.add_argument(
        "--text", action="append", default=[], metavar="TEXT",
        help="example text for the affinity map (repeatable; default: the first corpus texts)",
    )
    parser.add_argument("--frame", default="final_norm", help="raw | final_norm (default) | tuned")
    parser.add_argument("--layers", default="all", help="comma-separated layer indices, e.g. 0,5,10, or all (default)")
    parser.add_argument(
        "--max-tokens", default=str(DEFAULT_MAX_TOKENS), metavar="N",
        help=f"token budget: whole texts until N tokens, or all (default {DEFAULT_MAX_TOKENS})",
    )
    parser.add_argument(
        "--lens-tokens", default=str(DEFAULT_LENS_TOKENS), metavar="N",
        help=f"tokens sampled for the full-vocabulary readouts, or all (default {DEFAULT_LENS_TOKENS})",
    )
    parser.add_argument("--batch-size", default="8", metavar="B", help="texts per forward pass (default 8)")
    parser.add_argument("--out", default="vsem-report", help="output directory (default ./vsem-report)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the token samples (default 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress output; print only the report path")
    scale = parser.add_argument_group("scale (see docs/scale.md)")
    add_distributed_argument(scale, "shard the corpus, combine the statistics, rank 0 writes the report")
    scale.add_argument(
        "--checkpoint-every", default=None, metavar="N",
        help=f"checkpoint the streaming state every N batches (into --checkpoint-dir, default {DEFAULT_CHECKPOINT_DIR}); "
        "a run started again with the same arguments resumes",
    )
    scale.add_argument("--checkpoint-dir", default=None, metavar="DIR", help="folder of resumable checkpoints")
    scale.add_argument("--dtype", default="float32", help="weights: float32 (default) | bfloat16 | float16; statistics stay float64")
    scale.add_argument("--device-map", default=None, metavar="MAP", help="split a big model: auto | balanced | sequential | JSON dict")
    scale.add_argument("--n-devices", default=None, metavar="N", help="split a big model over N GPUs")
    scale.add_argument("--max-memory", default=None, metavar="BUDGET", help="per-device budget, e.g. 0=20GiB,1=20GiB,cpu=64GiB")
    parser.set_defaults(func=run)
