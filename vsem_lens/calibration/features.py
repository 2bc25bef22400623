"""Zero-shot prompt features of a task: one residual vector per example, cached on disk.

Each example is wrapped in the task's template (``"Review: {text}\\nSentiment:"``) and run through the
hooked model once. From that single forward we keep, per example:

- ``X`` [n, d]: the residual ``blocks.{layer}.hook_resid_post`` at the **last non-padding token**,
  mapped into a frame (docs/concepts/frames.md) resolved by :func:`vsem_lens.lenses.resolve_frame`:
  ``final_norm`` (default; at the last layer this is exactly the LM-head input, the space the semantic
  bases live in), ``raw``, ``tuned`` or any :class:`~vsem_lens.lenses.base.Lens`.
- ``X_mean``, ``X_max`` [n, d]: the mean and the per-dimension max of the same layer's residuals over
  the prompt's real tokens, in the same frame (the token pools a CBAM-style channel attention reads;
  see :mod:`vsem_lens.calibration.heads`).
- ``label_logits`` [n, k]: the model's own next-token logits at the last token over the task's label
  tokens (the zero-shot "matmul" readout, ``LN_f(h_L) W_U + b_U``), independent of ``layer``/``frame``.
- ``seconds``: wall time of the forward passes when the features were computed (kept in the cache,
  so that methods built on cached features can still report their full cost).

Tokenisation follows the model's BOS rule (:mod:`vsem_lens.core.models`); batches are sorted by length
to limit padding, right-padded, and padding never enters a pool.

Cache: ``cache_dir()/features/<task>-L<layer>-<frame>-<key>.safetensors`` where the key hashes the model
fingerprint, the task name, the texts, the template, the label tokens, layer, frame, BOS rule,
truncation length and dtype. The frame enters the key as its name for ``raw``/``final_norm`` and as a digest
of the weights for a tuned lens; a custom lens has no such identity, so its features are only computed
with ``cache=False`` (asking for the cache raises a clear error). Files are written atomically (temporary file + rename), so a second run
skips the forward passes and an interrupted run never leaves a half-written entry.

Example:
    >>> task = load_task("sentiment")                                  # doctest: +SKIP
    >>> feats = extract_features(model, task.split("train"))          # doctest: +SKIP
    >>> feats.X.shape, feats.label_logits.shape                        # doctest: +SKIP
    (torch.Size([360, 576]), torch.Size([360, 2]))
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from jaxtyping import Float
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from ..core.capture import check_layers, iter_capture
from ..core.distributed import SINGLE, DistEnv, all_gather_objects, all_reduce_sum, resolve_env, shard
from ..core.errors import ArtifactError, InputError, NumericalError, VocabularyError, check_positive_int
from ..core.io import atomic_write, check_tensors, tensors_digest, texts_digest
from ..core.models import HookedModel, cache_dir, check_texts
from ..lenses.base import Lens
from ..lenses.frames import lens_identity, resolve_frame
from ..readout.basis import word_token_ids
from .datasets import TextClassificationTask

FORMAT_VERSION = 2
POOLS = ("tokens", "vector")


@dataclass
class Features:
    """Features of a list of prompts (see the module docstring for what each tensor holds).

    Example:
        >>> feats.head_input("tokens").shape   # doctest: +SKIP
        torch.Size([360, 3, 576])
    """

    X: Float[Tensor, "n d_model"]
    X_mean: Float[Tensor, "n d_model"]
    X_max: Float[Tensor, "n d_model"]
    label_logits: Float[Tensor, "n n_labels"]
    layer: int
    frame: str
    label_token_ids: list[int]
    key: str = ""
    from_cache: bool = False
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.X.shape[0])

    def head_input(self, pool: str = "tokens") -> Float[Tensor, "n ..."]:
        """Input of a calibration head: ``[n, 3, d]`` (last, mean, max) for ``pool="tokens"``,
        the last-token vectors ``[n, d]`` for ``pool="vector"``.

        Example:
            >>> feats.head_input("vector").shape   # doctest: +SKIP
            torch.Size([360, 576])
        """
        if pool not in POOLS:
            raise InputError(f"unknown pool {pool!r}; choose one of {', '.join(POOLS)}.")
        if pool == "vector":
            return self.X
        return torch.stack([self.X, self.X_mean, self.X_max], dim=1)


def label_token_ids(model: HookedModel, words: Sequence[str], *, warn: bool = True) -> list[int]:
    """Label token of each word: the last sub-token of ``" " + word`` (same rule as
    :meth:`vsem_lens.readout.basis.SemanticBasis.token_ids_for_words`), warning on multi-token words.

    Example:
        >>> label_token_ids(model, ["positive", "negative"])  # doctest: +SKIP
        [2731, 3524]
    """
    ids = word_token_ids(model.tokenizer, words, model.d_vocab, warn=warn)
    if len(set(ids)) != len(ids):
        raise VocabularyError(f"two label words share a label token ({dict(zip(words, ids))}); choose distinct words.")
    return ids


def build_prompts(
    model: HookedModel, template: str, texts: Sequence[str], *, max_length: int | None = None
) -> tuple[list[str], int]:
    """Fill the template with each text; when ``max_length`` (tokens) is set, shorten the *text*
    (whole words from its end, marked with "...") until the prompt fits, so the template's suffix
    (which the label word follows) is never cut.

    Returns:
        the prompts and the number of texts that were shortened.

    Example:
        >>> build_prompts(model, "Review: {text}\\nSentiment:", ["good"])  # doctest: +SKIP
        (['Review: good\\nSentiment:'], 0)
    """
    limit = model.n_ctx if max_length is None else int(max_length)
    if limit < 1:
        raise InputError(f"max_length must be a positive number of tokens, got {max_length}.")
    prompts, shortened = [], 0
    for text in texts:
        prompt = template.replace("{text}", text)
        if n_tokens(model, prompt) <= limit:
            prompts.append(prompt)
            continue
        words = text.split()
        lo, hi = 0, len(words)  # binary search the longest prefix of words that fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if n_tokens(model, template.replace("{text}", " ".join(words[:mid]) + " ...")) <= limit:
                lo = mid
            else:
                hi = mid - 1
        prompt = template.replace("{text}", " ".join(words[:lo]) + " ...")
        if n_tokens(model, prompt) > limit:
            raise InputError(
                f"the template alone needs more than max_length={limit} tokens; raise max_length or shorten it."
            )
        prompts.append(prompt)
        shortened += 1
    return prompts, shortened


def n_tokens(model: HookedModel, text: str) -> int:
    """Tokens of ``text`` under the model's tokenisation rule (no context limit).

    Example:
        >>> n_tokens(model, "Hello world")  # doctest: +SKIP
        2
    """
    return len(model.token_ids([text], max_length=1 << 30)[0])


def feature_key(
    model: HookedModel,
    task_name: str,
    texts: Sequence[str],
    template: str,
    label_ids: Sequence[int],
    layer: int,
    frame: str,
    max_length: int | None,
) -> str:
    """The cache key of a feature extraction (a short hex digest; see the module docstring).

    ``frame`` is the frame's identity from :func:`~vsem_lens.lenses.frames.lens_identity` (the plain
    name for ``raw`` and ``final_norm``).

    Example:
        >>> len(feature_key(model, "t", ["a"], "{text}", [1, 2], 29, "final_norm", None))  # doctest: +SKIP
        24
    """
    payload = json.dumps(
        {
            "format": FORMAT_VERSION,
            "model": model.fingerprint,
            "task": task_name,
            "texts": texts_digest(texts),
            "n": len(texts),
            "template": template,
            "labels": list(map(int, label_ids)),
            "layer": int(layer),
            "frame": frame,
            "prepend_bos": bool(model.prepend_bos),
            "max_length": max_length,
            "dtype": str(model.dtype),
        },
        sort_keys=True,
    )
    return hashlib.blake2b(payload.encode(), digest_size=12).hexdigest()


# Over 80 lines only through its docstring (every argument documented); the body is about 40 lines.
def extract_features(
    model: HookedModel,
    task: TextClassificationTask,
    *,
    texts: Sequence[str] | None = None,
    layer: int = -1,
    frame: str | Lens = "final_norm",
    lens: Lens | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
    cache: bool = True,
    progress: bool = True,
    distributed: DistEnv | bool | None = None,
) -> Features:
    """Zero-shot prompt features of a task's texts (or of other ``texts`` with the task's prompt).

    Args:
        model: the hooked model.
        task: gives the template, the label words (-> label tokens) and, unless ``texts`` is given,
            the texts (pass ``task.split("train")`` for one split).
        texts: classify these texts with the task's prompt instead of the task's own texts.
        layer: block index of ``hook_resid_post`` (negative counts from the end; default the last).
        frame: ``final_norm`` (default; the LM-head input at the last layer), ``raw``, ``tuned`` or a
            :class:`~vsem_lens.lenses.base.Lens` (see :func:`~vsem_lens.lenses.frames.resolve_frame`).
        lens: the tuned lens for ``frame="tuned"`` (default: the one cached for this model).
        batch_size: prompts per forward pass.
        max_length: token budget of a prompt; longer texts are shortened (see :func:`build_prompts`).
            Default: the model's context (longer texts are shortened, with a warning).
        cache: read and write the on-disk feature cache (a custom lens needs ``cache=False``, see
            :func:`~vsem_lens.lenses.frames.lens_identity`).
        progress: show a tqdm bar over batches.
        distributed: ``True`` inside ``torchrun`` (or a :class:`~vsem_lens.core.distributed.DistEnv` from
            :func:`~vsem_lens.core.distributed.init_distributed`): batch ``b`` runs on rank
            ``b % world_size`` and the features are gathered, so every rank returns the whole, identical
            result (equal to one process's); only rank 0 writes the cache.

    Returns:
        :class:`Features` with ``X``/``X_mean``/``X_max`` [n, d] and ``label_logits`` [n, k]
        (float32, CPU); ``from_cache`` tells whether the forward passes were skipped.

    Example:
        >>> feats = extract_features(model, load_task("topic").split("test"), layer=20, frame="raw")  # doctest: +SKIP
        >>> feats.X.shape                                                                          # doctest: +SKIP
        torch.Size([120, 576])
    """
    if not isinstance(task, TextClassificationTask):
        raise InputError(f"task must be a TextClassificationTask (see vsem_lens.calibration.load_task), got {type(task).__name__}.")
    lens = resolve_frame(frame, model, lens=lens)
    identity = lens_identity(lens)
    if cache and identity is None:
        raise InputError(
            f"features through the custom lens {lens!r} cannot be cached (its parameters have no fingerprint); "
            "pass cache=False."
        )
    frame = lens.frame or type(lens).__name__
    check_positive_int(batch_size, "batch_size")
    layer_abs = check_layers(layer, model.n_layers)[0]
    texts = check_texts(list(task.texts if texts is None else texts))
    label_ids = label_token_ids(model, task.label_words)
    key = feature_key(model, task.name, texts, task.template, label_ids, layer_abs, identity or frame, max_length)
    path = cache_dir() / "features" / f"{_safe(task.name)}-L{layer_abs}-{frame}-{key}.safetensors"
    env = resolve_env(distributed, device=model.device, command="calibrate")
    cached = _load(path, key) if cache and path.is_file() else None
    if env.active:  # every rank must take the same branch, or the collectives below would hang
        cached = cached if all(all_gather_objects(cached is not None, env)) else None
    if cached is not None:
        tensors, seconds = cached
        return Features(
            **tensors, layer=layer_abs, frame=frame, label_token_ids=label_ids, key=key, from_cache=True, seconds=seconds
        )
    started = time.perf_counter()
    prompts, shortened = build_prompts(model, task.template, texts, max_length=max_length)
    if shortened:
        warnings.warn(f"{shortened} text(s) were shortened to fit max_length={max_length} tokens.", stacklevel=2)
    tensors = _forward_features(model, prompts, layer_abs, lens, label_ids, batch_size, progress, env)
    seconds = time.perf_counter() - started
    if cache and env.is_main:
        try:
            _save(path, tensors, key, task.name, layer_abs, frame, seconds)
        except OSError as exc:  # a read-only cache must not stop the analysis
            warnings.warn(f"could not cache features in {path}: {exc}", stacklevel=2)
    return Features(
        **tensors, layer=layer_abs, frame=frame, label_token_ids=label_ids, key=key, from_cache=False, seconds=seconds
    )


def _forward_features(
    model: HookedModel,
    prompts: list[str],
    layer: int,
    lens: Lens,
    label_ids: list[int],
    batch_size: int,
    progress: bool,
    env: DistEnv = SINGLE,
) -> dict[str, Tensor]:
    n, d = len(prompts), model.d_model
    token_rows = model.token_ids(prompts)
    order = sorted(range(n), key=lambda i: len(token_rows[i]))  # similar lengths together: less padding
    # Under torchrun each rank fills its own rows of zeroed tensors; one sum over ranks then assembles them.
    alloc = torch.zeros if env.active else torch.empty
    out = {name: alloc(n, d, dtype=torch.float32) for name in ("X", "X_mean", "X_max")}
    out["label_logits"] = alloc(n, len(label_ids), dtype=torch.float32)
    label_head = model.unembedding(torch.float32).columns(label_ids)  # [d, k], output transform included
    layers = sorted({layer, model.n_layers - 1})
    for start in tqdm(shard(range(0, n, batch_size), env), desc="features", unit="batch",
                      disable=not (progress and env.is_main)):
        rows = order[start : start + batch_size]
        tokens = model.pad([token_rows[i] for i in rows])
        # One capture of the (at most two) layers; it stops after the last block, before the unembedding.
        acts = next(iter_capture(model, tokens, layers=layers, batch_size=len(rows))).acts["resid_post"]
        with torch.no_grad():
            # [real tokens of the batch, d], text by text, in the lens's frame
            resid = lens(acts[layers.index(layer)], layer).float()
            count = tokens.mask.sum(dim=1).to(resid.device)
            doc = torch.repeat_interleave(torch.arange(len(rows), device=resid.device), count)
            last = count.cumsum(0) - 1  # each text's last token
            x_last = resid[last]
            x_mean = resid.new_zeros(len(rows), d).index_add_(0, doc, resid) / count.unsqueeze(1)
            x_max = resid.new_full((len(rows), d), float("-inf")).scatter_reduce_(
                0, doc.unsqueeze(1).expand_as(resid), resid, reduce="amax"
            )
            # The model's next-token logits over the label tokens (its output transform is elementwise).
            lab = label_head(model.final_norm(acts[-1][last]))
        if not (torch.isfinite(x_last).all() and torch.isfinite(lab).all() and torch.isfinite(x_max).all()):
            raise NumericalError(
                "the model produced NaN/inf activations for some prompts; check the weights and dtype "
                "(float16 overflows are common: try dtype=torch.float32)."
            )
        index = torch.tensor(rows, dtype=torch.long)
        out["X"][index] = x_last.cpu()
        out["X_mean"][index] = x_mean.cpu()
        out["X_max"][index] = x_max.cpu()
        out["label_logits"][index] = lab.cpu()
    if env.active:  # every row was written by exactly one rank, so the sum is that rank's values
        out = {name: all_reduce_sum(tensor, env) for name, tensor in out.items()}
    return out


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:40] or "task"


def _save(
    path: Path, tensors: dict[str, Tensor], key: str, task_name: str, layer: int, frame: str, seconds: float
) -> None:
    meta = {
        "format": str(FORMAT_VERSION), "key": key, "task": task_name, "layer": str(layer), "frame": frame,
        "seconds": f"{seconds:.6f}",
    }
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    meta["sha256"] = tensors_digest(tensors)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def _load(path: Path, key: str) -> tuple[dict[str, Tensor], float] | None:
    """A cache entry, or None when it is unreadable, stale or damaged (it is then recomputed and overwritten)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        tensors = load_file(str(path))
    except Exception:  # safetensors raises its own error types on corrupt files
        return None
    if meta.get("key") != key or set(tensors) != {"X", "X_mean", "X_max", "label_logits"}:
        return None
    try:
        check_tensors(tensors, f"the feature cache {path}", digest=meta.get("sha256"))
    except ArtifactError as exc:
        warnings.warn(f"recomputing features: {exc}", stacklevel=3)
        return None
    try:
        seconds = float(meta.get("seconds", "0"))
    except ValueError:
        seconds = 0.0
    return tensors, seconds
