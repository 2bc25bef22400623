"""Self-contained HTML for a :class:`~vsem_lens.report.build.Report` (one file, opens offline).

- plotly.js is inlined once from plotly's offline bundle (``plotly.offline.get_plotlyjs``): no CDN, no
  web fonts (the CSS uses the system font stack), no external ``src``/``href`` anywhere.
- All text is escaped with :func:`html.escape`. Figure JSON embedded in ``<script>`` goes through
  :func:`script_safe_json`, which escapes ``<``, ``>``, ``&`` (and U+2028/2029) as ``\\u003c`` etc., so a
  token string such as ``</script>`` or ``<!--`` cannot end the script element early.

Example:
    >>> script_safe_json('{"t": "</script><!--"}')
    '{"t": "\\\\u003c/script\\\\u003e\\\\u003c!--"}'
"""

from __future__ import annotations

import html
import json
import uuid
from functools import lru_cache
from typing import Any

import plotly.io as pio

from .figures import total_seconds

PLOTLY_CONFIG = {
    "responsive": True,
    "displaylogo": False,
    "modeBarButtonsToRemove": ["lasso2d", "select2d"],
    "toImageButtonOptions": {"format": "png", "scale": 2},
}

CSS = """
.vsem-report { --fg:#1f2328; --muted:#59636e; --accent:#3b5bdb; --panel:#f6f8fa; --border:#d1d9e0;
  color:var(--fg); font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
  font-size:15px; line-height:1.55; }
.vsem-report * { box-sizing:border-box; }
.vsem-report header { padding:28px 0 14px; border-bottom:1px solid var(--border); margin-bottom:18px; }
.vsem-report h1 { font-size:26px; margin:0 0 4px; font-weight:650; letter-spacing:-0.01em; }
.vsem-report h2 { font-size:20px; margin:36px 0 10px; padding-top:8px; border-top:1px solid var(--border); }
.vsem-report h3 { font-size:15px; margin:18px 0 6px; }
.vsem-report .sub { color:var(--muted); margin:0; font-size:14px; }
.vsem-report .sub b { color:var(--fg); font-weight:600; }
.vsem-report .top { display:grid; grid-template-columns:minmax(220px,300px) 1fr; gap:18px; align-items:start; }
.vsem-report nav.toc, .vsem-report .glance { background:var(--panel); border:1px solid var(--border);
  border-radius:8px; padding:12px 18px; }
.vsem-report nav.toc h2, .vsem-report .glance h2 { border:0; margin:0 0 6px; padding:0; font-size:15px; }
.vsem-report nav.toc ol { margin:0; padding-left:20px; }
.vsem-report nav.toc a { color:var(--accent); text-decoration:none; }
.vsem-report nav.toc a:hover { text-decoration:underline; }
.vsem-report .glance ul { margin:0; padding-left:18px; }
.vsem-report .glance li { margin:2px 0; }
.vsem-report p.guide { background:#f3f6fc; border-left:4px solid var(--accent); border-radius:0 6px 6px 0;
  padding:10px 14px; margin:8px 0 14px; max-width:1020px; font-size:14px; }
.vsem-report p.caption { margin:16px 0 2px; font-size:14px; color:var(--muted); max-width:1020px;
  overflow-wrap:anywhere; }
.vsem-report p.caption b { color:var(--fg); }
/* display:block: a host page's own .figure rule (Bootstrap's is inline-block) would shrink the plot to nothing */
.vsem-report .figure { display:block; overflow-x:auto; margin:4px 0 18px; border:1px solid #eef0f3; border-radius:6px; }
.vsem-report .figure .plot-error { color:#b02a37; padding:12px; }
.vsem-report .cards { display:grid; grid-template-columns:repeat(auto-fit,minmax(300px,1fr)); gap:14px; align-items:start; }
.vsem-report table.facts { border-collapse:collapse; font-size:13px; width:100%; }
.vsem-report table.facts caption { text-align:left; font-weight:600; padding:4px 0; font-size:14px; }
.vsem-report table.facts th, .vsem-report table.facts td { padding:3px 8px; border-bottom:1px solid #eaeef2;
  text-align:left; vertical-align:top; }
.vsem-report table.facts th { color:var(--muted); font-weight:500; white-space:nowrap; width:45%; }
.vsem-report code { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; font-size:12.5px;
  background:var(--panel); padding:1px 4px; border-radius:4px; }
.vsem-report footer { margin:40px 0 20px; color:var(--muted); font-size:13px; border-top:1px solid var(--border);
  padding-top:10px; }
@media (max-width: 860px) { .vsem-report .top { grid-template-columns:1fr; } }
"""

