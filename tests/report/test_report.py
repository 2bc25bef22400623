"""build_report / Report / `vsem-lens report`: tables, readout engine, sampling, atomic writes, HTML safety, CLI."""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY_TEXTS

from vsem_lens.cli import main
from vsem_lens.core.errors import InputError
from vsem_lens.report import record as report_module
from vsem_lens.report.build import build_report

SCRIPT = "<script>alert(1)</script>"
IMG = '"><img src=x onerror=alert(1)>'
EVIL = f"Evil {SCRIPT} and {IMG} done."
CORPUS = TINY_TEXTS * 3 + [EVIL]


@pytest.fixture(scope="module")
def tiny_report(tiny_model):
    return build_report(tiny_model, CORPUS, lens_tokens=60, examples=[EVIL, TINY_TEXTS[0]], seed=3)


def _jsonl(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()
    }


# ---------------------------------------------------------------------------------- the Report


def test_report_contents(tiny_report, tiny_model):
    r = tiny_report
    assert set(r.tables) >= {"examples", "prediction_formation", "isotropy", "decomposition", "coherence_summary",
                             "coherence_histogram", "leverage_extremes", "corpus", "timings"}
    assert set(r.figures) == {"affinity_map_1", "affinity_map_2", "prediction_formation", "isotropy",
                              "outlier_dimensions", "coherence_histogram", "leverage", "components", "timings"}
    n_layers = tiny_model.n_layers
    form = r.tables["prediction_formation"]
    assert len(form) == 2 * n_layers and set(form["readout"]) == {"lens", "affinity"}
    assert (form["n_tokens"] == 60).all() and (form["n_quantile_tokens"] == 60).all()
    assert form["top1_agreement"].between(0, 1).all()
    assert (form["rank_q25"] <= form["rank_median"]).all() and (form["rank_median"] <= form["rank_q75"]).all()
    last_lens = form[(form.readout == "lens") & (form.layer == n_layers - 1)].iloc[0]
    # The logit lens at the last layer is the model's own output distribution.
    assert last_lens["rank_median"] == 0 and last_lens["top1_agreement"] == 1.0
    assert last_lens["kl_bits_mean"] < 1e-4
    iso = r.tables["isotropy"]
    assert set(iso["frame"]) == {"raw", "final_norm"} and len(iso) == 2 * n_layers
    n_tokens = r.summary["tokens"]["corpus_tokens"]
    assert (iso["n_tokens"] == n_tokens).all()
    assert int(r.tables["corpus"]["n_tokens"].sum()) == n_tokens
    assert int(r.tables["corpus"]["lens_tokens"].sum()) == 60
    ex = r.tables["examples"]
    assert set(ex["example"]) == {0, 1} and len(ex["affinity_top_tokens"].iloc[0]) == 5


def test_summary_fields(tiny_report, tiny_model):
    s = tiny_report.summary
    assert s["model"]["n_layers"] == tiny_model.n_layers and s["model"]["d_vocab"] == tiny_model.d_vocab
    for package in ("torch", "transformers", "transformer-lens", "vsem-lens"):
        assert s["versions"][package]
    assert s["parameters"]["frame"] == "final_norm" and s["parameters"]["seed"] == 3
    assert s["bos_rule"]["prepend_bos"] is False and "BOS" in s["bos_rule"]["description"]
    assert s["tokens"]["lens_tokens"] == 60 and s["tokens"]["texts_used"] == len(CORPUS)
    assert s["timings_s"]["total (build_report)"] > 0 and s["peak_rss_mib"] > 0
    assert set(s["figures"]) == set(tiny_report.figures) and all(s["figures"].values())
    assert s["highlights"]
    json.dumps(report_module._jsonable(s))  # JSON-able


