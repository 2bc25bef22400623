"""kNN prompting (KP; Xu et al. 2023, "kNN Prompting: Beyond-Context Learning with Calibration-Free
Nearest Neighbor Inference"), the KP baseline of Gu et al.'s table.

Not the cosine kNN on hidden features (:mod:`vsem_lens.calibration.cosine_knn`): KP's datastore holds
the language model's **next-token distributions over the full vocabulary**.

1. Demonstrations: ``shots`` training examples per class, seeded, as in the ICL baseline
   (:func:`~vsem_lens.calibration.icl.icl_demonstrations`); the same prefix for every prompt.
2. Anchors (the datastore): the *other* training examples ``x_i`` (at most ``max_anchors``, a seeded
   class-balanced subsample; the authors used 128 training examples in all) are put after the
   demonstrations in the zero-shot template; the model's next-token distribution at the last prompt token,
   ``d_i = softmax(logits)`` over all ``V`` tokens, is stored with the label ``y_i``.
3. A query ``x`` gets its distribution ``d_q`` the same way and the ``k`` anchors closest in
   ``KL(d_i || d_q) = sum_v d_i(v) (log d_i(v) - log d_q(v))`` vote; the majority label wins.

Distance and ``k`` follow the authors' code (github.com/BenfengXu/KNNPrompting: ``utils/anchor.py``
computes ``mean_v d_i (log d_i - log d_q)``, i.e. KL(anchor || query) divided by ``V``, which does not
change the ranking; ``run_knnprompting.sh`` uses ``k = 3``). Ties in the vote go to the lowest class
index, as ``argmax`` over the vote counts does there.

Memory: the datastore is ``[n_anchors, V]`` log-probabilities in **float32** (360 anchors x 49,152
tokens of SmolLM2 = 71 MB; float64 would double it for nothing); the KL sums are accumulated in float64
over chunks of anchors, so at most ``chunk x V`` float64 values exist at a time.

Example:
    >>> knn_prompting_baseline(model, load_task("topic"), shots=1, k=3).accuracy  # doctest: +SKIP
"""

from __future__ import annotations

import random
import time

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..core.capture import iter_capture
from ..core.errors import InputError, NumericalError, check_positive_int
from ..core.models import HookedModel
from .datasets import TextClassificationTask
from .features import build_prompts, n_tokens
from .icl import icl_demonstrations, icl_prefix
from .results import BaselineResult, baseline_result

KP_K = 3


def next_token_log_probs(
    model: HookedModel, prompts: list[str], *, batch_size: int = 4
) -> Float[Tensor, "n d_vocab"]:
    """The model's next-token log-distribution over the full vocabulary at each prompt's last token
    (float32, CPU), computed from the last layer only at that token (no ``[batch, pos, V]`` logits).

    Example:
        >>> next_token_log_probs(model, ["Review: great\\nSentiment:"]).shape  # doctest: +SKIP
        torch.Size([1, 49152])
    """
    check_positive_int(batch_size, "batch_size")
    rows = model.token_ids(prompts)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out = torch.empty(len(rows), model.d_vocab, dtype=torch.float32)
    head = model.unembedding(torch.float32)
    last_layer = model.n_layers - 1
    for start in range(0, len(rows), batch_size):
        index = order[start : start + batch_size]
        tokens = model.pad([rows[i] for i in index])
        acts = next(iter_capture(model, tokens, layers=[last_layer], batch_size=len(index))).acts["resid_post"][0]
        with torch.no_grad():
            last = tokens.mask.sum(dim=1).to(acts.device).cumsum(0) - 1  # packed real tokens: each text's last
            logits = head(model.final_norm(acts[last]).float())
            out[torch.tensor(index)] = torch.log_softmax(logits.float(), dim=-1).cpu()
    if not torch.isfinite(out).all():
        raise NumericalError("the next-token distributions contain NaN/inf; check the model's weights and dtype.")
    return out


def kl_anchor_to_query(
    anchors: Float[Tensor, "n d_vocab"], queries: Float[Tensor, "m d_vocab"], *, chunk: int = 64
) -> Float[Tensor, "m n"]:
    """``KL(d_i || d_q)`` for every query ``q`` (rows) and anchor ``i`` (columns), in nats, from
    log-probabilities; float64 accumulation over chunks of ``chunk`` anchors.

    Example:
        >>> p = torch.log_softmax(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), dim=1)
        >>> kl_anchor_to_query(p, p).diagonal().tolist()
        [0.0, 0.0]
    """
    if anchors.dim() != 2 or queries.dim() != 2 or anchors.shape[1] != queries.shape[1]:
        raise InputError(f"anchors and queries must be [n, V] and [m, V], got {tuple(anchors.shape)} and {tuple(queries.shape)}.")
    check_positive_int(chunk, "chunk")
    log_q = queries.double()
    out = torch.empty(queries.shape[0], anchors.shape[0], dtype=torch.float64)
    for start in range(0, anchors.shape[0], chunk):
        log_p = anchors[start : start + chunk].double()
        p = log_p.exp()
        negentropy = (p * log_p).sum(dim=1)                       # sum_v d_i log d_i
        out[:, start : start + chunk] = negentropy[None, :] - log_q @ p.T
    return out.clamp_min_(0.0)


