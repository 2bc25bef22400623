"""Benchmark ``vl.probe`` on one 64-token prompt against the bare work it has to do.

The anchor is the least any probe can do: one plain Hugging Face forward of the embedded model with
``output_hidden_states=True`` (SDPA attention), then the bare readout products of every layer's
residual at every position: the final norm and ``[layers x tokens, d] @ W_U`` for the logit lens, and
``[layers x tokens, d] @ unit(S)^T`` for vocabulary affinity (float32, no top-k, no ranks, no table).
Ours is ``vl.probe(model, text)`` (all 30 layers, both readouts, top-5 tokens, ranks, probabilities,
the tidy table), plus building its two plotly figures. Interleaved repeats in one process, medians;
one thread by default. Also reported: the HTML of two probes in one notebook, and how much of it is
plotly.js (included once per notebook: in the first output only). Target: <= 1.5x the anchor.

    nice -n 5 python benchmarks/bench_probe.py [--threads 1] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

from _measure import corpus_texts, interleaved_medians  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    import vsem_lens as vl
    from vsem_lens.report.html import plotly_js

    torch.set_num_threads(args.threads)
    model = vl.load_model()
    ids = []
    for text in corpus_texts():
        ids += model.token_ids([text])[0]
        if len(ids) >= args.tokens:
            break
    text = model.tokenizer.decode(ids[: args.tokens])
    tokens = model.tokenize([text])
    n_tokens = int(tokens.mask.sum())
    basis = vl.SemanticBasis.from_model(model)
    unit = F.normalize(basis.vectors.float(), dim=1)
    hf = AutoModelForCausalLM.from_pretrained(vl.core.loading.embedded_model_dir(), attn_implementation="sdpa").eval()
    W_U = hf.lm_head.weight.detach()

    def anchor():
        with torch.no_grad():
            hidden = hf(input_ids=tokens.ids, attention_mask=tokens.mask, output_hidden_states=True).hidden_states[1:]
            h = torch.cat([x[0] for x in hidden])                       # [layers x tokens, d]
            logits = hf.model.norm(h) @ W_U.T                           # logit lens
            cosines = F.normalize(hf.model.norm(h), dim=1) @ unit.T     # affinity
            return logits.shape, cosines.shape

    def ours():
        p = vl.probe(model, text, max_tokens=args.tokens)
        return [p.figure(0, r) for r in p.readouts]

    medians = interleaved_medians({"anchor": anchor, "probe": ours}, repeats=args.repeats)
    # A notebook with two probes: the kernel's first figure output carries plotly.js, the second does not.
    vl.report.resend_plotly()
    first = vl.probe(model, text, max_tokens=args.tokens)._repr_html_()
    second = vl.probe(model, text, max_tokens=args.tokens)._repr_html_()
    results = {
        "tokens": n_tokens, "layers": model.n_layers, "threads": args.threads, "repeats": args.repeats,
        "anchor_s": round(medians["anchor"], 3), "probe_s": round(medians["probe"], 3),
        "ratio": round(medians["probe"] / medians["anchor"], 3),
        "html_bytes": len(first.encode()), "later_html_bytes": len(second.encode()),
        "plotly_js_bytes": len(plotly_js().encode()),
        "plotly_js_copies": first.count('<script id="plotly-js"') + second.count('<script id="plotly-js"'),
    }
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
