"""Training tuned lenses: the hyper-parameters (:class:`TrainingConfig`) and the streamed training loop.

:meth:`vsem_lens.lenses.tuned.TunedLens.fit` validates its arguments and runs a :class:`TunedLensTrainer`;
the method (the loss, the optimiser, clipping, multi-process training, determinism and resuming) is
described in :mod:`vsem_lens.lenses.tuned`. The trainer returns plain tensors and a training record
(:class:`TrainedTranslators`), so this module does not depend on the lens class.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..core.capture import iter_capture
from ..core.distributed import SINGLE, DistEnv, all_reduce_sum
from ..core.errors import ArtifactError, InputError, NumericalError, check_positive_int
from ..core.io import atomic_write
from ..core.logits import final_distribution
from ..core.models import HookedModel, Tokens

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_VERSION = 2  # 2: translators stacked in one module (DDP); 1 (per-layer tensors) is refused
LN2 = math.log(2.0)
OPTIMIZERS = ("sgd", "adam")
UNEMBED_DTYPES = ("float32", "bfloat16")
CLIPS = ("per_translator", "global")


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
        max_grad_norm: clip the gradient to this norm (``None`` = no clipping).
        clip: ``"per_translator"`` (each layer's translator is clipped on its own; the default) or
            ``"global"`` (the norm over all translators at once, as tuned-lens's trainer does, so one
            large-gradient layer shrinks every layer's step).
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
    clip: str = "per_translator"
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
        if self.clip not in CLIPS:
            raise InputError(f"clip must be one of {', '.join(CLIPS)}, got {self.clip!r}.")
        if self.unembed_dtype not in UNEMBED_DTYPES:
            raise InputError(f"unembed_dtype must be one of {', '.join(UNEMBED_DTYPES)}, got {self.unembed_dtype!r}.")
        for name in ("steps", "tokens_per_step", "max_length", "batch_size", "token_chunk"):
            check_positive_int(getattr(self, name), name)
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




@dataclass
class TrainedTranslators:
    """What a training run produces: the translators, the config, a summary and the per-step curve."""

    weight: Float[Tensor, "translator d_model d_model"]
    bias: Float[Tensor, "translator d_model"]
    config: TrainingConfig
    metadata: dict[str, Any]
    history: pd.DataFrame


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot product of two [n, k] matrices without an [n, k] temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).reshape(-1)


def assign_rows(lengths: Sequence[int], world_size: int) -> list[int]:
    """The rank of each row (rows sorted longest first): each row goes to the rank with the fewest tokens.

    Deterministic (ties go to the lowest rank), so every rank computes the same assignment.

    Example:
        >>> assign_rows([9, 5, 4, 3], 2)
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


class TunedLensTrainer:
    """The training loop behind :meth:`TunedLens.fit` (one instance per call).

    Under ``torchrun`` (``env.active``) every rank computes the same plan, takes its share of each
    step's texts (:func:`assign_rows`), and the translators are wrapped in
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
        self.grad_scales: list[list[float]] = []  # per step and translator: the clipping factor applied
        self.seconds = 0.0
        self.ddp: torch.nn.Module | None = None

    def _wrap(self) -> torch.nn.Module:
        """The module the loss runs through: the translators, or their DDP wrapper under torchrun."""
        if not self.env.active:
            return self.translators
        if self.ddp is None:
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
        owner = assign_rows([len(r) for r in rows], self.env.world_size)
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
        if cfg.max_grad_norm is not None:
            g_w, g_b = self.translators.weight.grad, self.translators.bias.grad
            norm = torch.sqrt(g_w.square().sum(dim=(1, 2)) + g_b.square().sum(dim=1))  # per translator
            if cfg.clip == "global":  # tuned-lens: clip_grad_norm_ over all parameters at once
                norm = norm.square().sum().sqrt().expand_as(norm)
            factor = (cfg.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            g_w.mul_(factor[:, None, None])
            g_b.mul_(factor[:, None])
            self.grad_scales.append(factor.double().tolist())
        else:
            self.grad_scales.append([1.0] * self.n_tr)
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
            "grad_scales": torch.tensor(self.grad_scales, dtype=torch.float64).reshape(-1, self.n_tr),
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
        scales = state.get("grad_scales")
        self.grad_scales = scales.tolist() if scales is not None else [[math.nan] * self.n_tr] * len(self.lrs)
        self.seconds = float(state["seconds"])
        return int(state["step"])

    # -- the loop ------------------------------------------------------------------------------
    def run(self, *, checkpoint_dir, checkpoint_every, resume, progress, callback) -> TrainedTranslators:
        """Train to ``cfg.steps`` (from the checkpoint when resuming); arguments as :meth:`TunedLens.fit`."""
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
        return self.result()

    def result(self) -> TrainedTranslators:
        """The translators trained so far, with the config, a training summary and the per-step curve."""
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
        n_steps = history.shape[0]
        curve = pd.DataFrame(
            {
                "step": torch.arange(n_steps).repeat_interleave(self.n_tr).numpy(),
                "layer": torch.arange(self.n_tr).repeat(n_steps).numpy(),
                "lr": torch.tensor(self.lrs, dtype=torch.float64).repeat_interleave(self.n_tr).numpy(),
                "kl_bits": history.reshape(-1).numpy(),
                "grad_scale": torch.tensor(self.grad_scales, dtype=torch.float64).reshape(-1).numpy(),
            }
        )
        return TrainedTranslators(weight, bias, self.cfg, metadata, curve)
