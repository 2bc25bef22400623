"""Draw docs/img/architecture.svg (the layers and the data flow of `vsem-lens report`): python docs/img/architecture_svg.py"""
from html import escape
from pathlib import Path

W, H = 980, 560
out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" '
       'font-family="Helvetica, Arial, sans-serif" font-size="13">',
       '<defs><marker id="a" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto">'
       '<path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>',
       f'<rect width="{W}" height="{H}" fill="#ffffff"/>',
       '<text x="20" y="28" font-size="16" font-weight="bold">Layers (imports point down only)</text>',
       '<text x="520" y="28" font-size="16" font-weight="bold">vsem-lens report: one streamed pass</text>']
layers = [
    ("cli", "vsem-lens commands: argument parsing, messages", "#e8eaf6"),
    ("report", "build_report, Report record, checkpoints, figures, HTML", "#e3f2fd"),
    ("calibration | taskspace", "heads and baselines | minimal pairs, gradients, FTGD", "#e0f7fa"),
    ("geometry", "IsoScore, IsoScore*, I-STAR, coherence, decomposition", "#e8f5e9"),
    ("readout", "semantic basis, readout kernel, affinity, logit lens", "#fffde7"),
    ("lenses", "Lens, raw, final_norm, tuned (+ trainer), resolve_frame", "#fff3e0"),
    ("core", "load_model, HookedModel, capture, logits, Stat, io, errors", "#fbe9e7"),
]
y = 48
for i, (name, what, colour) in enumerate(layers):
    out.append(f'<rect x="20" y="{y}" width="440" height="56" rx="8" fill="{colour}" stroke="#888"/>')
    out.append(f'<text x="36" y="{y + 23}" font-weight="bold">{escape(name)}</text>')
    out.append(f'<text x="36" y="{y + 43}" fill="#333">{escape(what)}</text>')
    if i < len(layers) - 1:
        out.append(f'<line x1="240" y1="{y + 56}" x2="240" y2="{y + 70}" stroke="#555" marker-end="url(#a)"/>')
    y += 70
steps = [
    ("load_corpus -> texts", "a corpus file or the embedded corpus"),
    ("plan_corpus", "tokens, budget, length-sorted batches, readout sample"),
    ("iter_capture (run_pass)", "resid_post, attn_out, mlp_out of every layer"),
    ("CorpusStats.update", "isotropy, lens readouts, decomposition, counts"),
    ("Checkpoint.save / restore", "every stat's state_dict; resume after a kill"),
    ("stat.all_reduce, stat.result", "ranks combined; tidy tables, figures"),
    ("Report.save", "report.html (offline), CSV, JSON; atomic swap"),
]
y = 48
for i, (name, what) in enumerate(steps):
    out.append(f'<rect x="520" y="{y}" width="440" height="52" rx="8" fill="#f5f5f5" stroke="#888"/>')
    out.append(f'<text x="536" y="{y + 21}" font-weight="bold">{escape(name)}</text>')
    out.append(f'<text x="536" y="{y + 40}" fill="#333">{escape(what)}</text>')
    if i < len(steps) - 1:
        out.append(f'<line x1="740" y1="{y + 52}" x2="740" y2="{y + 70}" stroke="#555" marker-end="url(#a)"/>')
    y += 70
out.append("</svg>")
open(Path(__file__).with_name("architecture.svg"), "w").write("\n".join(out) + "\n")
