"""Benchmark isotropy_by_layer on the embedded model against a plain HF forward over the same tokens.

isotropy_by_layer(resid_post, frames raw + final_norm, all 30 layers) streams 64 English texts in
batches of 8: one bridge forward per batch with residual hooks, then per batch two batched float64
scatter updates (one per frame, all layers in one ``baddbmm``) and the unit-vector sums. The anchor is
``AutoModelForCausalLM`` (eager attention, as the bridge uses) on exactly the same right-padded token
batches. Target: <= 1.3x the HF forward. Peak RSS growth is measured per run in this process.

Run:  python benchmarks/bench_isotropy_by_layer.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from _measure import PeakRSS, interleaved_medians  # noqa: E402

TEXTS = [
    "The river wound slowly through the valley, carrying leaves and the smell of rain toward the distant sea.",
    "After the meeting ran late, she walked home under the streetlights and thought about the offer.",
    "Most birds build their nests in spring, when insects are plentiful and the days grow longer.",
    "The recipe calls for two cups of flour, a pinch of salt, and butter that has been left to soften.",
    "He had never seen the ocean before, so the first sight of the waves left him speechless.",
    "Scientists measured the temperature of the lake every hour for three weeks during the summer.",
    "The old library smelled of dust and paper, and the floorboards creaked with every step.",
    "Our train was delayed by forty minutes because of a signal failure just outside the station.",
    "She learned to play the violin as a child and still practices for an hour every evening.",
    "A strong wind knocked down several trees in the park, blocking the path near the pond.",
    "The committee will announce its decision on the new budget at the end of the month.",
    "Children gathered around the fire as their grandfather told stories about the war.",
    "Computers store information as long sequences of ones and zeros in their memory chips.",
    "The museum's new exhibition features paintings from artists who lived in the nineteenth century.",
    "Farmers in the region depend on the autumn rains to water their crops before winter.",
    "He apologized for the mistake and promised that it would not happen again.",
    "The mountain trail was steep and narrow, but the view from the top was worth the climb.",
    "Doctors recommend drinking plenty of water and getting enough sleep during a cold.",
    "The company opened a small office in the city center to be closer to its customers.",
    "When the lights went out, everyone in the theater waited quietly for the show to resume.",
    "My neighbor grows tomatoes, beans and peppers in a garden behind her house.",
    "The bridge was built more than a hundred years ago and is still used by thousands of cars.",
    "Students must submit their essays by Friday if they want to receive feedback before the exam.",
    "A cat slept on the windowsill, warming itself in the afternoon sun.",
    "The orchestra tuned their instruments while the audience found their seats.",
    "Heavy snow closed the roads, so the village was cut off for almost a week.",
    "Engineers are testing a new kind of battery that charges in just a few minutes.",
    "She found an old photograph of her parents hidden between the pages of a book.",
    "The price of coffee rose sharply after a poor harvest in several growing countries.",
    "We spent the weekend at the beach, swimming in the morning and reading in the afternoon.",
    "The detective noticed that the clock on the wall had stopped at exactly midnight.",
    "Volunteers cleaned the beach and collected more than two hundred bags of plastic.",
    "Learning a new language takes patience, practice and a willingness to make mistakes.",
    "The restaurant on the corner serves the best soup in town, according to my brother.",
    "As the sun set, the sky turned orange and then a deep shade of purple.",
    "The city council voted to build a new playground next to the primary school.",
    "He repaired the broken chair with some glue, a few nails and a lot of patience.",
    "Whales communicate with each other using long songs that can travel for miles underwater.",
    "The software update fixed several bugs but introduced a new problem with the printer.",
    "They decided to postpone the wedding until the following spring because of the weather.",
    "The teacher asked the class to describe their favorite place in exactly one hundred words.",
    "Bees play an essential role in pollinating the fruits and vegetables we eat.",
    "The small boat drifted away from the shore when nobody remembered to tie it up.",
    "Our grandparents moved to the countryside after they retired from their jobs in the city.",
    "The film received excellent reviews, but very few people went to see it in cinemas.",
    "A thick fog covered the harbor, and the ships sounded their horns as they moved slowly.",
    "The scientist explained her theory using a simple drawing on the whiteboard.",
    "Every morning he runs five kilometers along the canal before going to work.",
    "The factory produces thousands of bottles a day and ships them across the country.",
    "She opened the letter carefully, afraid of what it might say.",
    "The government announced new rules to reduce air pollution in large cities.",
    "In the evening the market fills with people buying fresh bread, cheese and fruit.",
    "The puppy chewed through the cable, and the television stopped working.",
    "Historians still debate the causes of the conflict that began more than two centuries ago.",
    "The hotel room had a small balcony with a view of the old town and the cathedral.",
    "He forgot his umbrella at the office and arrived home soaked to the skin.",
    "Astronomers discovered a planet that orbits its star once every eleven days.",
    "The bakery sells out of croissants by nine o'clock on most Saturday mornings.",
    "The team practiced for months, and their hard work finally paid off in the final match.",
    "Please remember to turn off the lights and lock the door when you leave the building.",
    "The novel tells the story of a young woman who travels across the desert alone.",
    "Rising sea levels threaten many coastal towns and the people who live in them.",
    "The children built a snowman in the garden and gave it a carrot for a nose.",
    "The capital of France is Paris, a city famous for its museums, cafes and bridges.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    import vsem_lens as vl

    model = vl.load_model("embedded")
    hf = AutoModelForCausalLM.from_pretrained(vl.core.loading.embedded_model_dir(), attn_implementation="eager").eval()
    batches = [model.tokenize(TEXTS[i : i + args.batch_size]) for i in range(0, len(TEXTS), args.batch_size)]
    n_tokens = sum(int(b.mask.sum()) for b in batches)
    padded = sum(b.ids.numel() for b in batches)

    def hf_forward():
        with torch.no_grad():
            for b in batches:
                hf(b.ids, attention_mask=b.mask)

    def ours():
        return vl.isotropy_by_layer(model, TEXTS, batch_size=args.batch_size)

    def capture_only():  # context: the hooked forward alone, no statistics
        for _ in vl.iter_capture(model, TEXTS, batch_size=args.batch_size):
            pass

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{len(TEXTS)} texts, {len(batches)} batches of {args.batch_size}, {n_tokens} real tokens ({padded} padded)")
    times = interleaved_medians({"hf": hf_forward, "capture": capture_only, "ours": ours}, repeats=args.repeats)
    peaks = {}
    for name, fn in (("hf", hf_forward), ("ours", ours)):
        with PeakRSS() as peak:
            fn()
        peaks[name] = peak.extra_mib
    start = time.perf_counter()
    df = ours()
    ratio = times["ours"] / times["hf"]
    print("\nisotropy_by_layer: resid_post, frames raw + final_norm, all 30 layers (60 keys)")
    print(f"  HF eager forward         {times['hf']:.2f} s = 1.00   peak RSS +{peaks['hf']:.0f} MiB")
    print(f"  capture only (context)   {times['capture']:.2f} s = {times['capture'] / times['hf']:.2f}x")
    print(f"  isotropy_by_layer        {times['ours']:.2f} s = {ratio:.2f}x (target <= 1.3x)   peak RSS +{peaks['ours']:.0f} MiB")
    print(f"  (one more run: {time.perf_counter() - start:.2f} s)")
    for frame in ("raw", "final_norm"):
        sub = df[df.frame == frame]
        print(
            f"  {frame:<10} isoscore {sub.isoscore.min():.2e}..{sub.isoscore.max():.2e}  "
            f"avg cos {sub.average_cosine.min():.2f}..{sub.average_cosine.max():.2f}  "
            f"top-5 var share {sub.outlier_variance_share.min():.2f}..{sub.outlier_variance_share.max():.2f}"
        )
    print(df[["layer", "frame", "isoscore", "isoscore_star", "average_cosine", "participation_ratio", "outlier_dims",
              "outlier_variance_share"]].to_string(float_format=lambda v: f"{v:.4g}"))
    summary = {"time_ratio": ratio, "capture_ratio": times["capture"] / times["hf"], "hf_s": times["hf"], "ours_s": times["ours"], "peak_mib_hf": peaks["hf"],
               "peak_mib_ours": peaks["ours"], "n_tokens": n_tokens}
    print("\n" + json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
