"""``vsem-lens lens train``: train a tuned lens (per-layer affine translators, Belrose et al. 2023).

The lens is saved in the cache (``$VSEM_LENS_CACHE/lenses/<model fingerprint>``), where ``frame="tuned"``
finds it for this model everywhere (report, basis, affinity), and also to ``--out`` when given.
Training checkpoints every ``--checkpoint-every`` steps; rerunning the same command after an
interruption resumes from the last checkpoint and ends with the same weights.

Example:
    $ vsem-lens lens train                                   # embedded model, default corpus
    $ vsem-lens lens train --corpus my_texts.txt --steps 200 --optimizer adam --out my-lens
    $ vsem-lens report --frame tuned                         # uses the cached lens
    $ torchrun --standalone --nproc_per_node=2 -m vsem_lens.cli lens train --distributed
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from ..core.corpus import load_corpus
from ..core.distributed import destroy
from ..core.errors import InputError
from ..core.io import check_writable, texts_digest
from ..lenses.training import CHECKPOINT_FILE, CHECKPOINT_VERSION, TrainingConfig
from ..lenses.tuned import TunedLens, tuned_lens_cache_path
from .common import add_distributed_argument, add_model_arguments, load_model_from_args, messenger, start_distributed


def _checkpoint_dir(cache_path: Path, config, texts: list[str], prepend_bos: bool) -> Path:
    """One checkpoint folder per (model, corpus content, hyper-parameters) so unrelated runs never collide."""
    settings = json.dumps([config.to_dict(), prepend_bos, CHECKPOINT_VERSION], sort_keys=True)
    tag = texts_digest([settings, *texts], digest_size=5)
    return cache_path.parent / ".checkpoints" / f"{cache_path.name}-{tag}"


def run_train(args: argparse.Namespace) -> int:
    """Load the model and corpus, train, save to the cache and ``--out``; prints where it went."""
    quiet = bool(args.quiet)
    if args.no_cache and not args.out:
        raise InputError("--no-cache without --out would save the lens nowhere; pass --out DIR.")
    if args.out:
        check_writable(args.out, kind="dir")  # before any work
    config = TrainingConfig(
        optimizer=args.optimizer,
        lr=args.lr,
        steps=args.steps,
        tokens_per_step=args.tokens_per_step,
        warmup_steps=args.warmup,
        weight_decay=args.weight_decay,
        seed=args.seed,
        max_length=args.max_length,
        unembed_dtype="bfloat16" if args.bf16 else "float32",
    ).resolved()  # validate before loading anything
    texts = load_corpus(args.corpus)
    env, device = start_distributed(args, "lens train")
    try:
        return _train(args, config, texts, env, device, quiet=quiet or not env.is_main)
    finally:
        destroy(env)


def _train(args: argparse.Namespace, config, texts: list[str], env, device: str, *, quiet: bool) -> int:
    say = messenger(quiet)
    model, _ = load_model_from_args(args, say, device=device)
    say(f"{len(texts)} texts; {config.steps} steps x {config.tokens_per_step} tokens, {config.optimizer} lr {config.lr}")
    cache_path = tuned_lens_cache_path(model)
    checkpoints = _checkpoint_dir(cache_path, config, texts, model.prepend_bos)
    if (checkpoints / CHECKPOINT_FILE).is_file():
        say(f"resuming from {checkpoints}")
    if env.active:
        say(f"training on {env.world_size} ranks ({env.backend})")
    lens = TunedLens.fit(
        model, texts, config=config, checkpoint_dir=checkpoints, checkpoint_every=args.checkpoint_every,
        progress=not quiet, distributed=env,
    )
    if not env.is_main:  # every rank holds the same lens; rank 0 writes it
        return 0
    written = []
    if not args.no_cache:
        written.append(lens.save(cache_path))
    if args.out:
        written.append(lens.save(Path(args.out)))
    shutil.rmtree(checkpoints, ignore_errors=True)
    if not quiet:
        summary = lens.metadata["summary"]
        first, last = summary["train_kl_bits_first_step"], summary["train_kl_bits_last_10pct"]
        print("layer  train KL(final || lens) bits: first step -> last 10% of steps")
        for layer, (a, b) in enumerate(zip(first, last)):
            print(f"{layer:5d}  {a:8.2f} -> {b:8.2f}")
        print(f"trained in {summary['train_seconds']:.0f} s")
    for path in written:
        print(str(path))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``lens`` command with its ``train`` subcommand."""
    parser = sub.add_parser(
        "lens",
        help="train tuned lenses (the 'tuned' frame)",
        description="Tuned lenses: per-layer affine translators h + A_l h + b_l followed by the final norm, trained "
        "by KL to the final layer (Belrose et al. 2023).",
    )
    lens_sub = parser.add_subparsers(dest="lens_command", required=True, metavar="SUBCOMMAND")
    train = lens_sub.add_parser(
        "train",
        help="train a tuned lens and cache it for frame='tuned'",
        description="Train a tuned lens on a corpus. Saved to the cache (found automatically by frame='tuned' for "
        "this model) and to --out if given. Rerunning an interrupted command resumes from its checkpoint.",
    )
    add_model_arguments(train)
    train.add_argument("--corpus", default="default", help="default | FILE.txt | FILE.jsonl | FILE.csv")
    train.add_argument("--steps", type=int, default=100, help="optimiser steps (default 100)")
    train.add_argument("--tokens-per-step", type=int, default=512, help="tokens per step (default 512)")
    train.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"],
                       help="sgd (Nesterov momentum 0.9, tuned-lens's default) or adam (AMSGrad)")
    train.add_argument("--lr", type=float, default=None, help="peak learning rate (default 0.1 for sgd, 1e-3 for adam)")
    train.add_argument("--warmup", type=int, default=None,
                       help="linear warm-up steps (default 0 for sgd, min(1000, steps/5) for adam)")
    train.add_argument("--weight-decay", type=float, default=1e-3, help="L2 weight decay (default 1e-3)")
    train.add_argument("--max-length", type=int, default=256, help="truncate texts to this many tokens (default 256)")
    train.add_argument("--bf16", action="store_true",
                       help="bfloat16 vocabulary matmuls in the loss (~2x faster on CPUs with native bf16)")
    train.add_argument("--seed", type=int, default=0, help="seed of the text order (default 0)")
    train.add_argument("--checkpoint-every", type=int, default=10, help="steps between checkpoints (default 10)")
    add_distributed_argument(train, "each rank forwards its share of every step's texts; the gradients are "
                             "averaged by DistributedDataParallel; rank 0 saves the lens")
    train.add_argument("--out", default=None, help="also save the lens to this directory")
    train.add_argument("--no-cache", action="store_true", help="do not save the lens in the cache (needs --out)")
    train.add_argument("--quiet", action="store_true", help="no progress output; print only the output path(s)")
    train.set_defaults(func=run_train)
