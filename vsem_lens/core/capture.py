"""Stream activations (any site, any layers) over a corpus in batches, padding removed.

Sites use TransformerLens's hook names:

========== ==================================== ===========================================
site       hook                                 meaning
========== ==================================== ===========================================
embed      ``hook_embed``                       token embedding (layer index 0 only)
resid_pre  ``blocks.{l}.hook_resid_pre``        residual entering block l
resid_mid  ``blocks.{l}.hook_resid_mid``        after block l's attention
resid_post ``blocks.{l}.hook_resid_post``       residual leaving block l (= HF hidden_states[l+1])
attn_out   ``blocks.{l}.hook_attn_out``         block l's attention output
mlp_out    ``blocks.{l}.hook_mlp_out``          block l's MLP output
========== ==================================== ===========================================

Only the requested hooks are attached, and each hook keeps only the non-padding tokens, so memory
is ``layers x real tokens x d_model`` per batch and nothing else.

Long inputs. Attention runs through PyTorch's SDPA kernel (see :mod:`vsem_lens.core.attention`), so
a forward pass never forms the [batch, head, token, token] score matrices the bridge's eager
attention builds (7.5 GB for one 8,192-token text on SmolLM2). A text longer than the model's context
is an error unless ``max_length`` is given; with ``max_length`` texts are cut to it and one warning
says how many texts and tokens were dropped. Before each batch the memory it needs is estimated
(:func:`~vsem_lens.core.memory.capture_memory`) and a warning names ``--batch-size``/``--max-length``
when it exceeds the free memory; an allocation failure during the forward pass becomes a
:class:`~vsem_lens.core.errors.MemoryLimitError` with the same advice.

Example:
    >>> acts = capture(model, ["The capital of France is"], layers=[0, 29])  # doctest: +SKIP
    >>> acts["resid_post"].shape                                           # doctest: +SKIP
    torch.Size([2, 5, 576])
"""

from __future__ import annotations

import html
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from .attention import check_attention, sdpa_attention, supports_sdpa
from .errors import InputError, NumericalError, check_int_list, check_layer_index, check_positive_int
from .memory import ADVICE, capture_memory, describe, free_memory, is_out_of_memory, out_of_memory_error
from .models import HookedModel, Tokens, check_texts
from .tokens import display_token

