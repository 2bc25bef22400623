"""Tuned lens: one affine translator per layer, trained by KL to the final layer (Belrose et al. 2023).

The ``tuned`` frame (docs/concepts/frames.md) maps the residual ``h_l`` of layer ``l`` (``resid_post``) to

    T_l(h) = LN_f(h + A_l h + b_l)

where ``LN_f`` is the model's own final norm, ``A_l`` [d_model, d_model] and ``b_l`` [d_model] are
zero-initialised (so an untrained tuned lens *is* the ``final_norm`` frame, exactly), and the last
layer's translator is fixed to the identity (its readout is the model's output distribution). The
translators are trained to minimise, at every position,

    KL(p_final || q_l),  p_final = softmax(f(LN_f(h_{L-1}) W_U + b_U)),  q_l = softmax(f(T_l(h_l) W_U + b_U))

with ``f`` the model's output-logit transform (:mod:`vsem_lens.core.logits`; the identity for most models),

(arXiv 2303.08112, "tuned lens"). ``A_l`` uses the ``nn.Linear`` convention (``A_l h`` for a column
vector, ``h @ A_l.T`` for rows), and is saved under tuned-lens's own key names.

Training (:meth:`TunedLens.fit`) streams the corpus: each step captures every layer's ``resid_post``
for ``tokens_per_step`` tokens, computes the targets from the last layer, and updates all translators
at once (the per-layer losses are independent; so are the per-translator gradient clipping, weight
decay and the optimiser's per-element updates, so layer ``l``'s result does not depend on the others).

Memory: the vocabulary is handled ``token_chunk`` tokens at a time, so the largest buffers are a few
``[token_chunk, d_vocab]`` float32 matrices (``p_final``, the lens logits / ``q - p``; ~50 MB each for
256 tokens of SmolLM2's 49,152-token vocabulary), plus the step's activations ``[n_layers,
tokens_per_step, d_model]`` and the autograd graph of one chunk through all translators (a few
``[n_layers - 1, token_chunk, d_model]`` tensors, ~17 MB each for SmolLM2). No ``[layers, tokens,
vocab]`` tensor is ever built. The gradient of the KL with respect to the lens logits is ``q - p``,
so the backward pass through the unembedding is one matmul computed directly (no autograd graph over
the vocabulary; a model with an output transform adds its elementwise derivative); autograd only runs
through the small translators and the final norm.

Hyper-parameters (:class:`TrainingConfig`, all recorded in ``config.json``) follow tuned-lens's
defaults where a CPU allows: SGD with Nesterov momentum 0.9, ``lr`` 0.1 as given to torch (= tuned-lens's
unit ``lr_scale`` times ``1 - momentum``), weight decay 1e-3, no warm-up for SGD; Adam (AMSGrad,
betas (0.9, 0.999), ``lr`` 1e-3, warm-up ``min(1000, steps // 5)``); a linear decay of the learning
rate to zero at ``steps``; gradient-norm clipping at 1.0 (per translator here, globally in tuned-lens).
The step and token budget is CPU-sized (tuned-lens trains 250 steps of 2^18 tokens on a GPU).

Multi-process training (``distributed=True`` under ``torchrun``, ``vsem-lens lens train --distributed``):
every rank builds the same plan, forwards its share of each step's texts, and the translators are
wrapped in ``DistributedDataParallel``, which averages the ranks' gradients; each rank's gradient is
scaled so the average is the gradient of the mean KL over all the step's tokens. N ranks therefore
train the same lens as one process (up to the order of float32 sums), with each step's model forward
and vocabulary work split N ways.

Determinism: the text order comes from ``seed`` alone, every step uses a fixed set of token prefixes,
and nothing else is random, so two runs with the same corpus, config, torch thread count and number of
ranks give the same weights; a run resumed from a checkpoint gives the same weights as an uninterrupted one.

Example:
    >>> lens = TunedLens.fit(model, texts, steps=100)          # doctest: +SKIP
    >>> lens.save("smollm2-lens")                              # doctest: +SKIP
    >>> lens = TunedLens.load("smollm2-lens", model=model)     # doctest: +SKIP
    >>> layerwise_affinity(model, "The capital of France is", frame=lens)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from ..core.capture import iter_capture
from ..core.distributed import SINGLE, DistEnv, all_reduce_sum, resolve_env
from ..core.errors import ArtifactError, InputError, NumericalError
from ..core.io import atomic_write
from ..core.logits import final_distribution
from ..core.models import HookedModel, Tokens, cache_dir, check_texts
from .base import Lens

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_VERSION = 2  # 2: translators stacked in one module (DDP); 1 (per-layer tensors) is refused
LN2 = math.log(2.0)
OPTIMIZERS = ("sgd", "adam")
UNEMBED_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class TrainingConfig:
    """Hyper-parameters of :meth:`TunedLens.fit` (every field is saved with the lens).

    Attributes:
        optimizer: ``"sgd"`` (Nesterov momentum; tuned-lens's default) or ``"adam"`` (AMSGrad).
        lr: peak learning rate as passed to torch; ``None`` = 0.1 for SGD (tuned-lens's unit
            ``lr_scale`` times ``1 - momentum``), 1e-3 for Adam.
        momentum: SGD momentum, or Adam's beta1.
        steps: optimiser steps.
        tokens_per_step: tokens (all positions of the step's texts, padding excluded) per step; every
            layer's translator sees all of them.
        warmup_steps: linear warm-up steps; ``None`` = 0 for SGD, ``min(1000, steps // 5)`` for Adam.
            After the warm-up the learning rate decays linearly to 0 at ``steps``.
        weight_decay: L2 weight decay on ``A`` and ``b`` (as in tuned-lens).
        max_grad_norm: clip each translator's gradient to this norm (``None`` = no clipping).
        seed: seed of the text order (the only randomness).
        max_length: texts are truncated to this many tokens.
        batch_size: texts per forward pass of the model.
        token_chunk: tokens per vocabulary-sized buffer (memory ~ 3 x token_chunk x d_vocab floats).
        unembed_dtype: dtype of the two vocabulary matmuls of the *training* loss (``"float32"``, or
            ``"bfloat16"``: ~2x faster on CPUs with native bf16, as tuned-lens's bf16 autocast;
            softmax, loss and updates stay float32). Inference always uses the model's dtype.

    Example:
        >>> TrainingConfig(optimizer="adam").resolved().lr
        0.001
    """

    optimizer: str = "sgd"
    lr: float | None = None
    momentum: float = 0.9
    steps: int = 100
    tokens_per_step: int = 512
    warmup_steps: int | None = None
    weight_decay: float = 1e-3
    max_grad_norm: float | None = 1.0
    seed: int = 0
    max_length: int = 256
    batch_size: int = 8
    token_chunk: int = 256
    unembed_dtype: str = "float32"

    def resolved(self) -> "TrainingConfig":
        """Validate the fields and fill in the optimiser-dependent defaults (``lr``, ``warmup_steps``).

        Example:
            >>> TrainingConfig().resolved().lr, TrainingConfig().resolved().warmup_steps
            (0.1, 0)
        """
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}.")
        if self.unembed_dtype not in UNEMBED_DTYPES:
            raise InputError(f"unembed_dtype must be one of {', '.join(UNEMBED_DTYPES)}, got {self.unembed_dtype!r}.")
        for name in ("steps", "tokens_per_step", "max_length", "batch_size", "token_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}.")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"lr must be a positive number, got {self.lr!r}.")
        if not 0.0 <= self.momentum < 1.0:
            raise InputError(f"momentum must be in [0, 1), got {self.momentum!r}.")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise InputError(f"weight_decay must be >= 0, got {self.weight_decay!r}.")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise InputError(f"max_grad_norm must be positive or None, got {self.max_grad_norm!r}.")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps < self.steps:
            raise InputError(f"warmup_steps must be in [0, steps={self.steps}), got {self.warmup_steps!r}.")
        lr = self.lr if self.lr is not None else (0.1 if self.optimizer == "sgd" else 1e-3)
        warmup = self.warmup_steps
        if warmup is None:
            warmup = 0 if self.optimizer == "sgd" else min(1000, self.steps // 5)
        return dataclasses.replace(self, lr=float(lr), warmup_steps=int(warmup), seed=int(self.seed))

    def lr_at(self, step: int) -> float:
        """Learning rate of (0-based) ``step``: linear warm-up, then linear decay to 0 at ``steps``.

        Example:
            >>> cfg = TrainingConfig(steps=4).resolved()
            >>> [round(cfg.lr_at(s), 3) for s in range(4)]
            [0.1, 0.075, 0.05, 0.025]
        """
        warmup = int(self.warmup_steps or 0)
        if step < warmup:
            factor = (step + 1) / warmup
        else:
            factor = (self.steps - step) / max(1, self.steps - warmup)
        return float(self.lr) * max(0.0, factor)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return dataclasses.asdict(self)


class TunedLens(Lens):
    """Per-layer affine translators ``h + A_l h + b_l`` followed by the model's final norm (frame ``tuned``).

    Attributes:
        model: the hooked model (its final norm is part of the lens).
        weight: ``A`` [n_layers - 1, d_model, d_model] (``nn.Linear`` convention; the last layer has none).
        bias: ``b`` [n_layers - 1, d_model].
        fingerprint: the fingerprint of the model the lens belongs to.
        config: the :class:`TrainingConfig` it was trained with (``None`` for an untrained lens).
        history_: per step and layer, the training KL(final || lens) in bits (a DataFrame with columns
            ``step, layer, lr, kl_bits``), measured on the step's tokens before its update.
        metadata: what ``config.json`` records besides the weights (training summary, corpus hash, ...).

    Example:
        >>> lens = TunedLens.identity(model)                   # doctest: +SKIP
        >>> torch.equal(lens(h, layer=3), model.final_norm(h))  # untrained = final_norm  # doctest: +SKIP
        True
    """

    frame = "tuned"

    def __init__(
        self,
        model: HookedModel,
        weight: Float[Tensor, "translator d_model d_model"],
        bias: Float[Tensor, "translator d_model"],
        *,
        config: TrainingConfig | None = None,
        metadata: dict[str, Any] | None = None,
    ):
        n_tr, d = model.n_layers - 1, model.d_model
        if tuple(weight.shape) != (n_tr, d, d) or tuple(bias.shape) != (n_tr, d):
            raise ArtifactError(
                f"a tuned lens for this model needs weight [{n_tr}, {d}, {d}] and bias [{n_tr}, {d}]; "
                f"got {tuple(weight.shape)} and {tuple(bias.shape)}."
            )
        self.model = model
        self.weight = weight.detach().to(model.device, torch.float32)
        self.bias = bias.detach().to(model.device, torch.float32)
        self.fingerprint = model.fingerprint
        self.config = config
        self.metadata = dict(metadata or {})
        self.history_: pd.DataFrame = pd.DataFrame(columns=["step", "layer", "lr", "kl_bits"])

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def identity(cls, model: HookedModel) -> "TunedLens":
        """The untrained (zero-initialised) tuned lens; it equals the ``final_norm`` frame exactly.

        Example:
            >>> TunedLens.identity(model).weight.abs().max().item()  # doctest: +SKIP
            0.0
        """
        n_tr, d = model.n_layers - 1, model.d_model
        return cls(model, torch.zeros(n_tr, d, d), torch.zeros(n_tr, d))

    @classmethod
    def fit(
        cls,
        model: HookedModel,
        texts: str | Sequence[str],
        *,
        config: TrainingConfig | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 25,
        resume: bool = True,
        progress: bool = True,
        callback: Callable[[int, dict[str, Any]], None] | None = None,
        distributed: DistEnv | bool = False,
        **hyperparameters: Any,
    ) -> "TunedLens":
        """Train a tuned lens for ``model`` on ``texts`` (see the module docstring for the method).

        Args:
            model: the hooked model (left unchanged).
            texts: the training corpus (keep held-out texts out of it to evaluate the lens).
            config: a :class:`TrainingConfig`; keyword ``hyperparameters`` override its fields
                (``steps=200, lr=0.05, optimizer="adam", seed=1, ...``).
            checkpoint_dir: write ``checkpoint.pt`` there every ``checkpoint_every`` steps and at the
                end (atomically: temporary file + ``os.replace``).
            checkpoint_every: steps between checkpoints.
            resume: continue from the checkpoint in ``checkpoint_dir`` if there is one (it must come
                from the same model, corpus and config, otherwise :class:`ArtifactError`).
            progress: show a tqdm bar with the mean training KL in bits.
            callback: called as ``callback(step, info)`` after each step (``step`` counts completed
                steps; ``info`` has ``lr``, ``kl_bits`` [per layer], ``tokens``, ``seconds``). An
                exception raised by it stops training (the last checkpoint stays on disk).
            distributed: ``True`` inside ``torchrun`` (or a :class:`~vsem_lens.core.distributed.DistEnv`):
                every rank runs this call with the same arguments, takes its share of each step's texts,
                and the translators train under ``DistributedDataParallel`` (the gradient is that of the
                mean KL over all the step's tokens, as in one process). Every rank returns the same lens;
                rank 0 alone writes checkpoints, shows progress and calls ``callback``.

        Returns:
            the trained :class:`TunedLens` (``history_`` holds the training curve).

        Example:
            >>> lens = TunedLens.fit(model, texts, steps=50, tokens_per_step=256, seed=0)  # doctest: +SKIP
            >>> lens.history_.groupby("step").kl_bits.mean().iloc[[0, -1]]                  # doctest: +SKIP
        """
        unknown = set(hyperparameters) - {f.name for f in dataclasses.fields(TrainingConfig)}
        if unknown:
            raise InputError(
                f"unknown hyper-parameter(s) {', '.join(sorted(unknown))}; the fields of TrainingConfig are "
                f"{', '.join(f.name for f in dataclasses.fields(TrainingConfig))}."
            )
        cfg = dataclasses.replace(config or TrainingConfig(), **hyperparameters).resolved()
        if checkpoint_every < 1:
            raise InputError(f"checkpoint_every must be at least 1, got {checkpoint_every}.")
        if model.n_layers < 2:
            raise InputError("a tuned lens needs a model with at least 2 layers (the last one is the identity).")
        env = resolve_env(distributed, device=model.device, command="lens train")
        trainer = _Trainer(model, check_texts(texts), cfg, env)
        return trainer.run(
            checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir is not None else None,
            checkpoint_every=checkpoint_every,
            resume=resume,
            progress=progress,
            callback=callback,
        )

    # -- the lens ------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        """Number of layers the lens covers (the model's; the last one is the identity)."""
        return int(self.weight.shape[0]) + 1

    @property
    def d_model(self) -> int:
        """Residual width."""
        return int(self.weight.shape[1])

    def _check_layer(self, layer: int) -> int:
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise InputError(f"layer must be an integer, got {layer!r}.")
        if not -self.n_layers <= layer < self.n_layers:
            raise InputError(f"layer {layer} is out of range: the tuned lens covers layers 0..{self.n_layers - 1}.")
        return layer % self.n_layers

    def translate(self, h: Float[Tensor, "... d_model"], layer: int) -> Float[Tensor, "... d_model"]:
        """The translator alone, before the final norm: ``h + A_l h + b_l`` (identity at the last layer).

        Example:
            >>> lens.translate(torch.zeros(2, model.d_model), layer=0).shape  # doctest: +SKIP
            torch.Size([2, 576])
        """
        layer = self._check_layer(layer)
        if h.shape[-1] != self.d_model:
            raise InputError(f"h has width {h.shape[-1]} but the tuned lens has d_model={self.d_model}.")
        if layer == self.n_layers - 1:
            return h
        x = h.to(self.weight.dtype)
        flat = x.reshape(-1, self.d_model)
        out = torch.addmm(self.bias[layer], flat, self.weight[layer].T).add_(flat)
        return out.reshape(x.shape)

    def forward(self, h: Float[Tensor, "... d_model"], layer: int) -> Float[Tensor, "... d_model"]:
        """``LN_f(h + A_l h + b_l)``: the residual of ``layer`` in the LM-head input space.

        Example:
            >>> lens(acts.layer("resid_post", 10), layer=10).shape  # doctest: +SKIP
            torch.Size([5, 576])
        """
        return self.model.final_norm(self.translate(h, layer))

    def check_model(self, model: Any) -> None:
        """Raise :class:`ArtifactError` if ``model`` is not the model this lens was trained for."""
        fingerprint = getattr(model, "fingerprint", None)
        if fingerprint is not None and fingerprint != self.fingerprint:
            raise ArtifactError(
                f"this tuned lens belongs to another model (fingerprint {self.fingerprint} vs {fingerprint}); "
                "train one for this model with `vsem-lens lens train` or TunedLens.fit."
            )

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Save as a directory: ``config.json`` + ``weights.safetensors`` (tuned-lens's key names).

        Both files are written to temporary names and renamed into place.

        Example:
            >>> lens.save("my-lens")  # doctest: +SKIP
            PosixPath('my-lens')
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for i in range(self.n_layers - 1):
            tensors[f"layer_translators.{i}.weight"] = self.weight[i].detach().cpu().contiguous()
            tensors[f"layer_translators.{i}.bias"] = self.bias[i].detach().cpu().contiguous()
        config = {
            "format_version": FORMAT_VERSION,
            "lens_type": "vsem_lens.TunedLens",
            "frame": self.frame,
            "formula": "LN_f(h + A_l h + b_l); A_l = layer_translators.{l}.weight (nn.Linear convention), "
            "b_l = layer_translators.{l}.bias; the last layer's translator is the identity",
            "fingerprint": self.fingerprint,
            "model_name": self.model.name,
            "prepend_bos": self.model.prepend_bos,
            "num_hidden_layers": self.n_layers,
            "num_translators": self.n_layers - 1,
            "d_model": self.d_model,
            "d_vocab": self.model.d_vocab,
            "training": self.config.to_dict() if self.config is not None else None,
            **{k: v for k, v in self.metadata.items() if k not in ("training",)},
        }
        atomic_write(path / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp)))
        atomic_write(path / CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(config, indent=2)))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, model: HookedModel) -> "TunedLens":
        """Load a lens saved by :meth:`save` for ``model`` (:class:`ArtifactError` if it belongs to another).

        Example:
            >>> lens = TunedLens.load("my-lens", model=model)  # doctest: +SKIP
        """
        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise ArtifactError(f"{path} holds no tuned lens ({CONFIG_FILE} is missing).")
        try:
            config = json.loads((path / CONFIG_FILE).read_text())
            tensors = load_file(str(path / WEIGHTS_FILE))
        except Exception as exc:  # json and safetensors raise their own error types on corrupt files
            raise ArtifactError(f"could not read the tuned lens in {path}: {exc}") from exc
        if not isinstance(config, dict) or config.get("lens_type") != "vsem_lens.TunedLens":
            raise ArtifactError(f"{path / CONFIG_FILE} does not describe a vsem-lens tuned lens.")
        if config.get("fingerprint") != model.fingerprint:
            raise ArtifactError(
                f"the tuned lens in {path} was trained for another model (fingerprint {config.get('fingerprint')} "
                f"vs {model.fingerprint}, model {config.get('model_name')!r}); train one for this model with "
                "`vsem-lens lens train`."
            )
        n_tr = int(config.get("num_translators", -1))
        try:
            weight = torch.stack([tensors[f"layer_translators.{i}.weight"] for i in range(n_tr)])
            bias = torch.stack([tensors[f"layer_translators.{i}.bias"] for i in range(n_tr)])
        except (KeyError, RuntimeError) as exc:
            raise ArtifactError(f"the tuned lens in {path} is corrupt (missing or misshapen tensor {exc}).") from exc
        training = config.get("training")
        cfg = TrainingConfig(**training) if isinstance(training, dict) else None
        standard = {"format_version", "lens_type", "frame", "formula", "fingerprint", "model_name", "prepend_bos",
                    "num_hidden_layers", "num_translators", "d_model", "d_vocab", "training"}
        meta = {k: v for k, v in config.items() if k not in standard}
        return cls(model, weight, bias, config=cfg, metadata=meta)

    def __repr__(self) -> str:
        trained = f"steps={self.config.steps}" if self.config is not None else "untrained"
        return f"TunedLens(n_layers={self.n_layers}, d_model={self.d_model}, {trained})"


# ------------------------------------------------------------------------------------------- cache
def tuned_lens_cache_path(model: HookedModel) -> Path:
    """Where the cached tuned lens of ``model`` lives: ``cache_dir()/lenses/<fingerprint>``.

    Example:
        >>> tuned_lens_cache_path(model).parent.name  # doctest: +SKIP
        'lenses'
    """
    return cache_dir() / "lenses" / model.fingerprint


def find_cached_tuned_lens(model: HookedModel) -> TunedLens | None:
    """The tuned lens cached for ``model`` (saved by ``vsem-lens lens train``), or ``None``.

    A cached lens that cannot be read raises :class:`ArtifactError` (delete it or retrain).

    Example:
        >>> find_cached_tuned_lens(model) is None  # before `vsem-lens lens train`  # doctest: +SKIP
        True
    """
    path = tuned_lens_cache_path(model)
    config = path / CONFIG_FILE
    if not config.is_file():
        return None
    stamp = (str(path), config.stat().st_mtime_ns, (path / WEIGHTS_FILE).stat().st_mtime_ns
             if (path / WEIGHTS_FILE).is_file() else 0)
    memo = getattr(model, "_tuned_lens_memo", None)
    if memo is not None and memo[0] == stamp:
        return memo[1]
    lens = TunedLens.load(path, model=model)
    model._tuned_lens_memo = (stamp, lens)
    return lens


# ---------------------------------------------------------------------------------------- training
def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot product of two [n, k] matrices without an [n, k] temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).reshape(-1)


def _assign_rows(lengths: Sequence[int], world_size: int) -> list[int]:
    """The rank of each row (rows sorted longest first): each row goes to the rank with the fewest tokens.

    Deterministic (ties go to the lowest rank), so every rank computes the same assignment.

    Example:
        >>> _assign_rows([9, 5, 4, 3], 2)
        [0, 1, 1, 0]
    """
    load = [0] * world_size
    owner = []
    for n in lengths:
        rank = min(range(world_size), key=load.__getitem__)
        owner.append(rank)
        load[rank] += n
    return owner


class _Translators(torch.nn.Module):
    """All translators as two stacked parameters: one module, so DistributedDataParallel can wrap it."""

    def __init__(self, n_translators: int, d_model: int, device: str | torch.device):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(n_translators, d_model, d_model, device=device))
        self.bias = torch.nn.Parameter(torch.zeros(n_translators, d_model, device=device))

    def forward(self, h: Float[Tensor, "translator token d_model"]) -> Float[Tensor, "translator token d_model"]:
        """``h + A_l h + b_l`` for every translator ``l`` at once."""
        return torch.baddbmm(self.bias.unsqueeze(1), h, self.weight.transpose(1, 2)) + h


