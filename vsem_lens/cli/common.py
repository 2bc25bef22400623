"""Arguments and helpers shared by the ``vsem-lens`` commands (model choice, corpus, messages)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable

from ..core.devices import check_device
from ..core.distributed import SINGLE, rank_device, resolve_env, torchrun_env
from ..core.errors import InputError
from ..core.loading import load_model

MODEL_HELP = "embedded (default) | hub name | local HF dir | .gguf file"
CORPUS_HELP = "default | FILE.txt | FILE.jsonl | FILE.csv"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--device`` and ``--prepend-bos``, the same for every command."""
    parser.add_argument("--model", default="embedded", help=MODEL_HELP)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | mps (default cpu; checked against this machine)")
    parser.add_argument("--prepend-bos", action="store_true",
                        help="prepend BOS to every text (TransformerLens convention; default: as the HF tokenizer)")


def add_distributed_argument(parser: "argparse.ArgumentParser | argparse._ArgumentGroup", what: str) -> None:
    """``--distributed``: one rank per torchrun process; ``what`` says how this command splits its work."""
    parser.add_argument("--distributed", action="store_true",
                        help=f"one rank per torchrun process (launch with torchrun --nproc_per_node=N -m vsem_lens.cli "
                        f"...): {what}")


def start_distributed(args: argparse.Namespace, command: str):
    """Join torchrun's process group when ``--distributed`` is given: ``(env, this rank's device)``.

    Without ``--distributed`` this is ``(SINGLE, args.device)``; ``cuda`` becomes ``cuda:LOCAL_RANK``.

    Raises:
        InputError: ``--distributed`` outside torchrun; a ``--device`` this machine does not have.
    """
    check_device(args.device, "--device")  # before any work: a typo must not become a silent CPU run
    if not getattr(args, "distributed", False):
        return SINGLE, args.device
    layout = torchrun_env()
    device = rank_device(layout, args.device) if layout is not None else args.device
    check_device(device, "--device")
    return resolve_env(True, device=device, command=command), device


def messenger(quiet: bool) -> Callable[[str], None]:
    """A ``say(message)`` that prints ``vsem-lens: message`` to stderr unless ``quiet``."""

    def say(message: str) -> None:
        if not quiet:
            print(f"vsem-lens: {message}", file=sys.stderr, flush=True)

    return say


def load_model_from_args(
    args: argparse.Namespace, say: Callable[[str], None], *, device: str | None = None, **kwargs: Any
):
    """Load ``args.model`` on ``device`` (default ``args.device``), say how long it took; ``(model, seconds)``.

    ``kwargs`` go to :func:`~vsem_lens.core.loading.load_model` (``dtype``, the placement options, ...).
    """
    check_device(device or args.device, "--device")
    started = time.perf_counter()
    model = load_model(args.model, device=device or args.device, prepend_bos=args.prepend_bos, **kwargs)
    seconds = time.perf_counter() - started
    dtype = str(model.dtype).removeprefix("torch.")
    say(f"loaded {model.name} ({model.n_layers} layers, d_model {model.d_model}) on {model.device}, {dtype}, in {seconds:.1f} s")
    return model, seconds


def parse_layers(spec: str | None) -> list[int] | None:
    """Parse ``--layers``: ``all`` (or nothing) -> None; ``0,5,10`` (negative allowed) -> [0, 5, 10].

    Example:
        >>> parse_layers("0, 5,-1"), parse_layers("all")
        ([0, 5, -1], None)
    """
    if spec is None or spec.strip().lower() in ("", "all"):
        return None
    layers = []
    for part in spec.split(","):
        part = part.strip()
        try:
            layers.append(int(part))
        except ValueError:
            raise InputError(
                f"--layers expects comma-separated layer indices such as 0,5,10 (negative counts from the end) "
                f"or 'all'; {part!r} in {spec!r} is not an integer."
            ) from None
    return layers


def parse_positive(spec: str, option: str, *, allow_all: bool = False) -> int | str:
    """Parse a positive integer option (or ``all`` when allowed).

    Example:
        >>> parse_positive("2048", "--lens-tokens"), parse_positive("all", "--lens-tokens", allow_all=True)
        (2048, 'all')
    """
    text = str(spec).strip().lower().replace("_", "")
    if allow_all and text == "all":
        return "all"
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        extra = " or 'all'" if allow_all else ""
        raise InputError(f"{option} expects a positive integer{extra}, got {spec!r}.")
    return value