PAGE_CSS = "body { margin:0; background:#fff; } main.vsem-report { max-width:1240px; margin:0 auto; padding:0 28px; }"


def script_safe_json(text: str) -> str:
    """Make JSON text safe inside ``<script>``: escape ``<``, ``>``, ``&``, U+2028 and U+2029.

    The result is still valid JSON (and JavaScript) with the same value.

    Example:
        >>> json.loads(script_safe_json('["<!--</script>&"]'))
        ['<!--</script>&']
    """
    return (
        text.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


@lru_cache(maxsize=1)
def plotly_js() -> str:
    """plotly.js from plotly's offline bundle (the exact version plotly.py's figures are made for).

    Example:
        >>> "Plotly" in plotly_js()[:2000]
        True
    """
    from plotly.offline import get_plotlyjs

    js = get_plotlyjs()
    # Never true for plotly's bundle, but a closing tag inside it would end the <script> element.
    return js.replace("</script", "<\\/script").replace("<!--", "<\\!--")


def figure_json(fig: Any) -> str:
    """``{"data": ..., "layout": ...}`` of a plotly figure, script-safe (see :func:`script_safe_json`).

    Example:
        >>> import plotly.graph_objects as go
        >>> "<b>" in figure_json(go.Figure(go.Bar(x=["<b>"], y=[1])))
        False
    """
    return script_safe_json(pio.to_json(fig, validate=False, pretty=False))


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value)


def _facts_table(caption: str, rows: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(_fmt(v))}</td></tr>" for k, v in rows)
    return f'<table class="facts"><caption>{_e(caption)}</caption>{body}</table>'


def _run_card(summary: dict[str, Any]) -> str:
    model, tok, par = summary.get("model", {}), summary.get("tokens", {}), summary.get("parameters", {})
    total = total_seconds(summary.get("timings_s", {}))
    cards = [
        _facts_table(
            "Model",
            [
                ("name", model.get("name")),
                ("layers", model.get("n_layers")),
                ("d_model", model.get("d_model")),
                ("vocabulary (W_U rows)", model.get("d_vocab")),
                ("context", model.get("n_ctx")),
                ("parameters", model.get("n_parameters")),
                ("dtype / device", f"{model.get('dtype')} / {model.get('device')}"),
                ("BOS prepended", summary.get("bos_rule", {}).get("prepend_bos")),
            ],
        ),
        _facts_table(
            "Corpus and sampling",
            [
                ("corpus", par.get("corpus") or "given texts"),
                ("texts used / given", f"{tok.get('texts_used', 0):,} / {tok.get('texts_given', 0):,}"),
                ("tokens (all statistics)", tok.get("corpus_tokens")),
                ("tokens read out (sample)", tok.get("lens_tokens")),
                ("tokens for quantiles", tok.get("quantile_tokens")),
                ("example tokens", tok.get("example_tokens")),
                ("texts cut to the context", tok.get("texts_truncated_to_context")),
                ("tokens dropped by those cuts", tok.get("tokens_dropped_to_context")),
                ("mean entropy of predictions", f"{tok.get('mean_final_entropy_bits', float('nan')):.2f} bits"),
            ],
        ),
        _facts_table(
            "Run",
            [
                ("frame", par.get("frame")),
                ("layers", par.get("layers")),
                ("max tokens / lens tokens", f"{par.get('max_tokens')} / {par.get('lens_tokens')}"),
                ("batch size / seed", f"{par.get('batch_size')} / {par.get('seed')}"),
                ("total time", f"{total:.1f} s"),
                ("peak memory (RSS)", f"{summary.get('peak_rss_mib', 0):,.0f} MiB"),
                ("created (UTC)", summary.get("created")),
            ]
            + [(name, v) for name, v in summary.get("versions", {}).items()],
        ),
    ]
    return f'<div class="cards">{"".join(cards)}</div>'


