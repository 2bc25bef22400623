r"""Residual decomposition: how each layer's residual is built from its components, streamed.

Mickus, Paperno & Constant 2022, "How to Dissect a Muppet"; Mickus & Vazquez, "Why bother with
geometry? On the relevance of linear decompositions of Transformer embeddings", BlackboxNLP 2023. The
residual after block ``l`` is a sum of components, ``e = x_embed + sum_{j <= l} (x_attn_j + x_mlp_j) +
remainder``; for Llama-style models (no biases, pre-norm) the remainder is zero up to float rounding,
and we report it rather than assume it. Per component ``k``, token and layer: ``spim_k = <x_k, e> /
||e||^2`` (sums to 1 over the components), ``cos_k = cos(x_k, e)``, ``dist_k = ||x_k - e||`` and
``norm_ratio_k = ||x_k|| / ||e||``, summarised over tokens by mean and standard deviation (streamed; no
token is kept). The decomposition reads the raw activations (no frame: the components add up only there).

Example:
    >>> dec = decomposition_by_layer(model, corpus, layers=[5, 29])  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Sequence

import pandas as pd
import torch

from ..core.capture import ActivationBatch, check_layers, iter_capture
from ..core.distributed import all_reduce_max
from ..core.errors import InputError, check_positive_int
from ..core.models import HookedModel
from ..core.stats import RunningScalars, Stat

_DECOMP_STATS = ("spim", "cos", "dist", "norm_ratio")
#: Sites a decomposition needs in each captured batch.
DECOMPOSITION_SITES = ("embed", "attn_out", "mlp_out", "resid_post")


class DecompositionAccumulator(Stat):
    """Streaming residual decomposition: feed captured batches, read the tidy table (see
    :func:`decomposition_by_layer` for the indicators and the columns).

    Each batch must hold :data:`DECOMPOSITION_SITES` for the blocks :attr:`capture_layers`
    (``0..max(layers)``); extra sites or layers are ignored, so one capture can serve several analyses.
    Only running means and variances are kept (no token), in float64.

    Args:
        n_layers: the model's number of layers.
        layers: residual layers to decompose (``None`` = all).
        token_chunk: tokens per float64 working block (bounds memory to
            ``(2 n_layers + 2) x token_chunk x d_model`` doubles).

    Example:
        >>> acc = DecompositionAccumulator(model.n_layers, layers=[5, 29])             # doctest: +SKIP
        >>> for batch in iter_capture(model, corpus, sites=DECOMPOSITION_SITES,        # doctest: +SKIP
        ...                           layers=acc.capture_layers):
        ...     acc.update(batch)
        >>> acc.table().query("layer == 29").head()                                  # doctest: +SKIP
    """

    def __init__(self, n_layers: int, layers: int | Sequence[int] | None = None, *, token_chunk: int = 256):
        check_positive_int(token_chunk, "token_chunk")
        self.targets = check_layers(layers, n_layers)
        #: Blocks whose outputs the batches must hold.
        self.capture_layers = list(range(max(self.targets) + 1))
        self.token_chunk = token_chunk
        self.n_comp = 2 * len(self.capture_layers) + 1  # embed, attn_0, mlp_0, attn_1, mlp_1, ...
        # Streams: [target layer, component (the remainder in the last slot)].
        shape = (len(self.targets), self.n_comp + 1)
        self.running = {name: RunningScalars(shape) for name in _DECOMP_STATS}
        self.max_abs = torch.zeros(len(self.targets), dtype=torch.float64)
        self.max_rel = torch.zeros(len(self.targets), dtype=torch.float64)

    def update(self, batch: ActivationBatch) -> "DecompositionAccumulator":
        """Fold one captured batch in; returns ``self``."""
        missing = [site for site in DECOMPOSITION_SITES if site not in batch.acts]
        if missing:
            raise InputError(f"the batch lacks sites {missing}; capture with sites={DECOMPOSITION_SITES}.")
        absent = sorted(set(self.capture_layers) - set(batch.layers))
        if absent:
            raise InputError(f"the batch lacks layers {absent}; capture with layers={self.capture_layers}.")
        index = [batch.layers.index(j) for j in self.capture_layers]
        acts = batch.acts
        attn, mlp = acts["attn_out"], acts["mlp_out"]
        if index == list(range(len(index))):  # the usual leading block of layers: views, no copy
            attn, mlp = attn[: len(index)], mlp[: len(index)]
        else:
            attn, mlp = attn[index], mlp[index]
        resid_rows = torch.tensor([batch.layers.index(layer) for layer in self.targets])
        # Components used by each target layer: embed + attn/mlp of blocks 0..layer.
        target_slot = {layer: i for i, layer in enumerate(self.targets)}
        n_comp = self.n_comp
        for start in range(0, batch.n_tokens, self.token_chunk):
            span = slice(start, start + self.token_chunk)
            # Components in residual order: embed, attn_0, mlp_0, attn_1, mlp_1, ... [n_comp, T, d].
            comps = torch.empty(n_comp, *acts["embed"][0, span].shape, dtype=torch.float64)
            comps[0] = acts["embed"][0, span]
            comps[1::2] = attn[:, span]
            comps[2::2] = mlp[:, span]
            comp_norm = comps.norm(dim=-1)  # [n_comp, T]
            # Residual reconstructed after each block: embed + sum_{j<=l} (attn_j + mlp_j). An in-place
            # running sum (torch.cumsum over the leading axis is several times slower here).
            # Only the target layers' snapshots are kept.
            reconstructed = torch.empty(len(self.targets), *comps.shape[1:], dtype=torch.float64)
            running_sum = comps[0].clone()
            for j in range(len(self.capture_layers)):
                running_sum += comps[2 * j + 1]
                running_sum += comps[2 * j + 2]
                if j in target_slot:
                    reconstructed[target_slot[j]] = running_sum
            # All target layers at once: every (layer, component) stream gets a value per token; the
            # streams of components after a layer (k >= 2 layer + 3) are computed too but never reported.
            e = acts["resid_post"][resid_rows.to(acts["resid_post"].device), span].to(torch.float64)  # [L, T, d]
            e_sq = (e * e).sum(-1)  # [L, T]
            if not bool((e_sq > 0).all()):
                bad = self.targets[int((e_sq <= 0).any(dim=1).nonzero()[0])]
                raise InputError(
                    f"a residual at layer {bad} is all zeros, so its decomposition is undefined; check the model."
                )
            e_norm = e_sq.sqrt()
            remainder = e - reconstructed  # [L, T, d]
            rem_norm = remainder.norm(dim=-1)  # [L, T]
            self.max_abs = torch.maximum(self.max_abs, remainder.abs().amax(dim=(1, 2)))
            self.max_rel = torch.maximum(self.max_rel, (rem_norm / e_norm).amax(dim=1))
            dots = torch.cat(
                [torch.einsum("ltd,ktd->lkt", e, comps), (remainder * e).sum(-1).unsqueeze(1)], dim=1
            )  # [L, n_comp + 1, T]
            norms = torch.cat([comp_norm.expand(len(self.targets), -1, -1), rem_norm.unsqueeze(1)], dim=1)
            e_sq, e_norm = e_sq.unsqueeze(1), e_norm.unsqueeze(1)
            values = {
                "spim": dots / e_sq,
                "cos": torch.where(norms > 0, dots / (norms * e_norm).clamp_min(1e-300), 0.0),
                "dist": (norms.square() - 2 * dots + e_sq).clamp_min(0.0).sqrt(),
                "norm_ratio": norms / e_norm,
            }
            for name, tensor in values.items():
                self.running[name].update(tensor)
        return self

    def state_dict(self) -> dict[str, Any]:
        """The streaming state as plain tensors (for checkpoints; ``torch.load(weights_only=True)``)."""
        return {
            "targets": list(self.targets),
            "running": {name: r.state_dict() for name, r in self.running.items()},
            "max_abs": self.max_abs.clone(),
            "max_rel": self.max_rel.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (same target layers)."""
        if list(state["targets"]) != self.targets:
            raise InputError("the saved decomposition state tracks other layers than this accumulator.")
        for name, saved in state["running"].items():
            self.running[name].load_state_dict(saved)
        self.max_abs, self.max_rel = state["max_abs"].clone(), state["max_rel"].clone()

    def merge(self, other: "DecompositionAccumulator") -> "DecompositionAccumulator":
        """Fold an accumulator over other tokens (same layers) into this one; returns ``self``."""
        if not isinstance(other, DecompositionAccumulator) or other.targets != self.targets:
            raise InputError("DecompositionAccumulator.merge expects an accumulator over the same layers.")
        for name, running in self.running.items():
            running.merge(other.running[name])
        self.max_abs = torch.maximum(self.max_abs, other.max_abs)
        self.max_rel = torch.maximum(self.max_rel, other.max_rel)
        return self

    def result(self) -> pd.DataFrame:
        """The tidy table over every token folded in so far (see :meth:`table`)."""
        return self.table()

    def all_reduce(self, env: Any) -> None:
        """Combine the state of every ``torch.distributed`` rank in place; every rank gets it."""
        if not env.active:
            return
        for running in self.running.values():
            running.all_reduce(env)
        self.max_abs = all_reduce_max(self.max_abs, env)
        self.max_rel = all_reduce_max(self.max_rel, env)

    def table(self) -> pd.DataFrame:
        """The tidy table over every token folded in so far (columns: :func:`decomposition_by_layer`)."""
        rows = []
        names = ["embed"] + [f"{kind}_{j}" for j in self.capture_layers for kind in ("attn", "mlp")]
        for t, layer in enumerate(self.targets):
            n_used = 2 * layer + 3
            for slot in list(range(n_used)) + [self.n_comp]:
                if slot == self.n_comp:
                    component, kind, comp_layer = "remainder", "remainder", layer
                else:
                    component = names[slot]
                    kind = component.split("_")[0]
                    comp_layer = -1 if slot == 0 else (slot - 1) // 2
                row = {
                    "layer": layer,
                    "component": component,
                    "component_layer": comp_layer,
                    "kind": kind,
                    "n_tokens": int(self.running["spim"].count[t, slot]),
                }
                for name in _DECOMP_STATS:
                    row[f"{name}_mean"] = float(self.running[name].mean[t, slot])
                    row[f"{name}_std"] = float(self.running[name].std()[t, slot])
                row["reconstruction_error"] = float(self.max_abs[t])
                row["reconstruction_rel_error"] = float(self.max_rel[t])
                rows.append(row)
        return pd.DataFrame(rows)


