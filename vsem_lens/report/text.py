"""The words of a report: highlights, figure descriptions, section guides, and the run facts of the summary.

Example:
    >>> figure_description("affinity_map_2").startswith("Heatmap")
    True
"""

from __future__ import annotations

import platform
import re
from typing import Any

import pandas as pd

from ..core.models import HookedModel
from .record import Report, Section

BOS_DESCRIPTION = (
    "Token ids are exactly what the model's HF tokenizer produces (its default special tokens); "
    "prepend_bos=True forces a BOS token first (TransformerLens's convention). Padding never enters a "
    "statistic."
)


def versions() -> dict[str, str]:
    """Versions of the packages that determine the results.

    Example:
        >>> {"torch", "transformers", "transformer-lens", "vsem-lens"} <= set(versions())
        True
    """
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("vsem-lens", "torch", "transformers", "transformer-lens", "plotly", "numpy", "pandas"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def model_facts(model: HookedModel, vocab_len: int) -> dict[str, Any]:
    """Name, sizes, parameter count (shared tensors once), dtype, device and BOS rule of ``model``.

    Example:
        >>> model_facts(model, len(model.tokenizer))["n_layers"]   # doctest: +SKIP
        30
    """
    seen, n_params = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n_params += p.numel()
    return {
        "name": model.name,
        "n_layers": model.n_layers,
        "d_model": model.d_model,
        "d_vocab": model.d_vocab,
        "tokenizer_vocab": vocab_len,
        "n_ctx": model.n_ctx,
        "n_parameters": n_params,
        "dtype": str(model.dtype).replace("torch.", ""),
        "device": str(model.device),
        "fingerprint": model.fingerprint,
        "prepend_bos": model.prepend_bos,
    }


def highlights(formation: pd.DataFrame, iso: pd.DataFrame, dec: pd.DataFrame, coh: pd.DataFrame) -> list[str]:
    """A few plain-language findings computed from the tables (shown at the top of the page).

    Example:
        >>> highlights(formation, iso_df, decomposition, coherence.summary)[0]   # doctest: +SKIP
    """
    out = []
    lens = formation[formation["readout"] == "lens"].sort_values("layer")
    if len(lens):
        zero = (lens["rank_median"] == 0).tolist()
        if zero and zero[-1]:
            first = len(zero) - next(i for i, z in enumerate(reversed(zero)) if not z) if not all(zero) else 0
            out.append(
                f"The logit lens's top-1 matches the model's prediction for most sampled tokens (median rank 1) "
                f"from layer {int(lens['layer'].iloc[first])} on."
            )
        below = lens[lens["kl_bits_mean"] < 1.0]
        if len(below):
            out.append(f"Mean KL(final || logit lens) falls below 1 bit at layer {int(below['layer'].iloc[0])}.")
        mid = lens.iloc[len(lens) // 2]
        out.append(
            f"At layer {int(mid['layer'])} the logit lens agrees with the final top-1 on "
            f"{100 * mid['top1_agreement']:.0f}% of sampled tokens."
        )
    aff = formation[formation["readout"] == "affinity"].sort_values("layer")
    if len(aff):
        best = aff.loc[aff["top1_agreement"].idxmax()]
        out.append(
            f"Vocabulary affinity agrees best with the final prediction at layer {int(best['layer'])} "
            f"({100 * best['top1_agreement']:.0f}% top-1 agreement)."
        )
    raw = iso[(iso["frame"] == "raw") & (iso["site"] == "resid_post")]
    if len(raw):
        low = raw.loc[raw["isoscore"].idxmin()]
        out.append(
            f"The raw residual is least isotropic at layer {int(low['layer'])} (IsoScore {low['isoscore']:.3f}, "
            f"participation ratio {low['participation_ratio']:.1f}); its top outlier dimension there is "
            f"{low['outlier_dims'][0]} ({100 * low['outlier_shares'][0]:.0f}% of the variance)."
        )
    if len(coh) == 2 and "which" in coh:
        s = coh.set_index("which")
        out.append(
            f"Mean |cosine| between token vectors: {s.loc['semantic_basis', 'mean_abs_cos']:.3f} for semantic bases "
            f"vs {s.loc['unembedding', 'mean_abs_cos']:.3f} for unembedding columns."
        )
    return out


FIGURE_DESCRIPTIONS = {
    "affinity_map": "Heatmap, layer x position of one example text: cell text = top-1 token by vocabulary affinity "
    "(cosine to the semantic bases); colour = cosine of the residual with the basis vector of the model's final "
    "prediction; hover = top-k affinity tokens with cosines, logit lens top-1, ranks.",
    "prediction_formation": "Per layer over the sampled tokens, for the logit lens and vocabulary affinity: rank of the "
    "model's final top-1 token (median, IQR band), top-1 agreement, its probability (mean, IQR band) and "
    "KL(final || readout) in bits (mean, IQR band).",
    "isotropy": "IsoScore, IsoScore*, average cosine and top-k outlier variance share per layer in the raw and "
    "final-norm frames, and the participation ratio (effective dimensions).",
    "outlier_dimensions": "Variance share of the top-k coordinate dimensions per layer (dropdown: frame).",
    "coherence_histogram": "Histogram of pairwise cosines of a token sample: semantic basis vectors vs unembedding "
    "columns.",
    "leverage": "Leverage P_ii of every token (diagonal of the projector pinv(W_U) W_U), sorted, extremes marked.",
    "components": "Per layer, the share of the residual (spim = <x_k, e>/||e||^2, summed per kind) and the mean cosine "
    "with the residual of the embedding, attention, MLP and remainder components.",
    "timings": "Wall time per stage of the run.",
}


def figure_description(key: str) -> str:
    """The description of figure ``key`` (numbered figures share one: ``affinity_map_2`` -> ``affinity_map``).

    Example:
        >>> figure_description("timings")
        'Wall time per stage of the run.'
    """
    return FIGURE_DESCRIPTIONS.get(re.sub(r"_\d+$", "", key), "")


# Long because it is the page's prose: five literal reading guides, kept together so the page reads in order.
def sections(report: Report, example_meta: list[dict[str, Any]]) -> list[Section]:
    """The five sections of the page (titles, reading guides filled in from the summary, figure keys).

    Example:
        >>> [s.key for s in sections(report, example_meta)][:2]   # doctest: +SKIP
        ['affinity-map', 'prediction']
    """
    s = report.summary
    p, tok = s["parameters"], s["tokens"]
    frame = p["frame"]
    frame_words = {
        "final_norm": "after the model's own final norm (the logit-lens convention)",
        "raw": "as it is (raw frame, no final norm)",
        "tuned": "through the tuned lens",
    }[frame]
    maps = [k for k in report.figures if k.startswith("affinity_map_")]
    iso_attrs = p.get("isotropy", {})
    coh_n = p.get("coherence_sample")
    captions = {}
    for key, meta in zip(maps, example_meta):
        shown = f"first {meta['n_tokens']} of {meta['n_tokens_full']} tokens" if meta["n_tokens_full"] > meta["n_tokens"] else f"{meta['n_tokens']} tokens"
        captions[key] = f"Example {meta['index'] + 1} ({shown}): {meta['text']}"
    return [
        Section(
            "affinity-map",
            "1. Layerwise affinity map",
            "Each panel is one example text: columns are input positions (the input token below, the model's "
            "next-token prediction on top), rows are layers (the residual stream after each block, read "
            f"{frame_words}). The text in a cell is the vocabulary token whose semantic basis vector "
            "(a row of pinv(W_U)) has the highest cosine with the residual: what the layer says in the model's "
            "own vocabulary coordinates. The colour is the cosine with the basis vector of the token the model "
            "finally predicts at that position, so warm cells show where the eventual prediction is already "
            "present. Hover a cell for the top-5 tokens by affinity with their cosines, the logit lens's top-1 "
            "and the ranks of the final prediction. Affinity is a whitened, per-token-normalised logit lens, so "
            "in early layers its top-1 often differs from the logit lens's.",
            maps,
            captions,
        ),
        Section(
            "prediction",
            "2. When does the prediction form?",
            f"For {tok['lens_tokens']:,} tokens sampled uniformly from the corpus (seed {p['seed']}), every "
            "layer's residual is read out over the whole vocabulary and compared with the model's own next-token "
            "distribution at the same position. Top left: rank of the model's final top-1 token in the readout "
            "(1 = the readout's top-1 already agrees; line = median, band = interquartile range; log scale). Top "
            "right: fraction of tokens whose readout top-1 equals the final prediction. Bottom: the probability "
            "the readout gives to that token and KL(final || readout) in bits (line = mean, band = interquartile "
            "range). The layer where the rank drops to 1 and the KL falls is where the prediction forms. "
            "Vocabulary affinity appears in the top panels only: as a softmax over cosines in [-1, 1] (no "
            "temperature, as in Gu et al.) its probabilities stay near 1/V and its KL near log2 V minus the final "
            "entropy on every layer, so they are uninformative and not drawn; read affinity by rank and agreement "
            "(or fit a temperature, vsem_lens.readout.temperature, for probabilities with a scale).",
            ["prediction_formation"],
        ),
        Section(
            "isotropy",
            "3. Isotropy by layer",
            f"Isotropy of the residual stream over all {tok['corpus_tokens']:,} corpus tokens, layer by layer, in "
            "the raw residual and after the model's final norm. IsoScore (Rudman et al. 2022) is 1 when the "
            "variance is spread evenly over all d_model dimensions and 0 when a single direction holds it; "
            f"IsoScore* shrinks the covariance by zeta = {iso_attrs.get('zeta')} toward an isotropic reference "
            f"({iso_attrs.get('star_reference')}) and is steadier; the participation ratio is the effective number "
            "of dimensions (IsoScore = (PR - 1)/(d - 1)). The average cosine between token vectors is shown because "
            "it is common, but it measures a shared mean direction, not isotropy. Below: the coordinate dimensions "
            "with the largest variance share per layer (outlier dimensions; the menu switches frames), which drive "
            "IsoScore toward 0; the final norm's gain can damp or amplify them.",
            ["isotropy", "outlier_dimensions"],
        ),
        Section(
            "disentanglement",
            "4. Disentanglement",
            f"Basis view: pairwise cosines between the semantic basis vectors of {coh_n:,} random tokens and between "
            "the unembedding columns of the same tokens. The pseudoinverse whitens the unembedding, so semantic "
            "bases are usually closer to orthogonal (a distribution concentrated near 0). Leverage P_ii = s_i . w_i "
            "is each token's diagonal entry of the projector pinv(W_U) W_U; it sums to d_model, and low-leverage "
            "tokens are hard to express in the residual stream. Component view (Mickus et al. 2022; Mickus & "
            "Vazquez 2023): the residual after block l is the sum of the embedding and every attention and MLP "
            "output up to l; spim_k = <x_k, e>/||e||^2 is each kind's share of the residual (the kinds sum to 1), "
            "and the cosine shows how aligned a kind's components are with the residual.",
            ["coherence_histogram", "leverage", "components"],
        ),
        Section(
            "run-card",
            "5. Run card",
            "What was run and what it cost. Times are wall-clock seconds on this machine; the peak memory is the "
            "process's peak resident set size (model weights included).",
            ["timings"],
        ),
    ]
