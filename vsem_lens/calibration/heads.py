"""Semantic calibration: a neural clustering head trained on detached zero-shot representations.

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

**Loss.** Cross-entropy over ``scale * cos(lambda(r), s_k)`` for the label bases ``s_k``. The scale
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
(``istar_weight``, ``istar_zeta``; :func:`vsem_lens.geometry.isotropy.istar_penalty`). With
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

import hashlib
import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..core.errors import ArtifactError, InputError, NumericalError, check_positive_int
from ..core.io import atomic_write

FORMAT_VERSION = 1
HEADS = ("clustering", "prototype")
MAX_SCALE = 100.0


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (``None`` leaves it alone).

    Small-matrix training loops are much faster on one thread on a busy CPU: on the shared 2-core
    machine, 20 epochs of the head took 1.0 s on one thread and 30 s on two (OpenMP threads spinning
    against other processes).

    Example:
        >>> with torch_threads(1):
        ...     torch.get_num_threads()
        1
    """
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


# -- modules -------------------------------------------------------------------------------------
class ChannelAttention(nn.Module):
    """CBAM/SE channel gate ``sigmoid(Bn(avg) + Bn(max))`` with one shared bottleneck d -> d/r -> d.

    Example:
        >>> gate = ChannelAttention(32, reduction=16)
        >>> gate(torch.randn(4, 32), torch.randn(4, 32)).shape
        torch.Size([4, 32])
    """

    def __init__(self, d: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, d // reduction)
        self.bottleneck = nn.Sequential(nn.Linear(d, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, d, bias=False))

    def forward(self, avg: Float[Tensor, "batch d"], mx: Float[Tensor, "batch d"]) -> Float[Tensor, "batch d"]:
        return torch.sigmoid(self.bottleneck(avg) + self.bottleneck(mx))


def _mlp(d: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, 2 * d, bias=False), nn.GELU(), nn.Linear(2 * d, d, bias=False))