class _Trainer:
    """The training loop behind :meth:`TunedLens.fit` (one instance per call).

    Under ``torchrun`` (``env.active``) every rank computes the same plan, takes its share of each
    step's texts (:func:`_assign_rows`), and the translators are wrapped in
    ``DistributedDataParallel``, which sums the ranks' gradients in backward; each rank scales its
    gradient by ``world_size / tokens_per_step`` so DDP's average is the gradient of the mean KL over
    *all* the step's tokens, the same as one process's. Clipping and the optimiser step then run on
    identical gradients on every rank, so the translators stay identical without further messages.
    """

    def __init__(self, model: HookedModel, texts: list[str], cfg: TrainingConfig, env: DistEnv = SINGLE):
        self.model, self.cfg, self.env = model, cfg, env
        self.n_tr, self.d = model.n_layers - 1, model.d_model
        self.token_ids = model.token_ids(texts, max_length=cfg.max_length)
        self.corpus_hash = self._hash_corpus()
        self.plan = self._plan()
        self.translators = _Translators(self.n_tr, self.d, model.device)
        params = list(self.translators.parameters())
        if cfg.optimizer == "sgd":
            self.opt = torch.optim.SGD(
                params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay
            )
        else:
            self.opt = torch.optim.Adam(
                params, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay, amsgrad=True
            )
        mm_dtype = torch.bfloat16 if cfg.unembed_dtype == "bfloat16" else torch.float32
        # The model's one logits path (output transform included): in the loss's matmul dtype, and
        # in float32 for the exact targets.
        self.head = model.unembedding(mm_dtype)
        self.target_head = model.unembedding(torch.float32)
        self.history: list[list[float]] = []
        self.lrs: list[float] = []
        self.seconds = 0.0
        self.ddp: torch.nn.Module | None = None

    def _wrap(self) -> torch.nn.Module:
        """The module the loss runs through: the translators, or their DDP wrapper under torchrun."""
        if not self.env.active:
            return self.translators
        if self.ddp is None:
            from torch.nn.parallel import DistributedDataParallel

            on_cuda = torch.device(self.model.device).type == "cuda"
            device_ids = [torch.device(self.model.device).index or 0] if on_cuda else None
            # DDP broadcasts rank 0's parameters here, after every rank loaded the same checkpoint.
            self.ddp = DistributedDataParallel(self.translators, device_ids=device_ids)
        return self.ddp

    # -- data ----------------------------------------------------------------------------------
    def _hash_corpus(self) -> str:
        digest = hashlib.blake2b(digest_size=8)
        for ids in self.token_ids:
            digest.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
            digest.update(b"|")
        return digest.hexdigest()

    def _plan(self) -> list[list[tuple[int, int]]]:
        """Per step, the (text index, prefix length) pairs it trains on: exactly ``tokens_per_step`` tokens.

        Texts are visited in a fresh seeded permutation per epoch; the text that overflows a step
        contributes only its prefix (causal models give the prefix the same activations as the full
        text), the rest of it is skipped.
        """
        gen = torch.Generator().manual_seed(self.cfg.seed)
        lengths = [len(ids) for ids in self.token_ids]
        plan: list[list[tuple[int, int]]] = []
        order: list[int] = []
        next_text = 0
        while len(plan) < self.cfg.steps:
            step, need = [], self.cfg.tokens_per_step
            while need > 0:
                if next_text == len(order):  # a new epoch
                    order, next_text = torch.randperm(len(lengths), generator=gen).tolist(), 0
                index = order[next_text]
                next_text += 1
                take = min(lengths[index], need)
                step.append((index, take))
                need -= take
            plan.append(step)
        return plan

    def _tokens_for(self, step: int) -> Tokens | None:
        """This rank's rows of the step (longest first, right-padded), or ``None`` if it has none."""
        rows = sorted((self.token_ids[i][:n] for i, n in self.plan[step]), key=len, reverse=True)
        owner = _assign_rows([len(r) for r in rows], self.env.world_size)
        rows = [row for row, rank in zip(rows, owner) if rank == self.env.rank]
        return self.model.pad(rows) if rows else None

    # -- one step ------------------------------------------------------------------------------
    def _capture(self, step: int) -> Float[Tensor, "layer token d_model"]:
        tokens = self._tokens_for(step)
        if tokens is None:  # more ranks than texts in this step: an empty share (still joins the all-reduce)
            return torch.zeros(self.model.n_layers, 0, self.d, device=self.model.device)
        parts = [
            batch.acts["resid_post"]
            for batch in iter_capture(self.model, tokens, layers=None, batch_size=self.cfg.batch_size)
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _accumulate_gradients(self, resid: Float[Tensor, "layer token d_model"]) -> Float[Tensor, " translator"]:
        """Add the gradient of the step's mean per-token KL to ``.grad``; return this rank's summed KL (nats).

        The vocabulary is handled ``token_chunk`` tokens at a time: for each chunk the translators
        and final norm run forward with autograd (all layers at once), the gradient of the KL with
        respect to the normed residual is computed layer by layer without autograd (``(q - p) W_U^T``),
        and one backward call takes it to ``A`` and ``b``. Under DDP the gradients are summed over
        ranks in the backward of the rank's last chunk.
        """
        model, cfg = self.model, self.cfg
        n_tok = resid.shape[1]
        scale = self.env.world_size / cfg.tokens_per_step  # DDP averages over ranks
        module = self._wrap()
        kl_sum = torch.zeros(self.n_tr, dtype=torch.float64)
        head = self.head
        W_T = head.W_U.T  # [V, d]; the backward matmul
        starts = list(range(0, n_tok, cfg.token_chunk)) or [0]
        for start in starts:
            stop = start + cfg.token_chunk
            with torch.no_grad():
                # Targets: the final distribution, from the last layer's residual (exact float32).
                p, neg_entropy, _ = final_distribution(
                    resid[-1, start:stop].float(), model.final_norm, self.target_head, top1=False
                )
            sync = start == starts[-1] or self.ddp is None
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                with torch.enable_grad():
                    normed = model.final_norm(module(resid[:-1, start:stop].float()))
                grad_normed = torch.empty(normed.shape, dtype=normed.dtype, device=normed.device)
                with torch.no_grad():
                    for layer in range(self.n_tr):
                        pre = head.pre_transform(normed[layer].detach())
                        logits = head.transform(pre.float()) if head.transform is not None else pre
                        log_q = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
                        del logits
                        kl_sum[layer] += (neg_entropy - _rowdot(p, log_q)).sum().double()
                        # dKL/dlogits = q - p per token, written straight in the matmul dtype (one pass);
                        # through the output transform's derivative when the model has one.
                        q = log_q.exp_()
                        if head.transform is not None:
                            diff = head.transform_backward(pre.float(), q.sub_(p)).to(W_T.dtype)
                        elif W_T.dtype == q.dtype:
                            diff = q.sub_(p)
                        else:
                            diff = torch.sub(q, p, out=torch.empty_like(q, dtype=W_T.dtype))
                        del log_q, q, pre
                        grad_normed[layer] = (diff @ W_T).float().mul_(scale)
                        del diff
                # inputs=: only the translators get gradients (never the model's final-norm weights).
                normed.backward(grad_normed, inputs=list(self.translators.parameters()))
        return kl_sum

    def _step(self, step: int) -> Tensor:
        cfg = self.cfg
        resid = self._capture(step)
        self.opt.zero_grad(set_to_none=True)
        kl = all_reduce_sum(self._accumulate_gradients(resid), self.env) / cfg.tokens_per_step
        if not torch.isfinite(kl).all():
            raise NumericalError(
                f"the tuned-lens loss became NaN/inf at step {step}; lower the learning rate (lr={cfg.lr})."
            )
        if cfg.max_grad_norm is not None:  # per translator
            g_w, g_b = self.translators.weight.grad, self.translators.bias.grad
            norm = torch.sqrt(g_w.square().sum(dim=(1, 2)) + g_b.square().sum(dim=1))
            factor = (cfg.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            g_w.mul_(factor[:, None, None])
            g_b.mul_(factor[:, None])
        lr = cfg.lr_at(step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.lrs.append(lr)
        return kl / LN2

    # -- checkpoints ---------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        return {
            "checkpoint_version": CHECKPOINT_VERSION,
            "fingerprint": self.model.fingerprint,
            "corpus_hash": self.corpus_hash,
            "config": json.dumps(self.cfg.to_dict(), sort_keys=True),
        }

    def _save_checkpoint(self, directory: Path, step: int) -> None:
        if not self.env.is_main:  # the ranks hold identical states; rank 0 writes
            return
        directory.mkdir(parents=True, exist_ok=True)
        state = {
            **self._identity(),
            "step": step,
            "weight": self.translators.weight.detach().cpu(),
            "bias": self.translators.bias.detach().cpu(),
            "optimizer": self.opt.state_dict(),
            "history": torch.tensor(self.history, dtype=torch.float64).reshape(-1, self.n_tr),
            "lrs": torch.tensor(self.lrs, dtype=torch.float64),
            "seconds": self.seconds,
        }
        atomic_write(directory / CHECKPOINT_FILE, lambda tmp: torch.save(state, tmp))

    def _load_checkpoint(self, directory: Path) -> int:
        """Restore the state saved in ``directory`` (every rank reads the same file); the step to start at.

        A checkpoint does not depend on the number of ranks (every rank holds the whole state), so a
        run may resume with another ``--nproc_per_node``.
        """
        path = directory / CHECKPOINT_FILE
        if not path.is_file():
            return 0
        try:
            state = torch.load(path, map_location=self.model.device, weights_only=True)
        except Exception as exc:
            raise ArtifactError(f"could not read the checkpoint {path}: {exc}; delete it to start over.") from exc
        for key, value in self._identity().items():
            if state.get(key) != value:
                what = {"checkpoint_version": "another version of vsem-lens", "fingerprint": "another model",
                        "corpus_hash": "another corpus", "config": "other hyper-parameters"}[key]
                raise ArtifactError(
                    f"the checkpoint {path} was written for {what}; delete it, pass another checkpoint "
                    "directory, or resume=False to start over."
                )
        with torch.no_grad():
            self.translators.weight.copy_(state["weight"])
            self.translators.bias.copy_(state["bias"])
        self.opt.load_state_dict(state["optimizer"])
        self.history = state["history"].tolist()
        self.lrs = state["lrs"].tolist()
        self.seconds = float(state["seconds"])
        return int(state["step"])

    # -- the loop ------------------------------------------------------------------------------
    def run(self, *, checkpoint_dir, checkpoint_every, resume, progress, callback) -> TunedLens:
        cfg, main = self.cfg, self.env.is_main
        start = self._load_checkpoint(checkpoint_dir) if checkpoint_dir is not None and resume else 0
        bar = tqdm(total=cfg.steps, initial=start, desc="tuned lens", unit="step", disable=not (progress and main))
        run_seconds = 0.0
        try:
            for step in range(start, cfg.steps):
                began = time.perf_counter()
                kl_bits = self._step(step)
                elapsed = time.perf_counter() - began
                self.seconds += elapsed
                run_seconds += elapsed
                self.history.append(kl_bits.tolist())
                done = step + 1
                bar.update(1)
                rate = cfg.tokens_per_step * (done - start) / max(run_seconds, 1e-9)
                bar.set_postfix(kl_bits=f"{float(kl_bits.mean()):.2f}", tokens_per_s=f"{rate:.0f}")
                if checkpoint_dir is not None and (done % checkpoint_every == 0 or done == cfg.steps):
                    self._save_checkpoint(checkpoint_dir, done)
                if callback is not None and main:
                    callback(done, {"lr": self.lrs[-1], "kl_bits": kl_bits.tolist(),
                                    "tokens": done * cfg.tokens_per_step, "seconds": self.seconds})
        finally:
            bar.close()
        return self._lens()

    def _lens(self) -> TunedLens:
        weight = self.translators.weight.detach().clone()
        bias = self.translators.bias.detach().clone()
        history = torch.tensor(self.history, dtype=torch.float64).reshape(-1, self.n_tr)
        tail = history[-max(1, len(history) // 10):].mean(dim=0).tolist() if len(history) else []
        metadata = {
            "summary": {
                "steps": self.cfg.steps,
                "tokens": self.cfg.steps * self.cfg.tokens_per_step,
                "train_seconds": round(self.seconds, 2),
                "world_size": self.env.world_size,
                "train_kl_bits_first_step": [round(v, 4) for v in history[0].tolist()] if len(history) else [],
                "train_kl_bits_last_10pct": [round(v, 4) for v in tail],
            },
            "corpus": {"n_texts": len(self.token_ids), "token_hash": self.corpus_hash},
        }
        lens = TunedLens(self.model, weight, bias, config=self.cfg, metadata=metadata)
        n_steps = history.shape[0]
        lens.history_ = pd.DataFrame(
            {
                "step": torch.arange(n_steps).repeat_interleave(self.n_tr).numpy(),
                "layer": torch.arange(self.n_tr).repeat(n_steps).numpy(),
                "lr": torch.tensor(self.lrs, dtype=torch.float64).repeat_interleave(self.n_tr).numpy(),
                "kl_bits": history.reshape(-1).numpy(),
            }
        )
        return lens