#: Whether this process has already sent plotly.js into a notebook output (see :func:`notebook_scripts`).
_NOTEBOOK = {"plotly_sent": False}

NOTEBOOK_MISSING_PLOTLY = (
    "plotly.js is not on this page: the output that carried it was cleared or not rendered. "
    "Run vsem_lens.report.resend_plotly() and re-run this cell."
)


def figure_scripts(figures: dict[str, Any], *, include_plotlyjs: bool = True) -> str:
    """plotly.js (inlined once) and the ``Plotly.newPlot`` call of each figure into its ``<div id>``.

    A figure that fails to draw shows the error in its div and on the console instead of stopping the
    others. Without ``include_plotlyjs`` the calls use the ``Plotly`` an earlier script put on the page, and
    each div says so when there is none.

    plotly.js is wrapped so it always defines ``window.Plotly``: in a page that has require.js (the classic
    Jupyter notebook) its UMD header would otherwise register an AMD module and define no global.

    Example:
        >>> import plotly.graph_objects as go
        >>> figure_scripts({"a": go.Figure()}).count('<script id="plotly-js"')
        1
        >>> figure_scripts({"a": go.Figure()}, include_plotlyjs=False).count('<script id="plotly-js"')
        0
    """
    config = script_safe_json(json.dumps(PLOTLY_CONFIG))
    missing = script_safe_json(json.dumps(NOTEBOOK_MISSING_PLOTLY))
    calls = [f"[{script_safe_json(json.dumps(div_id))}, {figure_json(fig)}]" for div_id, fig in figures.items()]
    library = (
        f'<script id="plotly-js">(function(){{var define, module, exports;\n{plotly_js()}\n}})();</script>'
        if include_plotlyjs else ""
    )
    return (
        library + "<script>(function(){var config=" + config + ";var figs=[" + ",\n".join(calls) + "];"
        "function draw(){figs.forEach(function(item){var el=document.getElementById(item[0]);if(!el){return;}"
        "if(typeof Plotly==='undefined'){el.textContent=" + missing + ";el.className+=' plot-error';return;}"
        "try{Plotly.newPlot(el,item[1].data,item[1].layout,config);}"
        "catch(err){console.error('vsem-lens: figure '+item[0]+' failed: '+err);"
        "el.textContent='This figure could not be drawn: '+err;el.className+=' plot-error';}});}"
        # in a page still loading, wait for its layout (a theme's CSS) so each figure gets its real width
        "if(document.readyState==='loading'){document.addEventListener('DOMContentLoaded',draw);}else{draw();}"
        "})();</script>"
    )


def notebook_scripts(figures: dict[str, Any]) -> str:
    """:func:`figure_scripts` for a Jupyter output: plotly.js goes into the first output of this process only.

    Every figure in a notebook shares the page, so one copy of plotly.js (4.6 MB) serves them all: the
    first figure output of the kernel carries it, later ones call the ``Plotly`` it defined. A restarted
    kernel sends it again. If that first output is cleared and the page reloaded, later figures say so;
    :func:`resend_plotly` makes the next output carry the library again.

    Example:
        >>> import plotly.graph_objects as go
        >>> resend_plotly()
        >>> [notebook_scripts({"a": go.Figure()}).count('id="plotly-js"') for _ in range(2)]
        [1, 0]
    """
    first = not _NOTEBOOK["plotly_sent"]
    _NOTEBOOK["plotly_sent"] = True
    return figure_scripts(figures, include_plotlyjs=first)


def resend_plotly() -> None:
    """Make the next notebook figure carry plotly.js again (after clearing the output that carried it).

    Example:
        >>> resend_plotly()
    """
    _NOTEBOOK["plotly_sent"] = False