def _split_input(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(r, avg, max) from a [batch, d] (avg = max = r) or [batch, 3, d] (last, mean, max) input."""
    if x.dim() == 3:
        return x[:, 0], x[:, 1], x[:, 2]
    return x, x, x


class ClusteringModule(nn.Module):
    """``lambda(r) = LN(MLP(r * CA(r)))`` (see the module docstring); input [b, d] or [b, 3, d].

    Example:
        >>> ClusteringModule(64)(torch.randn(2, 3, 64))[0].shape
        torch.Size([2, 64])
    """

    def __init__(self, d: int, *, channel_attention: bool = True, reduction: int = 16):
        super().__init__()
        self.ca = ChannelAttention(d, reduction) if channel_attention else None
        self.mlp = _mlp(d)
        self.ln = nn.LayerNorm(d)

    def forward(self, x: Tensor) -> tuple[Float[Tensor, "batch d"], Tensor | None]:
        r, avg, mx = _split_input(x)
        if self.ca is not None:
            r = r * self.ca(avg, mx)
        return self.ln(self.mlp(r)), None


class PrototypeModule(nn.Module):
    """The authors' prototype: encoder MLP (classified) + decoder MLP (reconstructs ``r``).

    Example:
        >>> z, recon = PrototypeModule(16)(torch.randn(2, 16)); z.shape, recon.shape
        (torch.Size([2, 16]), torch.Size([2, 16]))
    """

    def __init__(self, d: int):
        super().__init__()
        self.encoder = _mlp(d)
        self.decoder = _mlp(d)

    def forward(self, x: Tensor) -> tuple[Float[Tensor, "batch d"], Float[Tensor, "batch d"]]:
        r = _split_input(x)[0]
        z = self.encoder(r)
        return z, self.decoder(z)


# -- metrics -------------------------------------------------------------------------------------
def classification_metrics(y_true: Any, y_pred: Any, n_classes: int | None = None) -> dict[str, float]:
    """Accuracy and macro-F1 (the unweighted mean of per-class F1; a class never predicted and never
    present is left out, one present but never predicted counts 0).

    Example:
        >>> classification_metrics([0, 0, 1, 1], [0, 1, 1, 1])
        {'accuracy': 0.75, 'macro_f1': 0.7333333333333334}
    """
    t = torch.as_tensor(y_true).long().reshape(-1)
    p = torch.as_tensor(y_pred).long().reshape(-1)
    if t.numel() != p.numel() or t.numel() == 0:
        raise InputError(f"y_true and y_pred must be non-empty and the same length ({t.numel()} vs {p.numel()}).")
    k = int(n_classes) if n_classes is not None else int(max(t.max(), p.max())) + 1
    f1s = []
    for c in range(k):
        tp = int(((p == c) & (t == c)).sum())
        fp = int(((p == c) & (t != c)).sum())
        fn = int(((p != c) & (t == c)).sum())
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": float((t == p).double().mean()), "macro_f1": float(np.mean(f1s)) if f1s else 0.0}


# -- the head ------------------------------------------------------------------------------------
class NeuralClusteringHead:
    """Semantic-calibration head with a scikit-learn style API (``fit``/``predict``/``score``).

    Args:
        label_bases: [k, d] semantic bases of the label tokens (fixed centroids), e.g.
            ``SemanticBasis.from_model(model).for_words(task.label_words)``.
        classes: class names (default ``"0"..."k-1"``); ``y`` may be given as indices or names.
        head: ``"clustering"`` (the paper's module) or ``"prototype"`` (encoder/decoder + MSE).
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
            outputs of each mini-batch (0 = off; sign as in :func:`vsem_lens.geometry.isotropy.istar_penalty`).
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
        self.channel_attention = bool(channel_attention)
        self.reduction = check_positive_int(reduction, "reduction")
        self.temperature = _positive_float(temperature, "temperature")
        self.learn_temperature = bool(learn_temperature)
        self.lr = _positive_float(lr, "lr")
        self.weight_decay = _nonnegative_float(weight_decay, "weight_decay")
        self.epochs = check_positive_int(epochs, "epochs")
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.patience = None if patience is None else check_positive_int(patience, "patience")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InputError(f"seed must be an integer, got {seed!r}.")
        self.seed = seed
        self.recon_weight = _nonnegative_float(recon_weight, "recon_weight")
        self.istar_weight = _finite_float(istar_weight, "istar_weight")
        self.istar_zeta = _finite_float(istar_zeta, "istar_zeta")
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
        if self.head == "prototype":
            return PrototypeModule(self.d_model)
        return ClusteringModule(self.d_model, channel_attention=self.channel_attention, reduction=self.reduction)

    def _init_state(self) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.module_ = self._build_module()
        scale = torch.tensor(math.log(1.0 / self.temperature), dtype=torch.float32)
        self.log_scale_ = nn.Parameter(scale) if self.learn_temperature else scale

    # -- forward pieces --------------------------------------------------------------------------
    def _scale(self) -> Tensor:
        return self.log_scale_.exp().clamp(max=MAX_SCALE)

    def _cosines(self, z: Tensor) -> Tensor:
        return F.normalize(z, dim=-1) @ F.normalize(self.label_bases, dim=-1).T

    def _losses(self, xb: Tensor, yb: Tensor) -> tuple[Tensor, Tensor]:
        z, recon = self.module_(xb)
        logits = self._scale() * self._cosines(z)
        loss = F.cross_entropy(logits, yb)
        if recon is not None and self.recon_weight > 0:
            loss = loss + self.recon_weight * F.mse_loss(recon, _split_input(xb)[0])
        if self.istar_weight != 0 and z.shape[0] >= 2:
            from ..geometry.isotropy import istar_penalty

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
            self.module_.train()
            order = torch.randperm(n, generator=generator)
            total = 0.0
            for start in range(0, n, self.batch_size):
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

    def _evaluate(self, X: Tensor, y: Tensor) -> tuple[float, float]:
        self.module_.eval()
        with torch.no_grad():
            z, _ = self.module_(X)
            logits = self._scale() * self._cosines(z)
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
        digest = hashlib.blake2b(digest_size=12)
        digest.update(json.dumps(self.get_config(), sort_keys=True).encode())
        for tensor in (self.label_bases, X, y, Xv, yv):
            if tensor is not None:
                digest.update(str(tuple(tensor.shape)).encode())
                digest.update(tensor.contiguous().numpy().tobytes())
        return digest.hexdigest()

    def _save_checkpoint(self, run_id, state, optimizer, generator, best_weights) -> None:
        path = self.checkpoint_dir
        path.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": FORMAT_VERSION,
            "run_id": run_id,
            "state": json.dumps(state),
            "weights": self._weights(),
            "best_weights": best_weights,
            "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(),
        }
        atomic_write(path / "checkpoint.pt", lambda tmp: torch.save(payload, tmp))

    def _load_checkpoint(self, run_id, optimizer, generator):
        path = self.checkpoint_dir / "checkpoint.pt"
        if not path.is_file():
            return None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            state = json.loads(payload["state"])
        except Exception as exc:  # a torn or foreign file
            raise ArtifactError(
                f"the checkpoint {path} is unreadable ({type(exc).__name__}: {exc}); delete it to start over."
            ) from exc
        if payload.get("run_id") != run_id:
            raise ArtifactError(
                f"the checkpoint in {self.checkpoint_dir} belongs to another training run (different data or "
                "settings); use another checkpoint_dir, delete it, or pass resume=False to start over."
            )
        self._set_weights(payload["weights"])
        optimizer.load_state_dict(payload["optimizer"])
        generator.set_state(payload["generator"])
        return state, payload["best_weights"]

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
        """Cosines of ``lambda(r)`` to each label basis.

        Example:
            >>> head.decision_function(X_test).shape  # doctest: +SKIP
            torch.Size([120, 2])
        """
        return self._cosines(self.transform(X))

    def predict_proba(self, X: Float[Tensor, "n ..."]) -> Float[Tensor, "n k"]:
        """Class probabilities ``softmax(scale * cos)`` (scale = the learned inverse temperature).

        Example:
            >>> head.predict_proba(X_test).sum(1)  # doctest: +SKIP
        """
        with torch.no_grad():
            return torch.softmax(self._scale() * self.decision_function(X), dim=-1)

    def predict(self, X: Float[Tensor, "n ..."]) -> Int[Tensor, " n"]:
        """Class index of each input: argmax of the cosine to the label bases."""
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
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {
            "format_version": FORMAT_VERSION,
            "kind": "vsem_lens.NeuralClusteringHead",
            "config": self.get_config(),
            "d_model": self.d_model,
            "input_shape": list(self.input_shape_),
            "best_epoch": self.best_epoch_,
            "history": self.history_,
            "metadata": self.metadata,
        }
        weights = {k: v.contiguous() for k, v in self._weights().items()}
        weights["label_bases"] = self.label_bases.contiguous()
        atomic_write(path / "weights.safetensors", lambda tmp: save_file(weights, str(tmp)))
        atomic_write(path / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2)))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "NeuralClusteringHead":
        """Load a head saved by :meth:`save`.

        Example:
            >>> head = NeuralClusteringHead.load("my_head")  # doctest: +SKIP
        """
        path = Path(path)
        try:
            config = json.loads((path / "config.json").read_text())
            weights = load_file(str(path / "weights.safetensors"))
        except FileNotFoundError as exc:
            raise ArtifactError(f"{path} holds no saved head (config.json + weights.safetensors): {exc}") from None
        except Exception as exc:
            raise ArtifactError(f"could not read the head in {path}: {type(exc).__name__}: {exc}") from exc
        if config.get("kind") != "vsem_lens.NeuralClusteringHead" or "label_bases" not in weights:
            raise ArtifactError(f"{path} does not hold a vsem-lens calibration head.")
        if config.get("format_version", 0) > FORMAT_VERSION:
            raise ArtifactError(f"the head in {path} was saved by a newer vsem-lens; upgrade to load it.")
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
        try:
            X = torch.as_tensor(X).detach().to("cpu", torch.float32)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InputError(f"{name} must be a numeric array/tensor: {exc}") from None
        if X.dim() not in (2, 3) or X.shape[-1] != self.d_model or (X.dim() == 3 and X.shape[1] != 3):
            raise InputError(
                f"{name} must be [n, {self.d_model}] or [n, 3, {self.d_model}] (last, mean, max), got {tuple(X.shape)}."
            )
        if X.shape[0] == 0:
            raise InputError(f"{name} is empty.")
        if not fitting and self.input_shape_ is not None and tuple(X.shape[1:]) != self.input_shape_:
            raise InputError(
                f"{name} has per-example shape {tuple(X.shape[1:])} but the head was fitted on {self.input_shape_}; "
                "use the same feature pooling as in training."
            )
        if not torch.isfinite(X).all():
            raise NumericalError(f"{name} contains NaN or inf.")
        return X

    def _check_y(self, y: Any, n: int, name: str) -> Tensor:
        if isinstance(y, Tensor):
            values = y.detach().cpu().reshape(-1).tolist()
        else:
            values = list(y)
        if len(values) != n:
            raise InputError(f"{name} has {len(values)} labels for {n} examples.")
        index = {c: i for i, c in enumerate(self.classes)}
        out = []
        for v in values:
            if isinstance(v, str):
                if v not in index:
                    raise InputError(f"{name} holds label {v!r}, not one of the classes {self.classes}.")
                out.append(index[v])
            else:
                try:
                    iv = int(v)
                except (TypeError, ValueError):
                    raise InputError(f"{name} holds {v!r}, neither a class index nor a class name.") from None
                if iv != v or not 0 <= iv < self.n_classes:
                    raise InputError(f"{name} holds {v!r}, not a class index in 0..{self.n_classes - 1}.")
                out.append(iv)
        return torch.tensor(out, dtype=torch.long)

    def __repr__(self) -> str:
        state = "fitted" if self.module_ is not None else "not fitted"
        return (
            f"NeuralClusteringHead(head={self.head!r}, channel_attention={self.channel_attention}, "
            f"k={self.n_classes}, d={self.d_model}, {state})"
        )


