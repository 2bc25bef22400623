"""README blocks of the intermediate-frames study, rendered from its committed outputs only.

Reads results.csv, ablation.csv, summary.json (the main run), affinity_temperature.csv and temperature.json
(the affinity temperature), clip_comparison.csv, clip_comparison.json and training_curves.csv (per-translator
vs global gradient clipping). No model, no vsem_lens import.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from readme_blocks import fmt, markdown_table  # noqa: E402

FRAMES = ("raw", "final_norm", "tuned")
EXCERPT_LENS = (0, 4, 8, 12, 16, 19, 20, 22, 23, 24, 26, 28, 29)
EXCERPT_AFFINITY = (0, 8, 16, 20, 22, 23, 24, 25, 26, 28, 29)
ABLATION_LAYERS = (0, 12, 20, 23, 26, 28, 29)
CLIP_LAYERS = (0, 4, 8, 12, 16, 20, 22, 24, 26, 28)


def _rank(value: float) -> str:
    return f"{value:,.0f}"


def _pct(value: float, digits: int = 0) -> str:
    return f"{100 * value:.{digits}f}%"


def _load(folder: Path) -> dict:
    out = {
        "results": pd.read_csv(folder / "results.csv"),
        "ablation": pd.read_csv(folder / "ablation.csv"),
        "summary": json.loads((folder / "summary.json").read_text()),
        "temperature": pd.read_csv(folder / "affinity_temperature.csv"),
        "temperature_info": json.loads((folder / "temperature.json").read_text()),
        "clip": pd.read_csv(folder / "clip_comparison.csv"),
        "clip_info": json.loads((folder / "clip_comparison.json").read_text()),
        "curves": pd.read_csv(folder / "training_curves.csv"),
    }
    return out


def _series(results: pd.DataFrame, frame: str, readout: str, metric: str) -> pd.Series:
    df = results[(results.frame == frame) & (results.readout == readout)]
    return df.set_index("layer")[metric]


def budget(d: dict) -> str:
    t = d["summary"]["training"]
    rows = [
        ("optimiser", f"{t['optimizer'].upper()}, Nesterov momentum {t['momentum']}, lr {t['lr']}, linear decay to 0, "
                      f"weight decay {t['weight_decay']}, gradient-norm clip {t['max_grad_norm']} "
                      f"{t.get('clip', 'per_translator').replace('_', ' ')} "
                      "(tuned-lens clips the norm over all translators at once; see below)"),
        ("budget", f"{t['steps']} steps x {t['tokens_per_step']} tokens = {t['tokens']:,} tokens "
                   f"({d['summary']['train_texts']} training texts, truncated to {t['max_length']} tokens)"),
        ("loss matmuls", f"{t['unembed_dtype']} (softmax, KL and updates in float32)"),
        ("wall time", f"{t['wall_seconds']:,.1f} s with 1 torch thread, `nice 5`, on a shared 2-core CPU"),
    ]
    return markdown_table([{"k": k, "v": v} for k, v in rows], {"setting": "k", "value": "v"}, align="ll")


def target(d: dict) -> str:
    r, s = d["results"], d["summary"]["tuned_over_final_norm_kl_layers_0_22"]
    fn, tu = _series(r, "final_norm", "lens", "kl_bits"), _series(r, "tuned", "lens", "kl_bits")
    ratio = (tu / fn).loc[0:22]
    worst = int(ratio.idxmax())
    verdict = "met" if s["halved_on_every_layer"] else "not met"
    return (f"**Target (halve the final_norm frame's KL on layers 0-22, held-out text): {verdict}.** The tuned/final_norm "
            f"KL ratio is at most **{s['max']:.2f}** on layers 0-22 (mean {s['mean']:.2f}). The worst layer is {worst} "
            f"({tu[worst]:.2f} vs {fn[worst]:.2f} bits).")


def _frame_table(r: pd.DataFrame, readout: str, layers, kl: bool = True) -> list[dict]:
    rows = []
    for layer in layers:
        row = {"layer": str(layer)}
        for f in FRAMES:
            row[f"kl {f}"] = _series(r, f, readout, "kl_bits")[layer]
            row[f"top1 {f}"] = _series(r, f, readout, "top1_agreement")[layer]
            row[f"rank {f}"] = _series(r, f, readout, "median_rank")[layer]
        rows.append(row)
    return rows


def lens_table(d: dict) -> str:
    rows = _frame_table(d["results"], "lens", EXCERPT_LENS)
    cols = {"layer": "layer"}
    cols |= {f"KL {f}": (lambda row, f=f: fmt(row[f"kl {f}"], 2)) for f in FRAMES}
    cols |= {f"top-1 {f}": f"top1 {f}" for f in FRAMES}
    cols |= {f"rank {f}": (lambda row, f=f: _rank(row[f"rank {f}"])) for f in FRAMES}
    return markdown_table(rows, cols)


def affinity_table(d: dict) -> str:
    rows = _frame_table(d["results"], "affinity", EXCERPT_AFFINITY)
    temp = d["temperature"].set_index("layer")
    for row in rows:
        layer = int(row["layer"])
        row["T"] = f"{temp.temperature[layer]:.4f}"
        row["kl_t"] = fmt(temp.heldout_kl_bits_tempered[layer], 2)
    cols = {"layer": "layer", "T (final_norm)": "T", "KL tempered, final_norm": "kl_t",
            "KL untempered, final_norm (uninformative)": lambda row: fmt(row["kl final_norm"], 2)}
    cols |= {f"top-1 {f}": f"top1 {f}" for f in FRAMES}
    cols |= {f"rank {f}": (lambda row, f=f: _rank(row[f"rank {f}"])) for f in FRAMES}
    return markdown_table(rows, cols)


def findings(d: dict) -> str:
    r, s = d["results"], d["summary"]
    fn_kl, tu_kl, raw_kl = (_series(r, f, "lens", "kl_bits") for f in FRAMES[1:] + FRAMES[:1])
    fn_top1, tu_top1 = _series(r, "final_norm", "lens", "top1_agreement"), _series(r, "tuned", "lens", "top1_agreement")
    tu_rank = _series(r, "tuned", "lens", "median_rank")
    aff_kl = r[r.readout == "affinity"].kl_bits
    aff_rank = _series(r, "final_norm", "affinity", "median_rank")
    tuned_aff_rank = _series(r, "tuned", "affinity", "median_rank")
    tuned_aff_top1 = _series(r, "tuned", "affinity", "top1_agreement")
    ratio = (fn_kl / tu_kl).loc[0:22]
    last = int(r.layer.max())
    h, v = s["final_entropy_bits_mean"], s["kl_of_uniform_readout_bits"] + s["final_entropy_bits_mean"]
    vocab = int(s["frequency"]["n_vocab"])
    chance = (vocab - 1) / 2
    bullets = [
        f"The final_norm logit lens has {fn_kl.loc[0:22].min():.1f}-{fn_kl.loc[0:22].max():.1f} bits of KL on layers "
        f"0-22 and {fn_kl[last - 1]:.2f} bits at layer {last - 1}; it agrees with the final top-1 at most "
        f"{fn_top1.loc[0:18].max():.3f} of the time before layer 19. Full-vocabulary affinity (final_norm) agrees "
        f"{_series(r, 'final_norm', 'affinity', 'top1_agreement')[last]:.3f} of the time at the last layer.",
        f"The tuned lens's KL is {tu_kl[0]:.2f} bits at layer 0 and {tu_kl[22]:.2f} at layer 22, "
        f"{ratio.min():.1f}-{ratio.max():.1f}x below final_norm's on layers 0-22. Its top-1 agreement is "
        f"{tu_top1[0]:.3f} at layer 0 (final_norm: {fn_top1[0]:.3f}), and the final token's median rank is at most "
        f"{tu_rank.max():.0f} on every layer.",
        f"The raw frame's logit-lens KL is {raw_kl.min():.0f}-{raw_kl.max():.0f} bits: raw logits are far too sharp.",
        f"Untempered affinity's KL is {aff_kl.min():.2f}-{aff_kl.max():.2f} bits on every layer and frame, next to "
        f"KL(final || uniform) = log2 V - H(final) = {v:.2f} - {h:.2f} = {s['kl_of_uniform_readout_bits']:.2f} bits: "
        "it says almost nothing about the layer.",
        f"Affinity ranks (final_norm; chance ~{chance:,.0f}): median rank {aff_rank.loc[0:18].min():,.0f}-"
        f"{aff_rank.loc[0:18].max():,.0f} on layers 0-18, {aff_rank[20]:,.0f} at layer 20, "
        f"{aff_rank.loc[23:last - 1].min():,.0f}-{aff_rank.loc[23:last - 1].max():,.0f} on layers 23-{last - 1} "
        f"and {aff_rank[last]:,.0f} at the last layer. In the tuned frame the ranks are "
        f"{tuned_aff_rank.loc[0:18].min():,.0f}-{tuned_aff_rank.loc[0:18].max():,.0f} on layers 0-18 and top-1 "
        f"agreement is at most {tuned_aff_top1.loc[0:22].max():.3f} up to layer 22.",
    ]
    return "\n".join(f"- {b}" for b in bullets)


def temperature(d: dict) -> str:
    t, info, r = d["temperature"].set_index("layer"), d["temperature_info"], d["results"]
    last = int(t.index.max())
    lens_kl = _series(r, "final_norm", "lens", "kl_bits")
    aff_kl = _series(r, "final_norm", "affinity", "kl_bits")
    uniform = d["summary"]["kl_of_uniform_readout_bits"]
    lower = (lens_kl < t.heldout_kl_bits_tempered).reindex(t.index)
    crossing = next(layer for layer in t.index if lower.loc[layer:].all())
    bullets = [
        f"Fitted on {info['sample_texts']} training texts ({info['sample_tokens']} tokens, {info['newton_passes']} "
        f"Newton passes; layers at a search bound: {info['at_bound'] or 'none'}); evaluated on the "
        f"{info['heldout_tokens']} held-out tokens.",
        f"T ranges over {t.temperature.min():.4f}-{t.temperature.max():.4f} (layer {int(t.temperature.idxmin())}: "
        f"lowest; layer {last}: {t.temperature[last]:.4f}). Cosines are divided by T, i.e. multiplied by "
        f"{1 / t.temperature.max():.0f}-{1 / t.temperature.min():.0f}.",
        f"Held-out KL, tempered vs untempered: layer 0 {t.heldout_kl_bits_tempered[0]:.2f} vs {aff_kl[0]:.2f} bits, "
        f"layer 23 {t.heldout_kl_bits_tempered[23]:.2f} vs {aff_kl[23]:.2f}, last layer "
        f"{t.heldout_kl_bits_tempered[last]:.2f} (95% CI {t.heldout_kl_bits_tempered_ci_low[last]:.2f}-"
        f"{t.heldout_kl_bits_tempered_ci_high[last]:.2f}, bootstrap over held-out texts) vs {aff_kl[last]:.2f}. "
        f"The final_norm logit lens at layers 0, 23, {last - 1} and {last}: {lens_kl[0]:.2f}, {lens_kl[23]:.2f}, "
        f"{lens_kl[last - 1]:.2f} and {lens_kl[last]:.2f} bits.",
        f"On layers 0-19 tempered affinity's held-out KL ({t.heldout_kl_bits_tempered.loc[0:19].min():.2f}-"
        f"{t.heldout_kl_bits_tempered.loc[0:19].max():.2f} bits) is at most "
        f"{uniform - t.heldout_kl_bits_tempered.loc[0:19].min():.2f} bits below KL(final || uniform) = {uniform:.2f}; "
        f"from layer 20 on it falls to {t.heldout_kl_bits_tempered.loc[20:].min():.2f} bits. The final_norm logit "
        f"lens has the lower KL from layer {crossing} on (layer {last - 1}: {lens_kl[last - 1]:.2f} vs "
        f"{t.heldout_kl_bits_tempered[last - 1]:.2f} bits), and the higher one before.",
    ]
    return "\n".join(f"- {b}" for b in bullets)


def ablation_table(d: dict) -> str:
    a = d["ablation"]
    short = {
        "logit (u_i . h)": "logit `u_i . h`",
        "unembedding cosine (u_i . h / ||u_i||)": "unembedding cosine `u_i . h / ‖u_i‖` (norm only)",
        "whitened logit (s_i . h = u_i G^-1 h)": "whitened logit `u_i G^-1 h` (whitening only)",
        "vocabulary affinity (s_i . h / ||s_i||)": "vocabulary affinity (both)",
        "unembedding cosine, centred h": "unembedding cosine, centred h",
        "vocabulary affinity, centred h": "vocabulary affinity, centred h",
    }
    rows = []
    for frame in ("final_norm", "tuned"):
        for scoring in dict.fromkeys(a.scoring):
            df = a[(a.frame == frame) & (a.scoring == scoring)].set_index("layer").top1_agreement
            rows.append({"scoring": short.get(scoring, scoring), "frame": frame,
                         **{f"L{layer}": df[layer] for layer in ABLATION_LAYERS}})
    return markdown_table(rows, {"scoring": "scoring", "frame": "frame", **{f"L{x}": f"L{x}" for x in ABLATION_LAYERS}})


def why(d: dict) -> str:
    s, a = d["summary"], d["ablation"]
    sp, fq = s["spectrum"], s["frequency"]
    last = int(a.layer.max())

    def agree(frame, scoring, layer=last):
        return a[(a.frame == frame) & (a.scoring == scoring) & (a.layer == layer)].top1_agreement.iloc[0]

    white = agree("final_norm", "whitened logit (s_i . h = u_i G^-1 h)")
    both = agree("final_norm", "vocabulary affinity (s_i . h / ||s_i||)")
    norm_only = agree("final_norm", "unembedding cosine (u_i . h / ||u_i||)")
    cond = sp["condition_number"]
    lt = fq["last_layer_top1"]
    q = fq["s_norm_quantiles"]
    spear = fq["spearman"]
    examples = ", ".join(f"`{k}`" for k in list(fq["affinity_top1_examples"])[:3])
    cen = a[(a.frame == "final_norm") & (a.scoring == "vocabulary affinity, centred h")].set_index("layer").top1_agreement
    unc = a[(a.frame == "final_norm") & (a.scoring == "vocabulary affinity (s_i . h / ||s_i||)")].set_index("layer").top1_agreement
    items = [
        f"**Whitening accounts for most of the loss (1.000 → {white:.3f} at the last layer).** The condition number of "
        f"W_U is {cond:.0f} (σ from {sp['sigma_top_bottom'][0]:.0f} down to {sp['sigma_top_bottom'][1]:.1f}), so whitening "
        f"re-weights directions relative to the logits by up to {cond:.0f}² ≈ {cond ** 2:,.0f}. On the held-out "
        f"final-layer states the top 10% singular directions carry {_pct(sp['logit']['share_top10pct_directions'])} "
        f"of the logits' energy but {_pct(sp['whitened logit']['share_top10pct_directions'], 1)} of the whitened "
        f"logits'; the bottom 10% carry {_pct(sp['whitened logit']['share_bottom10pct_directions'])} of the whitened "
        f"logits' energy against {_pct(sp['logit']['share_bottom10pct_directions'])} of the logits'. The final-normed "
        f"residual itself has {_pct(sp['h itself']['share_bottom10pct_directions'])} of its energy in those bottom-10% "
        "directions, which W_U barely reads.",
        f"**The per-token norm halves what remains ({white:.3f} → {both:.3f}), and on its own costs 1.000 → "
        f"{norm_only:.3f}.** The final top-1 tokens sit at percentile {lt['final prediction']['median_s_norm_percentile']:.1f} "
        f"of ||s_i|| over the vocabulary (median over held-out positions). For {_pct(lt['vocabulary affinity']['share_never_in_corpus'])} "
        f"of positions affinity's top-1 never occurs in the {fq['corpus_tokens']:,}-token corpus (median count "
        f"{lt['vocabulary affinity']['median_corpus_count']:.0f}; the final top-1's: "
        f"{lt['final prediction']['median_corpus_count']:.0f}); the commonest are {examples}. ||s_i|| varies little "
        f"(1st-99th percentile {q['0.01']:.4f}-{q['0.99']:.4f}, a factor {q['0.99'] / q['0.01']:.1f}); it correlates "
        f"with ||u_i|| (Spearman {spear['s_norm~u_norm']:.2f}), negatively with the model's average log-probability of "
        f"the token ({spear['s_norm~mean_final_logprob']:.2f}), and, among tokens that occur in the corpus, weakly with "
        f"frequency ({spear['s_norm~log_count(seen tokens)']:.2f} with log count).",
        f"**Centring does not fix it.** The mean cos² between a final-normed state and the mean state is "
        f"{sp['final_norm_h_mean_direction_cos2']:.2f}. Centring raises affinity's agreement on layers 26-28 "
        f"({unc.loc[26:28].min():.3f}-{unc.loc[26:28].max():.3f} → {cen.loc[26:28].min():.3f}-{cen.loc[26:28].max():.3f}) "
        f"but not much at the last layer ({cen[last]:.3f}).",
    ]
    return "\n".join(f"{i}. {item}" for i, item in enumerate(items, 1))


def guidance(d: dict) -> str:
    r, a = d["results"], d["ablation"]
    last = int(r.layer.max())
    aff_rank = _series(r, "final_norm", "affinity", "median_rank")
    best = a[a.scoring.str.contains("affinity")].sort_values("top1_agreement").iloc[-1]
    ucos = a[(a.frame == "final_norm") & (a.scoring == "unembedding cosine (u_i . h / ||u_i||)")].set_index("layer").top1_agreement
    ucos_t = a[(a.frame == "tuned") & (a.scoring == "unembedding cosine (u_i . h / ||u_i||)")].set_index("layer").top1_agreement
    logit = _series(r, "final_norm", "lens", "top1_agreement")
    raw_rank, fn_rank = _series(r, "raw", "affinity", "median_rank"), _series(r, "final_norm", "affinity", "median_rank")
    vocab = d["summary"]["frequency"]["n_vocab"]
    early = (raw_rank / fn_rank).loc[0:18]
    bullets = [
        f"The best full-vocabulary agreement of any affinity variant, in any frame, is {best.top1_agreement:.3f} "
        f"({best.scoring}, {best.frame} frame, layer {int(best.layer)}). Affinity is informative as a ranking, and "
        f"only late: in the final_norm frame the final token's median rank is at most "
        f"{aff_rank.loc[23:].max():,.0f} (top {100 * aff_rank.loc[23:].max() / vocab:.1f}% of the vocabulary) from "
        f"layer 23 on, and {aff_rank[last]:,.0f} at the last layer.",
        f"The un-whitened cosine with the W_U columns follows the logit lens in the final_norm frame: "
        f"{ucos[20]:.3f} vs {logit[20]:.3f} at layer 20, {ucos[24]:.3f} vs {logit[24]:.3f} at layer 24, "
        f"{ucos[last - 1]:.3f} vs {logit[last - 1]:.3f} at layer {last - 1}; it loses at the last layer ({ucos[last]:.3f}).",
        f"The tuned frame raises the unembedding cosine on layers 0-19 ({ucos_t.loc[0:19].min():.3f}-{ucos_t.loc[0:19].max():.3f} "
        f"vs {ucos.loc[0:19].min():.3f}-{ucos.loc[0:19].max():.3f} in final_norm).",
        f"Raw-frame affinity ranks are {early.min():.1f}-{early.max():.1f}x those of final_norm on layers 0-18.",
    ]
    return "\n".join(f"- {b}" for b in bullets)


def clip(d: dict) -> str:
    c, info, curves = d["clip"].set_index("layer"), d["clip_info"], d["curves"]
    t = info["training"]
    rows = [{"layer": str(layer), **c.loc[layer].to_dict()} for layer in CLIP_LAYERS if layer in c.index]
    table = markdown_table(rows, {
        "layer": "layer",
        "KL per-translator clip": lambda r: fmt(r["kl_bits_per_translator"], 2),
        "KL global clip": lambda r: fmt(r["kl_bits_global"], 2),
        "global − per-translator (95% CI)": lambda r: f"{r['diff_bits']:.2f} ({r['diff_ci_low']:.2f}, {r['diff_ci_high']:.2f})",
        "relative reduction (95% CI)": lambda r: f"{_pct(r['reduction'])} ({_pct(r['reduction_ci_low'])}, {_pct(r['reduction_ci_high'])})",
    })
    g = info["grad_scale"]
    lo, hi = info["mean_reduction_ci"]
    sig = "significant" if lo > 0 or hi < 0 else "not significant"
    per_curve = curves[curves["clip"] == "per_translator"]
    first = per_curve[(per_curve.step == 0) & (per_curve.layer <= 22)].kl_bits
    text = [
        f"Both lenses: {t['steps']} steps x {t['tokens_per_step']} tokens = {t['tokens']:,} tokens, "
        f"{t['unembed_dtype']} loss matmuls, lr {t['lr']}, seed {t['seed']}, the same texts in the same order; "
        f"wall time {t['wall_seconds']['per_translator']:,.0f} s (per-translator) and "
        f"{t['wall_seconds']['global']:,.0f} s (global), run side by side on the shared CPU.",
        f"Held-out KL averaged over layers {info['layers']}: **{info['mean_kl_bits_per_translator']:.2f} bits with the "
        f"per-translator clip vs {info['mean_kl_bits_global']:.2f} with the global clip**, a relative reduction of "
        f"{_pct(info['mean_reduction'], 1)} (95% CI {_pct(lo, 1)} to {_pct(hi, 1)}, bootstrap over the "
        f"{info['heldout_texts']} held-out texts, paired): {sig}. The per-translator clip is lower on "
        f"{info['layers_lower_per_translator']} of {len(c)} layers ({info['layers_ci_excludes_zero']} with a per-layer "
        f"CI excluding 0) and on {info['texts_lower_per_translator']} of {info['heldout_texts']} texts (exact sign "
        f"test p = {info['sign_test_p']:.2g}).",
        f"Why: at step 0 (same weights, same tokens) the global clip makes each translator's step "
        f"{info['step0_step_ratio_median']:.1f}x smaller than the per-translator clip (median over layers; range "
        f"{info['step0_step_ratio_range'][0]:.1f}-{info['step0_step_ratio_range'][1]:.1f}x). Median clipping factor "
        f"over the first quarter of the steps: {g['per_translator']['first_quarter_median']:.3f} per translator, "
        f"{g['global']['first_quarter_median']:.3f} global.",
        f"Training KL (per-translator run), layers 0-22: {first.min():.1f}-{first.max():.1f} bits at the first step; "
        f"mean over all layers in the last quarter of the steps "
        f"{info['train_kl_bits_last_quarter']['per_translator']:.2f} (global: "
        f"{info['train_kl_bits_last_quarter']['global']:.2f}).",
    ]
    return table + "\n\n" + "\n".join(f"- {x}" for x in text)


def render(folder: Path) -> dict[str, str]:
    """Every README block of this study, from the committed outputs in ``folder``."""
    d = _load(Path(folder))
    return {
        "budget": budget(d),
        "target": target(d),
        "lens-table": lens_table(d),
        "affinity-table": affinity_table(d),
        "findings": findings(d),
        "temperature": temperature(d),
        "ablation-table": ablation_table(d),
        "why": why(d),
        "guidance": guidance(d),
        "clip": clip(d),
    }


if __name__ == "__main__":
    for name, body in render(Path(__file__).resolve().parent).items():
        print(f"<!-- {name} -->\n{body}\n")
