"""The semantic basis: one vector per vocabulary token, from the pseudoinverse of the unembedding.

Gu et al. (arXiv 2401.16184). Row convention ``logits = r W`` with ``W = W_U`` in R^{d x V}. The
semantic basis of token i is ``s_i = e_i W^+``; all bases together are ``S = W^+`` [V, d]. With
``U = W^T`` [V, d] of full column rank, ``S = U (U^T U)^{-1}``: one d x d Cholesky inverse and one GEMM, O(V d^2),
instead of an SVD. Computed in float64 (the float32 solve loses ~3e-5 relative accuracy on SmolLM2)
and stored in the model's dtype.

Properties (tested): ``W S = I_d``; ``P = S W`` [V, V] is a rank-d orthogonal projector; its diagonal
``P_ii = s_i . w_i`` is the leverage of token i. An LM-head bias plays no part in the method.

The bases live in the LM-head input space (after the final norm). :meth:`SemanticBasis.project`
maps a layer's residual into the basis's frame (see :mod:`vsem_lens.lenses.base`).

Example:
    >>> basis = SemanticBasis.from_model(model)     # doctest: +SKIP
    >>> basis.vectors.shape                          # doctest: +SKIP
    torch.Size([49152, 576])
    >>> basis.for_words(["positive", "negative"]).shape  # doctest: +SKIP
    torch.Size([2, 576])
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..core.errors import ArtifactError, NumericalError, VocabularyError, check_int, check_int_list, check_layer_index
from ..core.io import atomic_write, check_tensors, tensors_digest
from ..core.models import HookedModel, cache_dir
from ..lenses.base import Lens
from ..lenses.frames import check_frame, resolve_frame

FORMAT_VERSION = 1
REBUILD_HINT = " Delete the folder (or recompute the basis with SemanticBasis.from_model)."


def pinv_by_gram(
    W_U: Float[Tensor, "d_model d_vocab"], *, compute_dtype: torch.dtype = torch.float64
) -> Float[Tensor, "d_vocab d_model"]:
    """Moore-Penrose pseudoinverse of a full-row-rank ``W_U`` by one Gram solve: ``U (U^T U)^{-1}``.

    Args:
        W_U: unembedding [d_model, d_vocab] with d_model <= d_vocab and full rank.
        compute_dtype: dtype of the solve (float64 by default for accuracy).

    Returns:
        ``S`` [d_vocab, d_model] in ``compute_dtype``, with ``W_U @ S = I``.

    Example:
        >>> W = torch.randn(4, 10, dtype=torch.float64)
        >>> S = pinv_by_gram(W)
        >>> torch.allclose(W @ S, torch.eye(4, dtype=torch.float64))
        True
    """
    d_model, d_vocab = W_U.shape
    if d_model > d_vocab:
        raise NumericalError(f"W_U is {d_model} x {d_vocab}: the method needs d_model <= d_vocab.")
    U = W_U.detach().to(compute_dtype).T  # [V, d]
    gram = U.T @ U  # [d, d]
    chol, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0 or not torch.isfinite(gram).all():
        raise NumericalError(
            "the unembedding is rank-deficient (its Gram matrix is not positive definite), so the "
            "semantic basis is not defined; check the weights for NaN or duplicated columns."
        )
    # G^{-1} from its Cholesky factor (d^3, cheap), then one GEMM: faster than two triangular solves
    # against V right-hand sides, and as accurate in float64 (G is well conditioned for real LM heads).
    return U @ torch.cholesky_inverse(chol)


def word_token_ids(tokenizer: Any, words: str | Sequence[str], d_vocab: int, *, warn: bool = True) -> list[int]:
    """Label-token id of each word: the last sub-token of ``" " + word`` (Gu et al.'s rule).

    One rule for the whole package (semantic bases of words, calibration label tokens). A word that
    splits into several tokens triggers a warning: its basis is then that of its last piece only.

    Raises:
        VocabularyError: an empty word, a word that maps to the unknown token, a word whose last token
            is a byte fragment of a character (byte-level tokenizers split emoji and rare characters),
            or an id >= ``d_vocab``.

    Example:
        >>> word_token_ids(model.tokenizer, ["Paris"], model.d_vocab)  # doctest: +SKIP
        [7042]
    """
    if isinstance(words, str):
        words = [words]
    unk = getattr(tokenizer, "unk_token_id", None)
    ids = []
    for word in words:
        if not isinstance(word, str) or not word.strip():
            raise VocabularyError(f"{word!r} is not a word; pass non-empty strings.")
        pieces = tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"]
        if not pieces or (unk is not None and pieces[-1] == unk):
            raise VocabularyError(
                f"word {word!r} is not in the vocabulary (it maps to the unknown token); choose another word."
            )
        if "\ufffd" in tokenizer.decode([pieces[-1]]) and "\ufffd" not in word:
            raise VocabularyError(
                f"word {word!r} ends in a byte fragment: its last token is part of a character split over "
                f"{len(pieces)} byte tokens, so its basis would be a stray byte's. Choose a word whose last "
                "token is whole (most emoji and many CJK characters are not single tokens)."
            )
        if len(pieces) > 1 and warn:
            strings = [tokenizer.decode([p]) for p in pieces]
            warnings.warn(
                f"word {word!r} is {len(pieces)} tokens {strings}; it is read as its last token "
                f"{strings[-1]!r}. Prefer a single-token word.",
                stacklevel=3,
            )
        if pieces[-1] >= d_vocab:
            raise VocabularyError(f"word {word!r} maps to id {pieces[-1]} outside the vocabulary (d_vocab={d_vocab}).")
        ids.append(int(pieces[-1]))
    return ids


class SemanticBasis:
    """Semantic basis vectors of a model's vocabulary, tied to a frame.

    Attributes:
        vectors: ``S = pinv(W_U)`` [d_vocab, d_model] in the model's dtype.
        frame: ``raw``, ``final_norm`` or ``tuned``: how :meth:`project` maps residuals.
        fingerprint: hash of the model's unembedding and final norm (see ``HookedModel.fingerprint``).

    Example:
        >>> basis = SemanticBasis.from_model(model, frame="final_norm")  # doctest: +SKIP
        >>> basis.project(h, layer=12)                                    # doctest: +SKIP
    """

    def __init__(
        self,
        vectors: Float[Tensor, "d_vocab d_model"],
        *,
        frame: str = "final_norm",
        fingerprint: str = "",
        model: HookedModel | None = None,
        lens: Lens | None = None,
    ):
        self.vectors = vectors
        self.frame = check_frame(frame)
        self.fingerprint = fingerprint
        self.model = model
        self._lens = lens
        self._unit: Tensor | None = None

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_model(
        cls,
        model: HookedModel,
        frame: str = "final_norm",
        *,
        lens: Lens | None = None,
        compute_dtype: torch.dtype = torch.float64,
        cache: bool = True,
    ) -> "SemanticBasis":
        """Compute (or load from the disk cache) the semantic basis of ``model``.

        Args:
            model: the hooked model.
            frame: ``raw``, ``final_norm`` (default) or ``tuned`` (then pass ``lens=`` or have one cached).
            lens: a trained lens for the ``tuned`` frame.
            compute_dtype: dtype of the Gram solve.
            cache: read/write ``$VSEM_LENS_CACHE/bases/<fingerprint>``.

        Example:
            >>> SemanticBasis.from_model(model).vectors.dtype  # doctest: +SKIP
            torch.float32
        """
        check_frame(frame)
        resolved = resolve_frame(frame, model, lens=lens) if frame == "tuned" else lens
        path = cache_dir() / "bases" / f"{model.fingerprint}-{str(compute_dtype).split('.')[-1]}"
        if cache and (path / "basis.safetensors").is_file():
            try:
                basis = cls.load(path, model=model)
                basis.frame, basis._lens = frame, resolved
                return basis
            except ArtifactError as exc:
                warnings.warn(f"rebuilding the cached semantic basis: {exc}", stacklevel=2)
        vectors = pinv_by_gram(model.W_U, compute_dtype=compute_dtype).to(model.dtype).to(model.device)
        basis = cls(vectors, frame=frame, fingerprint=model.fingerprint, model=model, lens=resolved)
        if cache:
            try:
                basis.save(path)
            except OSError as exc:  # a read-only cache must not stop the analysis
                warnings.warn(f"could not cache the semantic basis in {path}: {exc}", stacklevel=2)
        return basis

    # -- views ---------------------------------------------------------------------------------
    @property
    def d_vocab(self) -> int:
        """Number of basis vectors."""
        return int(self.vectors.shape[0])

    @property
    def d_model(self) -> int:
        """Dimension of each basis vector."""
        return int(self.vectors.shape[1])

    @property
    def unit_vectors(self) -> Float[Tensor, "d_vocab d_model"]:
        """Basis vectors scaled to unit norm (cached): cosines become plain matmuls. Zero vectors stay 0."""
        if self._unit is None:
            norms = self.vectors.double().norm(dim=1, keepdim=True)
            # A token whose unembedding column is zero (e.g. an unused padding row) has a zero basis
            # vector; its cosine with anything is defined as 0 rather than NaN.
            unit = torch.where(norms > 0, self.vectors.double() / norms.clamp_min(1e-300), 0.0)
            self._unit = unit.to(self.vectors.dtype)
        return self._unit

    def leverage(self) -> Float[Tensor, " d_vocab"]:
        """Diagonal of the projector ``P = S W_U``: ``P_ii = s_i . w_i`` (sums to d_model).

        Example:
            >>> float(basis.leverage().sum())  # doctest: +SKIP
            576.0
        """
        W_U = self._require_model().W_U
        return (self.vectors.double() * W_U.T.double()).sum(dim=1)

    def for_tokens(self, ids: int | Sequence[int] | Tensor) -> Float[Tensor, "n d_model"]:
        """Basis vectors of token ids.

        Example:
            >>> basis.for_tokens([12, 13]).shape  # doctest: +SKIP
            torch.Size([2, 576])
        """
        ids_t = torch.tensor(check_int_list(ids, "token ids"), dtype=torch.long)
        bad = ids_t[(ids_t < 0) | (ids_t >= self.d_vocab)]
        if bad.numel():
            raise VocabularyError(
                f"token id {int(bad[0])} is outside the vocabulary (0..{self.d_vocab - 1})."
            )
        return self.vectors[ids_t.to(self.vectors.device)]

    def token_ids_for_words(self, words: str | Sequence[str], *, warn: bool = True) -> list[int]:
        """Label-token id of each word: the last sub-token of ``" " + word`` (the authors' rule).

        A word that splits into several tokens triggers a warning (its basis is then that of its last
        piece only).

        Example:
            >>> basis.token_ids_for_words(["Paris"])  # doctest: +SKIP
            [7042]
        """
        return word_token_ids(self._require_model().tokenizer, words, self.d_vocab, warn=warn)

    def for_words(self, words: str | Sequence[str]) -> Float[Tensor, "n d_model"]:
        """Basis vectors of label words (last sub-token of ``" " + word``; see :meth:`token_ids_for_words`).

        Example:
            >>> basis.for_words(["positive", "negative"]).shape  # doctest: +SKIP
            torch.Size([2, 576])
        """
        return self.for_tokens(self.token_ids_for_words(words))

    def project(self, h: Float[Tensor, "... d_model"], layer: int) -> Float[Tensor, "... d_model"]:
        """Map residual vectors of ``layer`` into this basis's frame.

        Example:
            >>> basis.project(acts.layer("resid_post", 10), layer=10)  # doctest: +SKIP
        """
        layer = check_layer_index(layer, self.model.n_layers) if self.model is not None else check_int(layer, "layer")
        return self.lens(h, layer)

    @property
    def lens(self) -> Lens:
        """The :class:`~vsem_lens.lenses.base.Lens` implementing this basis's frame."""
        if self._lens is None:
            if self.frame != "raw" and self.model is None:
                raise ArtifactError(
                    f"frame {self.frame!r} needs the model; load the basis with SemanticBasis.load(path, model=model)."
                )
            self._lens = resolve_frame(self.frame, self.model)
        return self._lens

    def with_frame(self, frame: str, *, lens: Lens | None = None) -> "SemanticBasis":
        """The same vectors in another frame (no recomputation).

        Example:
            >>> basis.with_frame("raw").frame  # doctest: +SKIP
            'raw'
        """
        check_frame(frame)
        resolved = resolve_frame(frame, self.model, lens=lens) if frame != "raw" else None
        other = SemanticBasis(self.vectors, frame=frame, fingerprint=self.fingerprint, model=self.model, lens=resolved)
        other._unit = self._unit
        return other

    def _require_model(self) -> HookedModel:
        if self.model is None:
            raise ArtifactError("this basis was loaded without its model; pass model= to SemanticBasis.load.")
        return self.model

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Save as ``basis.safetensors`` + ``basis.json`` in a directory, atomically.

        Example:
            >>> basis.save("my_basis")  # doctest: +SKIP
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {
            "format_version": FORMAT_VERSION,
            "frame": self.frame,
            "fingerprint": self.fingerprint,
            "d_vocab": self.d_vocab,
            "d_model": self.d_model,
            "dtype": str(self.vectors.dtype),
            "method": "pinv(W_U) = U (U^T U)^-1 via a float64 Cholesky inverse (Gu et al., arXiv 2401.16184)",
        }
        vectors = {"vectors": self.vectors.detach().cpu().contiguous()}
        meta["sha256"] = tensors_digest(vectors)
        atomic_write(path / "basis.safetensors", lambda tmp: save_file(vectors, str(tmp)))
        atomic_write(path / "basis.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, model: HookedModel | None = None) -> "SemanticBasis":
        """Load a basis saved by :meth:`save`; checks its content and that it belongs to ``model`` when given.

        Raises:
            ArtifactError: unreadable files, non-finite values, content that no longer matches the digest
                written at save time, a shape that does not fit the metadata or ``model``, another model's basis.

        Example:
            >>> SemanticBasis.load("my_basis", model=model)  # doctest: +SKIP
        """
        path = Path(path)
        try:
            meta = json.loads((path / "basis.json").read_text())
            tensors = load_file(str(path / "basis.safetensors"))
            vectors = tensors["vectors"]
        except Exception as exc:  # safetensors raises its own error type on corrupt files
            raise ArtifactError(f"could not read a semantic basis from {path}: {exc}") from exc
        check_tensors(tensors, f"the semantic basis in {path}", digest=meta.get("sha256"), remedy=REBUILD_HINT)
        if tuple(vectors.shape) != (meta.get("d_vocab"), meta.get("d_model")):
            raise ArtifactError(f"the basis in {path} is corrupt (shape {tuple(vectors.shape)} vs metadata).")
        if model is not None:
            if tuple(vectors.shape) != (model.d_vocab, model.d_model):
                raise ArtifactError(
                    f"the basis in {path} has shape {tuple(vectors.shape)}, not ({model.d_vocab}, {model.d_model}) "
                    "as this model needs; recompute it with SemanticBasis.from_model."
                )
            if meta.get("fingerprint") and meta["fingerprint"] != model.fingerprint:
                raise ArtifactError(
                    f"the basis in {path} was computed for another model (fingerprint "
                    f"{meta['fingerprint']} vs {model.fingerprint}); recompute it with SemanticBasis.from_model."
                )
            vectors = vectors.to(model.device, model.dtype)
        return cls(vectors, frame=meta.get("frame", "final_norm"), fingerprint=meta.get("fingerprint", ""), model=model)

    def __repr__(self) -> str:
        return f"SemanticBasis(d_vocab={self.d_vocab}, d_model={self.d_model}, frame={self.frame!r})"

