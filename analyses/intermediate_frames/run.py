"""Intermediate layers: tuned translators and a comparison of frames, on the embedded SmolLM2-135M-Instruct.

Stages (``--stages``, default all):

main
    1. Split the default corpus (seeded) into training texts and held-out texts.
    2. Train a tuned lens (vsem_lens.TunedLens.fit, per-translator gradient clipping) on the training texts.
    3. On the held-out texts only, per layer, for the frames raw / final_norm / tuned and the two readouts
       (logit lens, vocabulary affinity), via vsem_lens.iter_layer_readouts: KL(final || readout) in bits,
       top-1 agreement with the final prediction, median rank of the final prediction.
    4. Why vocabulary affinity disagrees with the final prediction: a 2 x 2 ablation of its two ingredients
       (whitening by G^-1 = (W_U W_U^T)^-1, per-token normalisation), plus centring, scored by agreement with
       the final top-1; where the logits and the whitened logits put their energy in W_U's singular
       directions; and how the per-token norms ||s_i|| relate to token frequency and to the model's average logit.
    Writes results.csv, ablation.csv, summary.json, tables.md and figure.html (plotly.js embedded: works
    offline; git-ignored, rebuilt from the CSVs by ``--stages figure``).
temperature
    Per layer (final_norm frame), the affinity temperature fitted on a sample of training texts
    (vsem_lens.readout.temperature) and the tempered KL on the held-out texts, with bootstrap intervals over
    held-out texts. Writes affinity_temperature.csv and temperature.json.
clip
    Two tuned lenses trained side by side on the same tokens and seed, one with per-translator gradient
    clipping and one with tuned-lens's global clip (TrainingConfig.clip="global"); held-out KL per layer,
    paired bootstrap intervals over held-out texts, an exact sign test over texts, and the clipping factors
    recorded during training. Writes clip_comparison.csv, clip_comparison.json and training_curves.csv.

Then, when writing into this folder, the README blocks are re-rendered from the outputs (tables.py).
Trained lenses go to the vsem-lens cache under analyses/intermediate_frames/<config+corpus hash>/ (not the
per-model lens cache, so nobody's frame='tuned' changes; never into the repository).

Run:  .venv/bin/python analyses/intermediate_frames/run.py [--stages main,clip,temperature] [--steps 64]
      [--tokens-per-step 256] [--fp32] [--threads 1] [--reuse-lens]
(the defaults are the main stage's budget in README.md; --threads 1 is steadier on a shared CPU)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
FRAMES = ("raw", "final_norm", "tuned")
READOUTS = {"lens": "logit lens", "affinity": "vocabulary affinity"}
STAGES = ("main", "clip", "temperature")


def split_corpus(texts: list[str], n_heldout: int, seed: int) -> tuple[list[str], list[str]]:
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    held = [texts[i] for i in order[:n_heldout]]
    train = [texts[i] for i in order[n_heldout:]]
    return train, held


def train_lens(vl, model, train, args, clip: str = "per_translator"):
    """Train (or, with --reuse-lens, load) the tuned lens with the given gradient clipping; (lens, wall seconds)."""
    import hashlib

    from vsem_lens.core.models import cache_dir
    from vsem_lens.lenses import TrainingConfig, TunedLens

    config = TrainingConfig(
        steps=args.steps, tokens_per_step=args.tokens_per_step, optimizer=args.optimizer, lr=args.lr,
        seed=args.seed, max_length=args.max_length, unembed_dtype="float32" if args.fp32 else "bfloat16",
        clip=clip,
    ).resolved()
    # One folder per (config, training texts): --reuse-lens never picks up a lens trained otherwise.
    key = hashlib.blake2b(json.dumps([config.to_dict(), train]).encode(), digest_size=6).hexdigest()
    where = cache_dir() / "analyses" / "intermediate_frames" / key
    lens_dir = where / "lens"
    if args.reuse_lens and (lens_dir / "config.json").is_file():
        lens = TunedLens.load(lens_dir, model=model)
        lens.history_ = pd.read_csv(where / "history.csv")
        wall = float(lens.metadata.get("wall_seconds", lens.metadata["summary"]["train_seconds"]))
        print(f"reusing the {clip}-clip lens in {lens_dir} (trained in {wall:.0f} s)")
        return lens, wall
    started = time.perf_counter()
    lens = TunedLens.fit(model, train, config=config, checkpoint_dir=where / "checkpoint", checkpoint_every=10)
    wall = time.perf_counter() - started
    lens.metadata["wall_seconds"] = round(wall, 1)
    lens.save(lens_dir)
    lens.history_.to_csv(where / "history.csv", index=False)
    return lens, wall


def evaluate(vl, model, basis, lens, held, args):
    """Per (frame, readout, layer): mean KL bits, top-1 agreement, median rank over held-out tokens."""
    rows, last_layer_top1 = [], {}
    timings = {}
    for frame in FRAMES:
        started = time.perf_counter()
        kl, ranks = {}, {}
        final_ids, entropy = [], []
        for out in vl.iter_layer_readouts(
            model, held, basis=basis, frame=lens if frame == "tuned" else frame, k=1,
            batch_size=8, max_length=args.eval_max_length,
        ):
            final_ids.append(out.final_ids)
            entropy.append(out.final_entropy_bits)
            for name, stats in out.readouts.items():
                kl.setdefault(name, []).append(stats["kl_bits"])
                ranks.setdefault(name, []).append(stats["final_rank"])
                if frame == "final_norm":
                    last_layer_top1.setdefault(name, []).append(stats["top_ids"][-1, :, 0])
        timings[frame] = time.perf_counter() - started
        for name in READOUTS:
            k = torch.cat(kl[name], dim=1).double()
            r = torch.cat(ranks[name], dim=1)
            for i, layer in enumerate(range(model.n_layers)):
                rows.append({
                    "frame": frame, "readout": name, "layer": layer,
                    "kl_bits": float(k[i].mean()),
                    "top1_agreement": float((r[i] == 0).double().mean()),
                    "median_rank": float(r[i].double().median()),
                    "n_tokens": int(r.shape[1]),
                })
    final_ids = torch.cat(final_ids)
    timings["final_entropy_bits_mean"] = float(torch.cat(entropy).double().mean())
    last_top1 = {name: torch.cat(parts) for name, parts in last_layer_top1.items()}
    return pd.DataFrame(rows), final_ids, last_top1, timings


def ablation(vl, model, basis, lens, held, args):
    """Agreement with the final top-1 of the scorings (whitened or not) x (per-token normalised or not),
    plus the two cosine scorings with the residual centred (the held-out mean of that layer and frame
    subtracted first)."""
    acts = vl.capture(model, held, max_length=args.eval_max_length)
    resid = acts["resid_post"]  # [layer, token, d]
    W = model.W_U  # [d, V]
    S = basis.vectors.to(W.dtype)  # [V, d]
    u_norm = W.norm(dim=0)  # ||u_i||
    s_norm = S.norm(dim=1)  # ||s_i||
    with torch.no_grad():
        final = model.final_norm(resid[-1]) @ W + model.b_U
        final_ids = final.argmax(-1)
        log_p = torch.log_softmax(final, -1)
        prior = log_p.mean(0)  # the model's average log-prob of each token over held-out positions
        mean_logit = final.mean(0)
        del final, log_p
    # name -> (matrix, per-token norm or None, centre h?)
    variants = {
        "logit (u_i . h)": (W, None, False),
        "unembedding cosine (u_i . h / ||u_i||)": (W, u_norm, False),
        "whitened logit (s_i . h = u_i G^-1 h)": (S.T, None, False),
        "vocabulary affinity (s_i . h / ||s_i||)": (S.T, s_norm, False),
        "unembedding cosine, centred h": (W, u_norm, True),
        "vocabulary affinity, centred h": (S.T, s_norm, True),
    }
    rows = []
    layers = range(model.n_layers) if args.ablation_every <= 1 else sorted(
        set(range(0, model.n_layers, args.ablation_every)) | {model.n_layers - 1})
    with torch.no_grad():
        for frame, lens_obj in (("final_norm", vl.FinalNormLens(model)), ("tuned", lens)):
            for layer in layers:
                x = lens_obj(resid[layer], layer)
                x_c = x - x.mean(0)
                for name, (M, norm, centre) in variants.items():
                    scores = (x_c if centre else x) @ M
                    if norm is not None:
                        scores = scores / norm
                    target = scores.gather(1, final_ids[:, None])
                    rank = (scores > target).sum(1)
                    rows.append({"frame": frame, "scoring": name, "layer": layer,
                                 "top1_agreement": float((rank == 0).double().mean()),
                                 "median_rank": float(rank.double().median())})
                    del scores
    norms = {"u_norm": u_norm, "s_norm": s_norm, "prior": prior, "mean_logit": mean_logit}
    return pd.DataFrame(rows), norms, spectrum(model, resid)


def spectrum(model, resid) -> dict:
    """Where the logit lens and the whitened logit put their weight in W_U's singular directions.

    With U = W_U^T = P diag(sigma) Q^T, the logits of h are P diag(sigma) Q^T h and the whitened
    logits S h = U G^-1 h are P diag(1/sigma) Q^T h: the same coordinates c = Q^T h, weighted by sigma
    or by 1/sigma. Reported for the last layer (final_norm frame): the share of each readout's energy
    (sum over k of w_k^2 c_k^2) carried by the top / bottom 10% singular directions, averaged over tokens.
    """
    W = model.W_U.detach().double()  # [d, V]
    evals, Q = torch.linalg.eigh(W @ W.T)  # G = U^T U = W W^T, ascending
    sigma = evals.clamp_min(0).sqrt()
    order = torch.argsort(sigma, descending=True)
    sigma, Q = sigma[order], Q[:, order]
    d = sigma.numel()
    tenth = max(1, d // 10)
    out = {"condition_number": float(sigma[0] / sigma[-1]),
           "sigma_top_bottom": [float(sigma[0]), float(sigma[-1])]}
    with torch.no_grad():
        h = model.final_norm(resid[-1]).double()
    c = h @ Q  # [token, d]
    h_c = (h - h.mean(0)) @ Q
    for name, w, coords in (("logit", sigma, c), ("whitened logit", 1 / sigma, c),
                            ("logit, centred h", sigma, h_c), ("whitened logit, centred h", 1 / sigma, h_c)):
        e = (w * coords).square()
        share = e / e.sum(1, keepdim=True)
        out[name] = {"share_top10pct_directions": float(share[:, :tenth].sum(1).mean()),
                     "share_bottom10pct_directions": float(share[:, -tenth:].sum(1).mean())}
    share_h = c.square() / c.square().sum(1, keepdim=True)
    out["h itself"] = {"share_top10pct_directions": float(share_h[:, :tenth].sum(1).mean()),
                       "share_bottom10pct_directions": float(share_h[:, -tenth:].sum(1).mean())}
    mean_dir = h.mean(0)
    out["final_norm_h_mean_direction_cos2"] = float(((h @ mean_dir) / (h.norm(dim=1) * mean_dir.norm())).square().mean())
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(pd.Series(a).rank().corr(pd.Series(b).rank()))


def frequency_analysis(model, texts, norms, final_ids, last_top1):
    n_vocab = min(len(model.tokenizer), model.d_vocab)
    counts = np.zeros(model.d_vocab, dtype=np.int64)
    for start in range(0, len(texts), 64):
        for ids in model.tokenizer(texts[start : start + 64])["input_ids"]:
            np.add.at(counts, ids, 1)
    counts, log_count = counts[:n_vocab], np.log1p(counts[:n_vocab])
    s_norm = norms["s_norm"][:n_vocab].double().numpy()
    u_norm = norms["u_norm"][:n_vocab].double().numpy()
    prior = norms["prior"][:n_vocab].double().numpy()
    mean_logit = norms["mean_logit"][:n_vocab].double().numpy()
    seen = counts > 0
    out = {
        "n_vocab": int(n_vocab),
        "corpus_tokens": int(counts.sum()),
        "tokens_seen_in_corpus": int(seen.sum()),
        "spearman": {
            "s_norm~log_count": spearman(s_norm, log_count),
            "s_norm~log_count(seen tokens)": spearman(s_norm[seen], log_count[seen]),
            "s_norm~mean_final_logprob": spearman(s_norm, prior),
            "s_norm~mean_final_logit": spearman(s_norm, mean_logit),
            "u_norm~log_count": spearman(u_norm, log_count),
            "u_norm~mean_final_logprob": spearman(u_norm, prior),
            "u_norm~mean_final_logit": spearman(u_norm, mean_logit),
            "s_norm~u_norm": spearman(s_norm, u_norm),
        },
        "s_norm_quantiles": {q: float(np.quantile(s_norm, q)) for q in (0.01, 0.5, 0.99)},
    }
    # What kind of token does each readout put first at the last layer (final_norm frame)?
    def describe(ids: torch.Tensor) -> dict:
        ids = ids.numpy()
        ids = ids[ids < n_vocab]
        return {
            "median_corpus_count": float(np.median(counts[ids])),
            "share_never_in_corpus": float((counts[ids] == 0).mean()),
            "median_s_norm_percentile": float(np.median((s_norm[None, :] < s_norm[ids, None]).mean(1)) * 100),
            "distinct_tokens": int(len(np.unique(ids))),
        }

    out["last_layer_top1"] = {"final prediction": describe(final_ids)}
    for name, ids in last_top1.items():
        out["last_layer_top1"][READOUTS[name]] = describe(ids)
    examples = pd.Series(model.token_strings(last_top1["affinity"][:400].tolist())).value_counts().head(8)
    out["affinity_top1_examples"] = {repr(k): int(v) for k, v in examples.items()}
    return out


def figure(results: pd.DataFrame, ablation_df: pd.DataFrame):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(
        rows=2, cols=2, shared_xaxes=True,
        subplot_titles=("KL(final || readout), bits", "top-1 agreement with the final prediction",
                        "median rank of the final prediction", "affinity ablation: top-1 agreement (solid final_norm, dotted tuned)"),
        vertical_spacing=0.1,
    )
    colors = {"raw": "#7f7f7f", "final_norm": "#1f77b4", "tuned": "#d95f02"}
    for (frame, readout), df in results.groupby(["frame", "readout"], sort=False):
        dash = "solid" if readout == "lens" else "dot"
        name = f"{READOUTS[readout]}, {frame}"
        for (row, col), metric in (((1, 1), "kl_bits"), ((1, 2), "top1_agreement"), ((2, 1), "median_rank")):
            fig.add_trace(go.Scatter(
                x=df.layer, y=df[metric], mode="lines+markers", name=name, legendgroup=name,
                showlegend=(row, col) == (1, 1), line=dict(color=colors[frame], dash=dash),
                hovertemplate=f"{name}<br>layer %{{x}}<br>{metric} %{{y:.3g}}<extra></extra>",
            ), row=row, col=col)
    palette = ["#1b9e77", "#e7298a", "#7570b3", "#66a61e", "#e6ab02", "#a6761d"]
    scorings = list(dict.fromkeys(ablation_df.scoring))
    for frame, dash in (("final_norm", "solid"), ("tuned", "dot")):
        for scoring, df in ablation_df[ablation_df.frame == frame].groupby("scoring", sort=False):
            name = f"{scoring} ({frame} frame)"
            fig.add_trace(go.Scatter(
                x=df.layer, y=df.top1_agreement, mode="lines", name=name,
                line=dict(color=palette[scorings.index(scoring) % len(palette)], dash=dash),
                hovertemplate=f"{name}<br>layer %{{x}}<br>top-1 agreement %{{y:.3f}}<extra></extra>",
            ), row=2, col=2)
    fig.update_yaxes(type="log", row=2, col=1)
    fig.update_xaxes(title_text="layer (resid_post)", row=2, col=1)
    fig.update_xaxes(title_text="layer (resid_post)", row=2, col=2)
    fig.update_layout(
        title="SmolLM2-135M-Instruct, held-out texts: readouts of each layer in three frames",
        height=850, width=1200, legend=dict(font=dict(size=10)),
    )
    return fig


def markdown_tables(results: pd.DataFrame, ablation_df: pd.DataFrame) -> str:
    """Per-layer tables (the numbers quoted in README.md)."""
    lines = []
    for readout in READOUTS:
        df = results[results.readout == readout]
        wide = df.pivot_table(index="layer", columns="frame", values=["kl_bits", "top1_agreement", "median_rank"])
        lines += [f"### {READOUTS[readout]}", "",
                  "| layer | " + " | ".join(f"KL {f}" for f in FRAMES) + " | " + " | ".join(f"top-1 {f}" for f in FRAMES)
                  + " | " + " | ".join(f"rank {f}" for f in FRAMES) + " |",
                  "|---:|" + "---:|" * 9]
        for layer, row in wide.iterrows():
            cells = [f"{row[('kl_bits', f)]:.2f}" for f in FRAMES] + [f"{row[('top1_agreement', f)]:.3f}" for f in FRAMES] \
                + [f"{row[('median_rank', f)]:g}" for f in FRAMES]
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
        lines.append("")
    for frame in ("final_norm", "tuned"):
        df = ablation_df[ablation_df.frame == frame]
        wide = df.pivot_table(index="layer", columns="scoring", values="top1_agreement", sort=False)
        names = list(dict.fromkeys(df.scoring))
        lines += [f"### ablation, {frame} frame: top-1 agreement with the final prediction", "",
                  "| layer | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
        for layer, row in wide.iterrows():
            lines.append(f"| {layer} | " + " | ".join(f"{row[n]:.3f}" for n in names) + " |")
        lines.append("")
    return "\n".join(lines)


def temperature_stage(vl, model, train, held, args, out: Path) -> dict:
    """Per layer (final_norm frame): the affinity temperature fitted on a sample of training texts, and the
    tempered KL on the held-out texts; writes affinity_temperature.csv."""
    from vsem_lens.readout.temperature import affinity_kl_at, fit_affinity_temperature

    basis = vl.SemanticBasis.from_model(model)  # final_norm frame
    sample = train[: args.temperature_texts]
    started = time.perf_counter()
    fit = fit_affinity_temperature(model, sample, basis=basis, max_length=args.eval_max_length)
    fit_seconds = time.perf_counter() - started
    started = time.perf_counter()
    kl, doc = affinity_kl_at(model, held, fit.temperature, basis=basis, max_length=args.eval_max_length)
    eval_seconds = time.perf_counter() - started
    lo, hi = bootstrap_mean_ci(kl, doc, seed=args.seed)
    table = pd.DataFrame({
        "frame": "final_norm", "layer": fit.layers, "temperature": fit.temperature.numpy(),
        "fit_kl_bits_tempered": fit.kl_bits.numpy(), "fit_kl_bits_untempered": fit.kl_bits_untempered.numpy(),
        "heldout_kl_bits_tempered": kl.mean(dim=1).numpy(), "heldout_kl_bits_tempered_ci_low": lo,
        "heldout_kl_bits_tempered_ci_high": hi,
    })
    table.to_csv(out / "affinity_temperature.csv", index=False, float_format="%.5g")
    info = {"sample_texts": len(sample), "sample_tokens": fit.n_tokens, "newton_passes": fit.iterations,
            "at_bound": fit.at_bound, "heldout_tokens": int(kl.shape[1]), "fit_seconds": round(fit_seconds, 1),
            "heldout_seconds": round(eval_seconds, 1)}
    print(table.to_string(float_format=lambda v: f"{v:.4g}"))
    return info


def per_text_means(values: torch.Tensor, doc: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """[layer, token] values -> per-text sums [text, layer] and token counts [text]."""
    docs = torch.unique(doc)
    sums = torch.stack([values[:, doc == d].sum(dim=1) for d in docs]).numpy()
    counts = np.array([int((doc == d).sum()) for d in docs], dtype=float)
    return sums, counts


def bootstrap_mean_ci(values: torch.Tensor, doc: torch.Tensor, *, n_boot: int = 10000, seed: int = 0):
    """Per layer, a 95% bootstrap interval of the token mean, resampling whole texts."""
    sums, counts = per_text_means(values.double(), doc)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(counts), size=(n_boot, len(counts)))
    boot = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)[:, None]  # [boot, layer]
    return np.quantile(boot, 0.025, axis=0), np.quantile(boot, 0.975, axis=0)


def heldout_lens_kl(vl, model, lens, held, args) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(final || logit lens through ``lens``) per layer and held-out token [layer, token], bits; text index."""
    kl, doc = [], []
    for out in vl.iter_layer_readouts(model, held, frame=lens, readouts=("lens",), k=1, batch_size=8,
                                      max_length=args.eval_max_length):
        kl.append(out.readouts["lens"]["kl_bits"].double())
        doc.append(out.doc_index)
    return torch.cat(kl, dim=1), torch.cat(doc)


