"""Isotropy by layer: one streamed pass over a corpus, per (site, layer, frame), as a tidy table.

The measures are those of :mod:`vsem_lens.geometry.metrics` (IsoScore, IsoScore*, participation ratio,
outlier dimensions) and :mod:`vsem_lens.geometry.cosine` (average cosine), accumulated in an
:class:`~vsem_lens.geometry.streaming.IsotropyState`.

Example:
    >>> df = isotropy_by_layer(model, corpus, layers=[0, 15, 29])       # doctest: +SKIP
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd

from ..core.capture import iter_capture
from ..core.models import HookedModel
from ..lenses.base import Lens
from .streaming import DEFAULT_ISOTROPY_FRAMES, IsotropyState, check_result_options


def isotropy_by_layer(
    model: HookedModel,
    texts: str | Sequence[str],
    *,
    sites: str | Sequence[str] = ("resid_post",),
    frames: str | Lens | Sequence[str | Lens] = DEFAULT_ISOTROPY_FRAMES,
    layers: int | Sequence[int] | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    k_outliers: int = 5,
    zeta: float = 0.2,
    star_reference: str = "scaled_identity",
    progress: bool = False,
) -> pd.DataFrame:
    """Isotropy of the token states of every layer, streamed once over any corpus.

    One pass of :func:`~vsem_lens.core.capture.iter_capture` feeds an :class:`IsotropyState` with a
    float64 mean/covariance and a sum of unit vectors per (site, layer, frame): memory is O(d^2) per
    key whatever the corpus size, and the result does not depend on ``batch_size`` beyond the float32
    rounding of attention on padded batches. Padding never enters (capture removes it). Tokenisation follows the model's rule (see :mod:`vsem_lens.core.models`).

    Frames: ``raw`` is the activation as captured; ``final_norm`` applies the model's own final norm to
    each token vector (the logit-lens frame, where the semantic bases live); ``tuned`` applies the
    cached tuned lens of the model; a :class:`~vsem_lens.lenses.base.Lens` object is applied as it is
    (``lens(h, layer)``) and its rows are labelled with its ``frame`` attribute (or its class name). A
    lens maps a whole residual state, so rows in frames other than ``raw`` are produced for residual
    sites only (``embed``, ``resid_pre``, ``resid_mid``, ``resid_post``; ``embed`` is passed as layer 0);
    block outputs (``attn_out``, ``mlp_out``) get ``raw`` rows only, and asking for a block output with no
    applicable frame is an error.

    IsoScore* (Rudman & Eickhoff 2024) shrinks the covariance towards a reference ``C0``:
    ``Sigma = (1 - zeta) C + zeta C0``. Over a whole corpus the authors' data-driven ``C0`` (the
    covariance of a large sample of token states) is ``C`` itself and would make IsoScore* equal to
    IsoScore, so the default ``star_reference="scaled_identity"`` uses ``C0 = (trace(C)/d) I``: the
    isotropic covariance with the same total variance (Ledoit-Wolf-style shrinkage). Unlike the plain
    identity (``star_reference="identity"``, the ``isoscore`` package default), it keeps IsoScore*
    invariant to the scale of the activations, so frames and layers with very different norms stay
    comparable. IsoScore* is evaluated from the streamed covariance, without autograd.

    Args:
        model: a :class:`~vsem_lens.core.models.HookedModel`.
        texts: one text or a list of texts.
        sites: activation sites (see :mod:`vsem_lens.core.capture`).
        frames: frame names (``raw``, ``final_norm``, ``tuned``) and/or :class:`~vsem_lens.lenses.base.Lens`
            objects.
        layers: layer indices (``None`` = all; negative count from the end).
        batch_size, max_length, progress: as in :func:`~vsem_lens.core.capture.iter_capture`.
        k_outliers: number of highest-variance coordinate dimensions to report.
        zeta: IsoScore* shrinkage weight of ``C0``, in [0, 1].
        star_reference: ``scaled_identity`` (default) or ``identity``: the ``C0`` of IsoScore*.

    Returns:
        A tidy DataFrame, one row per (site, frame, layer): ``layer, site, frame, n_tokens, isoscore,
        isoscore_star, average_cosine, participation_ratio, outlier_dims`` (list of k indices, largest
        variance first), ``outlier_shares`` (their variance shares) and ``outlier_variance_share``
        (their sum). ``df.attrs`` records ``zeta``, ``star_reference`` and ``k_outliers``.

    Raises:
        InputError: unknown site or frame, bad layers, empty texts, fewer than 2 tokens.

    Example:
        >>> df = isotropy_by_layer(model, corpus, layers=[0, 15, 29])       # doctest: +SKIP
        >>> df.query("frame == 'raw'")[["layer", "isoscore", "outlier_dims"]]  # doctest: +SKIP
    """
    state = IsotropyState.for_model(model, sites=sites, frames=frames, layers=layers)
    check_result_options(k_outliers, zeta, star_reference, model.d_model)  # fail before the long pass
    for batch in iter_capture(
        model,
        texts,
        sites=state.sites,
        layers=state.layers,
        batch_size=batch_size,
        max_length=max_length,
        progress=progress,
    ):
        state.update(batch)
    return state.result(k_outliers=k_outliers, zeta=zeta, star_reference=star_reference)
