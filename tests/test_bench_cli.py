"""`mixq bench` on a tiny local model: results.json/md/html, resume after an interrupt, evaluation on two
domains side by side, the calibration record, and bench/report.py on fake committed results."""
import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

from mixq import data
from mixq.cli import main

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the market said shares rose fell percent year company new million stock trading index "
         "bank rates bonds investors prices quarter sales profit analysts federal board dollar").split()


def _text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_words // 12):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(12)) + " .")
    return "\n".join(lines) + "\n"


@pytest.fixture
def corpora(tmp_path):
    ev, cal = tmp_path / "eval.txt", tmp_path / "calib.txt"
    ev.write_text(_text(400, 1))
    cal.write_text(_text(400, 2))
    return ev, cal


@pytest.fixture
def fortunes_dir(tmp_path, monkeypatch):
    """A stand-in for Debian's fortune databases (punctuated, capitalised quotations) and a private cache
    (self-generated calibration rows are cached there)."""
    d = tmp_path / "fortunes"
    d.mkdir()
    rng = random.Random(3)
    quotes = ["Time flies like an arrow; fruit flies like a banana.", "Do, or do not. There is no try!",
              "A penny saved is a penny earned.", "Never put off till tomorrow what you can do today?"]
    (d / "wisdom").write_text("\n%\n".join(f"{rng.choice(quotes)} {rng.choice(quotes)}\n\t-- Author {i}"
                                           for i in range(200)))
    (d / "wisdom.dat").write_bytes(b"")
    monkeypatch.setenv("MIXQ_FORTUNES_DIR", str(d))
    monkeypatch.setenv("MIXQ_CACHE_DIR", str(tmp_path / "cache"))
    return d


def _args(model, ev, cal, out, budgets="3,4", methods="rtn,mixq-gptq", *extra):
    return ["bench", str(model), "--bpw", budgets, "--methods", methods, "--corpus", str(ev), "--calib", str(cal),
            "--tokens", "256", "--seqlen", "32", "--nsamples", "4", "--calib-seqlen", "32", "--grad-samples", "2",
            "--resamples", "100", "--no-progress", "--out", str(out), *extra]