def clip_comparison(per_kl, glob_kl, doc, histories: dict, *, n_boot: int = 10000, seed: int = 0):
    """Per-translator vs global gradient clipping, same tokens and seed: held-out KL per layer with 95%
    bootstrap intervals over held-out texts (paired: the same resampled texts for both lenses), an exact
    sign test over texts, and the clipping factors recorded during training."""
    from scipy.stats import binomtest

    n_tr = per_kl.shape[0] - 1  # the last layer has no translator (KL 0 for both)
    per_s, counts = per_text_means(per_kl[:n_tr], doc)
    glob_s, _ = per_text_means(glob_kl[:n_tr], doc)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(counts), size=(n_boot, len(counts)))
    n = counts[idx].sum(axis=1)[:, None]
    per_b, glob_b = per_s[idx].sum(axis=1) / n, glob_s[idx].sum(axis=1) / n  # [boot, layer]
    per_m, glob_m = per_s.sum(0) / counts.sum(), glob_s.sum(0) / counts.sum()
    q = lambda x: (float(np.quantile(x, 0.025)), float(np.quantile(x, 0.975)))  # noqa: E731
    rows = []
    for layer in range(n_tr):
        diff = glob_b[:, layer] - per_b[:, layer]
        rel = 1 - per_b[:, layer] / glob_b[:, layer]
        rows.append({"layer": layer, "kl_bits_per_translator": per_m[layer], "kl_bits_global": glob_m[layer],
                     "diff_bits": glob_m[layer] - per_m[layer], "diff_ci_low": q(diff)[0], "diff_ci_high": q(diff)[1],
                     "reduction": 1 - per_m[layer] / glob_m[layer], "reduction_ci_low": q(rel)[0],
                     "reduction_ci_high": q(rel)[1]})
    table = pd.DataFrame(rows)
    mean_rel = 1 - per_b.mean(1) / glob_b.mean(1)
    text_per = per_s.sum(1) / counts  # layer-summed per text / tokens -> per-text mean over layers (x n_tr)
    text_glob = glob_s.sum(1) / counts
    wins = int((text_per < text_glob).sum())
    scales = {}
    for clip, hist in histories.items():
        first = hist[hist.step < max(1, int(hist.step.max() + 1) // 4)]
        scales[clip] = {"step0_median": float(hist[hist.step == 0].grad_scale.median()),
                        "first_quarter_median": float(first.grad_scale.median())}
    h_per, h_glob = histories["per_translator"], histories["global"]
    f_per0 = h_per[h_per.step == 0].set_index("layer").grad_scale
    f_glob0 = h_glob[h_glob.step == 0].set_index("layer").grad_scale
    summary = {
        "layers": f"0-{n_tr - 1}",
        "heldout_texts": len(counts), "heldout_tokens": int(counts.sum()),
        "mean_kl_bits_per_translator": float(per_m.mean()), "mean_kl_bits_global": float(glob_m.mean()),
        "mean_reduction": float(1 - per_m.mean() / glob_m.mean()),
        "mean_reduction_ci": list(q(mean_rel)),
        "layers_lower_per_translator": int((per_m < glob_m).sum()),
        "layers_ci_excludes_zero": int(((table.diff_ci_low > 0) | (table.diff_ci_high < 0)).sum()),
        "texts_lower_per_translator": wins,
        "sign_test_p": float(binomtest(wins, len(counts), 0.5).pvalue),
        "grad_scale": scales,
        # same weights and tokens at step 0: how much smaller the global clip makes each translator's step
        "step0_step_ratio_median": float((f_per0 / f_glob0).median()),
        "step0_step_ratio_range": [float((f_per0 / f_glob0).min()), float((f_per0 / f_glob0).max())],
        "train_kl_bits_last_quarter": {
            clip: float(h[h.step >= int(h.step.max() + 1) * 3 // 4].kl_bits.mean()) for clip, h in histories.items()},
    }
    return table, summary


def clip_stage(vl, model, train, held, args, out: Path) -> dict:
    """Train (or reuse) the per-translator and the global-clip lens on the same tokens; compare them."""
    lenses, walls, histories = {}, {}, {}
    for clip in ("per_translator", "global"):
        lenses[clip], walls[clip] = train_lens(vl, model, train, args, clip)
        histories[clip] = lenses[clip].history_.assign(clip=clip)
    per_kl, doc = heldout_lens_kl(vl, model, lenses["per_translator"], held, args)
    glob_kl, _ = heldout_lens_kl(vl, model, lenses["global"], held, args)
    table, summary = clip_comparison(per_kl, glob_kl, doc, histories, seed=args.seed)
    table.to_csv(out / "clip_comparison.csv", index=False, float_format="%.5g")
    curves = pd.concat(histories.values(), ignore_index=True)[["clip", "step", "layer", "lr", "kl_bits", "grad_scale"]]
    curves.to_csv(out / "training_curves.csv", index=False, float_format="%.5g")
    cfg = lenses["global"].config.to_dict()
    cfg.pop("clip")
    summary["training"] = {**cfg, "tokens": cfg["steps"] * cfg["tokens_per_step"],
                           "wall_seconds": {k: round(v, 1) for k, v in walls.items()}}
    print(table.to_string(float_format=lambda v: f"{v:.3g}"))
    print(json.dumps(summary, indent=1))
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=64, help="tuned-lens training steps (default 64)")
    parser.add_argument("--tokens-per-step", type=int, default=256, help="tokens per step (default 256)")
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    parser.add_argument("--lr", type=float, default=None, help="default: 0.1 (sgd) / 1e-3 (adam)")
    parser.add_argument("--fp32", action="store_true", help="float32 vocabulary matmuls in training (default bf16)")
    parser.add_argument("--max-length", type=int, default=256, help="training text truncation (tokens)")
    parser.add_argument("--heldout", type=int, default=16, help="held-out texts (default 16)")
    parser.add_argument("--eval-max-length", type=int, default=64, help="held-out text truncation (tokens)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--ablation-every", type=int, default=1, help="ablation on every n-th layer (+ the last)")
    parser.add_argument("--corpus", default="default", help="default (vsem_lens/data/corpus.jsonl) | FILE")
    parser.add_argument("--reuse-lens", action="store_true", help="reuse the lens of an earlier run if cached")
    parser.add_argument("--train-only", action="store_true", help="train (or resume) and cache the lenses, then stop")
    parser.add_argument("--clips", default="per_translator,global",
                        help="with --train-only: which lenses to train (comma-separated clip modes)")
    parser.add_argument("--out", default=str(HERE), help="output folder (default: this folder)")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help="main (lens, frames, ablation), clip (per-translator vs global clip), "
                             "temperature (affinity temperature); default all. 'figure' alone: rebuild "
                             "figure.html from the committed results.csv and ablation.csv (no model)")
    parser.add_argument("--temperature-texts", type=int, default=8,
                        help="training texts the affinity temperature is fitted on (default 8)")
    args = parser.parse_args()
    if args.stages == "figure":  # no model: the figure of the committed results
        write_figure(pd.read_csv(Path(args.out) / "results.csv"), pd.read_csv(Path(args.out) / "ablation.csv"), Path(args.out))
        return 0

    import vsem_lens as vl

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = vl.load_model("embedded")
    texts = vl.load_corpus(args.corpus)
    train, held = split_corpus(texts, args.heldout, args.seed)
    print(f"{model.name}: {len(texts)} texts -> {len(train)} training, {len(held)} held out; "
          f"torch threads {torch.get_num_threads()}")

    if args.train_only:
        for clip in args.clips.split(","):
            _, seconds = train_lens(vl, model, train, args, clip)
            print(f"{clip} clip: trained in {seconds:.0f} s; rerun with --reuse-lens to evaluate")
        return 0
    stages = set(args.stages.split(","))
    if not stages <= set(STAGES):
        parser.error(f"--stages: choose from {', '.join(STAGES)}")
    if "temperature" in stages:
        info = temperature_stage(vl, model, train, held, args, out)
        (out / "temperature.json").write_text(json.dumps(info, indent=2) + "\n")
    if "clip" in stages:
        summary = clip_stage(vl, model, train, held, args, out)
        (out / "clip_comparison.json").write_text(json.dumps(summary, indent=2) + "\n")
    if "main" in stages:
        main_stage(vl, model, texts, train, held, args, out)
    if out == HERE:
        sys.path.insert(0, str(HERE.parent))
        sys.path.insert(0, str(HERE))
        import tables
        from readme_blocks import write_blocks

        write_blocks(HERE / "README.md", tables.render(HERE))
        print(f"rendered the README blocks of {HERE / 'README.md'}")
    return 0


def write_figure(results: pd.DataFrame, ablation_df: pd.DataFrame, out: Path) -> None:
    """figure.html with plotly.js embedded, so it works offline (~4.7 MB, git-ignored: rebuild it from the
    committed CSVs with ``--stages figure``)."""
    figure(results, ablation_df).write_html(out / "figure.html", include_plotlyjs=True)


def main_stage(vl, model, texts, train, held, args, out: Path) -> None:
    """The lens (trained or reused), the three frames x two readouts, the ablation; the main outputs."""
    lens, train_seconds = train_lens(vl, model, train, args, "per_translator")
    basis = vl.SemanticBasis.from_model(model)
    results, final_ids, last_top1, eval_seconds = evaluate(vl, model, basis, lens, held, args)
    started = time.perf_counter()
    ablation_df, norms, spec = ablation(vl, model, basis, lens, held, args)
    eval_seconds["ablation"] = time.perf_counter() - started
    freq = frequency_analysis(model, texts, norms, final_ids, last_top1)

    eval_seconds_entropy = eval_seconds["final_entropy_bits_mean"]
    fn = results[(results.frame == "final_norm") & (results.readout == "lens")].set_index("layer").kl_bits
    tu = results[(results.frame == "tuned") & (results.readout == "lens")].set_index("layer").kl_bits
    ratio = (tu / fn).loc[0:22]
    summary = {
        "model": model.name,
        "corpus_texts": len(texts), "train_texts": len(train), "heldout_texts": len(held),
        "heldout_tokens": int(results.n_tokens.iloc[0]),
        "training": {**lens.config.to_dict(), "wall_seconds": round(train_seconds, 1),
                     "tokens": lens.config.steps * lens.config.tokens_per_step},
        "final_entropy_bits_mean": eval_seconds.pop("final_entropy_bits_mean"),
        # KL(final || uniform) = log2 V - H(final): what a readout that says nothing scores.
        "kl_of_uniform_readout_bits": math.log2(model.d_vocab) - eval_seconds_entropy,
        "eval_seconds": {k: round(v, 1) for k, v in eval_seconds.items()},
        "tuned_over_final_norm_kl_layers_0_22": {"max": float(ratio.max()), "mean": float(ratio.mean()),
                                                 "halved_on_every_layer": bool((ratio <= 0.5).all())},
        "frequency": freq,
        "spectrum": spec,
    }
    results.to_csv(out / "results.csv", index=False, float_format="%.5g")
    ablation_df.to_csv(out / "ablation.csv", index=False, float_format="%.5g")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "tables.md").write_text(markdown_tables(results, ablation_df))
    write_figure(results, ablation_df, out)

    pd.set_option("display.width", 200)
    wide = results.pivot_table(index="layer", columns=["readout", "frame"], values=["kl_bits", "top1_agreement", "median_rank"])
    print("\nHeld-out readouts per layer (KL bits | top-1 agreement | median rank):")
    for readout in READOUTS:
        table = pd.concat({m: wide[m][readout][list(FRAMES)] for m in ("kl_bits", "top1_agreement", "median_rank")}, axis=1)
        print(f"\n== {READOUTS[readout]} ==")
        print(table.to_string(float_format=lambda v: f"{v:.3g}"))
    print("\nAblation (top-1 agreement with the final prediction):")
    print(ablation_df.pivot_table(index="layer", columns=["frame", "scoring"], values="top1_agreement")
          .to_string(float_format=lambda v: f"{v:.2f}"))
    print("\n" + json.dumps({k: summary[k] for k in ("training", "eval_seconds", "tuned_over_final_norm_kl_layers_0_22")}, indent=1))
    print(json.dumps(freq, indent=1))
    print(json.dumps(spec, indent=1))
    print(f"\nwrote {out / 'results.csv'}, {out / 'ablation.csv'}, {out / 'summary.json'}, {out / 'tables.md'}, "
          f"{out / 'figure.html'}")


if __name__ == "__main__":
    sys.exit(main())
