"""Scale benchmark of `vsem-lens report`: peak memory vs corpus size, two ranks vs one.

1. **Bounded memory**: ``vsem-lens report --max-tokens N`` for N = 8k and 64k tokens (``--with-256k``
   adds 256k), each in a fresh process, with the default lens sample (512 tokens). Peak RSS is the
   process's own ``ru_maxrss`` as recorded in ``summary.json`` (model weights included). Target: flat
   within 10% (every corpus-wide statistic is O(layers x d_model^2) streaming state).
2. **Two processes vs one** on this machine (2 cores, shared): ``torchrun --nproc_per_node=2 ...
   report --distributed`` (gloo, one thread per rank, as torchrun sets) vs one process (torch's default
   threads) on the same tokens (``--dist-tokens``). Reported: wall time of the whole command (imports
   and model load included), the report's own time (``total (build_report)``) and the streaming pass
   (slowest rank), as ratios two/one.

``--model embedded`` (default) runs SmolLM2-135M; ``--model small`` a random d_model-128, 4-layer Llama
with a 1k-token BPE vocabulary trained on the default corpus: the same code path at ~1% of the cost,
for machines where 64k-256k tokens through SmolLM2 take too long. The corpus is the embedded default
corpus repeated until N tokens. Run it niced on a shared machine:

    nice -n 5 python benchmarks/bench_scale.py [--tokens 8192 65536] [--with-256k] [--model small]
        [--dist-model embedded --dist-tokens 1024] [--no-distributed] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

from _measure import repeat_to_tokens, run_cli  # noqa: E402


def make_small_model(path: Path) -> Path:
    """A small random Llama (d_model 128, 4 layers) with a 1,024-token BPE tokenizer trained on the default
    corpus, saved as an HF directory: the report's code path at a fraction of the embedded model's cost."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    import vsem_lens as vl

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(vl.load_corpus("default"), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.save_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def write_corpus(path: Path, n_tokens: int, model: str) -> int:
    """The default corpus repeated to at least ``n_tokens`` tokens, as JSONL; returns the texts written."""
    from transformers import AutoTokenizer

    import vsem_lens as vl
    from vsem_lens.core.loading import embedded_model_dir

    base = vl.load_corpus("default")
    tokenizer = AutoTokenizer.from_pretrained(str(embedded_model_dir()) if model == "embedded" else model)
    lengths = [len(tokenizer(t)["input_ids"]) for t in base]
    texts = repeat_to_tokens(base, lengths, n_tokens)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return len(texts)


def run_report(corpus: Path, n_tokens: int, out: Path, *, model: str, ranks: int = 1, batch_size: int = 8) -> dict:
    wall = run_cli(["report", "--model", model, "--corpus", str(corpus), "--max-tokens", str(n_tokens),
                    "--batch-size", str(batch_size), "--out", str(out), "--quiet"], ranks=ranks)
    summary = json.loads((out / "summary.json").read_text())
    per_rank = summary["ranks"]["per_rank"]
    return {
        "tokens": summary["tokens"]["corpus_tokens"],
        "lens_tokens": summary["tokens"]["lens_tokens"],
        "ranks": ranks,
        "wall_s": round(wall, 1),
        "build_report_s": summary["timings_s"]["total (build_report)"],
        "pass_s": max(r["pass_seconds"] for r in per_rank),
        "peak_rss_mib": summary["peak_rss_mib"],
        "peak_rss_mib_per_rank": [r["peak_rss_mib"] for r in per_rank],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 65536])
    parser.add_argument("--with-256k", action="store_true", help="also 262144 tokens (slow on 2 cores)")
    parser.add_argument("--no-distributed", action="store_true", help="skip the two-process comparison")
    parser.add_argument("--dist-tokens", type=int, default=8192)
    parser.add_argument("--model", default="embedded", help="embedded (default) | small (a random d_model-128 "
                        "Llama with a 1k vocabulary: the same code path, ~100x cheaper) | a local HF directory")
    parser.add_argument("--dist-model", default=None, help="model of the two-process comparison (default: --model)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    sizes = sorted(set(args.tokens + ([262144] if args.with_256k else [])))
    results: dict = {"memory": [], "distributed": None}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = {}
        for name in {args.model, args.dist_model or args.model}:
            models[name] = str(make_small_model(tmp / "small-model")) if name == "small" else name
        model, dist_model = models[args.model], models[args.dist_model or args.model]
        results["model"], results["dist_model"] = args.model, args.dist_model or args.model
        corpus = tmp / "corpus.jsonl"
        n_texts = write_corpus(corpus, max(sizes), model)
        dist_corpus = tmp / "dist-corpus.jsonl"
        write_corpus(dist_corpus, args.dist_tokens, dist_model)
        print(f"corpus: {n_texts} texts (default corpus repeated); model {args.model}", flush=True)
        for n in sizes:
            row = run_report(corpus, n, tmp / f"rep-{n}", model=model)
            results["memory"].append(row)
            print(f"  {row['tokens']:>7} tokens: peak RSS {row['peak_rss_mib']:7.1f} MiB, build_report "
                  f"{row['build_report_s']:.1f} s, wall {row['wall_s']:.1f} s", flush=True)
        peaks = [r["peak_rss_mib"] for r in results["memory"]]
        growth = max(peaks) / min(peaks) - 1
        results["memory_growth"] = round(growth, 4)
        print(f"peak RSS growth {sizes[0]} -> {sizes[-1]} tokens: {100 * growth:+.1f}% (target within 10%)")
        if not args.no_distributed:
            one = run_report(dist_corpus, args.dist_tokens, tmp / "rep-one", model=dist_model)
            two = run_report(dist_corpus, args.dist_tokens, tmp / "rep-two", model=dist_model, ranks=2)
            results["distributed"] = {
                "one": one,
                "two": two,
                "wall_ratio_two_over_one": round(two["wall_s"] / one["wall_s"], 3),
                "build_report_ratio_two_over_one": round(two["build_report_s"] / one["build_report_s"], 3),
                "pass_ratio_two_over_one": round(two["pass_s"] / one["pass_s"], 3),
            }
            d = results["distributed"]
            print(
                f"{dist_model}, {args.dist_tokens} tokens, 2 ranks vs 1 process: wall {two['wall_s']:.1f} / {one['wall_s']:.1f} s "
                f"= {d['wall_ratio_two_over_one']:.2f}; build_report {two['build_report_s']:.1f} / "
                f"{one['build_report_s']:.1f} s = {d['build_report_ratio_two_over_one']:.2f}; streaming pass "
                f"{d['pass_ratio_two_over_one']:.2f}; peak RSS per rank {two['peak_rss_mib_per_rank']} MiB"
            )
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
