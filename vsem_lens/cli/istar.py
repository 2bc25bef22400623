"""``vsem-lens istar``: fine-tune the hooked model on a labelled task with the I-STAR regulariser.

Writes into ``--out`` (default ``./istar-out``):

- ``model/``: the fine-tuned model as an HF directory (safetensors weights, config, tokenizer); read it
  with ``vsem-lens report --model OUT/model`` or ``load_model("OUT/model")``;
- ``istar.json``: settings, test accuracy before and after, label tokens, C0 sample, wall times;
- ``history.csv``: one row per step (loss, CE, penalty, the batch's IsoScore*, gradient norm).

Training checkpoints into ``OUT/checkpoint`` (removed after a successful run): rerunning an
interrupted command with the same arguments resumes and ends with the same weights.

Example:
    $ vsem-lens istar --task sentiment                      # lambda -5, zeta 0.2 (the paper's setting)
    $ vsem-lens istar --task topic --lambda 1 --layers 10,20,29 --epochs 2 --out topic-iso-up
    $ vsem-lens report --model istar-out/model --out istar-report
"""

from __future__ import annotations

import argparse
import shutil

import torch

from ..calibration.istar_finetune import IStarConfig, evaluate_labels, istar_finetune
from ..core.io import check_writable
from .calibrate import add_task_arguments, load_cli_task
from .common import add_model_arguments, load_model_from_args, messenger, parse_layers, parse_positive


def run_istar(args: argparse.Namespace) -> int:
    """Load the model and task, fine-tune, evaluate before and after, write the outputs."""
    if args.threads is not None:
        torch.set_num_threads(parse_positive(args.threads, "--threads"))
    layers = parse_layers(args.layers)
    config = IStarConfig(
        weight=args.weight, zeta=args.zeta, layers=None if layers is None else tuple(layers), c0=args.c0,
        c0_texts=None if args.c0_texts is None else parse_positive(args.c0_texts, "--c0-texts"),
        epochs=parse_positive(args.epochs, "--epochs"), lr=args.lr,
        batch_size=parse_positive(args.batch_size, "--batch-size"),
        max_length=parse_positive(args.max_length, "--max-length"), method=args.method, seed=args.seed,
    )
    task = load_cli_task(args)
    out = check_writable(args.out, kind="dir")  # before any work
    say = messenger(args.quiet)
    say(f"task {task.name}: {len(task)} examples, classes {task.label_names}, words {task.label_words}")
    model, _ = load_model_from_args(args, say)
    config = config.checked(model.n_layers)  # bad values fail here, before the baseline pass
    before = evaluate_labels(model, task, max_length=config.max_length, method="before")
    say(f"before fine-tuning: test accuracy {before.accuracy:.3f}")
    result = istar_finetune(model, task, config, checkpoint_dir=out / "checkpoint",
                            checkpoint_every=args.checkpoint_every, progress=not args.quiet)
    result.meta["test_before"] = before.as_row()
    result.save(out)
    if not args.keep_checkpoint:
        shutil.rmtree(out / "checkpoint", ignore_errors=True)
    say(f"after fine-tuning (lambda {config.weight:g}, zeta {config.zeta:g}): test accuracy {result.test.accuracy:.3f}, "
        f"{result.meta['steps']} steps in {result.meta['train_seconds']:.0f} s")
    print(str(out))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``istar`` command."""
    parser = sub.add_parser(
        "istar",
        help="fine-tune the model on a task with the I-STAR isotropy regulariser",
        description="Fine-tune the hooked model with L = CE(label tokens) + lambda (1 - IsoScore*) over the "
        "resid_post states of the chosen layers (Rudman & Eickhoff 2024). Writes OUT/model/ (HF directory), "
        "OUT/istar.json and OUT/history.csv.",
    )
    add_task_arguments(parser)
    add_model_arguments(parser)
    parser.add_argument("--lambda", dest="weight", type=float, default=-5.0,
                        help="regulariser strength: < 0 lowers isotropy, > 0 raises it, 0 = plain CE (default -5, the paper's)")
    parser.add_argument("--zeta", type=float, default=0.2, help="shrinkage toward C0 in [0, 1] (default 0.2, the paper's)")
    parser.add_argument("--layers", default="all", help="regularised blocks' resid_post: all (default) or 0,5,-1")
    parser.add_argument("--c0", default="train", choices=["train", "identity"],
                        help="C0: covariance of the training split's token states, refreshed each epoch (default), or identity")
    parser.add_argument("--c0-texts", default=None, help="training prompts sampled for C0 (default: all)")
    parser.add_argument("--method", default="full", choices=["full", "lora"], help="full fine-tuning (default) or LoRA (peft)")
    parser.add_argument("--epochs", default="1", help="passes over the training split (default 1)")
    parser.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (default 1e-5)")
    parser.add_argument("--batch-size", default="8", help="prompts per step (default 8)")
    parser.add_argument("--max-length", default="64", help="prompt length in tokens; texts are shortened (default 64)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the data order, C0 sample and splits (default 42)")
    parser.add_argument("--checkpoint-every", type=int, default=10, help="steps between checkpoints (default 10)")
    parser.add_argument("--keep-checkpoint", action="store_true", help="keep OUT/checkpoint after a successful run")
    parser.add_argument("--threads", default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default="istar-out", help="output directory (default ./istar-out)")
    parser.add_argument("--quiet", action="store_true", help="no progress output; print only the output path")
    parser.set_defaults(func=run_istar)