def test_sample_is_seeded_and_independent_of_batch_size(tiny_model):
    kwargs = dict(lens_tokens=40, examples=[TINY_TEXTS[0]])
    a = build_report(tiny_model, CORPUS, batch_size=2, seed=1, **kwargs)
    b = build_report(tiny_model, CORPUS, batch_size=5, seed=1, **kwargs)
    c = build_report(tiny_model, CORPUS, batch_size=5, seed=2, **kwargs)
    cols = ["rank_median", "rank_mean", "top1_agreement", "prob_mean", "kl_bits_mean", "kl_bits_median"]
    fa, fb, fc = (r.tables["prediction_formation"] for r in (a, b, c))
    pd.testing.assert_frame_equal(fa[cols], fb[cols], atol=1e-5, rtol=1e-4)
    assert a.tables["corpus"]["lens_tokens"].tolist() == b.tables["corpus"]["lens_tokens"].tolist()
    assert a.tables["corpus"]["lens_tokens"].tolist() != c.tables["corpus"]["lens_tokens"].tolist()
    iso_cols = ["isoscore", "average_cosine", "participation_ratio"]
    pd.testing.assert_frame_equal(a.tables["isotropy"][iso_cols], b.tables["isotropy"][iso_cols], atol=1e-8, rtol=1e-6)


def test_budget_lens_all_and_layers(tiny_model):
    lengths = [int(n) for n in tiny_model.tokenize(CORPUS).lengths]
    budget = lengths[0] + lengths[1] + lengths[2] - 1  # room for two whole texts only
    r = build_report(tiny_model, CORPUS, max_tokens=budget, lens_tokens="all", layers=[0, -1], examples=["Hi there"])
    assert r.summary["tokens"]["texts_used"] == 2
    assert r.summary["tokens"]["corpus_tokens"] == lengths[0] + lengths[1]
    form = r.tables["prediction_formation"]
    assert sorted(set(form["layer"])) == [0, tiny_model.n_layers - 1]
    assert (form["n_tokens"] == lengths[0] + lengths[1]).all()
    assert sorted(set(r.tables["isotropy"]["layer"])) == [0, tiny_model.n_layers - 1]
    # A first text longer than the budget is cut to it (the report still has something to show).
    cut = build_report(tiny_model, CORPUS, max_tokens=5, lens_tokens=3, examples=["Hi"])
    assert cut.summary["tokens"]["corpus_tokens"] == 5 and cut.summary["tokens"]["first_text_cut_to_budget"]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"frame": "sideways"}, "unknown frame 'sideways'"),
        ({"frame": "tuned"}, "tuned lens"),
        ({"layers": [0, 7]}, "layer 7 is out of range"),
        ({"lens_tokens": 0}, "lens_tokens must be a positive integer"),
        ({"max_tokens": 0}, "max_tokens must be a positive integer"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"examples": [""]}, "text 0 is empty"),
    ],
)
def test_build_report_errors(tiny_model, kwargs, fragment):
    with pytest.raises(InputError) as info:
        build_report(tiny_model, CORPUS, **kwargs)
    assert fragment in str(info.value)


# ---------------------------------------------------------------------------------- save / HTML


class _Attributes(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[tuple[str, str, str]] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "action", "srcset", "poster", "data") and value:
                self.urls.append((tag, name, value))


