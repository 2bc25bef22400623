"""Semantic calibration: the neural clustering head estimator trained on detached zero-shot representations
(its torch modules are in :mod:`vsem_lens.calibration.head_modules`, its file format in
:mod:`vsem_lens.calibration.head_files`).

The head (Gu et al., paper v6; docs/concepts/calibration.md) maps a representation ``r`` (by default the LM-head input
at the last prompt token, see :mod:`vsem_lens.calibration.features`) to ``lambda(r)``, and classifies by the
cosine of ``lambda(r)`` to the **fixed** semantic bases of the label tokens (the centroids; they are
never trained). Only the head learns; the language model is untouched.

Architecture (``head="clustering"``, the default)::

    lambda(r) = LN( MLP( r * CA(r) ) )
    CA(r)     = sigmoid( Bn(avg(r)) + Bn(max(r)) )      Bn: d -> d/16 -> d (ReLU, no bias, shared)
    MLP       = d -> 2d -> d (GELU, no bias)             LN: LayerNorm(d) with gain and bias

**What avg and max pool over (our interpretation).** The formula is CBAM's channel attention
(Woo et al. 2018: ``M_c(F) = sigmoid(MLP(AvgPool(F)) + MLP(MaxPool(F)))`` with one shared bottleneck
MLP, applied as ``F * M_c(F)``). The paper's parameter count, (33/8) d^2, pins the shapes: the MLP's
two matrices give 4 d^2 and the bottleneck's two give d^2/8, so ``Bn`` must be d -> d/16 -> d and
``avg(r)``, ``max(r)`` must be d-dimensional, i.e. pooled over an axis *other* than the channels.
(Pooling the d components of one vector, or reshaping r into C groups, would make them scalars or
C-vectors and break the count.) A text's representation has exactly one such axis, its tokens, so with
``pool="tokens"`` (default) ``avg``/``max`` are the mean and per-channel max of the prompt's token
states at the same layer and frame (the "spatial" axis of CBAM is the sequence), and the gate
re-weights the channels of the last-token vector ``r``. With ``pool="vector"`` only ``r`` is given and
``avg(r) = max(r) = r``: the head degenerates to a squeeze-and-excitation self-gate
``r * sigmoid(2 Bn(r))``. The paper's formula has no sigmoid; we keep CBAM/SE's sigmoid (without it
``r * CA(r)`` is an unbounded quadratic form, not an attention). Parameters: exactly (33/8) d^2 weights
plus the LayerNorm's 2d (tested). On the embedded tasks the two poolings and ``channel_attention=False``
are indistinguishable within the seed-to-seed spread (analyses/semantic_calibration/README.md).

Variants: ``channel_attention=False`` gives ``LN(MLP(r))``; ``head="prototype"`` is the authors'
prototype: an encoder MLP (d -> 2d -> d) whose output is classified, a decoder MLP (d -> 2d -> d) that
reconstructs ``r``, loss = CE + ``recon_weight`` * MSE (reconstruction of ``r``).

**Similarity.** ``similarity="cosine"`` (default, the paper's similarity logits) scores a class by
``cos(lambda(r), s_k)``; ``similarity="matmul"`` by the dot product ``lambda(r) . s_k`` (the paper's
matmul ablation: the same head with unnormalised logits; with the bases' own norms, so classes with a
longer basis get larger logits). Training, ``decision_function``, ``predict_proba`` and ``predict`` all
use the chosen score.

**Loss.** Cross-entropy over ``scale * score(lambda(r), s_k)`` for the label bases ``s_k``. The scale
(inverse temperature) matters: cosines lie in [-1, 1], so without it (the paper's and the prototype's
softmax over raw cosines) the best attainable probability of the right class among k is
``e / (e + (k - 1) / e)`` (0.88 for two classes, 0.71 for four), the loss is bounded far from zero and
every example, even a well-separated one, keeps pulling with almost the same force: the objective is
almost linear in the cosine margin, probabilities stay near uniform and training converges poorly
(NormFace, Wang et al. 2017). Default: a learnable log-scale initialised at 1/0.05 = 20 (clamped to at
most 100, as in CLIP); ``learn_temperature=False`` fixes it; ``temperature=1.0,
learn_temperature=False`` reproduces the raw-cosine softmax.

**Training.** AdamW; mini-batches shuffled by a generator seeded with ``seed`` (paper: 42); weights
initialised under the same seed; early stopping once validation accuracy has not improved for
``patience`` epochs, keeping the weights of the best epoch (highest validation accuracy, ties broken by
the lower validation loss). Paper: 100 epochs, batch 256; the
prototype used lr 1e-4, our default 1e-3 (with a few hundred examples, batch 256 means 2 steps per
epoch, and 200 steps at 1e-4 underfit). Optional I-STAR regulariser on the head outputs
(``istar_weight``, ``istar_zeta``; :func:`vsem_lens.geometry.istar.istar_penalty`). With
``checkpoint_dir`` the full training state (weights, AdamW moments, shuffling generator, epoch,
early-stopping state, history) is written atomically after every epoch; an interrupted ``fit`` on the
same data resumes from it and ends with bit-identical weights.

Example:
    >>> import torch
    >>> bases = torch.eye(3, 8)                               # 3 label bases in d = 8
    >>> X = bases.repeat(20, 1) + 0.1 * torch.randn(60, 8)    # points around them
    >>> y = torch.arange(3).repeat(20)
    >>> head = NeuralClusteringHead(bases, epochs=30, batch_size=16, reduction=4).fit(X, y)
    >>> head.score(X, y) > 0.9
    True
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from ..core.errors import ArtifactError, InputError, NumericalError, check_positive_int
from ..geometry.istar import istar_penalty
from .checks import check_head_input, class_indices, finite_float, nonnegative_float, positive_float
from .head_checkpoint import load_training_state, save_training_state, training_run_id
from .head_files import read_head_files, write_head_files
from .head_modules import HEADS, build_head_module, split_head_input
from .threads import torch_threads

MAX_SCALE = 100.0
SIMILARITIES = ("cosine", "matmul")

# -- the head ------------------------------------------------------------------------------------
class NeuralClusteringHead:
    """Semantic-calibration head with a scikit-learn style API (``fit``/``predict``/``score``).

    Args:
        label_bases: [k, d] semantic bases of the label tokens (fixed centroids), e.g.
            ``SemanticBasis.from_model(model).for_words(task.label_words)``.
        classes: class names (default ``"0"..."k-1"``); ``y`` may be given as indices or names.
        head: ``"clustering"`` (the paper's module) or ``"prototype"`` (encoder/decoder + MSE).
        similarity: class score ``"cosine"`` (default) or ``"matmul"`` (dot product with the basis);
            the logits are ``scale * score``.
        channel_attention: use the CA gate (clustering head only).
        reduction: bottleneck ratio of the gate (paper 16).
        temperature: initial softmax temperature over cosines (scale = 1/temperature; default 0.05).
        learn_temperature: learn the log-scale (default) or keep it fixed.
        lr, weight_decay: AdamW settings (defaults 1e-3, 0.01).
        epochs: maximum number of epochs (paper 100).
        batch_size: mini-batch size (paper 256).
        patience: early-stopping patience in epochs on validation accuracy (needs ``X_val``);
            ``None`` trains all epochs and keeps the best validation epoch anyway.
        seed: seeds the initial weights and the shuffling (paper 42).
        recon_weight: weight of the prototype's reconstruction MSE.
        istar_weight, istar_zeta: I-STAR regulariser ``istar_weight * (1 - IsoScore*)`` on the head
            outputs of each mini-batch (0 = off; sign as in :func:`vsem_lens.geometry.istar.istar_penalty`).
        checkpoint_dir: write the training state there after every epoch and resume from it.
        num_threads: torch threads while fitting (default 1, see :func:`torch_threads`; ``None``
            keeps torch's setting). Results do not depend on it beyond float rounding.
        resume: resume from a matching checkpoint in ``checkpoint_dir`` (False starts over).
        metadata: free-form JSON-able dict saved with the head (the CLI records the model and prompt).

    Attributes (after ``fit``):
        history_: one dict per epoch (train_loss, val_accuracy, val_loss, temperature).
        best_epoch_: the epoch whose weights were kept.
        resumed_from_: the epoch a resumed fit continued after (None for a fresh fit).

    Example:
        >>> head = NeuralClusteringHead(bases, classes=["positive", "negative"])  # doctest: +SKIP
        >>> head.fit(X_train, y_train, X_val, y_val).score(X_test, y_test)        # doctest: +SKIP
        0.93
    """

    def __init__(
        self,
        label_bases: Float[Tensor, "k d"],
        *,
        classes: Sequence[str] | None = None,
        head: str = "clustering",
        similarity: str = "cosine",
        channel_attention: bool = True,
        reduction: int = 16,
        temperature: float = 0.05,
        learn_temperature: bool = True,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        epochs: int = 100,
        batch_size: int = 256,
        patience: int | None = 20,
        seed: int = 42,
        recon_weight: float = 1.0,
        istar_weight: float = 0.0,
        istar_zeta: float = 0.2,
        checkpoint_dir: str | os.PathLike | None = None,
        resume: bool = True,
        metadata: dict | None = None,
        num_threads: int | None = 1,
    ):
        bases = torch.as_tensor(label_bases).detach().to(torch.float32).cpu()
        if bases.dim() != 2 or bases.shape[0] < 2 or bases.shape[1] < 1:
            raise InputError(f"label_bases must be a [k >= 2, d] matrix, got shape {tuple(bases.shape)}.")
        if not torch.isfinite(bases).all() or (bases.norm(dim=1) == 0).any():
            raise NumericalError("label_bases contain NaN/inf or zero vectors; cosines to them are undefined.")
        self.label_bases = bases
        k = bases.shape[0]
        self.classes = [str(c) for c in classes] if classes is not None else [str(i) for i in range(k)]
        if len(self.classes) != k or len(set(self.classes)) != k:
            raise InputError(f"classes must be {k} distinct names (one per label basis), got {self.classes}.")
        if head not in HEADS:
            raise InputError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}.")
        self.head = head
        if similarity not in SIMILARITIES:
            raise InputError(f"unknown similarity {similarity!r}; choose one of {', '.join(SIMILARITIES)}.")
        self.similarity = similarity
        self.channel_attention = bool(channel_attention)
        self.reduction = check_positive_int(reduction, "reduction")
        self.temperature = positive_float(temperature, "temperature")
        self.learn_temperature = bool(learn_temperature)
        self.lr = positive_float(lr, "lr")
        self.weight_decay = nonnegative_float(weight_decay, "weight_decay")
        self.epochs = check_positive_int(epochs, "epochs")
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.patience = None if patience is None else check_positive_int(patience, "patience")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise InputError(f"seed must be an integer, got {seed!r}.")
        self.seed = int(seed)
        self.recon_weight = nonnegative_float(recon_weight, "recon_weight")
        self.istar_weight = finite_float(istar_weight, "istar_weight")
        self.istar_zeta = finite_float(istar_zeta, "istar_zeta")
        if not 0.0 <= self.istar_zeta <= 1.0:
            raise InputError(f"istar_zeta must be in [0, 1], got {istar_zeta}.")
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.resume = bool(resume)
        self.num_threads = None if num_threads is None else check_positive_int(num_threads, "num_threads")
        self.metadata = dict(metadata or {})
        self.module_: nn.Module | None = None
        self.log_scale_: Tensor | None = None
        self.input_shape_: tuple[int, ...] | None = None
        self.history_: list[dict] = []
        self.best_epoch_: int | None = None
        self.resumed_from_: int | None = None

    # -- configuration ---------------------------------------------------------------------------
    @property
    def d_model(self) -> int:
        """Width of the representations (and of the label bases)."""
        return int(self.label_bases.shape[1])

    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return int(self.label_bases.shape[0])

    def get_config(self) -> dict:
        """The constructor arguments (JSON-able; ``label_bases`` and ``checkpoint_dir`` excluded).

        Example:
            >>> NeuralClusteringHead(torch.eye(2, 4)).get_config()["epochs"]
            100
        """
        return {
            "classes": self.classes,
            "head": self.head,
            "similarity": self.similarity,
            "channel_attention": self.channel_attention,
            "reduction": self.reduction,
            "temperature": self.temperature,
            "learn_temperature": self.learn_temperature,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "patience": self.patience,
            "seed": self.seed,
            "recon_weight": self.recon_weight,
            "istar_weight": self.istar_weight,
            "istar_zeta": self.istar_zeta,
        }

    def n_parameters(self) -> int:
        """Number of trainable parameters of the module (the learnable log-scale not included).

        Example:
            >>> NeuralClusteringHead(torch.eye(2, 64)).n_parameters() == 33 * 64 ** 2 // 8 + 2 * 64
            True
        """
        module = self.module_ if self.module_ is not None else self._build_module()
        return sum(p.numel() for p in module.parameters())

    def _build_module(self) -> nn.Module:
        return build_head_module(self.head, self.d_model, channel_attention=self.channel_attention, reduction=self.reduction)

    def _init_state(self) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.module_ = self._build_module()
        scale = torch.tensor(math.log(1.0 / self.temperature), dtype=torch.float32)
        self.log_scale_ = nn.Parameter(scale) if self.learn_temperature else scale

    # -- forward pieces --------------------------------------------------------------------------
    def _scale(self) -> Tensor:
        return self.log_scale_.exp().clamp(max=MAX_SCALE)

    def _scores(self, z: Tensor) -> Tensor:
        """``[n, k]`` class scores of the head outputs: cosines or dot products with the bases."""
        if self.similarity == "matmul":
            return z @ self.label_bases.T
        return F.normalize(z, dim=-1) @ F.normalize(self.label_bases, dim=-1).T

    def _losses(self, xb: Tensor, yb: Tensor) -> tuple[Tensor, Tensor]:
        z, recon = self.module_(xb)
        logits = self._scale() * self._scores(z)
        loss = F.cross_entropy(logits, yb)
        if recon is not None and self.recon_weight > 0:
            loss = loss + self.recon_weight * F.mse_loss(recon, split_head_input(xb)[0])
        if self.istar_weight != 0 and z.shape[0] >= 2:
            penalty = istar_penalty(z[None, :, None, :], None, zeta=self.istar_zeta, weight=self.istar_weight)
            loss = loss + penalty.to(loss.dtype)
        return loss, logits

    # -- fitting ---------------------------------------------------------------------------------
    def fit(
        self,
        X_train: Float[Tensor, "n ..."],
        y_train: Int[Tensor, " n"] | Sequence[str],
        X_val: Float[Tensor, "m ..."] | None = None,
        y_val: Int[Tensor, " m"] | Sequence[str] | None = None,
        *,
        callback: Callable[[int, dict], Any] | None = None,
    ) -> "NeuralClusteringHead":
        """Train the head (see the module docstring for the loss and the schedule).

        Args:
            X_train: [n, d] representations, or [n, 3, d] (last token, token mean, token max) for
                the ``pool="tokens"`` channel attention (``Features.head_input``).
            y_train: class indices or class names.
            X_val, y_val: validation data for early stopping and best-epoch selection.
            callback: called as ``callback(epoch, record)`` after each epoch (and after its
                checkpoint is written); raising in it interrupts training, which a later ``fit``
                with the same ``checkpoint_dir`` resumes.

        Returns:
            ``self``.

        Example:
            >>> head = NeuralClusteringHead(torch.eye(2, 8), epochs=5).fit(torch.eye(2, 8), [0, 1])
            >>> head.predict(torch.eye(2, 8)).tolist()
            [0, 1]
        """
        # enable_grad: fitting must work when called inside a caller's torch.no_grad() block.
        with torch_threads(self.num_threads), torch.enable_grad():
            return self._fit(X_train, y_train, X_val, y_val, callback)

    def _fit(self, X_train, y_train, X_val, y_val, callback) -> "NeuralClusteringHead":
        X = self._check_X(X_train, "X_train", fitting=True)
        y = self._check_y(y_train, X.shape[0], "y_train")
        has_val = X_val is not None or y_val is not None
        if has_val:
            if X_val is None or y_val is None:
                raise InputError("pass both X_val and y_val, or neither.")
            Xv = self._check_X(X_val, "X_val")
            yv = self._check_y(y_val, Xv.shape[0], "y_val")
        self.input_shape_ = tuple(X.shape[1:])
        self._init_state()
        params = list(self.module_.parameters()) + ([self.log_scale_] if self.learn_temperature else [])
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        generator = torch.Generator().manual_seed(self.seed)
        state = {"epoch": -1, "best_key": None, "best_epoch": None, "bad_epochs": 0, "done": False, "history": []}
        best_weights = self._weights()
        run_id = self._run_id(X, y, Xv if has_val else None, yv if has_val else None)
        self.resumed_from_ = None
        if self.checkpoint_dir is not None and self.resume:
            loaded = self._load_checkpoint(run_id, optimizer, generator)
            if loaded is not None:
                state, best_weights = loaded
                self.resumed_from_ = state["epoch"]
        n = X.shape[0]
        for epoch in range(state["epoch"] + 1, self.epochs):
            if state["done"]:
                break
            total = self._train_epoch(X, y, optimizer, generator, epoch)
            record = {"epoch": epoch, "train_loss": total / n, "temperature": float(1.0 / self._scale().detach())}
            if has_val:
                val_loss, val_acc = self._evaluate(Xv, yv)
                record.update(val_loss=val_loss, val_accuracy=val_acc)
                key = (val_acc, -val_loss)
            else:
                key = (epoch,)  # without validation the last epoch is the best
            if state["best_key"] is None or key > tuple(state["best_key"]):
                state.update(best_key=list(key), best_epoch=epoch)
                best_weights = self._weights()
            # Patience counts epochs without a strictly better validation accuracy (a falling
            # validation loss at equal accuracy still updates the kept weights, but not patience).
            if key[0] > state.get("patience_best", float("-inf")):
                state.update(patience_best=key[0], bad_epochs=0)
            else:
                state["bad_epochs"] += 1
            state["epoch"] = epoch
            state["history"].append(record)
            if has_val and self.patience is not None and state["bad_epochs"] >= self.patience:
                state["done"] = True
            if epoch == self.epochs - 1:
                state["done"] = True
            if self.checkpoint_dir is not None:
                self._save_checkpoint(run_id, state, optimizer, generator, best_weights)
            if callback is not None:
                callback(epoch, dict(record))
        self._set_weights(best_weights)
        self.module_.eval()
        self.history_ = list(state["history"])
        self.best_epoch_ = state["best_epoch"]
        return self

    def _train_epoch(self, X: Tensor, y: Tensor, optimizer, generator: torch.Generator, epoch: int) -> float:
        """One shuffled pass over ``(X, y)``; returns the summed (example-weighted) training loss."""
        self.module_.train()
        order = torch.randperm(X.shape[0], generator=generator)
        total = 0.0
        for start in range(0, X.shape[0], self.batch_size):
            index = order[start : start + self.batch_size]
            loss, _ = self._losses(X[index], y[index])
            if not torch.isfinite(loss):
                raise NumericalError(
                    f"the training loss became {float(loss)} at epoch {epoch}; lower lr or check the features."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * index.numel()
        return total

    def _evaluate(self, X: Tensor, y: Tensor) -> tuple[float, float]:
        self.module_.eval()
        with torch.no_grad():
            z, _ = self.module_(X)
            logits = self._scale() * self._scores(z)
            loss = float(F.cross_entropy(logits, y))
            acc = float((logits.argmax(dim=1) == y).double().mean())
        return loss, acc

    def _weights(self) -> dict[str, Tensor]:
        weights = {f"module.{k}": v.detach().clone() for k, v in self.module_.state_dict().items()}
        weights["log_scale"] = self.log_scale_.detach().clone()
        return weights

    def _set_weights(self, weights: dict[str, Tensor]) -> None:
        module_state = {k[len("module."):]: v for k, v in weights.items() if k.startswith("module.")}
        self.module_.load_state_dict(module_state)
        with torch.no_grad():
            self.log_scale_.copy_(weights["log_scale"])

    # -- checkpoints -----------------------------------------------------------------------------
    def _run_id(self, X: Tensor, y: Tensor, Xv: Tensor | None, yv: Tensor | None) -> str:
        return training_run_id(self.get_config(), (self.label_bases, X, y, Xv, yv))

    def _save_checkpoint(self, run_id, state, optimizer, generator, best_weights) -> None:
        save_training_state(self.checkpoint_dir, run_id, state, self._weights(), best_weights, optimizer, generator)

    def _load_checkpoint(self, run_id, optimizer, generator):
        payload = load_training_state(self.checkpoint_dir, run_id)
        if payload is None:
            return None
        self._set_weights(payload["weights"])
        optimizer.load_state_dict(payload["optimizer"])
        generator.set_state(payload["generator"])
        return payload["state"], payload["best_weights"]

    # -- inference -------------------------------------------------------------------------------
    def _require_fitted(self) -> None:
        if self.module_ is None:
            raise InputError("this head is not fitted yet; call fit(X, y) first (or load a saved head).")

    def transform(self, X: Float[Tensor, "n ..."]) -> Float[Tensor, "n d"]:
        """The calibrated representation ``lambda(r)`` of each input.

        Example:
            >>> head.transform(X_test).shape  # doctest: +SKIP
            torch.Size([120, 576])
        """
        self._require_fitted()
        X = self._check_X(X, "X")
        self.module_.eval()
        with torch.no_grad():
            return self.module_(X)[0]

    def decision_function(self, X: Float[Tensor, "n ..."]) -> Float[Tensor, "n k"]:
        """Class scores of ``lambda(r)``: cosines to each label basis (dot products for ``similarity="matmul"``).

        Example:
            >>> head.decision_function(X_test).shape  # doctest: +SKIP
            torch.Size([120, 2])
        """
        return self._scores(self.transform(X))

    def predict_proba(self, X: Float[Tensor, "n ..."]) -> Float[Tensor, "n k"]:
        """Class probabilities ``softmax(scale * score)`` (scale = the learned inverse temperature).

        Example:
            >>> head.predict_proba(X_test).sum(1)  # doctest: +SKIP
        """
        with torch.no_grad():
            return torch.softmax(self._scale() * self.decision_function(X), dim=-1)

    def predict(self, X: Float[Tensor, "n ..."]) -> Int[Tensor, " n"]:
        """Class index of each input: argmax of the score (cosine by default) to the label bases."""
        return self.decision_function(X).argmax(dim=-1)

    def predict_labels(self, X: Float[Tensor, "n ..."]) -> list[str]:
        """Class name of each input."""
        return [self.classes[i] for i in self.predict(X).tolist()]

    def score(self, X: Float[Tensor, "n ..."], y: Int[Tensor, " n"] | Sequence[str]) -> float:
        """Accuracy on ``(X, y)``."""
        X = self._check_X(X, "X")
        y = self._check_y(y, X.shape[0], "y")
        return float((self.predict(X) == y).double().mean())

    # -- persistence -----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Save as ``config.json`` + ``weights.safetensors`` in a directory (each written atomically).

        Example:
            >>> head.save("my_head")  # doctest: +SKIP
        """
        self._require_fitted()
        config = {
            "config": self.get_config(),
            "d_model": self.d_model,
            "input_shape": list(self.input_shape_),
            "best_epoch": self.best_epoch_,
            "history": self.history_,
            "metadata": self.metadata,
        }
        weights = {k: v.contiguous() for k, v in self._weights().items()}
        weights["label_bases"] = self.label_bases.contiguous()
        return write_head_files(path, config, weights)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "NeuralClusteringHead":
        """Load a head saved by :meth:`save`.

        Example:
            >>> head = NeuralClusteringHead.load("my_head")  # doctest: +SKIP
        """
        config, weights = read_head_files(path)
        head = cls(weights.pop("label_bases"), metadata=config.get("metadata"), **config["config"])
        head.input_shape_ = tuple(config["input_shape"])
        head._init_state()
        try:
            head._set_weights(weights)
        except (RuntimeError, KeyError) as exc:
            raise ArtifactError(f"the weights in {path} do not match its config: {exc}") from exc
        head.module_.eval()
        head.history_ = list(config.get("history") or [])
        head.best_epoch_ = config.get("best_epoch")
        return head

    # -- validation ------------------------------------------------------------------------------
    def _check_X(self, X: Any, name: str, *, fitting: bool = False) -> Tensor:
        return check_head_input(X, name, self.d_model, None if fitting else self.input_shape_)

    def _check_y(self, y: Any, n: int, name: str) -> Tensor:
        return class_indices(y, n, name, self.classes)

    def __repr__(self) -> str:
        state = "fitted" if self.module_ is not None else "not fitted"
        return (
            f"NeuralClusteringHead(head={self.head!r}, similarity={self.similarity!r}, channel_attention={self.channel_attention}, "
            f"k={self.n_classes}, d={self.d_model}, {state})"
        )


__all__ = ["NeuralClusteringHead"]