# -- end to end ----------------------------------------------------------------------------------
class CalibratedModel:
    """A hooked model + a fitted head + a task: classify new texts end to end.

    Args:
        model: the :class:`~vsem_lens.core.models.HookedModel` the features come from.
        head: a fitted :class:`NeuralClusteringHead`.
        task: the task (gives the template and label words); only its prompt is used.
        layer, frame, pool, max_length: how features are extracted (as in training).

    Example:
        >>> cm = CalibratedModel.fit(model, load_task("sentiment"), epochs=50)   # doctest: +SKIP
        >>> cm.predict(["A delight from start to finish."])                       # doctest: +SKIP
        ['positive']
        >>> cm.representation(["Dull."]).shape                                    # doctest: +SKIP
        torch.Size([1, 576])
    """

    def __init__(
        self,
        model: Any,
        head: NeuralClusteringHead,
        task: Any,
        *,
        layer: int = -1,
        frame: str = "final_norm",
        pool: str = "tokens",
        max_length: int | None = None,
    ):
        from .features import POOLS

        if head.module_ is None:
            raise InputError("the head is not fitted; fit it first or use CalibratedModel.fit.")
        if pool not in POOLS:
            raise InputError(f"unknown pool {pool!r}; choose one of {', '.join(POOLS)}.")
        if list(head.classes) != list(task.label_names):
            raise InputError(f"the head's classes {head.classes} differ from the task's {task.label_names}.")
        self.model, self.head, self.task = model, head, task
        self.layer, self.frame, self.pool, self.max_length = layer, frame, pool, max_length

    @classmethod
    def fit(
        cls,
        model: Any,
        task: Any,
        *,
        layer: int = -1,
        frame: str = "final_norm",
        pool: str = "tokens",
        max_length: int | None = None,
        progress: bool = True,
        features: Mapping[str, Any] | None = None,
        **head_kwargs: Any,
    ) -> "CalibratedModel":
        """Extract (cached) features of the task's ``train``/``validation`` splits and fit a head.

        ``head_kwargs`` go to :class:`NeuralClusteringHead`. Without a ``validation`` split no early
        stopping is done. ``features`` (by split name) are used instead of extracting them again, e.g.
        the ones a ``torchrun`` run extracted with ``extract_features(..., distributed=env)``.

        Example:
            >>> cm = CalibratedModel.fit(model, load_task("topic"), head="prototype")  # doctest: +SKIP
        """
        from ..readout.basis import SemanticBasis
        from .features import extract_features

        basis = SemanticBasis.from_model(model)
        bases = basis.for_words(task.label_words)
        head = NeuralClusteringHead(bases, classes=task.label_names, **head_kwargs)
        given = dict(features or {})

        def split_input(name: str) -> list[Any]:
            split = task.split(name)
            if name not in given:
                given[name] = extract_features(
                    model, split, layer=layer, frame=frame, max_length=max_length, progress=progress
                )
            return [given[name].head_input(pool), split.y]

        args = split_input("train") + (split_input("validation") if task.has_split("validation") else [])
        head.metadata.update(_prompt_metadata(model, task, layer, frame, pool, max_length))
        head.fit(*args)
        return cls(model, head, task, layer=layer, frame=frame, pool=pool, max_length=max_length)

    def features(self, texts: Sequence[str], *, cache: bool = False) -> Tensor:
        """Head input of texts (their zero-shot prompt features)."""
        from ..core.models import check_texts
        from .features import extract_features

        texts = check_texts(texts)
        feats = extract_features(
            self.model, self.task, texts=texts, layer=self.layer, frame=self.frame,
            max_length=self.max_length, cache=cache, progress=False,
        )
        return feats.head_input(self.pool)

    def predict(self, texts: str | Sequence[str]) -> list[str]:
        """Label of each text."""
        return self.head.predict_labels(self.features(texts))

    def predict_proba(self, texts: str | Sequence[str]) -> Float[Tensor, "n k"]:
        """Class probabilities of each text (columns in ``task.label_names`` order)."""
        return self.head.predict_proba(self.features(texts))

    def representation(self, texts: str | Sequence[str]) -> Float[Tensor, "n d_model"]:
        """The calibrated representation ``lambda(r)`` of each text (for the analyses)."""
        return self.head.transform(self.features(texts))

    def evaluate(self, task: Any, *, cache: bool = True) -> dict[str, float]:
        """Accuracy and macro-F1 on a labelled task (e.g. ``task.split("test")``)."""
        from .features import extract_features

        feats = extract_features(
            self.model, task, layer=self.layer, frame=self.frame, max_length=self.max_length, cache=cache, progress=False
        )
        return classification_metrics(task.y, self.head.predict(feats.head_input(self.pool)), task.n_classes)

    def save(self, path: str | os.PathLike) -> Path:
        """Save the head with everything needed to rebuild the classifier (model spec, prompt, layer)."""
        self.head.metadata.update(_prompt_metadata(self.model, self.task, self.layer, self.frame, self.pool, self.max_length))
        return self.head.save(path)

    @classmethod
    def load(cls, path: str | os.PathLike, model: Any = None) -> "CalibratedModel":
        """Load a saved classifier; loads the recorded model unless ``model`` is given (a hooked model,
        or a model spec for :func:`~vsem_lens.core.models.load_model`, loaded with the recorded BOS rule).

        Example:
            >>> cm = CalibratedModel.load("calibration-out/head")  # doctest: +SKIP
        """
        from ..core.models import load_model
        from .datasets import TextClassificationTask

        head = NeuralClusteringHead.load(path)
        meta = head.metadata
        required = ("template", "verbalizer", "layer", "frame", "pool")
        missing = [k for k in required if k not in meta]
        if missing:
            raise ArtifactError(f"the head in {path} lacks the prompt metadata {missing}; save it with CalibratedModel.save.")
        if model is None or isinstance(model, (str, os.PathLike)):
            spec = meta.get("model", "embedded") if model is None else model
            model = load_model(spec, prepend_bos=bool(meta.get("prepend_bos", False)))
        if meta.get("fingerprint") and meta["fingerprint"] != model.fingerprint:
            raise ArtifactError(
                f"the head in {path} was trained on another model (fingerprint {meta['fingerprint']} vs "
                f"{model.fingerprint}); pass the model it was trained with."
            )
        verbalizer = dict(meta["verbalizer"])
        task = TextClassificationTask(
            meta.get("task", "task"), ["-"] * 2, list(verbalizer)[:2], ["train", "train"], verbalizer, meta["template"]
        )
        return cls(model, head, task, layer=int(meta["layer"]), frame=meta["frame"], pool=meta["pool"], max_length=meta.get("max_length"))

    def __repr__(self) -> str:
        return f"CalibratedModel({self.model!r}, {self.head!r}, task={self.task.name!r}, layer={self.layer})"