SITES = ("embed", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


def hook_name(site: str, layer: int) -> str:
    """TransformerLens hook name of a site at a layer.

    Example:
        >>> hook_name("resid_post", 3)
        'blocks.3.hook_resid_post'
    """
    if site == "embed":
        return "hook_embed"
    return f"blocks.{layer}.hook_{site}"


def check_sites(sites: str | Sequence[str]) -> tuple[str, ...]:
    """Validate site names.

    Example:
        >>> check_sites("resid_post")
        ('resid_post',)
    """
    if isinstance(sites, str):
        sites = (sites,)
    sites = tuple(sites)
    if not sites:
        raise InputError(f"no sites were given; choose from {', '.join(SITES)}.")
    for site in sites:
        if site not in SITES:
            raise InputError(f"unknown site {site!r}; choose from {', '.join(SITES)}.")
    return sites


#: Where each site sits inside a block, in forward order (``embed`` is read before block 0).
FORWARD_ORDER = {"embed": 0, "resid_pre": 1, "attn_out": 2, "resid_mid": 3, "mlp_out": 4, "resid_post": 5}


def first_non_finite(acts: dict[str, Tensor], layers: Sequence[int]) -> tuple[int, str] | None:
    """The earliest ``(layer, site)`` in forward order whose activations hold a NaN or inf, or ``None``.

    Naming the earliest place, not the first site checked, points at where the values went bad.

    Example:
        >>> a = torch.zeros(2, 1, 3); b = torch.zeros(2, 1, 3); a[1, 0, 0] = float("nan"); b[1, 0, 1] = float("inf")
        >>> first_non_finite({"resid_post": a, "mlp_out": b}, [4, 7])
        (7, 'mlp_out')
    """
    found = []
    for site, tensor in acts.items():
        # A sum is a fast multi-threaded NaN/inf test; only if it fails (or overflows) look closer.
        if torch.isfinite(tensor.sum()):
            continue
        bad_layers = (~torch.isfinite(tensor)).flatten(1).any(dim=1).nonzero()
        if bad_layers.numel():
            first = int(bad_layers[0, 0])
            found.append((layers[first], FORWARD_ORDER.get(site, len(FORWARD_ORDER)), site))
    return min(found)[::2] if found else None


def check_layers(layers: int | Sequence[int] | None, n_layers: int) -> list[int]:
    """Validate layer indices (negative indices count from the end); ``None`` means all layers.

    Example:
        >>> check_layers([0, -1], 30)
        [0, 29]
    """
    if layers is None or (isinstance(layers, str) and layers == "all"):
        return list(range(n_layers))
    out = [check_layer_index(layer, n_layers) for layer in check_int_list(layers, "layers")]
    if not out:
        raise InputError("no layers were given; pass None for all layers.")
    return sorted(set(out))


@dataclass
class ActivationBatch:
    """Activations of one batch of texts, padding removed.

    Attributes:
        acts: per site a tensor [layer, token, d_model] over the batch's real tokens (row-major:
            text by text, position by position).
        layers: the layer index of each slice of dimension 0 (``[0]`` for ``embed``).
        tokens: the batch's padded token ids and mask.
        doc_index: global index of each real token's text.
        positions: position of each real token in its text.
        token_ids: id of each real token.

    Example:
        >>> for batch in iter_capture(model, texts, layers=[0, -1]):          # doctest: +SKIP
        ...     resid = batch.acts["resid_post"]    # [2, real tokens of the batch, d_model]
    """

    acts: dict[str, Float[Tensor, "layer token d_model"]]
    layers: list[int]
    tokens: Tokens
    doc_index: Int[Tensor, " token"]
    positions: Int[Tensor, " token"]
    token_ids: Int[Tensor, " token"]
    logits: Float[Tensor, "token d_vocab"] | None = None

    @property
    def n_tokens(self) -> int:
        """Number of real tokens in the batch."""
        return int(self.token_ids.numel())


@dataclass
class Activations:
    """Activations of a whole (small) corpus: per site [layer, token, d_model] plus a token table.

    Example:
        >>> acts = capture(model, ["Hello world"])  # doctest: +SKIP
        >>> acts.tokens.columns.tolist()            # doctest: +SKIP
        ['doc', 'position', 'token_id', 'token']
    """

    acts: dict[str, Float[Tensor, "layer token d_model"]]
    layers: list[int]
    tokens: pd.DataFrame = field(repr=False)

    def __getitem__(self, site: str) -> Float[Tensor, "layer token d_model"]:
        if site not in self.acts:
            raise InputError(f"site {site!r} was not captured; captured: {', '.join(self.acts)}.")
        return self.acts[site]

    def layer(self, site: str, layer: int) -> Float[Tensor, "token d_model"]:
        """Activations of one site at one (absolute) layer index."""
        if layer not in self.layers:
            raise InputError(f"layer {layer} was not captured; captured layers: {self.layers}.")
        return self[site][self.layers.index(layer)]

    def _layer_text(self) -> str:
        layers = self.layers
        if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
            return f"{layers[0]}..{layers[-1]} ({len(layers)})"
        return ", ".join(map(str, layers))

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in self.acts.items())
        n_docs = int(self.tokens["doc"].nunique()) if len(self.tokens) else 0
        head = [repr(t) for t in self.tokens["token"].head(8)]
        more = ", ..." if len(self.tokens) > 8 else ""
        return (f"Activations({shapes}; layers {self._layer_text()}; {len(self.tokens)} tokens in {n_docs} text(s): "
                f"{', '.join(head)}{more})")

    def _repr_html_(self) -> str:
        """A compact summary for Jupyter: the sites with their shapes, the layers, each text's tokens."""
        rows = "".join(
            f"<tr><td><code>{html.escape(site)}</code></td><td>{tuple(t.shape)}</td><td>{t.dtype}</td></tr>"
            for site, t in self.acts.items()
        )
        texts = []
        for doc, group in self.tokens.groupby("doc", sort=True):
            chips = "".join(
                f"<span style='border:1px solid #ccc;border-radius:3px;padding:0 3px;margin:1px;display:inline-block;"
                f"font-family:monospace' title='id {int(i)}'>{display_token(t, max_chars=24)}</span>"
                for t, i in zip(group["token"], group["token_id"])
            )
            texts.append(f"<div><b>text {int(doc)}</b> ({len(group)} tokens): {chips}</div>")
            if len(texts) == 8:
                texts.append(f"<div>... {self.tokens['doc'].nunique() - 8} more text(s)</div>")
                break
        return (
            "<div class='vsem-activations'><b>Activations</b>: layers "
            f"{html.escape(self._layer_text())}, {len(self.tokens)} tokens"
            "<table><tr><th>site</th><th>shape [layer, token, d_model]</th><th>dtype</th></tr>"
            f"{rows}</table>{''.join(texts)}</div>"
        )


