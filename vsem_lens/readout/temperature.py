"""A temperature for vocabulary affinity: the ``T`` that makes ``softmax(cos / T)`` closest to the model.

Gu et al.'s affinity probabilities are a softmax over cosines with no temperature. Cosines lie in
``[-1, 1]``, so over a whole vocabulary that softmax is close to uniform, and its KL to the model's
final distribution is close to ``log2 V - H(final)`` whatever the layer says (docs/concepts/affinity.md).
A per-layer temperature, fitted on a sample of tokens, gives the probabilities a scale:

    T_l = argmin_T  mean_tokens KL(p_final || softmax(cos(s, lens(h_l)) / T)).

With ``beta = 1 / T`` the objective is ``mean_t [sum_v p log p - beta E_p[c] + logsumexp(beta c)]``:
convex in ``beta`` (its second derivative is the variance of the cosines under the tempered softmax),
with first derivative ``E_q[c] - E_p[c]``. One pass over the sample gives the value and both
derivatives for every layer, so the fit is a safeguarded Newton iteration on ``beta`` (kept inside a
bracket of sign changes of the derivative), usually 6-10 passes. The scores come chunk by chunk from
the readout kernel (:meth:`~vsem_lens.readout.kernel.ReadoutKernel.iter_scores`): a
[layers, tokens, vocab] tensor is never built. The temperature changes no ranking: ranks and top-k
are the same as untempered; only probabilities and KL change.

Example:
    >>> fit = fit_affinity_temperature(model, sample_texts)            # doctest: +SKIP
    >>> fit.temperature[-1], fit.kl_bits[-1], fit.kl_bits_untempered[-1]  # doctest: +SKIP
    (0.021, 5.1, 11.6)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..core.capture import iter_capture
from ..core.errors import InputError, NumericalError, check_positive_int
from ..core.models import HookedModel
from ..lenses.base import Lens
from .basis import SemanticBasis
from .kernel import LN2, ReadoutKernel

__all__ = [
    "TemperatureFit",
    "affinity_kl_at",
    "fit_affinity_temperature",
    "fit_temperature",
    "solve_inverse_temperature",
    "tempered_moments",
]

#: Temperatures are searched in [1 / BETA_MAX, 1 / BETA_MIN].
BETA_MIN, BETA_MAX = 1e-6, 1e6
#: Rows per sub-chunk of the tempered softmax (small buffers that stay in the CPU caches).
SUB_ROWS = 32

#: (beta [group]) -> per group: the mean objective (nats), its first and second derivative in beta.
Objective = Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]


@dataclass
class TemperatureFit:
    """Fitted temperatures, one per group (layer), with the KL they reach on the fitting sample.

    Attributes:
        temperature: ``T`` [group] (float64); ``softmax(scores / T)`` is the tempered readout.
        kl_bits: mean KL(final || tempered readout) at ``T`` on the sample [group], bits.
        kl_bits_untempered: the same at ``T = 1`` (the paper's definition) [group], bits.
        n_tokens: tokens in the sample.
        iterations: Newton passes over the sample.
        layers: the layers of the groups (``None`` for :func:`fit_temperature`).
        at_bound: groups whose optimum lies at a search bound (``T`` then is that bound).

    Example:
        >>> fit = fit_temperature(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([[0.2, 0.8], [0.8, 0.2]]))
        >>> round(float(fit.temperature[0]), 4), fit.to_dict()["n_tokens"]
        (0.7213, 2)
    """

    temperature: Float[Tensor, " group"]
    kl_bits: Float[Tensor, " group"]
    kl_bits_untempered: Float[Tensor, " group"]
    n_tokens: int
    iterations: int
    layers: list[int] | None = None
    at_bound: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready fields.

        Example:
            >>> sorted(fit.to_dict())[:3]  # doctest: +SKIP
            ['at_bound', 'iterations', 'kl_bits']
        """
        return {
            "temperature": self.temperature.tolist(), "kl_bits": self.kl_bits.tolist(),
            "kl_bits_untempered": self.kl_bits_untempered.tolist(), "n_tokens": self.n_tokens,
            "iterations": self.iterations, "layers": self.layers, "at_bound": self.at_bound,
        }


def _check_finite(tensor: Tensor, name: str) -> None:
    if not torch.isfinite(tensor).all():
        raise InputError(f"{name} has NaN or infinite values.")


def tempered_moments(
    scores: Float[Tensor, "row vocab"],
    p: Float[Tensor, "row vocab"],
    neg_entropy: Float[Tensor, " row"],
    beta: Float[Tensor, " row"],
) -> tuple[Float[Tensor, " row"], Float[Tensor, " row"], Float[Tensor, " row"]]:
    """Per row: ``KL(p || softmax(beta * scores))`` (nats) and its first and second derivative in ``beta``.

    ``d/dbeta = E_q[s] - E_p[s]`` and ``d2/dbeta2 = Var_q[s]`` with ``q = softmax(beta * s)``; results are
    float64. Works in sub-chunks of :data:`SUB_ROWS` rows, so the extra memory is a few ``[32, vocab]``
    buffers.

    Example:
        >>> s = torch.tensor([[0.0, 1.0]]); p = torch.tensor([[0.5, 0.5]])
        >>> kl, d1, d2 = tempered_moments(s, p, (p * p.log()).sum(1), torch.tensor([0.0]))
        >>> round(float(kl), 6), round(float(d1), 6), round(float(d2), 6)
        (0.0, 0.0, 0.25)
    """
    kl, d1, d2 = (torch.empty(scores.shape[0], dtype=torch.float64, device=scores.device) for _ in range(3))
    for a in range(0, scores.shape[0], SUB_ROWS):
        s, pa = scores[a : a + SUB_ROWS], p[a : a + SUB_ROWS]
        z = s * beta[a : a + SUB_ROWS, None].to(s.dtype)
        lse = torch.logsumexp(z, dim=-1)
        q = torch.exp(z.sub_(lse[:, None]))
        e_q = (q * s).sum(-1)
        e_q2 = (q * s * s).sum(-1)
        e_p = (pa * s).sum(-1)
        b = beta[a : a + SUB_ROWS].double()
        kl[a : a + SUB_ROWS] = neg_entropy[a : a + SUB_ROWS].double() - b * e_p.double() + lse.double()
        d1[a : a + SUB_ROWS] = e_q.double() - e_p.double()
        d2[a : a + SUB_ROWS] = (e_q2.double() - e_q.double().square()).clamp_min(0.0)
    return kl.clamp_min(0.0), d1, d2


def solve_inverse_temperature(
    objective: Objective, n_groups: int, *, beta0: float = 1.0, tol: float = 1e-6, max_iter: int = 60
) -> tuple[Tensor, Tensor, Tensor, int, list[int]]:
    """Minimise a convex function of ``beta`` per group: safeguarded Newton inside a sign-change bracket.

    Args:
        objective: ``beta [group] -> (value, first, second derivative) [group]`` (one pass over the data).
        beta0: the starting point (1: the first pass also gives the untempered value).
        tol: stop when every group's ``|log beta|`` step is below ``tol``.

    Returns:
        ``(beta, value at beta, value at beta0, passes, groups at a bound)``.

    Example:
        >>> f = lambda b: ((b - 3) ** 2, 2 * (b - 3), torch.full_like(b, 2.0))
        >>> round(float(solve_inverse_temperature(f, 1)[0][0]), 6)
        3.0
    """
    beta = torch.full((n_groups,), float(beta0), dtype=torch.float64)
    lo = torch.full_like(beta, 0.0)
    hi = torch.full_like(beta, math.inf)
    active = torch.ones(n_groups, dtype=torch.bool)
    value0 = value = None
    passes = 0
    while passes < max_iter:
        value, d1, d2 = (t.double() for t in objective(beta))
        passes += 1
        if value0 is None:
            value0 = value.clone()
        if not (torch.isfinite(value).all() and torch.isfinite(d1).all() and torch.isfinite(d2).all()):
            raise NumericalError("the temperature objective became NaN/inf.")
        if not active.any():
            break
        lo = torch.where(active & (d1 < 0), beta, lo)
        hi = torch.where(active & (d1 > 0), beta, hi)
        newton = torch.where(d2 > 0, beta - d1 / d2.clamp_min(1e-300), torch.where(d1 < 0, math.inf, 0.0))
        inside = (newton > lo) & (newton < hi)
        fallback = torch.where(torch.isinf(hi), beta * 16, torch.where(lo == 0, beta / 16, (lo * hi).sqrt()))
        new = torch.where(inside, newton, fallback)
        new = torch.minimum(torch.maximum(new, beta / 16), beta * 16).clamp(BETA_MIN, BETA_MAX)
        new = torch.where(d1 == 0, beta, new)
        step = (new.log() - beta.log()).abs()
        beta = torch.where(active, new, beta)
        active &= step > tol
        if not active.any():
            value, _, _ = (t.double() for t in objective(beta))
            passes += 1
            break
    at_bound = [i for i, b in enumerate(beta.tolist()) if b <= BETA_MIN * (1 + 1e-9) or b >= BETA_MAX * (1 - 1e-9)]
    return beta, value, value0, passes, at_bound


def fit_temperature(
    scores: Float[Tensor, "token vocab"] | Float[Tensor, "token group vocab"],
    target: Float[Tensor, "token vocab"],
    *,
    log_target: bool = False,
    tol: float = 1e-6,
) -> TemperatureFit:
    """The temperature minimising ``mean_t KL(target_t || softmax(scores_t / T))``, per group.

    Args:
        scores: readout scores (e.g. cosines) [token, vocab], or [token, group, vocab] for one ``T`` per group.
        target: the reference distribution per token [token, vocab] (probabilities, or log-probabilities
            with ``log_target``); shared by the groups of a token.

    Raises:
        InputError: no tokens, mismatched shapes, non-finite values, or a target that is not a distribution.

    Example:
        >>> logits = torch.randn(50, 10, dtype=torch.float64)
        >>> fit = fit_temperature(logits * 0.5, torch.softmax(logits, -1))
        >>> round(float(fit.temperature[0]), 4)
        0.5
    """
    if scores.ndim == 2:
        scores = scores[:, None, :]
    if scores.ndim != 3 or target.ndim != 2:
        raise InputError(f"scores must be [token, (group,) vocab] and target [token, vocab]; got "
                         f"{tuple(scores.shape)} and {tuple(target.shape)}.")
    n_tok, n_groups, vocab = scores.shape
    if n_tok == 0 or vocab == 0:
        raise InputError("cannot fit a temperature on an empty sample.")
    if target.shape != (n_tok, vocab):
        raise InputError(f"target has shape {tuple(target.shape)}, expected {(n_tok, vocab)}.")
    _check_finite(scores, "scores")
    if log_target:
        logp = target.to(scores.dtype)
        if torch.isnan(logp).any() or (logp == math.inf).any():
            raise InputError("target has NaN or +inf log-probabilities.")
        p = logp.exp()
    else:
        _check_finite(target, "target")
        p = target.to(scores.dtype)
        if (p < 0).any():
            raise InputError("target has negative probabilities.")
        logp = p.log()
    if not torch.allclose(p.sum(-1).double(), torch.ones(n_tok, dtype=torch.float64), atol=1e-4):
        raise InputError("every target row must sum to 1.")
    neg_entropy = torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
    flat = scores.reshape(n_tok * n_groups, vocab)
    p_rows = p.repeat_interleave(n_groups, dim=0)
    h_rows = neg_entropy.repeat_interleave(n_groups)

    def objective(beta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        kl, d1, d2 = tempered_moments(flat, p_rows, h_rows, beta.repeat(n_tok))
        return tuple(t.view(n_tok, n_groups).mean(0) for t in (kl, d1, d2))

    beta, value, value0, passes, at_bound = solve_inverse_temperature(objective, n_groups, tol=tol)
    return TemperatureFit(1.0 / beta, value / LN2, value0 / LN2, n_tok, passes, at_bound=at_bound)


def _sample_residuals(model: HookedModel, texts: str | Sequence[str], kernel: ReadoutKernel, batch_size: int,
                      max_length: int | None) -> tuple[Tensor, Tensor, list[int], int]:
    """The sample's ``resid_post`` at the kernel's capture layers [layer, token, d], the tokens' text index,
    and where the read layers and the last layer sit.
    """
    check_positive_int(batch_size, "batch_size")
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise InputError("cannot fit a temperature on an empty sample (no texts).")
    parts, docs, batch_layers = [], [], kernel.capture_layers
    for batch in iter_capture(model, texts, layers=kernel.capture_layers, batch_size=batch_size,
                              max_length=max_length):
        parts.append(batch.acts["resid_post"])
        docs.append(batch.doc_index)
        batch_layers = batch.layers
    if not parts or sum(part.shape[1] for part in parts) == 0:
        raise InputError("cannot fit a temperature on an empty sample (no tokens).")
    rows, last = kernel.rows_of(batch_layers)
    return torch.cat(parts, dim=1), torch.cat(docs), rows, last


def _kernel_objective(kernel: ReadoutKernel, resid: Tensor, rows: list[int], last: int) -> Objective:
    n_layers = len(kernel.layers)

    def objective(beta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        total = torch.zeros(3, n_layers, dtype=torch.float64)
        for scores, p, neg_entropy in kernel.iter_scores(resid, rows, last, "affinity"):
            t = scores.shape[0]
            flat = scores.reshape(t * n_layers, -1)
            moments = tempered_moments(flat, p.repeat_interleave(n_layers, dim=0),
                                       neg_entropy.repeat_interleave(n_layers), beta.repeat(t))
            total += torch.stack([m.view(t, n_layers).sum(0) for m in moments])
        return tuple(total / resid.shape[1])

    return objective


def _affinity_kernel(model: HookedModel, basis: SemanticBasis | None, frame: str | Lens | None,
                     layers: int | Sequence[int] | None) -> ReadoutKernel:
    return ReadoutKernel.for_model(model, basis=basis, frame=frame, layers=layers, readouts=("affinity",), k=1)


def fit_affinity_temperature(
    model: HookedModel,
    texts: str | Sequence[str],
    *,
    basis: SemanticBasis | None = None,
    frame: str | Lens | None = None,
    layers: int | Sequence[int] | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    tol: float = 1e-5,
) -> TemperatureFit:
    """Per layer, the temperature of vocabulary affinity that minimises the mean KL to the model's final
    distribution over the tokens of ``texts`` (every position; the whole vocabulary).

    The sample's ``resid_post`` is captured once (``[layer, token, d_model]``); each Newton pass then
    reads it through the readout kernel chunk by chunk. Fit on texts other than those you evaluate on
    (:func:`affinity_kl_at` gives the KL of given temperatures on other texts).

    Raises:
        InputError: no texts or no tokens.

    Example:
        >>> fit = fit_affinity_temperature(model, corpus[:16], max_length=64)   # doctest: +SKIP
        >>> fit.temperature.shape                                               # doctest: +SKIP
        torch.Size([30])
    """
    kernel = _affinity_kernel(model, basis, frame, layers)
    resid, _, rows, last = _sample_residuals(model, texts, kernel, batch_size, max_length)
    beta, value, value0, passes, at_bound = solve_inverse_temperature(
        _kernel_objective(kernel, resid, rows, last), len(kernel.layers), tol=tol
    )
    kernel.release()
    return TemperatureFit(1.0 / beta, value / LN2, value0 / LN2, int(resid.shape[1]), passes,
                          layers=list(kernel.layers), at_bound=[kernel.layers[i] for i in at_bound])


def affinity_kl_at(
    model: HookedModel,
    texts: str | Sequence[str],
    temperature: Float[Tensor, " layer"] | Iterable[float],
    *,
    basis: SemanticBasis | None = None,
    frame: str | Lens | None = None,
    layers: int | Sequence[int] | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
) -> tuple[Float[Tensor, "layer token"], Int[Tensor, " token"]]:
    """Per layer and token, KL(final || softmax(affinity / T_l)) in bits, with the tokens' text index.

    ``temperature`` has one value per read layer (e.g. :attr:`TemperatureFit.temperature` of a fit on
    other texts); ``T = 1`` everywhere gives the untempered KL of :func:`~vsem_lens.readout.affinity.
    layerwise_affinity`.

    Example:
        >>> kl, doc = affinity_kl_at(model, heldout, fit.temperature)   # doctest: +SKIP
        >>> kl.mean(dim=1)  # per layer                                 # doctest: +SKIP
    """
    kernel = _affinity_kernel(model, basis, frame, layers)
    temperature = torch.as_tensor(list(temperature) if not isinstance(temperature, Tensor) else temperature,
                                  dtype=torch.float64)
    if temperature.shape != (len(kernel.layers),):
        raise InputError(f"need one temperature per layer ({len(kernel.layers)}), got {tuple(temperature.shape)}.")
    _check_finite(temperature, "temperature")
    if (temperature <= 0).any():
        raise InputError("temperatures must be positive.")
    resid, doc_index, rows, last = _sample_residuals(model, texts, kernel, batch_size, max_length)
    n_layers = len(kernel.layers)
    beta = 1.0 / temperature
    parts = []
    for scores, p, neg_entropy in kernel.iter_scores(resid, rows, last, "affinity"):
        t = scores.shape[0]
        kl, _, _ = tempered_moments(scores.reshape(t * n_layers, -1), p.repeat_interleave(n_layers, dim=0),
                                    neg_entropy.repeat_interleave(n_layers), beta.repeat(t))
        parts.append(kl.view(t, n_layers))
    kernel.release()
    return torch.cat(parts).T.contiguous() / LN2, doc_index