def _prompt_metadata(model, task, layer, frame, pool, max_length) -> dict:
    name = getattr(model, "name", "")
    spec = "embedded" if name == "SmolLM2-135M-Instruct" else name
    return {
        "model": spec,
        "fingerprint": getattr(model, "fingerprint", ""),
        "prepend_bos": bool(getattr(model, "prepend_bos", False)),
        "task": task.name,
        "template": task.template,
        "verbalizer": dict(task.verbalizer),
        "layer": int(layer) % model.n_layers if hasattr(model, "n_layers") else int(layer),
        "frame": frame,
        "pool": pool,
        "max_length": max_length,
    }


# -- argument checks -----------------------------------------------------------------------------
def _finite_float(value: Any, name: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}.") from None
    if not math.isfinite(out):
        raise InputError(f"{name} must be finite, got {value!r}.")
    return out


def _positive_float(value: Any, name: str) -> float:
    out = _finite_float(value, name)
    if out <= 0:
        raise InputError(f"{name} must be positive, got {value!r}.")
    return out


def _nonnegative_float(value: Any, name: str) -> float:
    out = _finite_float(value, name)
    if out < 0:
        raise InputError(f"{name} must be >= 0, got {value!r}.")
    return out


__all__ = [
    "CalibratedModel",
    "ChannelAttention",
    "ClusteringModule",
    "NeuralClusteringHead",
    "PrototypeModule",
    "classification_metrics",
    "torch_threads",
]