def decomposition_by_layer(
    model: HookedModel,
    texts: str | Sequence[str],
    *,
    layers: int | Sequence[int] | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    token_chunk: int = 256,
    progress: bool = False,
) -> pd.DataFrame:
    """Decompose each layer's residual into its components and measure each one's contribution.

    The residual after block ``l`` (``resid_post``) is ``e = embed + sum_{j<=l} (attn_j + mlp_j) +
    remainder``; ``remainder = e - sum`` is reported as a component. For Llama-style models (no biases,
    rotary positions) it is float rounding (~1e-6 of ``||e||`` on SmolLM2); for models with learned
    positional embeddings (GPT-2 style) it also holds the positional embedding, which no captured
    site includes. One streaming pass captures ``embed``,
    ``attn_out``, ``mlp_out`` and ``resid_post`` for blocks ``0..max(layers)``; per token the four
    indicators of Mickus & Vazquez (2023) are computed in float64 and folded into running means and
    variances, so no token is kept. ``spim`` sums to exactly 1 over the components (remainder
    included), per token and hence in the means. The work per batch is a
    :class:`DecompositionAccumulator`, which a streaming analysis that already captures these sites
    (the report) can feed directly.

    Args:
        model: a :class:`~vsem_lens.core.models.HookedModel`.
        texts: one text or a list of texts.
        layers: residual layers to decompose (``None`` = all).
        batch_size, max_length, progress: as in :func:`~vsem_lens.core.capture.iter_capture`.
        token_chunk: tokens per float64 working block (bounds memory to
            ``(2 n_layers + 2) x token_chunk x d_model`` doubles).

    Returns:
        A tidy DataFrame, one row per (layer, component): ``layer, component`` (``embed``,
        ``attn_3``, ``mlp_3``, ``remainder``), ``component_layer`` (the block index; -1 for the
        embedding, ``layer`` for the remainder), ``kind`` (``embed``/``attn``/``mlp``/``remainder``),
        ``n_tokens``, ``spim_mean, spim_std, cos_mean, cos_std, dist_mean, dist_std,
        norm_ratio_mean, norm_ratio_std`` (std: sample std over tokens, ddof=1), and per layer
        ``reconstruction_error`` (max abs difference between the sum of components and
        ``resid_post`` over tokens and dimensions) and ``reconstruction_rel_error`` (max over tokens of
        ``||remainder|| / ||e||``).

    Example:
        >>> dec = decomposition_by_layer(model, corpus, layers=[29])                  # doctest: +SKIP
        >>> dec.groupby("kind").spim_mean.sum()                                       # doctest: +SKIP
    """
    acc = DecompositionAccumulator(model.n_layers, layers, token_chunk=token_chunk)
    for batch in iter_capture(
        model,
        texts,
        sites=DECOMPOSITION_SITES,
        layers=acc.capture_layers,
        batch_size=batch_size,
        max_length=max_length,
        progress=progress,
    ):
        acc.update(batch)
    return acc.table()