def test_save_writes_self_contained_safe_report(tiny_report, tmp_path):
    out = tiny_report.save(tmp_path / "rep")
    files = {p.name for p in out.iterdir()}
    assert {"index.html", "summary.json"} | {f"{t}.csv" for t in tiny_report.tables} <= files
    summary = json.loads((out / "summary.json").read_text())
    assert summary["generator"] == "vsem-lens report" and "index.html" in summary["files"]
    pd.read_csv(out / "prediction_formation.csv")
    page = (out / "index.html").read_text(encoding="utf-8")
    # The malicious example text never appears raw; it appears HTML-escaped in the caption.
    for raw in (SCRIPT, IMG, "<img", "onerror=alert(1)>"):
        assert raw not in page
    assert html.escape(EVIL) in page
    assert page.count("<script") == page.count("</script>") == 2  # plotly.js + the figures
    # Inside the figures' JSON, token strings cannot close the script element.
    start = page.rindex("<script>")
    figures_script = page[start : page.index("</script>", start)]
    assert "</script" not in figures_script and "<!--" not in figures_script and "\\u003c" in figures_script
    # No external URL in any attribute; no CDN, no web fonts, no @import; only relative links to our files.
    parser = _Attributes()
    parser.feed(page)
    for tag, name, value in parser.urls:
        assert not re.match(r"\s*(https?:|//|ftp:)", value, re.I), (tag, name, value)
    assert "img" not in parser.tags
    plotly_start = page.index('<script id="plotly-js">')
    plotly_end = page.index("</script>", plotly_start)
    ours = page[:plotly_start] + page[plotly_end:]
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:|//)", ours, re.I)
    assert not re.search(r"url\(\s*[\"']?\s*(https?:|//)|@import|fonts\.googleapis|cdn\.", ours, re.I)
    assert page.count("window.Plotly = Plotly") == 1
    for key in tiny_report.figures:
        assert f'data-figure="{key}"' in page
    # Jupyter: plotly.js in the kernel's first figure output only, figures inline, unique element ids per rendering.
    fragment = tiny_report._repr_html_()
    assert fragment.count('<script id="plotly-js">') == 1 and "<html" not in fragment
    ids = re.findall(r'<div class="vsem-report" id="(vsem-[0-9a-f]{8})"', fragment)
    again = tiny_report._repr_html_()
    assert len(ids) == 1 and ids[0] not in again and '<script id="plotly-js">' not in again


def test_save_replaces_only_reports_and_is_atomic(tiny_report, tmp_path, monkeypatch):
    out = tmp_path / "rep"
    tiny_report.save(out)
    before = _tree_digest(out)
    # A failure (or Ctrl-C) while writing or moving leaves the earlier report exactly as it was.
    for target in ("replace_dir", "_csv_ready"):
        with monkeypatch.context() as patch:
            def boom(*args, **kwargs):
                raise KeyboardInterrupt
            patch.setattr(report_module, target, boom)
            with pytest.raises(KeyboardInterrupt):
                tiny_report.save(out)
        assert _tree_digest(out) == before
        assert [p.name for p in tmp_path.iterdir()] == ["rep"]  # no temporary directory left behind
    # Replacing an earlier report works and leaves nothing else behind.
    tiny_report.summary["parameters"]["seed"] = 3
    tiny_report.save(out)
    assert [p.name for p in tmp_path.iterdir()] == ["rep"]
    # Never replace something that is not a report.
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not delete")
    with pytest.raises(InputError, match="not a vsem-lens report"):
        tiny_report.save(precious)
    assert (precious / "thesis.tex").read_text() == "do not delete"
    with pytest.raises(InputError, match="is a file"):
        tiny_report.save(precious / "thesis.tex")
    # Temporaries left by a killed run (dead pid) are cleaned up by the next save.
    stale = tmp_path / f".tmp-{out.name}-999999999-0123abcd"
    live = tmp_path / f".tmp-{out.name}-{os.getppid()}-0123abcd"  # a live writer's work in progress
    stale.mkdir()
    live.mkdir()
    tiny_report.save(out)
    assert not stale.exists() and live.exists()


# ---------------------------------------------------------------------------------- CLI


def test_cli_end_to_end_tiny(tiny_model_dir, tmp_path, capsys):
    corpus = _jsonl(tmp_path / "corpus.jsonl", CORPUS)
    out = tmp_path / "report"
    rc = main(["report", "--model", str(tiny_model_dir), "--corpus", str(corpus), "--out", str(out), "--quiet",
               "--lens-tokens", "30", "--layers", "0,2", "--text", EVIL, "--text", "The cat sat.", "--seed", "5"])
    assert rc == 0
    assert capsys.readouterr().out.strip() == str(out / "index.html")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parameters"]["layers"] == [0, 2] and summary["parameters"]["seed"] == 5
    assert summary["tokens"]["lens_tokens"] == 30 and "load_model" in summary["timings_s"]
    assert summary["model"]["name"] == str(tiny_model_dir)
    examples = pd.read_csv(out / "examples.csv")
    assert sorted(examples["example"].unique()) == [0, 1]
    page = (out / "index.html").read_text()
    assert SCRIPT not in page and html.escape(EVIL) in page
    # The CSV column that holds lists is JSON.
    assert json.loads(examples["affinity_top_tokens"].iloc[0])