def render_page(report: Any, *, standalone: bool = True) -> str:
    """HTML of a :class:`~vsem_lens.report.build.Report`: a full page (``standalone``) or a fragment for Jupyter's
    ``_repr_html_``. ``report`` is untyped here so this module does not import the report module that uses it.

    Both draw every figure with ``Plotly.newPlot``. The page inlines plotly.js once; the fragment carries it
    only when it is the kernel's first figure output (:func:`notebook_scripts`), and scopes its CSS and
    element ids to one random prefix so several reports can share a notebook.

    Example:
        >>> page = render_page(report)            # doctest: +SKIP
        >>> page.count('<script id="plotly-js"') # doctest: +SKIP
        1
    """
    summary = report.summary
    prefix = "vsem" if standalone else f"vsem-{uuid.uuid4().hex[:8]}"
    model = summary.get("model", {})
    tok = summary.get("tokens", {})
    par = summary.get("parameters", {})
    figure_ids: dict[str, str] = {}
    out: list[str] = []
    title = f"Layerwise semantic report: {model.get('name', 'model')}"
    out.append(f"<header><h1>{_e(title)}</h1>")
    out.append(
        '<p class="sub">'
        f"<b>{_e(model.get('n_layers'))}</b> layers · d_model <b>{_e(model.get('d_model'))}</b> · vocabulary "
        f"<b>{_e(_fmt(model.get('d_vocab')))}</b> · <b>{_e(_fmt(tok.get('corpus_tokens')))}</b> tokens from "
        f"<b>{_e(_fmt(tok.get('texts_used')))}</b> texts ({_e(par.get('corpus') or 'given texts')}) · readouts on "
        f"<b>{_e(_fmt(tok.get('lens_tokens')))}</b> sampled tokens · frame <code>{_e(par.get('frame'))}</code> · "
        f"BOS {'prepended' if summary.get('bos_rule', {}).get('prepend_bos') else 'as the tokenizer does'} · "
        f"{_e(summary.get('created', ''))}</p></header>"
    )
    toc = "".join(f'<li><a href="#{prefix}-{_e(s.key)}">{_e(s.title.split(". ", 1)[-1])}</a></li>' for s in report.sections)
    glance = "".join(f"<li>{_e(h)}</li>" for h in summary.get("highlights", []))
    out.append('<div class="top">')
    out.append(f'<nav class="toc"><h2>Contents</h2><ol>{toc}</ol></nav>')
    out.append(f'<div class="glance"><h2>At a glance</h2><ul>{glance or "<li>no highlights</li>"}</ul></div></div>')
    for section in report.sections:
        out.append(f'<section id="{prefix}-{_e(section.key)}"><h2>{_e(section.title)}</h2>')
        out.append(f'<p class="guide">{_e(section.guide)}</p>')
        for key in section.figures:
            if key not in report.figures:
                continue
            caption = section.captions.get(key) if hasattr(section, "captions") else None
            if caption:
                label, _, text = caption.partition(": ")
                out.append(f'<p class="caption"><b>{_e(label)}:</b> {_e(text)}</p>')
            div_id = f"{prefix}-fig-{key}".replace("_", "-")
            figure_ids[key] = div_id
            out.append(f'<div class="figure" id="{_e(div_id)}" data-figure="{_e(key)}"></div>')
        if section.key == "run-card":
            out.append(_run_card(summary))
        out.append("</section>")
    files = summary.get("files") or {}
    if standalone and files:
        links = " · ".join(f'<a href="{_e(name)}">{_e(name)}</a>' for name in files if name != "index.html")
        out.append(f"<footer>Files in this report: {links}. Generated by vsem-lens {_e(summary.get('versions', {}).get('vsem-lens', ''))}.</footer>")
    else:
        out.append(f"<footer>Generated by vsem-lens {_e(summary.get('versions', {}).get('vsem-lens', ''))}.</footer>")

    figures = {div_id: report.figures[key] for key, div_id in figure_ids.items()}
    scripts = figure_scripts(figures) if standalone else notebook_scripts(figures)
    if standalone:
        return (
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{PAGE_CSS}{CSS}</style></head>\n"
            f'<body><main class="vsem-report">{"".join(out)}</main>\n{scripts}\n</body></html>\n'
        )
    return f'<div class="vsem-report" id="{prefix}"><style>{CSS}</style>{"".join(out)}{scripts}</div>'
