"""``vsem-lens calibrate`` (train a neural clustering head + baselines) and ``vsem-lens classify``.

``calibrate`` writes into ``--out`` (default ``./calibration-out``):

- ``head/``: the head (``config.json`` + ``weights.safetensors``) with the model spec, task, template,
  verbalizer, layer, frame and pooling it needs to classify new texts;
- ``metrics.json``: the head's test/validation metrics, its settings, split sizes, timings, baselines;
- ``baselines.csv``: one row per method (the head first): accuracy, macro-F1, wall time.

Features are cached (``$VSEM_LENS_CACHE/features``) and the head checkpoints every epoch into
``OUT/checkpoint`` (removed after a successful run), so rerunning an interrupted command resumes.

Example:
    $ vsem-lens calibrate --task sentiment
    $ vsem-lens calibrate --task reviews.csv --test reviews_test.csv --verbalizer pos=positive,neg=negative \\
          --template "Review: {text}\\nSentiment:" --baselines all --out my-run
    $ torchrun --standalone --nproc_per_node=2 -m vsem_lens.cli calibrate --task topic --distributed
    $ vsem-lens classify --head my-run "A delight from start to finish." "Two hours I will never get back."
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import pandas as pd
import torch

from ..calibration.baselines import parse_baselines, run_baselines
from ..calibration.calibrated import CalibratedModel
from ..calibration.features import extract_features
from ..calibration.metrics import classification_metrics
from ..calibration.results import results_table
from ..calibration.shipped_tasks import EMBEDDED_TASKS, load_task
from ..calibration.splits import ensure_splits
from ..calibration.task_files import load_task_file
from ..core.corpus import load_corpus
from ..core.distributed import destroy
from ..core.errors import ArtifactError, InputError, NumericalError
from ..core.io import atomic_write, check_writable
from ..lenses.frames import FRAMES
from .common import (
    add_distributed_argument,
    add_model_arguments,
    load_model_from_args,
    messenger,
    parse_positive,
    start_distributed,
)


def parse_verbalizer(spec: str | None) -> dict[str, str] | None:
    """Parse ``--verbalizer``: ``label=word,label=word`` (or a JSON object).

    Example:
        >>> parse_verbalizer("pos=positive, neg=negative")
        {'pos': 'positive', 'neg': 'negative'}
    """
    if spec is None or not spec.strip():
        return None
    if spec.strip().startswith("{"):
        try:
            value = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise InputError(f"--verbalizer is not valid JSON: {exc.msg}.") from None
        if not isinstance(value, dict):
            raise InputError("--verbalizer JSON must be an object mapping labels to words.")
        return {str(k): str(v) for k, v in value.items()}
    out = {}
    for part in spec.split(","):
        if "=" not in part:
            raise InputError(f"--verbalizer expects label=word pairs separated by commas; {part.strip()!r} has no '='.")
        label, word = (x.strip() for x in part.split("=", 1))
        if not label or not word:
            raise InputError(f"--verbalizer pair {part.strip()!r} has an empty label or word.")
        out[label] = word
    return out


def _unescape(template: str | None) -> str | None:
    """Let shell users write ``\\n`` in --template."""
    return None if template is None else template.replace("\\n", "\n").replace("\\t", "\t")


def load_cli_task(args: argparse.Namespace):
    """The task of ``--task`` (name or file) with train/validation/test splits (see ``ensure_splits``)."""
    verbalizer = parse_verbalizer(args.verbalizer)
    template = _unescape(args.template)
    if args.task in EMBEDDED_TASKS:
        task = load_task(args.task, template=template, verbalizer=verbalizer)
    else:
        path = Path(args.task)
        if not path.suffix:
            raise InputError(
                f"--task {args.task!r} is neither an embedded task ({', '.join(EMBEDDED_TASKS)}) nor a .jsonl/.csv file."
            )
        kw = dict(text_column=args.text_column, label_column=args.label_column, verbalizer=verbalizer, template=template)
        task = load_task_file(path, split_column=args.split_column, **kw)
    test = None
    if args.test:
        test = load_task_file(args.test, text_column=args.text_column, label_column=args.label_column,
                              verbalizer=dict(task.verbalizer), template=task.template, name=task.name)
    return ensure_splits(task, test=test, seed=args.seed)


# The command's whole pipeline in order (load, features, head, baselines, outputs); about 100 lines.
def run_calibrate(args: argparse.Namespace) -> int:
    """Load the model and task, train the head, run the baselines, write the outputs."""
    baselines = parse_baselines(args.baselines)
    epochs = parse_positive(args.epochs, "--epochs")
    batch_size = parse_positive(args.batch_size, "--batch-size")
    if args.threads is not None:
        torch.set_num_threads(parse_positive(args.threads, "--threads"))
    task = load_cli_task(args)
    out = check_writable(args.out, kind="dir")  # before any work
    env, device = start_distributed(args, "calibrate")
    quiet = bool(args.quiet) or not env.is_main
    say = messenger(quiet)
    splits = {s: task.split(s) for s in ("train", "validation", "test")}
    try:
        say(f"task {task.name}: {len(task)} examples, classes {task.label_names}, words {task.label_words}")
        model, _ = load_model_from_args(args, say, device=device)
        say(f"BOS prepended: {model.prepend_bos}")
        kw = dict(layer=args.layer, frame=args.frame, progress=not quiet, distributed=env if env.active else None)
        feats = {s: extract_features(model, t, **kw) for s, t in splits.items()}
    finally:
        destroy(env)
    if not env.is_main:  # the ranks shared the forward passes; the head and baselines run on rank 0
        return 0
    started = time.perf_counter()
    calibrated = CalibratedModel.fit(
        model, task, layer=args.layer, frame=args.frame, pool=args.pool, features=feats,
        head=args.head,
        channel_attention=not args.no_channel_attention,
        epochs=epochs,
        batch_size=batch_size,
        lr=args.lr,
        patience=None if args.patience == 0 else args.patience,
        seed=args.seed,
        istar_weight=args.istar_weight,
        istar_zeta=args.istar_zeta,
        checkpoint_dir=out / "checkpoint",
    )
    fit_seconds = time.perf_counter() - started
    head = calibrated.head
    if head.resumed_from_ is not None:
        say(f"resumed the head's training after epoch {head.resumed_from_}")
    head_dir = calibrated.save(out / "head")
    pred = head.predict(feats["test"].head_input(args.pool))
    metrics = classification_metrics(splits["test"].y, pred, task.n_classes)
    feature_seconds = sum(f.seconds for f in feats.values())
    method = f"head:{args.head}" + ("-noCA" if args.no_channel_attention and args.head == "clustering" else "")
    head_row = {
        "method": method, "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
        "wall_time_s": feature_seconds + fit_seconds, "fit_seconds": round(fit_seconds, 3),
        "best_epoch": head.best_epoch_, "epochs_run": len(head.history_),
    }
    say(f"head ({args.head}): test accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f} "
        f"(fit {fit_seconds:.1f} s, best epoch {head.best_epoch_})")
    results = run_baselines(model, task, baselines, layer=args.layer, frame=args.frame, shots=args.shots,
                            finetune_epochs=args.finetune_epochs, seed=args.seed, progress=not quiet) if baselines else []
    table = results_table(results) if results else None

    rows = pd.DataFrame([head_row] + ([] if table is None else table.to_dict(orient="records")))
    out.mkdir(parents=True, exist_ok=True)
    csv_text = rows.to_csv(index=False)
    atomic_write(out / "baselines.csv", lambda tmp: tmp.write_text(csv_text))
    summary = {
        "task": task.name,
        "model": model.name,
        "prepend_bos": model.prepend_bos,
        "layer": args.layer % model.n_layers,
        "frame": args.frame,
        "pool": args.pool,
        "template": task.template,
        "verbalizer": task.verbalizer,
        "split_sizes": {s: len(t) for s, t in splits.items()},
        "head": {**head.get_config(), "n_parameters": head.n_parameters(), "best_epoch": head.best_epoch_,
                 "epochs_run": len(head.history_), "fit_seconds": fit_seconds, "feature_seconds": feature_seconds,
                 "val_accuracy": head.history_[head.best_epoch_].get("val_accuracy") if head.history_ else None},
        "test": metrics,
        "baselines": [r.as_row() for r in results],
        "head_dir": str(head_dir),
    }
    metrics_text = json.dumps(summary, indent=2, default=str)
    atomic_write(out / "metrics.json", lambda tmp: tmp.write_text(metrics_text))
    if not args.keep_checkpoint:
        shutil.rmtree(out / "checkpoint", ignore_errors=True)
    if not quiet:
        print(rows[["method", "accuracy", "macro_f1", "wall_time_s"]].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(str(out))
    return 0


def run_classify(args: argparse.Namespace) -> int:
    """Classify texts with a saved head."""
    head_dir = Path(args.head)
    if not (head_dir / "config.json").is_file() and (head_dir / "head" / "config.json").is_file():
        head_dir = head_dir / "head"
    if not (head_dir / "config.json").is_file():
        raise ArtifactError(f"{args.head} holds no saved head; pass the --out folder of `vsem-lens calibrate` or its head/.")
    texts = list(args.texts)
    if args.file:
        texts += load_corpus(args.file)
    if not texts:
        raise InputError("no texts to classify; pass TEXT arguments or --file.")
    calibrated = CalibratedModel.load(head_dir, model=args.model or None)  # --model overrides the recorded one
    probs = calibrated.predict_proba(texts)
    if not torch.isfinite(probs).all():
        raise NumericalError(
            f"the head in {head_dir} gave non-finite probabilities for {int((~torch.isfinite(probs)).any(1).sum())} "
            "text(s); retrain it with `vsem-lens calibrate`."
        )
    labels = [calibrated.head.classes[i] for i in probs.argmax(dim=1).tolist()]
    if args.json:
        rows = [
            {"text": t, "label": lab, "probabilities": dict(zip(calibrated.head.classes, map(float, p)))}
            for t, lab, p in zip(texts, labels, probs)
        ]
        print(json.dumps(rows, indent=2, allow_nan=False))  # strict JSON: NaN is not JSON
    else:
        for text, label, p in zip(texts, labels, probs):
            print(f"{label}\t{float(p.max()):.3f}\t{text}")
    return 0


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """The task options read by :func:`load_cli_task` (``--task``, its columns, ``--verbalizer``, ``--template``)."""
    parser.add_argument("--task", default="sentiment", help="sentiment | topic | question | FILE.jsonl | FILE.csv")
    parser.add_argument("--test", default=None, metavar="FILE", help="separate test file (same columns as --task)")
    parser.add_argument("--text-column", default="text", help="text column of a task file (default text)")
    parser.add_argument("--label-column", default="label", help="label column of a task file (default label)")
    parser.add_argument("--split-column", default=None, help="split column of a task file (train/validation/test)")
    parser.add_argument("--verbalizer", default=None, help="label=word,... (default: the task's, or each label itself)")
    parser.add_argument("--template", default=None, help='prompt with one {text} slot, e.g. "Review: {text}\\nSentiment:"')


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``calibrate`` and ``classify`` commands."""
    parser = sub.add_parser(
        "calibrate",
        help="train a neural clustering head on a task (+ baselines)",
        description="Train a semantic-calibration head on zero-shot prompt features of a hooked model, evaluate it "
        "on the test split and compare it with baselines. Writes OUT/head/, OUT/metrics.json, OUT/baselines.csv.",
    )
    add_task_arguments(parser)
    add_model_arguments(parser)
    parser.add_argument("--layer", type=int, default=-1, help="layer of the features (default -1, the last)")
    parser.add_argument(
        "--frame", default="final_norm", choices=list(FRAMES),
        help="feature frame (default final_norm; tuned needs a tuned lens cached by `vsem-lens lens train`)",
    )
    parser.add_argument("--pool", default="tokens", choices=["tokens", "vector"],
                        help="channel-attention pooling: over the prompt's tokens (default) or the last vector only")
    parser.add_argument("--head", default="clustering", choices=["clustering", "prototype"], help="head architecture")
    parser.add_argument("--no-channel-attention", action="store_true", help="drop the CA gate: LN(MLP(r))")
    parser.add_argument("--epochs", default="100", help="maximum epochs (default 100, as in the paper)")
    parser.add_argument("--batch-size", default="256", help="mini-batch size (default 256, as in the paper)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    parser.add_argument("--patience", type=int, default=20, help="early-stopping patience in epochs; 0 = off (default 20)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the head, the splits and ICL (default 42)")
    parser.add_argument("--istar-weight", type=float, default=0.0, help="I-STAR weight on the head outputs (default 0 = off)")
    parser.add_argument("--istar-zeta", type=float, default=0.2, help="I-STAR shrinkage zeta (default 0.2)")
    parser.add_argument("--baselines", default="zero-shot,affinity,cosine-knn,probe",
                        help="comma list of zero-shot,affinity,cosine-knn,knn-prompting,probe,icl,lora,ia3 | all | none "
                             "(default: the four cheap ones; knn = cosine-knn, kp = knn-prompting)")
    parser.add_argument("--shots", type=int, default=1, help="ICL demonstrations per class (default 1)")
    parser.add_argument("--finetune-epochs", type=int, default=1, help="LoRA/IA3 epochs over train (default 1)")
    parser.add_argument("--threads", default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--keep-checkpoint", action="store_true", help="keep OUT/checkpoint after a successful run")
    add_distributed_argument(parser, "the ranks share the feature extraction (batch b on rank b %% N); rank 0 "
                             "trains the head, runs the baselines and writes the outputs")
    parser.add_argument("--out", default="calibration-out", help="output directory (default ./calibration-out)")
    parser.add_argument("--quiet", action="store_true", help="no progress output; print only the output path")
    parser.set_defaults(func=run_calibrate)

    classify = sub.add_parser(
        "classify",
        help="classify texts with a head saved by `calibrate`",
        description="Classify texts end to end with a saved calibration head (it records the model, prompt and layer). "
        "Prints label, probability and text per line.",
    )
    classify.add_argument("--head", required=True, help="the --out folder of `vsem-lens calibrate` (or its head/)")
    classify.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify")
    classify.add_argument("--file", default=None, help="also classify the texts of a .txt/.jsonl/.csv file")
    classify.add_argument("--model", default=None, help="override the recorded model (must be the same weights)")
    classify.add_argument("--json", action="store_true", help="print JSON with per-class probabilities")
    classify.set_defaults(func=run_classify)
