"""The parameter-efficient fine-tuning baselines (LoRA, IA3 via PyPI ``peft``) on a fresh copy of the HF
model with the zero-shot prompt; the shared hooked model is never modified.

Example:
    >>> finetune_baseline(model, load_task("topic"), "ia3").details["trainable_params"]  # doctest: +SKIP
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from ..core.errors import InputError, ModelLoadError, check_positive_int
from ..core.loading import EMBEDDED_NAME, embedded_model_dir, export_hf_model
from ..core.logits import Unembedding
from ..core.models import HookedModel
from .datasets import TextClassificationTask
from .features import build_prompts, label_token_ids
from .results import BaselineResult, baseline_result


def fresh_hf_model(model: HookedModel) -> Any:
    """A fresh, independent HF copy of the model's weights for fine-tuning (the shared hooked model
    is never modified).

    The embedded model is reloaded from its fp32 directory (standard HF attention); any other model is
    rebuilt from its config with the weights of :attr:`~vsem_lens.core.models.HookedModel.hf_model`
    copied in (the wrapping renames the HF submodules; their ``._original_component`` segments are stripped).

    Example:
        >>> hf = fresh_hf_model(model)  # doctest: +SKIP
    """
    if model.name == EMBEDDED_NAME:
        return AutoModelForCausalLM.from_pretrained(str(embedded_model_dir()), dtype=model.dtype)
    return export_hf_model(model)


def _peft_config(method: str, r: int, alpha: int, dropout: float, target_modules: Sequence[str] | None) -> Any:
    import peft  # optional and heavy: imported only when a LoRA/IA3 baseline runs

    targets = list(target_modules) if target_modules else None
    if method == "lora":
        return peft.LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    feed_forward = None
    if targets is not None:
        feed_forward = [t for t in targets if any(part in t for part in ("mlp", "down_proj", "fc", "ffn"))]
    return peft.IA3Config(task_type="CAUSAL_LM", target_modules=targets, feedforward_modules=feed_forward)


# One training-and-evaluation recipe kept in one place (prompts, adapter, loop, test pass), about 100 lines.
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
        import peft  # noqa: F401  # optional: fail early, before copying the model, when it is missing
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
    return baseline_result(
        method, test.y, pred, task.n_classes, seconds,
        train_seconds=round(train_seconds, 3), trainable_params=n_trainable, epochs=epochs, lr=lr,
        steps=len(steps), final_train_loss=round(sum(losses[-10:]) / max(1, len(losses[-10:])), 4),
    )


__all__ = ["finetune_baseline", "fresh_hf_model"]
