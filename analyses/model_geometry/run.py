"""Study: the embedded model's geometry at a glance (the numbers the concept pages point to).

For SmolLM2-135M-Instruct:

1. basis coherence (``vsem_lens.geometry.basis_coherence``): pairwise cosines of the semantic basis
   vectors and of the unembedding columns over the same sample of token ids;
2. isotropy of every layer's residual stream (``vsem_lens.geometry.isotropy_by_layer``) in the ``raw``
   and ``final_norm`` frames over the first ``--n-texts`` texts of the embedded corpus, cut to
   ``--max-length`` tokens (the library's tokenisation rule), with the coordinate dimensions that carry
   the most variance.

Writes coherence.csv, isotropy.csv and results.json next to this file, then re-renders the README's
blocks (tables.py). Run:  python analyses/model_geometry/run.py        (about a minute on one core)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-texts", type=int, default=50)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--sample", type=int, default=4096, help="token ids sampled for the coherence")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    sys.path[:0] = [str(HERE.parents[1]), str(HERE), str(HERE.parent)]
    import tables
    from readme_blocks import write_blocks

    import vsem_lens as vl

    torch.set_num_threads(1)
    started = time.time()
    model = vl.load_model()
    coherence = vl.geometry.basis_coherence(vl.SemanticBasis.from_model(model), sample=args.sample, seed=args.seed)
    summary = coherence.summary.drop(columns=["max_pair_ids"])
    summary.to_csv(HERE / "coherence.csv", index=False, float_format="%.6g")
    t_coherence = time.time() - started

    texts = vl.load_corpus("default")[: args.n_texts]
    iso = vl.geometry.isotropy_by_layer(model, texts, frames=("raw", "final_norm"), max_length=args.max_length)
    iso["top_dim"] = iso.outlier_dims.map(lambda dims: int(dims[0]))
    iso["top_dim_share"] = iso.outlier_shares.map(lambda shares: float(shares[0]))
    columns = ["layer", "frame", "n_tokens", "isoscore", "isoscore_star", "average_cosine", "participation_ratio"]
    iso[columns + ["top_dim", "top_dim_share", "outlier_variance_share"]].to_csv(
        HERE / "isotropy.csv", index=False, float_format="%.6g"
    )
    meta = {
        "model": model.name,
        "prepend_bos": bool(model.prepend_bos),
        "coherence_sample": args.sample,
        "seed": args.seed,
        "n_texts": len(texts),
        "max_length": args.max_length,
        "isoscore_star": dict(iso.attrs),
        "seconds": {"coherence": round(t_coherence), "total": round(time.time() - started)},
        "torch_threads": torch.get_num_threads(),
    }
    (HERE / "results.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    write_blocks(HERE / "README.md", tables.render(HERE))
    print(json.dumps(meta, indent=2, default=str))


if __name__ == "__main__":
    main()
