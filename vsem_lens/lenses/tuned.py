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
rate to zero at ``steps``; gradient-norm clipping at 1.0, per translator by default (tuned-lens clips the
norm over all translators at once: ``clip="global"``).
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

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..core.distributed import DistEnv, resolve_env
from ..core.errors import ArtifactError, InputError, check_layer_index
from ..core.io import atomic_write, check_tensors, tensors_digest
from ..core.models import HookedModel, cache_dir, check_texts
from .base import Lens
from .training import TrainingConfig, TunedLensTrainer

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"


class TunedLens(Lens):
    """Per-layer affine translators ``h + A_l h + b_l`` followed by the model's final norm (frame ``tuned``).

    Attributes:
        model: the hooked model (its final norm is part of the lens).
        weight: ``A`` [n_layers - 1, d_model, d_model] (``nn.Linear`` convention; the last layer has none).
        bias: ``b`` [n_layers - 1, d_model].
        fingerprint: the fingerprint of the model the lens belongs to.
        config: the :class:`TrainingConfig` it was trained with (``None`` for an untrained lens).
        history_: per step and layer, the training KL(final || lens) in bits (a DataFrame with columns
            ``step, layer, lr, kl_bits, grad_scale``), measured on the step's tokens before its update;
            ``grad_scale`` is the gradient-clipping factor applied to that layer's translator (1 = unclipped).
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
        self.history_: pd.DataFrame = pd.DataFrame(columns=["step", "layer", "lr", "kl_bits", "grad_scale"])

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
        trainer = TunedLensTrainer(model, check_texts(texts), cfg, env)
        trained = trainer.run(
            checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir is not None else None,
            checkpoint_every=checkpoint_every,
            resume=resume,
            progress=progress,
            callback=callback,
        )
        lens = cls(model, trained.weight, trained.bias, config=trained.config, metadata=trained.metadata)
        lens.history_ = trained.history
        return lens

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
        return check_layer_index(layer, self.n_layers, owner="the tuned lens")

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
        config["sha256"] = tensors_digest(tensors)
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
        check_tensors(tensors, f"the tuned lens in {path}", digest=config.get("sha256"),
                      remedy=" Retrain it with `vsem-lens lens train` (or restore the folder from a copy).")
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
                    "num_hidden_layers", "num_translators", "d_model", "d_vocab", "training", "sha256"}
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
