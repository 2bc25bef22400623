"""Intermediate layers: tuned translators and a comparison of frames, on the embedded SmolLM2-135M-Instruct.

1. Split the default corpus (seeded) into training texts and held-out texts.
2. Train a tuned lens (vsem_lens.TunedLens.fit) on the training texts, timing it.
3. On the held-out texts only, per layer, for the frames raw / final_norm / tuned and the two readouts
   (logit lens, vocabulary affinity), via vsem_lens.iter_layer_readouts: KL(final || readout) in bits,
   top-1 agreement with the final prediction, median rank of the final prediction.
4. Why vocabulary affinity disagrees with the final prediction: a 2 x 2 ablation of its two ingredients
   (whitening by G^-1 = (W_U W_U^T)^-1, per-token normalisation), plus centring, scored by agreement with
   the final top-1; where the logits and the whitened logits put their energy in W_U's singular directions;
   and how the per-token norms ||s_i|| relate to token frequency and to the model's average logit.

Writes results.csv (one row per frame x readout x layer), ablation.csv, summary.json, tables.md and
figure.html (plotly.js from the CDN) next to this script (or --out), and prints the tables. The trained
lens goes to the vsem-lens cache under analyses/intermediate_frames/<config+corpus hash>/lens (not the
per-model lens cache, so nobody's frame='tuned' changes; never into the repository).

Run:  .venv/bin/python analyses/intermediate_frames/run.py [--steps 64] [--tokens-per-step 256] [--threads 1] [--reuse-lens]
(the defaults are the budget used in README.md; --threads 1 is steadier on a shared CPU)
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


def split_corpus(texts: list[str], n_heldout: int, seed: int) -> tuple[list[str], list[str]]:
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    held = [texts[i] for i in order[:n_heldout]]
    train = [texts[i] for i in order[n_heldout:]]
    return train, held


def train_lens(vl, model, train, args):
    import hashlib

    from vsem_lens.core.models import cache_dir
    from vsem_lens.lenses import TrainingConfig, TunedLens

    config = TrainingConfig(
        steps=args.steps, tokens_per_step=args.tokens_per_step, optimizer=args.optimizer, lr=args.lr,
        seed=args.seed, max_length=args.max_length, unembed_dtype="float32" if args.fp32 else "bfloat16",
    ).resolved()
    # One folder per (config, training texts): --reuse-lens never picks up a lens trained otherwise.
    key = hashlib.blake2b(json.dumps([config.to_dict(), train]).encode(), digest_size=6).hexdigest()
    where = cache_dir() / "analyses" / "intermediate_frames" / key
    lens_dir = where / "lens"
    if args.reuse_lens and (lens_dir / "config.json").is_file():
        lens = TunedLens.load(lens_dir, model=model)
        wall = float(lens.metadata.get("wall_seconds", lens.metadata["summary"]["train_seconds"]))
        print(f"reusing the lens in {lens_dir} (trained in {wall:.0f} s)")
        return lens, wall
    started = time.perf_counter()
    lens = TunedLens.fit(model, train, config=config, checkpoint_dir=where / "checkpoint", checkpoint_every=10)
    wall = time.perf_counter() - started
    lens.metadata["wall_seconds"] = round(wall, 1)
    lens.save(lens_dir)
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
    parser.add_argument("--train-only", action="store_true", help="train (or resume) and cache the lens, then stop")
    parser.add_argument("--self-contained", action="store_true",
                        help="also write figure.offline.html with plotly.js embedded (4.7 MB, git-ignored)")
    parser.add_argument("--out", default=str(HERE), help="output folder (default: this folder)")
    args = parser.parse_args()

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

    lens, train_seconds = train_lens(vl, model, train, args)
    if args.train_only:
        print(f"trained in {train_seconds:.0f} s; rerun with --reuse-lens to evaluate")
        return 0
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
    fig = figure(results, ablation_df)
    # figure.html loads plotly.js from its CDN (~40 kB, committed); the offline copy embeds plotly.js
    # (~4.7 MB) and is git-ignored (.gitignore in this folder).
    fig.write_html(out / "figure.html", include_plotlyjs="cdn")
    if args.self_contained:
        fig.write_html(out / "figure.offline.html", include_plotlyjs=True)

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
    return 0


if __name__ == "__main__":
    sys.exit(main())