class _StopForward(Exception):
    """Raised by the last capture hook to end a forward pass early (the hooks context still removes the hooks)."""


@dataclass
class _Truncation:
    """Texts and tokens cut to ``max_length`` so far in one capture call."""

    limit: int
    texts: int = 0
    tokens: int = 0

    def notice(self, n_texts: int) -> str:
        return (
            f"{self.texts} of {n_texts} texts were longer than max_length={self.limit} tokens and were cut to it: "
            f"{self.tokens:,} tokens dropped."
        )


def _tokenize(model: HookedModel, texts: list[str], truncation: _Truncation | None) -> Tokens:
    """Tokenise a batch; with ``max_length`` (``truncation``) cut and count the over-long texts."""
    if truncation is None:
        return model.tokenize(texts)  # a text longer than the context is an error there
    # No limit while tokenising (max_length far above any text), so the dropped tokens can be counted.
    rows = model.token_ids(texts, max_length=2**62)
    for row in rows:
        if len(row) > truncation.limit:
            truncation.texts += 1
            truncation.tokens += len(row) - truncation.limit
    return model.pad([row[: truncation.limit] for row in rows])


class _Forward:
    """One batch's forward pass: SDPA unless eager is asked for, a memory estimate before it, and an
    out-of-memory error that says what to lower. Without gradients unless ``grad=True`` (training
    through the hooks, :func:`hooked_states`).
    """

    def __init__(self, model: HookedModel, attention: str, n_buffers: int, keep_logits: bool):
        self.model, self.n_buffers, self.keep_logits = model, n_buffers, keep_logits
        self.sdpa = attention == "sdpa" and supports_sdpa(model)
        self.attention = "sdpa" if self.sdpa else "eager"
        # Only a user who chose eager can be told to switch; other architectures have no SDPA kernel.
        self.hint = "attention='sdpa' avoids the eager score matrices" if attention == "eager" and supports_sdpa(model) else ""
        self.warned = False

    def __call__(self, tokens: Tokens, fwd_hooks: list, first: int, *, grad: bool = False) -> Tensor | None:
        n_texts, width = tokens.ids.shape
        need = capture_memory(
            self.model, n_texts, width, n_tokens=int(tokens.mask.sum()), n_buffers=self.n_buffers,
            attention=self.attention, keep_logits=self.keep_logits,
        )
        what = f"texts {first}..{first + n_texts - 1} ({n_texts} x {width:,} tokens)"
        free = free_memory(self.model.device)
        if free is not None and need["total"] > free and not self.warned:
            self.warned = True
            warnings.warn(
                f"capturing {what} needs {describe(need, self.attention)} but {free / 2**30:.1f} GiB are free; {ADVICE}.",
                stacklevel=4,
            )
        bridge, device = self.model.bridge, self.model.device
        try:
            with torch.set_grad_enabled(grad), sdpa_attention(self.model, self.sdpa), bridge.hooks(fwd_hooks=fwd_hooks):
                return bridge(tokens.ids.to(device), attention_mask=tokens.mask.to(device))
        except _StopForward:
            return None
        except (RuntimeError, MemoryError) as exc:
            if is_out_of_memory(exc):
                raise out_of_memory_error(exc, what, need, self.attention, self.hint) from exc
            raise