@pytest.mark.parametrize(
    ("setup", "args", "fragment"),
    [
        (None, ["--corpus", "{tmp}/missing.jsonl"], "does not exist"),
        ("empty.txt", ["--corpus", "{tmp}/empty.txt"], "contains no texts"),
        ("bad.jsonl", ["--corpus", "{tmp}/bad.jsonl"], "line 2: not valid JSON"),
        ("nocol.csv", ["--corpus", "{tmp}/nocol.csv"], 'no "text" column'),
        ("ok.txt", ["--corpus", "{tmp}/ok.txt", "--frame", "upside"], "unknown frame 'upside'"),
        ("ok.txt", ["--corpus", "{tmp}/ok.txt", "--layers", "0,99"], "layer 99 is out of range"),
        ("ok.txt", ["--corpus", "{tmp}/ok.txt", "--layers", "0;5"], "--layers expects comma-separated"),
        ("ok.txt", ["--corpus", "{tmp}/ok.txt", "--lens-tokens", "lots"], "--lens-tokens expects a positive integer"),
        ("ok.txt", ["--corpus", "{tmp}/ok.txt", "--max-tokens", "-3"], "--max-tokens expects a positive integer"),
    ],
)
def test_cli_errors(tiny_model_dir, tmp_path, capsys, setup, args, fragment):
    contents = {"empty.txt": "\n\n", "bad.jsonl": '{"text": "a"}\n{oops}\n', "nocol.csv": "body\nx\n",
                "ok.txt": "\n".join(TINY_TEXTS)}
    if setup:
        (tmp_path / setup).write_text(contents[setup])
    argv = ["report", "--model", str(tiny_model_dir), "--out", str(tmp_path / "out"), "--quiet"]
    rc = main(argv + [a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("vsem-lens: error: ") and fragment in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def _run_report(tiny_model_dir: Path, corpus: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "vsem_lens.cli", "report", "--model", str(tiny_model_dir), "--corpus", str(corpus),
         "--out", str(out), "--max-tokens", "all", "--lens-tokens", "200", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
        # as a shell starts it: Ctrl-C delivers SIGINT (an ignored SIGINT in the test process would be inherited)
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_interrupted_run_leaves_earlier_report_intact(tiny_model_dir, tmp_path, sig):
    small = _jsonl(tmp_path / "small.jsonl", TINY_TEXTS)
    out = tmp_path / "report"
    assert main(["report", "--model", str(tiny_model_dir), "--corpus", str(small), "--out", str(out), "--quiet"]) == 0
    before = _tree_digest(out)
    # A corpus long enough that the second run is still in its pass when the signal arrives.
    big = _jsonl(tmp_path / "big.jsonl", [f"{t} Copy number {i}." for i in range(3000) for t in TINY_TEXTS])
    proc = _run_report(tiny_model_dir, big, out, "--batch-size", "4")
    deadline = time.monotonic() + 120
    seen = ""
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        seen += line
        if "full-vocabulary readouts on" in line or not line:
            break
    # The plan is logged just before the pass: signal now. (Waiting here once let an idle machine finish a
    # shorter corpus first, and a SIGINT after the end is no interruption.)
    assert "full-vocabulary readouts on" in seen, seen
    assert proc.poll() is None, "the run finished before it could be interrupted; make the corpus bigger"
    proc.send_signal(sig)
    # communicate, not wait: the run's progress bars could fill the stderr pipe and block it forever
    _, rest = proc.communicate(timeout=60)
    rc, err = proc.returncode, seen + rest
    if sig == signal.SIGKILL:
        assert rc == -signal.SIGKILL
    else:
        assert rc == 130 and "interrupted" in err
    assert _tree_digest(out) == before
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".report.")]
    assert leftovers == []  # nothing was written yet when the signal came (and SIGINT cleans up anyway)


# ---------------------------------------------------------------------------------- embedded model


@pytest.mark.embedded
def test_cli_embedded_small(tmp_path, capsys):
    from importlib import resources

    out = tmp_path / "report"
    corpus = []  # the packaged default corpus; a stand-in until it has landed
    if not resources.files("vsem_lens").joinpath("data", "corpus.jsonl").is_file():
        corpus = ["--corpus", str(_jsonl(tmp_path / "corpus.jsonl", TINY_TEXTS * 10))]
    rc = main(["report", *corpus, "--max-tokens", "300", "--lens-tokens", "64", "--out", str(out), "--quiet",
               "--text", "The capital of France is Paris, and the capital of Italy is"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["name"] == "SmolLM2-135M-Instruct" and summary["model"]["n_layers"] == 30
    assert 0 < summary["tokens"]["corpus_tokens"] <= 300 and summary["tokens"]["lens_tokens"] == 64
    form = pd.read_csv(out / "prediction_formation.csv")
    lens = form[form.readout == "lens"].set_index("layer")
    assert lens.loc[29, "rank_median"] == 0 and lens.loc[29, "kl_bits_mean"] < 1e-3
    # The prediction forms late: early layers disagree with the output far more than late ones.
    assert lens.loc[0:9, "top1_agreement"].mean() < lens.loc[25:28, "top1_agreement"].mean()
    assert lens.loc[0:9, "kl_bits_mean"].mean() > lens.loc[25:28, "kl_bits_mean"].mean()
    iso = pd.read_csv(out / "isotropy.csv")
    assert len(iso) == 60 and iso["isoscore"].between(0, 1).all()
    examples = pd.read_csv(out / "examples.csv")
    last = examples[(examples.layer == 29)].sort_values("position").iloc[-1]
    assert last["final_token"].strip() == "Rome"


@pytest.mark.parametrize("kind", ["not a report", "under a file"])
def test_cli_checks_out_before_loading_the_model(tiny_model_dir, tmp_path, capsys, monkeypatch, kind):
    from vsem_lens.cli import common

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(common, "load_model", no_load)
    if kind == "not a report":
        out = tmp_path / "thesis"
        out.mkdir()
        (out / "chapter1.tex").write_text("keep")
        fragment = "not a vsem-lens report"
    else:
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "report"
        fragment = "cannot be written (it is not a folder"
    rc = main(["report", "--model", str(tiny_model_dir), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and fragment in err and "Traceback" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_out_is_refused_before_work(tmp_path):
    from vsem_lens.report import check_report_destination

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(InputError, match="no write permission"):
            check_report_destination(locked / "report")
    finally:
        locked.chmod(0o700)


def test_checkpoint_is_kept_until_the_report_is_written(tiny_model, tmp_path, monkeypatch):
    from vsem_lens.report import ReportWriteError

    ckpt = tmp_path / "ckpt"
    report = build_report(tiny_model, TINY_TEXTS, lens_tokens=20, checkpoint_dir=ckpt, progress=False)
    assert list(ckpt.rglob("*.pt")), "the end-of-pass state must survive until the report is saved"

    def disk_full(self, out):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(report_module.Report, "_save", disk_full)
        with pytest.raises(ReportWriteError, match="checkpoint is kept"):
            report.save(tmp_path / "out")
    assert list(ckpt.rglob("*.pt"))
    report.save(tmp_path / "out")
    assert not list(ckpt.rglob("*.pt")) and (tmp_path / "out" / "index.html").is_file()