def test_bench_writes_results_and_report(tiny_dir, corpora, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(_args(tiny_dir, *corpora, out)) == 0
    doc = json.loads((out / "results.json").read_text())
    rows = {(r["method"], r["budget"]): r for r in doc["rows"]}
    assert set(rows) == {("rtn", 3.0), ("rtn", 4.0), ("mixq-gptq", 3.0), ("mixq-gptq", 4.0)}
    for (m, b), r in rows.items():
        assert r["status"] == "ok", r
        assert r["bpw"] <= b
        assert r["uniform"] == (m == "rtn")
        assert r["ci"]["kl"][0] <= r["kl"] <= r["ci"]["kl"][1]
        assert r["ci"]["perplexity"][0] <= r["perplexity"] <= r["ci"]["perplexity"][1]
        assert r["machine"] and r["mixq"]["version"]
    assert len(rows[("rtn", 3.0)]["spec_counts"]) == 1  # uniform: one spec everywhere
    # the exact plan is never predicted worse than the best uniform spec at the same budget
    assert rows[("mixq-gptq", 3.0)]["predicted"] <= rows[("rtn", 3.0)]["predicted"] + 1e-12
    p = doc["protocol"]
    assert p["n_windows"] == 8 and p["seqlen"] == 32 and doc["calibration"]["nsamples"] == 4
    assert doc["unquantized"]["kl"] < 1e-3
    # one measurement for every budget, cached in the directory
    assert (out / "measurement.json").exists()
    md = (out / "results.md").read_text()
    assert "mixq-gptq" in md and "eval " in md and "figures/pareto-kl.png" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4  # pareto kl + ppl, heatmap, trade-off, sensitivity
    assert "src=\"http" not in html and "<script" not in html  # self-contained
    assert "Protocol" in html and "calib " in html
    assert "mixq-gptq" in capsys.readouterr().out


def test_bench_resumes_only_missing_rows(tiny_dir, corpora, tmp_path, monkeypatch, capsys):
    import mixq.api
    import mixq.measure

    out = tmp_path / "bench"
    real = mixq.api.quantize_model
    calls = []

    def interrupted_after_first(*a, **k):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(mixq.api, "quantize_model", interrupted_after_first)
        assert main(_args(tiny_dir, *corpora, out, "3,4", "rtn,mixq-rtn")) == 130
    finished = sorted(p.name for p in (out / "rows").glob("*.json"))
    assert finished == ["fp.json", "rtn_3bpw.json"]
    assert not (out / "results.json").exists()

    seen = []

    def counting(model, specs, **k):
        seen.append(k.get("method"))
        return real(model, specs, **k)

    monkeypatch.setattr(mixq.api, "quantize_model", counting)
    monkeypatch.setattr(mixq.measure, "measure", lambda *a, **k: pytest.fail("measured again"))
    assert main(_args(tiny_dir, *corpora, out, "3,4", "rtn,mixq-rtn")) == 0
    assert len(seen) == 3  # 4 rows, 1 done before the interrupt
    doc = json.loads((out / "results.json").read_text())
    assert len(doc["rows"]) == 4 and all(r["status"] == "ok" for r in doc["rows"])
    # paired mixed-vs-uniform comparison over the same windows is in the report
    assert "paired over the same windows" in (out / "results.md").read_text()
    # other settings in the same directory are refused; --report-only recomputes nothing
    capsys.readouterr()
    assert main(_args(tiny_dir, *corpora, out, "3", "rtn") + ["--tokens", "128"]) == 2
    assert "other settings (tokens: 256 → 128)" in capsys.readouterr().err
    seen.clear()
    assert main(["bench", "--out", str(out), "--report-only"]) == 0
    assert not seen


def test_bench_rejects_bad_input_before_loading(tmp_path, capsys):
    assert main(["bench", "nonexistent-model", "--methods", "rtn,foo", "--out", str(tmp_path / "b")]) == 2
    assert "unknown method 'foo'" in capsys.readouterr().err
    assert main(["bench", "x", "--bpw", "3,-1", "--out", str(tmp_path / "b")]) == 2
    assert not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------- bench/report.py
def _load_report_module():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_report"] = mod
    spec.loader.exec_module(mod)
    return mod


def _fake_results(d: Path) -> None:
    proto = {"version": 1, "corpus": "ptb", "split": "test", "tokenizer": "smollm2-135m", "seqlen": 512, "stride": 512,
             "bos": "none", "max_tokens": 4096, "n_windows": 8, "n_scored": 4088, "dtype": "float32"}
    fp = {"perplexity": 60.0, "kl": 5e-7, "top1_agreement": 1.0}
    formats = [{"spec": "fp32", "bpw_linears": 32.0, "bpw_all": 32.0, "seconds": 0.0, "fallback": 0,
                "perplexity": 60.0, "kl": 5e-7, "kl_p99": 2e-6, "top1_agreement": 1.0}]
    for spec, bpw, kl in (("W4-g128", 4.17, 0.05), ("W3-g64", 3.25, 0.2), ("NF4-g64", 4.25, 0.04), ("MXFP4", 4.25, 0.06)):
        formats.append({"spec": spec, "bpw_linears": bpw, "bpw_all": bpw + 1, "seconds": 1.0, "fallback": 0,
                        "perplexity": 60 * (1 + kl), "kl": kl, "kl_p99": kl * 5, "top1_agreement": 1 - kl})
    (d / "formats_rtn.json").write_text(json.dumps({"protocol": proto, "rows": formats}))
    alloc = []
    for b in (3.0, 4.0):
        for v, f in (("uniform RTN", 2.0), ("mixed RTN (kfac)", 1.0)):
            alloc.append({"budget": b, "variant": v, "bpw": b - 0.1, "predicted": 0.1 * f / b, "kl": 0.3 * f / b,
                          "perplexity": 60 + 10 * f / b, "top1": 0.9, "solve_ms": 1.0, "quant_s": 1.0,
                          "specs": "W3-g64" if f == 2.0 else "7 specs"})
    (d / "allocation_rtn.json").write_text(json.dumps({"protocol": proto, "fp32": fp, "rows": alloc,
                                                       "measure_seconds": {"kfac/rtn": 10.0}}))
    (d / "deploy.json").write_text(json.dumps({"command": "python bench/deploy.py", "protocol": proto, "threads": 2,
                                               "rows": [{"row": "fp32", "spec": "fp32", "bpw_linears": 32.0,
                                                         "disk_bytes": 5.4e8, "decode_tok_s": 20.0, "ppl": 60.0},
                                                        {"row": "W4-g64", "spec": "W4-g64", "bpw_linears": 4.5,
                                                         "disk_bytes": 1.2e8, "decode_tok_s": 30.0, "ppl": 63.0,
                                                         "kl_fake": 0.05}]}))
    intra = [{"kind": "curve", "budget": 3.0, "variant": v, "bpw": 2.9, "kl": kl, "perplexity": 70.0, "top1": 0.8,
              "predicted": kl, "n_specs": 3, "composite_layers": 0, "quant_s": 1.0, "spec_counts": {"W3-g64": 3}}
             for v, kl in (("uniform RTN", 0.3), ("mixed RTN (kfac)", 0.2), ("mixed RTN + intra (kfac)", 0.15))]
    intra += [{"kind": "method", "label": "OWQ", "spec": "W3-g64+c8", "method": "rtn", "bpw": 3.3, "kl": 0.25,
               "perplexity": 72.0, "top1": 0.8, "quant_s": 2.0}]
    (d / "intra.json").write_text(json.dumps({"header": ["# Intra", "", "- command: `python bench/intra.py`",
                                                         "- machine: test box", "- commit: abc1234, date: today"],
                                              "protocol": proto, "fp32": fp, "rows": intra,
                                              "intra_candidates": ["W3-g64+c8"]}))
    act = [{"section": "fp", "label": "fp32", "perplexity": 60.0, "kl": 5e-7, "top1_agreement": 1.0, "seconds": 1.0}]
    act += [{"section": "kv", "label": f"KV{b} R32", "perplexity": 60 + 8 / b, "kl": 0.1 / b, "top1_agreement": 0.9,
             "seconds": 2.0, "kv_bytes_512x1": 1000 * b} for b in (8, 4, 2)]
    (d / "act_kv.json").write_text(json.dumps({"protocol": proto, "fp32": fp, "rows": act, "extra": {}}))
    (d / "mystery.json").write_text(json.dumps({"rows": [{"a": 1, "b": "x"}]}))
    (d / "broken.json").write_text("{not json")


def test_report_script_on_fake_results(tmp_path):
    rep = _load_report_module()
    res = tmp_path / "results"
    res.mkdir()
    _fake_results(res)
    html_path, md_path = rep.main(["--results", str(res)])
    html = html_path.read_text()
    md = md_path.read_text()
    assert html_path == res / "report.html" and md_path == res / "report.md"
    for title in ("RTN across formats", "Mixed-precision allocation vs uniform (RTN)", "Deployment",
                  "Intra-tensor mixed precision", "mixed RTN + intra (kfac)", "machine: test box",
                  "KV-cache bits (KIVI)", "kv_bytes_512x1"):
        assert title in md, title
    assert "Not run: `algorithms.json`" in md  # missing benchmarks say so
    assert "mystery.json" in md and "broken.json" in md  # unknown files get a generic section, damaged ones a note
    assert html.count("data:image/png;base64,") >= 9
    assert "W3-g64" in html and "7 specs" in md
    assert "4088 scored" in md  # the protocol next to the numbers


def test_eval_ci_adds_bootstrap_intervals(tiny_dir, corpora, tmp_path):
    ev, cal = corpora
    q = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_dir), "--spec", "W3-g32", "--out", str(q)]) == 0
    out = tmp_path / "e.json"
    assert main(["eval", str(q), "--corpus", str(ev), "--tokens", "256", "--seqlen", "32", "--ci",
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    for k in ("perplexity", "kl", "top1_agreement"):
        ci = res["ci"][k]
        assert ci["low"] <= res[k] <= ci["high"] and ci["n_windows"] == 8, k
        assert ci["estimate"] == pytest.approx(res[k], rel=1e-4)
    assert res["overlap_warning"] is None  # RTN: no calibration data to overlap with


# ---------------------------------------------------------------------------- domains and calibration
def test_bench_two_domains_side_by_side(tiny_dir, fortunes_dir, tmp_path, capsys):
    from mixq.calibset import build_calibration
    from mixq.models import load_model

    ev = tmp_path / "short.txt"  # a text just longer than the 256 scored tokens
    ev.write_text(_text(48, 5))
    out = tmp_path / "bench"
    # calibrated on self-generated rows and on the primary evaluation text itself: the overlap check must see it
    args = _args(tiny_dir, f"{ev},fortunes", f"self+{ev}", out, "3", "rtn,mixq-rtn")
    assert main(args) == 0
    doc = json.loads((out / "results.json").read_text())
    assert list(doc["protocols"]) == [str(ev), "fortunes"]
    assert doc["protocol"] == doc["protocols"][str(ev)]  # the primary
    assert doc["key"]["corpus"] == f"{ev},fortunes"
    fort = doc["protocols"]["fortunes"]
    assert fort["corpus"] == "fortunes" and fort["split"] == "test" and fort["n_windows"] == 8
    for r in [doc["unquantized"], *doc["rows"]]:
        assert r["status"] == "ok", r
        dom = r["domains"]
        assert list(dom) == [str(ev), "fortunes"]
        assert dom[str(ev)]["kl"] == r["kl"] and dom[str(ev)]["perplexity"] == r["perplexity"]
        f = dom["fortunes"]
        assert f["n_scored"] == fort["n_scored"] and f["perplexity"] != r["perplexity"]
        assert f["ci"]["kl"][0] <= f["kl"] <= f["ci"]["kl"][1]
        assert "per_window" not in f and len(r["per_window"]["kl_sum"]) == 8
        if r.get("budget"):
            assert r["kl_ratio"]["fortunes"] == pytest.approx(f["kl"] / r["kl"])
    assert doc["unquantized"]["domains"]["fortunes"]["kl"] < 1e-3
    # the calibration record: sources, rows per source and the sha256 of the very ids the bench used
    cal = doc["calibration"]
    assert cal["corpus"] == f"self+{ev}" and cal["rows"] == {"self": 2, str(ev): 2}
    assert cal["nsamples"] == 4 and cal["seqlen"] == 32 and cal["grad_samples"] == 2 and cal["bos_id"] is None
    model, tok = load_model(str(tiny_dir))
    again = build_calibration(model, tok, f"self+{ev}", 4, 32, 0, progress=False)
    assert cal["sha256"] == again.sha256 and len(cal["sha256"]) == 64
    # the overlap check saw the corpus rows (of the primary text), and only the primary is named
    assert doc["overlap_warning"] and doc["overlap_warning"].startswith(f"{ev}: ")
    assert "fortunes:" not in doc["overlap_warning"]
    # the report: KL on both corpora and their ratio, per method and budget, in Markdown and HTML
    md, html = (out / "results.md").read_text(), (out / "report.html").read_text()
    for text in (md, html):
        assert "KL on the calibration domain and on text calibration never saw" in text
        assert f"KL fortunes / KL {ev}" in text and "also fortunes/test" in text
        assert f"sha256 {cal['sha256'][:12]}" in text
    mixed = next(r for r in doc["rows"] if r["method"] == "mixq-rtn")
    from mixq.bench.html import fmt

    line = next(x for x in md.splitlines() if x.startswith("| mixq-rtn | 3 |") and f"{fmt(mixed['kl'])} |" in x
                and x.count("|") == 7)
    assert f"| {fmt(mixed['domains']['fortunes']['kl'])} | {fmt(mixed['kl_ratio']['fortunes'])} |" in line
    assert "figures/pareto-kl-fortunes.png" in md
    stdout = capsys.readouterr().out
    assert "KL on each corpus" in stdout and f"×{fmt(mixed['kl_ratio']['fortunes'], 3)}" in stdout


def test_bench_resumes_a_single_domain_run_from_before_domains(tiny_dir, corpora, fortunes_dir, tmp_path,
                                                              monkeypatch, capsys):
    import mixq.api
    import mixq.measure

    ev, cal = corpora
    out = tmp_path / "bench"
    assert main(_args(tiny_dir, ev, cal, out, "3", "rtn")) == 0
    meta_path = out / "bench.json"
    meta = json.loads(meta_path.read_text())
    assert list(meta["protocols"]) == [str(ev)] and meta["calibration"]["rows"] == {str(cal): 4}
    # make it a bench of the old layout: default corpus ptb, no protocols, no calibration record
    meta.pop("protocols")
    meta["key"]["corpus"] = "ptb"
    meta["protocol"]["corpus"] = "ptb"
    meta["calibration"] = {"corpus": str(cal), "split": "train", "nsamples": 4, "seqlen": 32, "seed": 0,
                           "grad_samples": 2}
    meta_path.write_text(json.dumps(meta))
    rest = ["--calib", str(cal), "--tokens", "256", "--seqlen", "32", "--nsamples", "4", "--calib-seqlen", "32",
            "--grad-samples", "2", "--resamples", "100", "--no-progress", "--out", str(out)]
    # the new default (ptb and fortunes) is refused, with the flag that resumes it
    capsys.readouterr()
    assert main(["bench", str(tiny_dir), "--bpw", "3", "--methods", "rtn", *rest]) == 2
    err = capsys.readouterr().err
    assert "corpus: 'ptb' → 'ptb,fortunes'" in err and "--corpus ptb resumes it" in err
    # resumed on its one corpus, nothing is computed again and the report has no side-by-side table
    meta["key"]["corpus"] = str(ev)
    meta["protocol"]["corpus"] = str(ev)
    meta_path.write_text(json.dumps(meta))
    monkeypatch.setattr(mixq.api, "quantize_model", lambda *a, **k: pytest.fail("quantized again"))
    monkeypatch.setattr(mixq.measure, "measure", lambda *a, **k: pytest.fail("measured again"))
    assert main(["bench", str(tiny_dir), "--bpw", "3", "--methods", "rtn", "--corpus", str(ev), *rest]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert list(doc["protocols"]) == [str(ev)] and len(doc["calibration"]["sha256"]) == 64
    assert "domains" not in doc["rows"][0]
    assert "never saw" not in (out / "results.md").read_text()
    # a calibration set that does not hash the same is refused
    meta = json.loads(meta_path.read_text())
    meta["calibration"]["sha256"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["bench", str(tiny_dir), "--bpw", "3", "--methods", "rtn", "--corpus", str(ev), *rest]) == 2
    assert "calibrated on other ids" in capsys.readouterr().err


def test_bench_help_and_bad_domains(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for c in data.CORPORA:
        assert c in text
    assert "default ptb,fortunes" in text and "default self+ptb" in text
    assert main(["bench", "x", "--corpus", "ptb,ptb", "--out", str(tmp_path / "b")]) == 2
    assert "names a corpus twice" in capsys.readouterr().err
    assert main(["bench", "x", "--calib", f"self+{tmp_path / 'missing.txt'}", "--out", str(tmp_path / "b")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    assert main(["bench", "x", "--corpus", f"ptb,{tmp_path / 'gone.txt'}", "--out", str(tmp_path / "b")]) == 2
    assert "gone.txt" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()  # all refused before the model or the directory
