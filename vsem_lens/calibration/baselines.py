"""Baselines for semantic calibration, on the same splits and prompts as the heads.

Each baseline returns a :class:`BaselineResult` with test accuracy, macro-F1 and wall time.

=============== ======================================================================================
name            what it does
=============== ======================================================================================
zero-shot       the model's next-token logits over the label tokens (matmul: ``LN_f(h) W_U + b_U``)
affinity        cosine of the LM-head input to the label tokens' semantic bases (docs/concepts/affinity.md)
knn             cosine k-nearest neighbours on the prompt features; k chosen on validation
probe           multinomial logistic regression (L2) on standardised features; strength chosen on
                validation; full-batch L-BFGS in float64 (torch; no scikit-learn needed)
icl             few-shot in-context learning: ``shots`` demonstrations per class from train, drawn and
                ordered with a fixed seed, the same for every query; long demonstrations are shortened
lora, ia3       parameter-efficient fine-tuning (PyPI ``peft``) of a *fresh copy* of the HF model with
                the zero-shot prompt: cross-entropy over the label-token logits at the last prompt
                token; a short CPU budget (default 1 epoch over train, max_length 64, batch 8)
=============== ======================================================================================

**Wall time** is the full cost of the method from a loaded model: for the feature-based methods it
includes the forward passes that produced the features they use (measured when the features were
first computed, even when read back from the cache, see :class:`~vsem_lens.calibration.features.Features`); for
ICL the forward passes over the long prompts; for LoRA/IA3 copying the model, training and the test
forward passes.

Example:
    >>> results = run_baselines(model, load_task("sentiment"), ["zero-shot", "affinity", "probe"])  # doctest: +SKIP
    >>> results_table(results)[["method", "accuracy", "macro_f1", "wall_time_s"]]                    # doctest: +SKIP
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from ..core.errors import InputError, ModelLoadError, check_positive_int
from ..core.logits import Unembedding
from ..core.models import HookedModel
from .datasets import TextClassificationTask
from .features import Features, build_prompts, extract_features, label_token_ids, n_tokens
from .metrics import classification_metrics
from .threads import torch_threads

BASELINES = ("zero-shot", "affinity", "knn", "probe", "icl", "lora", "ia3")


@dataclass
class BaselineResult:
    """Test metrics and cost of one method.

    Example:
        >>> BaselineResult("knn", 0.9, 0.89, 1.5).as_row()["method"]
        'knn'
    """

    method: str
    accuracy: float
    macro_f1: float
    wall_time_s: float
    details: dict = field(default_factory=dict)
    predictions: Tensor | None = field(default=None, repr=False)

    def as_row(self) -> dict:
        """A flat dict for a table (details prefixed with nothing; JSON-able values only)."""
        row = {"method": self.method, "accuracy": self.accuracy, "macro_f1": self.macro_f1, "wall_time_s": self.wall_time_s}
        for key, value in self.details.items():
            if isinstance(value, (int, float, str, bool)) or value is None:
                row[key] = value
        return row


def results_table(results: Sequence[BaselineResult]) -> pd.DataFrame:
    """Results as a tidy table, one row per method.

    Example:
        >>> results_table([BaselineResult("knn", 0.9, 0.89, 1.5)]).shape
        (1, 4)
    """
    return pd.DataFrame([r.as_row() for r in results])


def _result(method: str, y: Tensor, pred: Tensor, n_classes: int, seconds: float, **details: Any) -> BaselineResult:
    metrics = classification_metrics(y, pred, n_classes)
    return BaselineResult(method, metrics["accuracy"], metrics["macro_f1"], float(seconds), dict(details), pred.detach().cpu())


# -- zero-shot -----------------------------------------------------------------------------------
def zero_shot_matmul(features: Features, y: Int[Tensor, " n"], n_classes: int | None = None) -> BaselineResult:
    """Zero-shot: argmax of the model's next-token logits over the label tokens.

    Example:
        >>> zero_shot_matmul(test_features, test.y).accuracy  # doctest: +SKIP
        0.95
    """
    started = time.perf_counter()
    pred = features.label_logits.argmax(dim=1)
    k = n_classes or features.label_logits.shape[1]
    return _result("zero-shot", y, pred, k, features.seconds + time.perf_counter() - started, readout="matmul logits")


def zero_shot_affinity(
    features: Features, label_bases: Float[Tensor, "k d"], y: Int[Tensor, " n"]
) -> BaselineResult:
    """Zero-shot with vocabulary-affinity logits: argmax of ``cos(r, s_label)`` over the label bases.

    ``features`` must be last-layer ``final_norm`` features (the LM-head input, where the bases live).

    Example:
        >>> zero_shot_affinity(test_features, basis.for_words(task.label_words), test.y)  # doctest: +SKIP
    """
    if features.frame != "final_norm":
        raise InputError("the affinity baseline needs final_norm features (the LM-head input); extract them with frame='final_norm'.")
    started = time.perf_counter()
    bases = torch.as_tensor(label_bases, dtype=torch.float32).cpu()
    cos = F.normalize(features.X, dim=1) @ F.normalize(bases, dim=1).T
    pred = cos.argmax(dim=1)
    counts = torch.bincount(pred, minlength=bases.shape[0]).tolist()
    return _result(
        "affinity", y, pred, bases.shape[0], features.seconds + time.perf_counter() - started,
        readout="cosine to label bases", predicted_counts=str(counts),
    )


# -- kNN -----------------------------------------------------------------------------------------
class KNNClassifier:
    """Cosine k-nearest-neighbour classifier: majority vote, ties broken by summed similarity.

    Example:
        >>> knn = KNNClassifier(k=1).fit(torch.eye(2, 3), torch.tensor([0, 1]))
        >>> knn.predict(torch.tensor([[0.9, 0.1, 0.0]])).tolist()
        [0]
    """

    def __init__(self, k: int = 5, n_classes: int | None = None):
        check_positive_int(k, "k")
        self.k, self.n_classes = k, n_classes

    def fit(self, X: Float[Tensor, "n d"], y: Int[Tensor, " n"]) -> "KNNClassifier":
        X = _matrix(X, "X")
        self.X_ = F.normalize(X.double(), dim=1)
        self.y_ = torch.as_tensor(y).long().reshape(-1)
        if self.y_.numel() != X.shape[0]:
            raise InputError(f"X has {X.shape[0]} rows but y has {self.y_.numel()} labels.")
        self.n_classes_ = self.n_classes or int(self.y_.max()) + 1
        return self

    def predict(self, X: Float[Tensor, "m d"], k: int | None = None) -> Int[Tensor, " m"]:
        k = min(k or self.k, self.X_.shape[0])
        sims = F.normalize(_matrix(X, "X").double(), dim=1) @ self.X_.T
        top, idx = sims.topk(k, dim=1)
        labels = self.y_[idx]
        votes = torch.zeros(X.shape[0], self.n_classes_, dtype=torch.float64)
        votes.scatter_add_(1, labels, torch.ones_like(top))
        weight = torch.zeros_like(votes).scatter_add_(1, labels, top)
        return (votes + 1e-6 * weight).argmax(dim=1)


def knn_baseline(
    f_train: Features, y_train: Tensor, f_val: Features, y_val: Tensor, f_test: Features, y_test: Tensor,
    *, ks: Sequence[int] = (1, 3, 5, 7, 9, 15, 25), n_classes: int | None = None,
) -> BaselineResult:
    """KNN on the last-token prompt features; k picked on validation accuracy (ties: smaller k).

    Example:
        >>> knn_baseline(f_tr, y_tr, f_va, y_va, f_te, y_te).details["k"]  # doctest: +SKIP
        7
    """
    with torch_threads(1):
        return _knn(f_train, y_train, f_val, y_val, f_test, y_test, ks, n_classes)


def _knn(f_train, y_train, f_val, y_val, f_test, y_test, ks, n_classes) -> BaselineResult:
    started = time.perf_counter()
    k_classes = n_classes or int(max(y_train.max(), y_val.max(), y_test.max())) + 1
    knn = KNNClassifier(n_classes=k_classes).fit(f_train.X, y_train)
    best_k, best_acc = None, -1.0
    for k in ks:
        acc = float((knn.predict(f_val.X, k) == y_val).double().mean())
        if acc > best_acc:
            best_k, best_acc = k, acc
    pred = knn.predict(f_test.X, best_k)
    seconds = f_train.seconds + f_val.seconds + f_test.seconds + time.perf_counter() - started
    return _result("knn", y_test, pred, k_classes, seconds, k=best_k, val_accuracy=best_acc)


# -- logistic-regression probe -------------------------------------------------------------------
class LogisticRegressionProbe:
    """Multinomial logistic regression with an L2 penalty, in torch.

    Minimises ``mean CE(X W + b, y) + (l2 / 2) ||W||^2`` (bias not penalised) on standardised
    features (train mean and standard deviation) with full-batch L-BFGS in float64; the problem is
    convex, so the result does not depend on a seed.

    Example:
        >>> X = torch.tensor([[0.0], [1.0], [2.0], [3.0]]); y = torch.tensor([0, 0, 1, 1])
        >>> LogisticRegressionProbe(l2=1e-3).fit(X, y).predict(X).tolist()
        [0, 0, 1, 1]
    """

    def __init__(self, l2: float = 1e-2, max_iter: int = 100, n_classes: int | None = None):
        if not isinstance(l2, (int, float)) or not math.isfinite(l2) or l2 < 0:
            raise InputError(f"l2 must be a finite number >= 0, got {l2!r}.")
        self.l2, self.max_iter, self.n_classes = float(l2), int(max_iter), n_classes

    def fit(
        self, X: Float[Tensor, "n d"], y: Int[Tensor, " n"], *, warm_start: "LogisticRegressionProbe | None" = None
    ) -> "LogisticRegressionProbe":
        """Fit; ``warm_start`` (a probe fitted on the same data) starts L-BFGS from its solution."""
        X = _matrix(X, "X").double()
        y = torch.as_tensor(y).long().reshape(-1)
        if y.numel() != X.shape[0]:
            raise InputError(f"X has {X.shape[0]} rows but y has {y.numel()} labels.")
        k = self.n_classes or int(y.max()) + 1
        self.mean_ = X.mean(dim=0)
        self.std_ = X.std(dim=0).clamp_min(1e-8)
        Z = (X - self.mean_) / self.std_
        if warm_start is not None and warm_start.W_.shape == (X.shape[1], k):
            W = warm_start.W_.clone().requires_grad_(True)
            b = warm_start.b_.clone().requires_grad_(True)
        else:
            W = torch.zeros(X.shape[1], k, dtype=torch.float64, requires_grad=True)
            b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=self.max_iter, tolerance_grad=1e-9,
                                tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(Z @ W + b, y) + 0.5 * self.l2 * (W * W).sum()
            loss.backward()
            return loss

        opt.step(closure)
        self.W_, self.b_ = W.detach(), b.detach()
        return self

    def decision_function(self, X: Float[Tensor, "m d"]) -> Float[Tensor, "m k"]:
        Z = (_matrix(X, "X").double() - self.mean_) / self.std_
        return Z @ self.W_ + self.b_

    def predict(self, X: Float[Tensor, "m d"]) -> Int[Tensor, " m"]:
        return self.decision_function(X).argmax(dim=1)


def probe_baseline(
    f_train: Features, y_train: Tensor, f_val: Features, y_val: Tensor, f_test: Features, y_test: Tensor,
    *, l2s: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0), n_classes: int | None = None,
) -> BaselineResult:
    """Logistic-regression probe; L2 strength picked on validation accuracy (ties: stronger L2).

    The strengths are fitted from the strongest down, each warm-started from the previous solution
    (on one torch thread, see :func:`~vsem_lens.calibration.threads.torch_threads`).

    Example:
        >>> probe_baseline(f_tr, y_tr, f_va, y_va, f_te, y_te).details["l2"]  # doctest: +SKIP
        0.1
    """
    with torch_threads(1):
        return _probe(f_train, y_train, f_val, y_val, f_test, y_test, l2s, n_classes)


def _probe(f_train, y_train, f_val, y_val, f_test, y_test, l2s, n_classes) -> BaselineResult:
    started = time.perf_counter()
    k_classes = n_classes or int(max(y_train.max(), y_val.max(), y_test.max())) + 1
    best, best_acc, best_l2, previous = None, -1.0, None, None
    for l2 in sorted(l2s, reverse=True):
        probe = LogisticRegressionProbe(l2, n_classes=k_classes).fit(f_train.X, y_train, warm_start=previous)
        previous = probe
        acc = float((probe.predict(f_val.X) == y_val).double().mean())
        if acc > best_acc:
            best, best_acc, best_l2 = probe, acc, l2
    pred = best.predict(f_test.X)
    seconds = f_train.seconds + f_val.seconds + f_test.seconds + time.perf_counter() - started
    return _result("probe", y_test, pred, k_classes, seconds, l2=best_l2, val_accuracy=best_acc)


# -- in-context learning -------------------------------------------------------------------------
def icl_prefix(
    model: HookedModel, task: TextClassificationTask, *, shots: int = 1, seed: int = 42, demo_max_tokens: int = 64
) -> str:
    """The demonstrations block: ``shots`` train examples per class, each as its filled template
    followed by ``" " + label word`` and a blank line, in a seeded random order.

    Example:
        >>> print(icl_prefix(model, load_task("sentiment"), shots=1))  # doctest: +SKIP
        Review: A gripping ...
        Sentiment: positive
        <BLANKLINE>
        Review: ...
    """
    check_positive_int(shots, "shots")
    train = task.split("train")
    rng = random.Random(seed)
    demos: list[tuple[str, str]] = []
    for label in task.label_names:
        members = [i for i, lab in enumerate(train.labels) if lab == label]
        if len(members) < shots:
            raise InputError(f"class {label!r} has {len(members)} training example(s), fewer than shots={shots}.")
        demos += [(train.texts[i], label) for i in rng.sample(members, shots)]
    rng.shuffle(demos)
    parts = []
    for text, label in demos:
        prompt = build_prompts(model, task.template, [text], max_length=demo_max_tokens)[0][0]
        parts.append(f"{prompt} {task.verbalizer[label]}\n\n")
    return "".join(parts)


def icl_baseline(
    model: HookedModel,
    task: TextClassificationTask,
    *,
    shots: int = 1,
    seed: int = 42,
    demo_max_tokens: int = 64,
    max_length: int | None = None,
    batch_size: int = 4,
    cache: bool = True,
    progress: bool = False,
) -> BaselineResult:
    """Few-shot ICL: demonstrations (see :func:`icl_prefix`) + the zero-shot prompt of each test text;
    prediction = argmax of the next-token logits over the label tokens.

    Context: each demonstration is shortened to ``demo_max_tokens``; the query to what is left of
    ``max_length`` (default the model's context). Raises InputError if the demonstrations alone do not fit.

    Example:
        >>> icl_baseline(model, load_task("topic"), shots=1).accuracy  # doctest: +SKIP
    """
    started = time.perf_counter()
    prefix = icl_prefix(model, task, shots=shots, seed=seed, demo_max_tokens=demo_max_tokens)
    prefix_seconds = time.perf_counter() - started
    if "{text}" in prefix:
        raise InputError("a demonstration contains the literal '{text}'; it cannot be used as a prompt prefix.")
    limit = model.n_ctx if max_length is None else int(max_length)
    prefix_tokens = n_tokens(model, prefix)
    if prefix_tokens + 8 > limit:
        raise InputError(
            f"the {shots}-shot demonstrations take {prefix_tokens} tokens, leaving no room for a query within "
            f"{limit} tokens; use fewer shots or a smaller demo_max_tokens."
        )
    test = task.split("test")
    icl_task = test.with_prompt(template=prefix + task.template)
    icl_task.name = f"{task.name}-icl{shots}-s{seed}"
    feats = extract_features(model, icl_task, batch_size=batch_size, max_length=limit, cache=cache, progress=progress)
    pred = feats.label_logits.argmax(dim=1)
    seconds = prefix_seconds + feats.seconds
    return _result("icl", test.y, pred, task.n_classes, seconds, shots=shots, prefix_tokens=prefix_tokens)


# -- LoRA / IA3 ----------------------------------------------------------------------------------
def fresh_hf_model(model: HookedModel) -> Any:
    """A fresh, independent HF copy of the model's weights for fine-tuning (the shared hooked model
    is never modified).

    The embedded model is reloaded from its fp32 directory (standard HF attention); any other model is
    rebuilt from its config with the bridge-wrapped weights copied in (the bridge renames the HF
    submodules; their ``._original_component`` segments are stripped).

    Example:
        >>> hf = fresh_hf_model(model)  # doctest: +SKIP
    """
    from ..core.models import EMBEDDED_NAME, embedded_model_dir

    if model.name == EMBEDDED_NAME:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(embedded_model_dir()), dtype=model.dtype)
    original = getattr(model.bridge, "original_model", None)
    if original is None:
        raise ModelLoadError("this hooked model exposes no HF model to copy; pass hf_factory= to fine-tune it.")
    fresh = type(original)(copy.deepcopy(original.config))
    wanted = fresh.state_dict()
    state = {}
    for key, value in original.state_dict().items():
        clean = key.replace("._original_component", "")
        if clean in wanted and clean not in state:
            state[clean] = value.detach().clone()
    missing = [k for k in wanted if k not in state]
    tied = {k for k in missing if "lm_head" in k or "embed" in k}
    if set(missing) - tied:
        raise ModelLoadError(f"could not copy the model's weights for fine-tuning (missing {missing[:3]}); pass hf_factory=.")
    fresh.load_state_dict(state, strict=False)
    if getattr(fresh.config, "tie_word_embeddings", False):
        fresh.tie_weights()
    return fresh.to(model.dtype)


def _peft_config(method: str, r: int, alpha: int, dropout: float, target_modules: Sequence[str] | None) -> Any:
    import peft

    targets = list(target_modules) if target_modules else None
    if method == "lora":
        return peft.LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    feed_forward = None
    if targets is not None:
        feed_forward = [t for t in targets if any(part in t for part in ("mlp", "down_proj", "fc", "ffn"))]
    return peft.IA3Config(task_type="CAUSAL_LM", target_modules=targets, feedforward_modules=feed_forward)


def finetune_baseline(
    model: HookedModel,
    task: TextClassificationTask,
    method: str = "lora",
    *,
    epochs: int = 1,
    lr: float | None = None,
    batch_size: int = 8,
    max_length: int = 64,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: Sequence[str] | None = None,
    seed: int = 42,
    hf_factory: Callable[[], Any] | None = None,
    progress: bool = False,
) -> BaselineResult:
    """Fine-tune a fresh HF copy with LoRA or IA3 (``peft``) and evaluate on the test split.

    Training: the zero-shot prompt of each train text (shortened to ``max_length`` tokens, same BOS
    rule as the hooked model); loss = cross-entropy over the label-token logits at the last prompt
    token (the model's logits over the label tokens only, so no [batch, pos, vocab] logits are built); AdamW; one pass
    over train per epoch in seeded random order. Defaults: LoRA r 8, alpha 16 on peft's default target
    modules (Llama: q_proj, v_proj), lr 5e-4; IA3 on peft's defaults (Llama: k_proj, v_proj,
    down_proj), lr 5e-3. No model selection on validation (fixed budget).

    Example:
        >>> finetune_baseline(model, load_task("topic"), "ia3").details["trainable_params"]  # doctest: +SKIP
    """
    if method not in ("lora", "ia3"):
        raise InputError(f"unknown fine-tuning method {method!r}; choose lora or ia3.")
    try:
        import peft  # noqa: F401
    except ImportError:  # pragma: no cover - peft is in the calibration extra
        raise ModelLoadError("LoRA/IA3 baselines need the 'peft' package: pip install peft") from None
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("max_length", max_length)):
        check_positive_int(value, name)
    lr = float(lr) if lr is not None else (5e-4 if method == "lora" else 5e-3)
    started = time.perf_counter()
    label_ids = torch.tensor(label_token_ids(model, task.label_words), dtype=torch.long)
    train, test = task.split("train"), task.split("test")
    train_prompts, _ = build_prompts(model, task.template, train.texts, max_length=max_length)
    test_prompts, _ = build_prompts(model, task.template, test.texts, max_length=max_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = hf_factory() if hf_factory is not None else fresh_hf_model(model)
        try:
            tuned = peft.get_peft_model(hf, _peft_config(method, r, alpha, dropout, target_modules))
        except ValueError as exc:
            raise InputError(f"peft cannot apply {method} to this model ({exc}); pass target_modules=[...].") from None
    n_trainable = sum(p.numel() for p in tuned.parameters() if p.requires_grad)
    base = tuned.get_base_model()
    backbone = getattr(base, base.base_model_prefix)
    head_b = getattr(base.get_output_embeddings(), "bias", None)
    # The copy's frozen LM head over the label tokens, through the model's one logits path.
    label_head = Unembedding(
        base.get_output_embeddings().weight.detach().T,
        head_b.detach() if head_b is not None else None,
        model.output_transform,
    ).columns(label_ids)

    def label_logits(prompts: list[str]) -> Tensor:
        tokens = model.tokenize(prompts)
        hidden = backbone(input_ids=tokens.ids, attention_mask=tokens.mask).last_hidden_state
        return label_head(hidden[torch.arange(hidden.shape[0]), tokens.mask.sum(dim=1) - 1])

    params = [p for p in tuned.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    y_train = train.y
    losses = []
    train_started = time.perf_counter()
    tuned.train()
    steps = [(epoch, start) for epoch in range(epochs) for start in range(0, len(train_prompts), batch_size)]
    order = None
    for epoch, start in tqdm(steps, desc=method, unit="step", disable=not progress):
        if start == 0:
            order = torch.randperm(len(train_prompts), generator=generator).tolist()
        index = order[start : start + batch_size]
        loss = F.cross_entropy(label_logits([train_prompts[i] for i in index]), y_train[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    train_seconds = time.perf_counter() - train_started
    tuned.eval()
    preds = []
    with torch.no_grad():
        for start in range(0, len(test_prompts), 16):
            preds.append(label_logits(test_prompts[start : start + 16]).argmax(dim=1))
    pred = torch.cat(preds)
    seconds = time.perf_counter() - started
    del tuned, hf
    return _result(
        method, test.y, pred, task.n_classes, seconds,
        train_seconds=round(train_seconds, 3), trainable_params=n_trainable, epochs=epochs, lr=lr,
        steps=len(steps), final_train_loss=round(sum(losses[-10:]) / max(1, len(losses[-10:])), 4),
    )


# -- all at once ---------------------------------------------------------------------------------
def parse_baselines(spec: str | Sequence[str] | None) -> list[str]:
    """Parse a baseline list: ``"zero-shot,knn"``, ``"all"`` or ``"none"``.

    Example:
        >>> parse_baselines("zero-shot, probe"), parse_baselines("none")
        (['zero-shot', 'probe'], [])
    """
    if spec is None:
        return []
    names = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if names in (["none"], []):
        return []
    if names == ["all"]:
        return list(BASELINES)
    aliases = {"zeroshot": "zero-shot", "zero_shot": "zero-shot", "matmul": "zero-shot", "kp": "knn", "lr": "probe"}
    out = []
    for name in names:
        name = aliases.get(name, name)
        if name not in BASELINES:
            raise InputError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}, all or none.")
        if name not in out:
            out.append(name)
    return out


def run_baselines(
    model: HookedModel,
    task: TextClassificationTask,
    names: str | Sequence[str] = ("zero-shot", "affinity", "knn", "probe"),
    *,
    layer: int = -1,
    frame: str = "final_norm",
    shots: int = 1,
    finetune_epochs: int = 1,
    finetune_max_length: int = 64,
    seed: int = 42,
    hf_factory: Callable[[], Any] | None = None,
    progress: bool = False,
) -> list[BaselineResult]:
    """Run several baselines on a task with ``train``/``validation``/``test`` splits.

    The zero-shot baseline reads the model's own label logits (the same for any ``layer``/``frame``),
    the affinity baseline the last layer in the ``final_norm`` frame; kNN and the probe use the
    features of ``layer``/``frame`` (the head's input).

    Example:
        >>> rows = run_baselines(model, load_task("topic"), "zero-shot,affinity,knn,probe")  # doctest: +SKIP
    """
    from ..readout.basis import SemanticBasis

    names = parse_baselines(names)
    for split in ("train", "validation", "test"):
        if not task.has_split(split):
            raise InputError(f"baselines need train/validation/test splits; task {task.name!r} has {task.split_names}.")
    splits = {s: task.split(s) for s in ("train", "validation", "test")}
    results = []
    feats: dict[tuple, Features] = {}

    def get(split: str, lay: int, frm: str) -> Features:
        key = (split, lay % model.n_layers, frm)
        if key not in feats:
            feats[key] = extract_features(model, splits[split], layer=lay, frame=frm, progress=progress)
        return feats[key]

    y = {s: t.y for s, t in splits.items()}
    for name in names:
        if name == "zero-shot":
            # The label logits do not depend on the features' layer/frame: reuse the head's features.
            results.append(zero_shot_matmul(get("test", layer, frame), y["test"], task.n_classes))
        elif name == "affinity":
            bases = SemanticBasis.from_model(model).for_words(task.label_words)
            results.append(zero_shot_affinity(get("test", -1, "final_norm"), bases, y["test"]))
        elif name in ("knn", "probe"):
            fn = knn_baseline if name == "knn" else probe_baseline
            args = [get("train", layer, frame), y["train"], get("validation", layer, frame), y["validation"],
                    get("test", layer, frame), y["test"]]
            results.append(fn(*args, n_classes=task.n_classes))
        elif name == "icl":
            results.append(icl_baseline(model, task, shots=shots, seed=seed, progress=progress))
        else:
            results.append(
                finetune_baseline(model, task, name, epochs=finetune_epochs, max_length=finetune_max_length,
                                  seed=seed, hf_factory=hf_factory, progress=progress)
            )
    return results


def _matrix(X: Any, name: str) -> Tensor:
    X = torch.as_tensor(X).detach().cpu()
    if X.dim() != 2 or X.shape[0] == 0:
        raise InputError(f"{name} must be a non-empty [n, d] matrix, got shape {tuple(X.shape)}.")
    return X.float()


__all__ = [
    "BASELINES",
    "BaselineResult",
    "KNNClassifier",
    "LogisticRegressionProbe",
    "finetune_baseline",
    "fresh_hf_model",
    "icl_baseline",
    "icl_prefix",
    "knn_baseline",
    "parse_baselines",
    "probe_baseline",
    "results_table",
    "run_baselines",
    "zero_shot_affinity",
    "zero_shot_matmul",
]
