"""``HookedModel``: a TransformerLens ``TransformerBridge`` with the unembedding, final norm and one
tokenisation rule every analysis needs (loading lives in :mod:`vsem_lens.core.loading`).

Tokenisation rule (documented, user-visible): token ids are exactly what the model's own HF tokenizer
produces for the text (``tokenizer(text)`` with its default special tokens), so results match a plain
HF pipeline. TransformerLens prepends a BOS token by default; pass ``prepend_bos=True`` (to
:func:`~vsem_lens.core.loading.load_model` or :meth:`HookedModel.tokenize`) to get that convention instead.
Every function that takes ``prepend_bos=None`` follows the model's rule (:attr:`HookedModel.prepend_bos`);
:meth:`HookedModel.resolve_bos` is the one place that turns a request into the rule used, and it refuses
BOS for a tokenizer that has no BOS token. On SmolLM2 the BOS token is the chat token ``<|im_start|>``
and the choice changes results noticeably, so reports record it. Batches are right-padded and every
statistic masks padding out.

Example:
    >>> model = load_model()                                  # doctest: +SKIP
    >>> model.tokenize(["The capital of France is"]).ids.shape  # doctest: +SKIP
    torch.Size([1, 5])
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .attention import sdpa_attention
from .errors import InputError, check_positive_int
from .logits import Unembedding, effective_transform


def cache_dir() -> Path:
    """The vsem-lens cache folder: ``$VSEM_LENS_CACHE`` or ``~/.cache/vsem-lens``.

    Example:
        >>> isinstance(cache_dir(), Path)
        True
    """
    root = os.environ.get("VSEM_LENS_CACHE") or os.path.join(Path.home(), ".cache", "vsem-lens")
    return Path(root).expanduser()


@dataclass
class Tokens:
    """A right-padded batch of token ids and its attention mask (1 = real token, 0 = padding).

    Example:
        >>> t = Tokens(torch.tensor([[5, 6], [7, 0]]), torch.tensor([[1, 1], [1, 0]]))
        >>> t.lengths.tolist()
        [2, 1]
    """

    ids: Int[Tensor, "batch pos"]
    mask: Int[Tensor, "batch pos"]

    @property
    def lengths(self) -> Int[Tensor, " batch"]:
        """Number of real (non-padding) tokens per row."""
        return self.mask.sum(dim=1)


class HookedModel:
    """A TransformerLens ``TransformerBridge`` plus the unembedding, final norm and tokenisation rule.

    Attributes:
        bridge: the ``TransformerBridge`` (hook names ``blocks.{l}.hook_resid_post`` etc.).
        tokenizer: the HF tokenizer.
        name: a human-readable model name.
        prepend_bos: whether :meth:`tokenize` forces a BOS token in front (see module docstring).
        bos_token_id: the tokenizer's own BOS token (``None``: it has none). Read before TransformerLens
            boots the bridge, which installs the EOS token as BOS on a tokenizer without one; vsem-lens
            never prepends that stand-in.

    Example:
        >>> model = load_model("embedded")                  # doctest: +SKIP
        >>> toks = model.tokenize(["The capital of France is"])  # doctest: +SKIP
        >>> model.bridge(toks.ids).shape                    # doctest: +SKIP
        torch.Size([1, 5, 49152])
    """

    def __init__(
        self, bridge: Any, tokenizer: Any, *, name: str, prepend_bos: bool = False, bos_token_id: Any = "tokenizer"
    ):
        self.bridge = bridge
        self.tokenizer = tokenizer
        self.name = name
        self.bos_token_id = getattr(tokenizer, "bos_token_id", None) if bos_token_id == "tokenizer" else bos_token_id
        self.prepend_bos = False
        self.prepend_bos = self.resolve_bos(prepend_bos)
        self._fingerprint: str | None = None
        self._unembeddings: dict[torch.dtype, tuple[tuple, Unembedding]] = {}

    # -- model facts ---------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        """Number of transformer blocks."""
        return int(self.bridge.cfg.n_layers)

    @property
    def d_model(self) -> int:
        """Width of the residual stream."""
        return int(self.bridge.cfg.d_model)

    @property
    def d_vocab(self) -> int:
        """Number of rows of the unembedding (may exceed ``len(tokenizer)`` by padding rows)."""
        return int(self.W_U.shape[1])

    @property
    def n_ctx(self) -> int:
        """Maximum context length in tokens."""
        return int(self.bridge.cfg.n_ctx)

    @property
    def device(self) -> torch.device:
        """Device of the unembedding weights."""
        return self.W_U.device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the weights."""
        return self.W_U.dtype

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        """Unembedding matrix in the row convention ``logits = h @ W_U + b_U`` (detached)."""
        return self.bridge.W_U.detach()

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        """Unembedding bias (zeros when the LM head has none; detached)."""
        return self.bridge.b_U.detach()

    def final_norm(self, h: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """Apply the model's own final norm (``ln_final``) to residual vectors, without hooks firing.

        Example:
            >>> model.final_norm(torch.zeros(2, model.d_model)).shape  # doctest: +SKIP
            torch.Size([2, 576])
        """
        ln = self.bridge.ln_final
        original = getattr(ln, "original_component", None)
        # The wrapped HF norm module computes exactly what the model computes, without firing hooks.
        module = original if original is not None else ln
        return module(h.to(self.dtype))

    @property
    def output_transform(self) -> Callable[[Tensor], Tensor] | None:
        """The architecture's elementwise output-logit transform (Gemma 2 softcap, Cohere's
        ``logit_scale``, Granite's ``logits_scaling``), or ``None`` when it is the identity.
        """
        adapter = getattr(self.bridge, "adapter", None)
        return effective_transform(getattr(adapter, "apply_output_logits_transform", None))

    @property
    def readout_dtype(self) -> torch.dtype:
        """The dtype of full-vocabulary readouts: float32 for half-precision models (a log-softmax over
        the whole vocabulary in 8-bit-mantissa arithmetic would swamp the statistics), else the model's.
        """
        return torch.float32 if self.dtype in (torch.float16, torch.bfloat16) else self.dtype

    def unembedding(self, dtype: torch.dtype | None = None) -> Unembedding:
        """The one logits path of this model, ``transform(h @ W_U + b_U)``, in ``dtype``
        (default :attr:`readout_dtype`). Cached until the weights change.

        Example:
            >>> head = model.unembedding()                                   # doctest: +SKIP
            >>> head(model.final_norm(h_last))  # equals the model's own logits  # doctest: +SKIP
        """
        dtype = dtype or self.readout_dtype
        W_U = self.W_U
        key = (dtype, W_U.data_ptr(), W_U._version, self.b_U._version)
        cached = self._unembeddings.get(dtype)
        if cached is None or cached[0] != key:
            cached = (key, Unembedding(W_U, self.b_U, self.output_transform, dtype=dtype))
            self._unembeddings[dtype] = cached
        return cached[1]

    def unembed(self, h: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
        """The model's logits of final-norm-space vectors: ``transform(h @ W_U + b_U)`` (see :meth:`unembedding`).

        Example:
            >>> logits = model.unembed(model.final_norm(h_last))  # doctest: +SKIP
        """
        return self.unembedding()(h)

    def trainable_unembedding(self) -> Unembedding:
        """The logits path on the live LM-head weights, so that gradients reach them (fine-tuning).

        :meth:`unembedding` reads detached weights for analysis; this one is for a loss on the model's
        own logits (e.g. ``.columns(label_ids)`` for classification). Not cached: the weights change.

        Example:
            >>> head = model.trainable_unembedding().columns([2731, 3524])    # doctest: +SKIP
            >>> head(model.final_norm(h_last)).sum().backward()              # doctest: +SKIP
        """
        b_U = self.bridge.b_U if getattr(self.bridge.b_U, "requires_grad", False) else self.b_U
        return Unembedding(self.bridge.W_U, b_U, self.output_transform)

    @property
    def fingerprint(self) -> str:
        """A short hash of the unembedding and final-norm weights; keys every on-disk cache.

        Example:
            >>> len(model.fingerprint)  # doctest: +SKIP
            16
        """
        if self._fingerprint is None:
            digest = hashlib.blake2b(digest_size=8)
            digest.update(f"{tuple(self.W_U.shape)}|{self.n_layers}|{self.d_model}".encode())
            for tensor in (self.W_U, self.b_U, *self.bridge.ln_final.parameters()):
                data = tensor.detach().to("cpu", torch.float32).contiguous()
                digest.update(data.numpy().tobytes())
            transform = self.output_transform
            if transform is not None:  # it shapes every distribution (identity: keys stay as they were)
                digest.update(transform(torch.linspace(-100.0, 100.0, 41)).numpy().tobytes())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    # -- tokenisation --------------------------------------------------------------------------
    def resolve_bos(self, prepend_bos: bool | None = None) -> bool:
        """The BOS rule a call uses: the model's (``None``) or the requested one, checked.

        The one check every BOS request goes through: asking for BOS when the tokenizer has no BOS
        token is an :class:`~vsem_lens.core.errors.InputError` (silently scoring without BOS would
        change every first-token statistic).

        Example:
            >>> model.resolve_bos(None) == model.prepend_bos   # doctest: +SKIP
            True
            >>> model.resolve_bos(True)                        # doctest: +SKIP
            True
        """
        if prepend_bos is None:
            return self.prepend_bos
        if prepend_bos not in (True, False):
            raise InputError(f"prepend_bos must be True, False or None (the model's rule), got {prepend_bos!r}.")
        if prepend_bos and self.bos_token_id is None:
            raise InputError(
                f"prepend_bos=True, but the tokenizer of {self.name!r} has no BOS token; use prepend_bos=False "
                "(the first token is then only context) or set tokenizer.bos_token first."
            )
        return bool(prepend_bos)

    def tokenize(
        self,
        texts: str | Sequence[str],
        *,
        max_length: int | None = None,
        prepend_bos: bool | None = None,
    ) -> Tokens:
        """Tokenise texts into a right-padded batch (see the module docstring for the BOS rule).

        Args:
            texts: one text or a list of texts; none may be empty.
            max_length: truncate each text to this many tokens. Without it, a text longer than the
                context is an error (silently cutting a text would change every statistic).
            prepend_bos: override the model's BOS rule for this call.

        Example:
            >>> toks = model.tokenize(["Hello world", "Hi"])  # doctest: +SKIP
            >>> toks.ids.shape, toks.mask.sum(1).tolist()       # doctest: +SKIP
            (torch.Size([2, 2]), [2, 1])
        """
        return self.pad(self.token_ids(texts, max_length=max_length, prepend_bos=prepend_bos))

    def token_ids(
        self,
        texts: str | Sequence[str],
        *,
        max_length: int | None = None,
        prepend_bos: bool | None = None,
    ) -> list[list[int]]:
        """The token ids of each text, unpadded (the rows :meth:`tokenize` pads; same arguments).

        Example:
            >>> model.token_ids(["Hello world", "Hi"])  # doctest: +SKIP
            [[19556, 905], [17560]]
        """
        texts = check_texts(texts)
        bos = self.resolve_bos(prepend_bos)
        limit = self.n_ctx if max_length is None else check_positive_int(max_length, "max_length")
        rows: list[list[int]] = []
        for index, text in enumerate(texts):
            ids = list(self.tokenizer(text)["input_ids"])
            bos_id = self.bos_token_id
            if bos and (not ids or ids[0] != bos_id):
                ids = [bos_id] + ids
            if not ids:
                raise InputError(f"text {index} ({text[:40]!r}) produced no tokens; remove it.")
            if len(ids) > limit:
                if max_length is None:
                    raise InputError(
                        f"text {index} has {len(ids)} tokens, more than the model's context of "
                        f"{self.n_ctx}; split it, or pass max_length={self.n_ctx} to truncate."
                    )
                ids = ids[:limit]
            rows.append(ids)
        return rows

    def pad(self, rows: Sequence[Sequence[int]]) -> Tokens:
        """Right-pad rows of token ids into a :class:`Tokens` batch (mask 1 on real tokens).

        Example:
            >>> model.pad([[5, 6, 7], [8]]).mask.tolist()  # doctest: +SKIP
            [[1, 1, 1], [1, 0, 0]]
        """
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return Tokens(ids, mask)

    @property
    def pad_token_id(self) -> int:
        """Id used for padding (never seen by any statistic)."""
        for candidate in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if candidate is not None:
                return int(candidate)
        return 0

    def token_strings(self, ids: Sequence[int] | Tensor) -> list[str]:
        """Decode each id separately into its string (e.g. ``" Paris"``).

        Example:
            >>> model.token_strings([12, 13])  # doctest: +SKIP
            ['-', '.']
        """
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        return [self.tokenizer.decode([int(i)]) for i in ids]

    def forward(self, tokens: Tokens) -> Float[Tensor, "batch pos d_vocab"]:
        """Logits of a batch through the bridge (no gradient)."""
        with torch.no_grad():
            return self.logits(tokens)

    def logits(self, tokens: Tokens) -> Float[Tensor, "batch pos d_vocab"]:
        """Logits of a batch through the bridge, in the caller's grad mode (for training and gradients).

        Attention runs through SDPA where the architecture has it (no attention pattern is read here),
        so a long text costs O(tokens) attention memory instead of the bridge's [head, token, token].
        """
        with sdpa_attention(self):
            return self.bridge(tokens.ids.to(self.device), attention_mask=tokens.mask.to(self.device))

    # The bridge's torch.nn.Module surface that analyses need, so that they never reach into ``bridge``.

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """The model's parameters (those of the wrapped Hugging Face model)."""
        return self.bridge.parameters()

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """``(name, parameter)`` pairs, named as the bridge names them."""
        return self.bridge.named_parameters()

    @property
    def training(self) -> bool:
        """Whether the model is in training mode (dropout active)."""
        return bool(self.bridge.training)

    def train(self, mode: bool = True) -> HookedModel:
        """Set training mode (``mode=False``: evaluation mode); returns ``self``."""
        self.bridge.train(mode)
        return self

    def eval(self) -> HookedModel:
        """Set evaluation mode; returns ``self``."""
        return self.train(False)

    @property
    def hf_model(self) -> Any:
        """The wrapped Hugging Face model (what ``peft`` adapts), or None when the bridge exposes none."""
        return getattr(self.bridge, "original_model", None)

    def __repr__(self) -> str:
        return (
            f"HookedModel({self.name!r}, n_layers={self.n_layers}, d_model={self.d_model}, "
            f"d_vocab={self.d_vocab}, prepend_bos={self.prepend_bos})"
        )


def check_texts(texts: str | Sequence[str]) -> list[str]:
    """Normalise one text or a list of texts, rejecting empty input with a clear error.

    Example:
        >>> check_texts("hi")
        ['hi']
    """
    if isinstance(texts, str):
        texts = [texts]
    if texts is None or len(texts) == 0:
        raise InputError("no texts were given; pass a string or a non-empty list of strings.")
    out = []
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"text {index} is a {type(text).__name__}, not a string.")
        if not text.strip():
            raise InputError(f"text {index} is empty; remove empty texts before the analysis.")
        out.append(text)
    return out