def iter_capture(
    model: HookedModel,
    texts: str | Sequence[str] | Tokens,
    *,
    sites: str | Sequence[str] = ("resid_post",),
    layers: int | Sequence[int] | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    keep_logits: bool = False,
    check_finite: bool = True,
    progress: bool = False,
    attention: str = "sdpa",
) -> Iterator[ActivationBatch]:
    """Stream activations batch by batch (for corpora that do not fit in memory).

    Args:
        model: a :class:`~vsem_lens.core.models.HookedModel`.
        texts: one text, a list of texts, or an already tokenised (right-padded) :class:`Tokens` batch.
        sites: which activations (see module docstring).
        layers: layer indices (``None`` = all). ``embed`` ignores it.
        batch_size: texts per forward pass.
        max_length: cut texts to this many tokens, with one warning giving the number of texts and
            tokens dropped. Without it a text longer than the model's context is an error (nothing is
            cut silently).
        keep_logits: also return the model's output logits at each real token ([token, d_vocab]).
            Without it the forward pass stops as soon as every requested hook has fired (the blocks
            after the last captured layer and the full-vocabulary unembedding are never run).
        check_finite: raise :class:`NumericalError` on NaN/inf activations.
        progress: show a tqdm bar over batches.
        attention: ``"sdpa"`` (default): memory-efficient attention (PyTorch's SDPA kernel through the
            HF attention module; no [token, token] matrix) wherever the architecture has it, else
            eager; ``"eager"``: the bridge's own step-by-step attention (hooks on attention patterns
            fire). The captured sites are the same either way (to ~1e-6).

    Yields:
        one :class:`ActivationBatch` per batch of texts.

    Raises:
        MemoryLimitError: a batch ran out of memory (the message names ``--batch-size``/``--max-length``).

    Example:
        >>> for batch in iter_capture(model, corpus, layers=[10]):  # doctest: +SKIP
        ...     stats.update(batch.acts["resid_post"][0])
    """
    # One generator on purpose: the hooks write into per-batch buffers that the forward, the early
    # stop and the batch assembly below share.
    pretokenized = texts if isinstance(texts, Tokens) else None
    n_texts = pretokenized.ids.shape[0] if pretokenized is not None else len(texts := check_texts(texts))
    sites = check_sites(sites)
    layer_list = check_layers(layers, model.n_layers)
    batch_size = check_positive_int(batch_size, "batch_size")
    truncation = _Truncation(check_positive_int(max_length, "max_length")) if max_length is not None else None
    hooks = {site: [hook_name(site, layer) for layer in ([0] if site == "embed" else layer_list)] for site in sites}
    forward = _Forward(model, check_attention(attention), sum(map(len, hooks.values())), keep_logits)
    try:
        for start in tqdm(range(0, n_texts, batch_size), desc="capture", unit="batch", disable=not progress):
            if pretokenized is not None:
                tokens = Tokens(pretokenized.ids[start : start + batch_size], pretokenized.mask[start : start + batch_size])
            else:
                tokens = _tokenize(model, texts[start : start + batch_size], truncation)
            yield _capture_batch(model, tokens, start, hooks, layer_list, forward, keep_logits, check_finite)
    finally:
        if truncation is not None and truncation.texts:
            warnings.warn(truncation.notice(n_texts), stacklevel=2)


def _capture_batch(
    model: HookedModel, tokens: Tokens, start: int, hooks: dict[str, list[str]], layer_list: list[int],
    forward: _Forward, keep_logits: bool, check_finite: bool,
) -> ActivationBatch:
    """Run one batch with the capture hooks and assemble its :class:`ActivationBatch`."""
    n_batch = tokens.ids.shape[0]
    keep = tokens.mask.bool()
    rows_cols = keep.nonzero(as_tuple=True)
    flat_index = keep.reshape(-1).nonzero().squeeze(1).to(model.device)
    # Each hook copies its real tokens straight into one preallocated [layer, token, d] buffer
    # per site (no padding kept, no later stacking copy).
    acts = {
        site: torch.empty(len(names), flat_index.numel(), model.d_model, dtype=model.dtype, device=model.device)
        for site, names in hooks.items()
    }

    index_on = {flat_index.device: flat_index}
    filled: set[tuple[str, int]] = set()

    def make_hook(site: str, slot: int):
        def save(tensor: Tensor, hook) -> Tensor:  # noqa: ARG001 - TransformerLens signature
            flat = tensor.detach().reshape(-1, tensor.shape[-1])
            out = acts[site][slot]
            if flat.device == out.device:
                torch.index_select(flat, 0, flat_index, out=out)
            else:  # a layer on another GPU (device_map): select there, then one copy to the buffers' device
                if flat.device not in index_on:
                    index_on[flat.device] = flat_index.to(flat.device)
                out.copy_(torch.index_select(flat, 0, index_on[flat.device]))
            filled.add((site, slot))
            if not keep_logits and len(filled) == n_hooks:
                raise _StopForward  # every buffer is full: skip the remaining blocks and the unembedding
            return tensor

        return save

    fwd_hooks = [(name, make_hook(site, slot)) for site, names in hooks.items() for slot, name in enumerate(names)]
    n_hooks = len(fwd_hooks)
    logits = forward(tokens, fwd_hooks, start)
    if len(filled) < n_hooks:
        missing = sorted({hooks[site][slot] for site, names in hooks.items() for slot in range(len(names))
                          if (site, slot) not in filled})
        raise NumericalError(
            f"the hooks {', '.join(missing[:4])} did not fire; this model's hook names are not TransformerLens's."
        )
    if check_finite:
        entry = first_non_finite(acts, layer_list)
        if entry is not None:
            layer, site = entry
            raise NumericalError(
                f"the model produced NaN/inf activations for texts {start}..{start + n_batch - 1}; the first "
                f"captured place they appear (in forward order) is layer {layer}, site {site!r}. Check the "
                "weights and dtype (float16 overflows are common: try dtype=torch.float32)."
            )
    rows, cols = rows_cols
    return ActivationBatch(
        acts=acts,
        layers=layer_list,
        tokens=tokens,
        doc_index=rows + start,
        positions=cols,
        token_ids=tokens.ids[rows, cols],
        logits=logits[keep.to(logits.device)] if keep_logits else None,
    )


