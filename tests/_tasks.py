"""Small labelled tasks and synthetic features for the calibration tests (not a test module)."""

from __future__ import annotations

import torch

from vsem_lens.calibration.datasets import TextClassificationTask

# Label words of the tiny BPE tokenizer: multi-token, but with distinct last sub-tokens.
TINY_VERBALIZER = {"animal": "cat", "food": "apples"}


def tiny_task(n_train: int = 12, n_val: int = 6, n_test: int = 8) -> TextClassificationTask:
    """A two-class task in the tiny tokenizer's vocabulary, with train/validation/test splits."""
    animal = ["The cat sat on the mat.", "A dog looked at the cat.", "The cat and the dog.", "A cat on a mat."]
    food = ["She sold three apples.", "Two pears and a melon.", "Apples at the market.", "A melon and apples."]
    texts, labels, splits = [], [], []
    for split, n in (("train", n_train), ("validation", n_val), ("test", n_test)):
        for i in range(n):
            pool, label = (animal, "animal") if i % 2 == 0 else (food, "food")
            texts.append(f"{pool[(i // 2) % len(pool)]} ({split} {i})")
            labels.append(label)
            splits.append(split)
    return TextClassificationTask("tiny", texts, labels, splits, dict(TINY_VERBALIZER), "Text: {text}\nLabel:")


def separable(bases: torch.Tensor, n_per_class: int, *, noise: float = 0.3, seed: int = 0, tokens: bool = False):
    """Points around each label basis (cosine-separable), with labels; [n, d] or [n, 3, d]."""
    g = torch.Generator().manual_seed(seed)
    k, d = bases.shape
    unit = bases / bases.norm(dim=1, keepdim=True)
    y = torch.arange(k).repeat(n_per_class)
    X = unit[y] * 3.0 + noise * torch.randn(len(y), d, generator=g)
    if tokens:
        X = torch.stack([X, X + 0.1 * torch.randn(X.shape, generator=g), X.abs()], dim=1)
    return X, y