class KNNPromptingClassifier:
    """Majority vote of the ``k`` anchors with the smallest ``KL(anchor || query)``.

    Args:
        k: neighbours per vote (authors: 3; at most the number of anchors is used).
        n_classes: number of classes (default: the largest anchor label + 1).

    Example:
        >>> anchors = torch.log_softmax(torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [2.5, 0, 0]]), dim=1)
        >>> kp = KNNPromptingClassifier(k=1).fit(anchors, torch.tensor([0, 1, 0]))
        >>> kp.predict(torch.log_softmax(torch.tensor([[0.0, 2.0, 0.0]]), dim=1)).tolist()
        [1]
    """

    def __init__(self, k: int = KP_K, n_classes: int | None = None):
        self.k = check_positive_int(k, "k")
        self.n_classes = n_classes

    def fit(self, anchor_log_probs: Float[Tensor, "n d_vocab"], y: Int[Tensor, " n"]) -> "KNNPromptingClassifier":
        """Store the anchors' log-distributions (float32) and labels; returns ``self``."""
        anchors = torch.as_tensor(anchor_log_probs).detach().cpu().float()
        labels = torch.as_tensor(y).long().reshape(-1)
        if anchors.dim() != 2 or anchors.shape[0] != labels.numel() or labels.numel() == 0:
            raise InputError(f"anchors must be [n, V] with one label each, got {tuple(anchors.shape)} and {labels.numel()} labels.")
        self.anchors_, self.y_ = anchors, labels
        self.n_classes_ = self.n_classes or int(labels.max()) + 1
        return self

    def predict(self, query_log_probs: Float[Tensor, "m d_vocab"], k: int | None = None) -> Int[Tensor, " m"]:
        """Majority label among the ``k`` nearest anchors of each query (ties: lowest class index)."""
        k = min(check_positive_int(k or self.k, "k"), self.anchors_.shape[0])
        dist = kl_anchor_to_query(self.anchors_, torch.as_tensor(query_log_probs).detach().cpu().float())
        idx = dist.topk(k, dim=1, largest=False).indices
        votes = torch.zeros(dist.shape[0], self.n_classes_, dtype=torch.long)
        votes.scatter_add_(1, self.y_[idx], torch.ones_like(idx))
        return votes.argmax(dim=1)  # first maximum: the lowest class index wins a tie


def knn_prompting_baseline(
    model: HookedModel,
    task: TextClassificationTask,
    *,
    shots: int = 1,
    k: int = KP_K,
    seed: int = 42,
    demo_max_tokens: int = 64,
    max_length: int | None = None,
    batch_size: int = 4,
    max_anchors: int | None = None,
) -> BaselineResult:
    """KNN prompting on a task with ``train`` and ``test`` splits (see the module docstring).

    Demonstrations: ``shots`` per class from train (the ICL baseline's, same ``seed``); anchors: the
    rest of train, or a class-balanced subsample of ``max_anchors`` of it drawn with ``seed`` (classes
    take turns, in a seeded order within each class); test prompts are shortened to ``max_length`` (default the model's context) like ICL's.
    Wall time covers building the prefix, the anchor and test forward passes and the search.

    Example:
        >>> knn_prompting_baseline(model, load_task("sentiment")).details["n_anchors"]  # doctest: +SKIP
        358
    """
    check_positive_int(k, "k")
    started = time.perf_counter()
    prefix = icl_prefix(model, task, shots=shots, seed=seed, demo_max_tokens=demo_max_tokens)
    demos = set(icl_demonstrations(task, shots=shots, seed=seed))
    limit = model.n_ctx if max_length is None else int(max_length)
    if n_tokens(model, prefix) + 8 > limit:
        raise InputError(f"the {shots}-shot demonstrations leave no room for a query within {limit} tokens.")
    train, test = task.split("train"), task.split("test")
    keep = [i for i in range(len(train.texts)) if i not in demos]
    if max_anchors is not None and check_positive_int(max_anchors, "max_anchors") < len(keep):
        keep = _balanced_subsample(keep, train.labels, max_anchors, seed)
    if not keep:
        raise InputError("every training example is a demonstration; kNN prompting needs anchors.")
    anchor_prompts = build_prompts(model, prefix + task.template, [train.texts[i] for i in keep], max_length=limit)[0]
    test_prompts = build_prompts(model, prefix + task.template, test.texts, max_length=limit)[0]
    anchors = next_token_log_probs(model, anchor_prompts, batch_size=batch_size)
    queries = next_token_log_probs(model, test_prompts, batch_size=batch_size)
    kp = KNNPromptingClassifier(k=k, n_classes=task.n_classes).fit(anchors, train.y[keep])
    pred = kp.predict(queries)
    seconds = time.perf_counter() - started
    return baseline_result(
        "knn-prompting", test.y, pred, task.n_classes, seconds, k=min(k, len(keep)), shots=shots,
        n_anchors=len(keep), distance="KL(anchor || query)",
    )


def _balanced_subsample(indices: list[int], labels: list[str], n: int, seed: int) -> list[int]:
    """``n`` of ``indices``, classes taking turns (each class's members in a seeded random order)."""
    rng = random.Random(seed)
    by_class: dict[str, list[int]] = {}
    for i in indices:
        by_class.setdefault(labels[i], []).append(i)
    queues = [rng.sample(members, len(members)) for members in by_class.values()]
    out: list[int] = []
    while len(out) < n:
        for queue in queues:
            if queue and len(out) < n:
                out.append(queue.pop(0))
    return sorted(out)


__all__ = ["KNNPromptingClassifier", "KP_K", "kl_anchor_to_query", "knn_prompting_baseline", "next_token_log_probs"]