def hooked_states(
    model: HookedModel,
    tokens: Tokens,
    *,
    layers: int | Sequence[int] | None = None,
    site: str = "resid_post",
) -> list[Float[Tensor, "batch pos d_model"]]:
    """One batch's activations at ``site`` of each layer, padded, in the caller's grad mode.

    For training through the hooks (I-STAR fine-tuning): the hooks keep the tensors themselves, not
    detached copies, so a loss built on them sends gradients back to every weight that produced them.
    The forward pass stops after the last requested hook (no later blocks, no unembedding) and runs
    SDPA attention where the architecture has it.

    Args:
        model: the hooked model (train it with ``model.train()`` and an optimiser over ``model.parameters()``).
        tokens: a right-padded batch (:meth:`~vsem_lens.core.models.HookedModel.tokenize`).
        layers: layer indices (``None`` = all).
        site: one site of :data:`SITES` other than ``embed``.

    Returns:
        a list with one [batch, pos, d_model] tensor per layer, in increasing layer order.

    Example:
        >>> toks = model.tokenize(["The capital of France is"])            # doctest: +SKIP
        >>> states = hooked_states(model, toks, layers=[0, -1])            # doctest: +SKIP
        >>> torch.stack(states).pow(2).mean().backward()                   # doctest: +SKIP
    """
    (site,) = check_sites(site)
    if site == "embed":
        raise InputError("hooked_states reads block sites (resid_pre, resid_mid, resid_post, attn_out, mlp_out), not embed.")
    layer_list = check_layers(layers, model.n_layers)
    states: dict[int, Tensor] = {}

    def make_hook(layer: int):
        def keep(tensor: Tensor, hook) -> Tensor:  # noqa: ARG001 - TransformerLens signature
            states[layer] = tensor
            if len(states) == len(layer_list):
                raise _StopForward  # the later blocks and the unembedding are not needed
            return tensor

        return keep

    fwd_hooks = [(hook_name(site, layer), make_hook(layer)) for layer in layer_list]
    forward = _Forward(model, "sdpa", len(layer_list), keep_logits=False)
    forward(tokens, fwd_hooks, 0, grad=torch.is_grad_enabled())
    if len(states) < len(layer_list):
        raise NumericalError(f"the {site} hooks did not fire; this model's hook names are not TransformerLens's.")
    return [states[layer] for layer in layer_list]


def capture(
    model: HookedModel,
    texts: str | Sequence[str] | Tokens,
    *,
    sites: str | Sequence[str] = ("resid_post",),
    layers: int | Sequence[int] | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = False,
    attention: str = "sdpa",
) -> Activations:
    """Capture activations of a (small) corpus into memory.

    Returns per site a tensor [layer, token, d_model] over the corpus's real tokens (no padding)
    and a token table (doc, position, token_id, token). For corpora that do not fit in memory use
    :func:`iter_capture` (which documents every argument).

    Example:
        >>> acts = capture(model, ["Hello world", "Hi"], sites=("resid_post", "mlp_out"))  # doctest: +SKIP
        >>> acts["mlp_out"].shape                                                          # doctest: +SKIP
        torch.Size([30, 3, 576])
    """
    parts: dict[str, list[Tensor]] = {}
    docs, positions, ids = [], [], []
    layer_list: list[int] = []
    for batch in iter_capture(
        model, texts, sites=sites, layers=layers, batch_size=batch_size, max_length=max_length, progress=progress,
        attention=attention,
    ):
        layer_list = batch.layers
        for site, tensor in batch.acts.items():
            parts.setdefault(site, []).append(tensor)
        docs.append(batch.doc_index)
        positions.append(batch.positions)
        ids.append(batch.token_ids)
    token_ids = torch.cat(ids)
    table = pd.DataFrame(
        {
            "doc": torch.cat(docs).numpy(),
            "position": torch.cat(positions).numpy(),
            "token_id": token_ids.numpy(),
            "token": model.token_strings(token_ids),
        }
    )
    acts = {site: chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1) for site, chunks in parts.items()}
    return Activations(acts=acts, layers=layer_list, tokens=table)
