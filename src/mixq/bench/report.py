"""``mixq bench`` results: collect the rows of a run, paired comparisons, and the Markdown/HTML report."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..jsonio import read_json, write_json_atomic
from .settings import BENCH_VERSION, FP_ROW, MIXED_PREFIX, ROWS, BenchError


def collect(out: str | Path) -> dict:
    """The results document of a bench directory, from ``bench.json``, the row files and the
    measurement (works on an interrupted run too)."""
    out = Path(out)
    meta_path = out / "bench.json"
    if not meta_path.exists():
        raise BenchError(f"{out} is not a bench directory (no bench.json): run `mixq bench ... --out {out}` first")
    meta = read_json(meta_path)
    rows, fp = [], None
    for p in sorted((out / ROWS).glob("*.json")):
        try:
            r = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if p.stem == FP_ROW:
            fp = r
        else:
            rows.append(r)
    order = {m: i for i, m in enumerate(meta.get("methods", []))}
    rows.sort(key=lambda r: (r.get("budget") or 0, order.get(r["method"], 99), r["method"]))
    meas = None
    if (out / "measurement.json").exists():
        from ..allocate import SensitivityTable

        t = SensitivityTable.load(out / "measurement.json")
        meas = {"metric": t.metric, "algorithm": t.meta.get("algorithm"), "layers": len(t.layers),
                "candidates": sorted({s.name for x in t.layers for s in x.candidates}),
                "seconds": t.meta.get("seconds"), "numel": t.numel}
    return {"_type": "mixq-bench-results", "_version": BENCH_VERSION, **{k: v for k, v in meta.items()
                                                                           if not k.startswith("_")},
            "measurement": meas, "unquantized": fp, "rows": rows}


def finish(out: str | Path) -> dict:
    """Write ``results.json``, ``results.md`` (+ ``figures/``) and ``report.html`` from what is in DIR."""
    out = Path(out)
    doc = collect(out)
    write_json_atomic(out / "results.json", doc, overwrite=True)
    table = None
    if (out / "measurement.json").exists():
        from ..allocate import SensitivityTable

        table = SensitivityTable.load(out / "measurement.json")
    rep = build_report(doc, table)
    if (out / "figures").exists():
        shutil.rmtree(out / "figures")
    rep.write(out / "report.html", out / "results.md", figure_dir=out / "figures")
    return doc


def domains(doc: dict) -> list[str]:
    """The evaluation corpora of a bench, the primary first (one for benches written before several)."""
    return list(doc.get("protocols") or {}) or [(doc.get("protocol") or {}).get("corpus")]


def _calib_text(c: dict) -> str:
    """``self+ptb (2 self, 2 ptb)/train`` — the calibration sources and their rows."""
    rows = c.get("rows") or {}
    mix = f" ({', '.join(f'{k} {s}' for s, k in rows.items())})" if len(rows) > 1 else ""
    return f"{c.get('corpus')}{mix}"


def protocol_line(doc: dict) -> str:
    """One line with everything a number depends on (printed under every table and figure)."""
    p, c = doc.get("protocol") or {}, doc.get("calibration") or {}
    m, b = doc.get("measurement") or {}, doc.get("bootstrap") or {}
    v = doc.get("mixq") or {}
    stride = "" if p.get("stride") == p.get("seqlen") else f", stride {p.get('stride')}"
    others = [q for name, q in (doc.get("protocols") or {}).items() if name != p.get("corpus")]
    also = "".join(f"; also {q.get('corpus')}/{q.get('split')}: {q.get('n_windows')} windows, {q.get('n_scored')} "
                   "scored" for q in others)
    sha = f", sha256 {c['sha256'][:12]}" if c.get("sha256") else ""
    parts = [f"model `{doc.get('model')}` ({p.get('dtype')})",
             f"eval {p.get('corpus')}/{p.get('split')}: first {p.get('max_tokens')} tokens = {p.get('n_windows')} "
             f"windows of {p.get('seqlen')}{stride}, {p.get('n_scored')} scored, BOS {p.get('bos')}{also}",
             "KL/top-1 vs the unquantized model",
             f"calib {_calib_text(c)}/train {c.get('nsamples')}×{c.get('seqlen')} tokens, seed {c.get('seed')}{sha}",
             f"measurement {m.get('metric', '?')}/{m.get('algorithm', '?')} (one for all budgets)"]
    if b.get("resamples"):
        parts.append(f"{b.get('confidence', 0.95):.0%} bootstrap CI over windows, {b['resamples']} resamples, "
                     f"seed {b.get('seed')}")
    parts += [f"machine: {doc.get('machine')}", f"mixq {v.get('version')} @ {v.get('commit') or 'no git'}"]
    return " · ".join(parts)


def _ci(r: dict, key: str):
    ci = (r.get("ci") or {}).get(key)
    return ci if ci else None


def _points(rows: list[dict], y: str, ci_key: str) -> list[dict]:
    pts = []
    for r in rows:
        if r.get("status") == "ok" and r.get(y) is not None:
            pts.append({"method": r["method"], "bpw": r["bpw"], y: r[y], "uniform": r.get("uniform", False),
                        "ci": _ci(r, ci_key)})
    return _points_ci(pts)


def domain_rows(doc: dict) -> tuple[list[str], list[dict]]:
    """KL on every domain side by side: ``(corpora, rows)``, each row ``{"method", "budget", "bpw", "kl":
    {corpus: KL}, "kl_ratio": {other corpus: KL(other) / KL(primary)}}`` for the finished quantized rows
    that were evaluated on more than one domain (none for a one-domain bench)."""
    names = domains(doc)
    if len(names) < 2:
        return names, []
    out = []
    for r in doc.get("rows", []):
        dom = r.get("domains") or {}
        if r.get("status") != "ok" or not dom:
            continue
        kl = {n: (dom.get(n) or {}).get("kl") for n in names}
        k0 = kl[names[0]]
        ratio = {n: (kl[n] / k0 if k0 and kl[n] is not None else None) for n in names[1:]}
        out.append({"method": r["method"], "budget": r.get("budget"), "bpw": r.get("bpw"),
                    "uniform": r.get("uniform", False), "kl": kl, "kl_ratio": ratio,
                    "ci": {n: ((dom.get(n) or {}).get("ci") or {}).get("kl") for n in names}})
    return names, out


def _points_ci(pts: list[dict]) -> list[dict]:
    """Error bars only where every point of a method's line has one (as :func:`_points`)."""
    for m in {p["method"] for p in pts}:
        grp = [p for p in pts if p["method"] == m]
        if any(p.get("ci") is None for p in grp):
            for p in grp:
                p.pop("ci", None)
    return pts


def paired_comparisons(doc: dict) -> list[dict]:
    """For each budget and algorithm with both a mixed and a uniform row: the paired bootstrap of
    KL and perplexity (mixed − uniform) over the same windows."""
    from ..eval.stats import bootstrap_diff

    b = doc.get("bootstrap") or {}
    n_res = b.get("resamples") or 0
    if not n_res:
        return []
    by = {(r["method"], r.get("budget")): r for r in doc["rows"] if r.get("status") == "ok" and r.get("per_window")}
    out = []
    for (m, budget), r in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if not m.startswith(MIXED_PREFIX):
            continue
        u = by.get((m[len(MIXED_PREFIX):], budget))
        if u is None:
            continue
        w = r["per_window"]["n_tokens"]
        if w != u["per_window"]["n_tokens"]:
            continue
        kw = dict(n_resamples=n_res, confidence=b.get("confidence", 0.95), seed=b.get("seed", 0))
        dkl = bootstrap_diff(r["per_window"]["kl_sum"], u["per_window"]["kl_sum"], w, stat="mean", **kw)
        dppl = bootstrap_diff(r["per_window"]["nll_sum"], u["per_window"]["nll_sum"], w, stat="ppl", **kw)
        out.append({"budget": budget, "mixed": m, "uniform": u["method"], "uniform_spec": u.get("specs"),
                    "d_kl": dkl["estimate"], "d_kl_ci": [dkl["low"], dkl["high"]],
                    "p_mixed_not_better_kl": dkl["p_a_not_better"],
                    "d_ppl": dppl["estimate"], "d_ppl_ci": [dppl["low"], dppl["high"]]})
    return out


def build_report(doc: dict, table=None):
    """The bench report (:class:`~mixq.bench.html.Report`): protocol, results table, paired
    comparisons, Pareto curves, allocation heatmap, sensitivity profile, trade-off chart."""
    from ..report.plots import allocation_heatmap, pareto_plot, sensitivity_profile, tradeoff_scatter
    from .html import Report

    rows, fp = doc.get("rows", []), doc.get("unquantized") or {}
    proto = protocol_line(doc)
    rep = Report(f"mixq bench — {doc.get('model')}",
                 f"Uniform baselines (one spec for every layer, the best that fits the budget) against mixq's "
                 f"mixed-precision plans, all from one sensitivity measurement. Updated {doc.get('updated')}.")
    # ---- protocol
    rep.heading("Protocol")
    p, c = doc.get("protocol") or {}, doc.get("calibration") or {}
    m, v = doc.get("measurement") or {}, doc.get("mixq") or {}
    names = domains(doc)
    protos = doc.get("protocols") or {p.get("corpus"): p}
    evaluation = [(("evaluation" if i == 0 else "also evaluated") + (" (primary)" if i == 0 and len(names) > 1
                                                                     else ""),
                   f"{q.get('corpus')}/{q.get('split')}, first {q.get('max_tokens')} tokens, {q.get('n_windows')} "
                   f"windows of {q.get('seqlen')} (stride {q.get('stride')}), {q.get('n_scored')} scored tokens, "
                   f"BOS {q.get('bos')}, tokenizer {q.get('tokenizer')}") for i, q in enumerate(protos.values())]
    sha = f", ids sha256 {c['sha256']}" if c.get("sha256") else ""
    items = [
        ("model", f"{doc.get('model')} (fingerprint {doc.get('model_fingerprint')}, {p.get('dtype')})"),
        *evaluation,
        ("reference", doc.get("reference")),
        ("calibration", f"{c.get('nsamples')} × {c.get('seqlen')} tokens of {_calib_text(c)}/train, seed "
                        f"{c.get('seed')}{sha}; gradient statistics from the first {c.get('grad_samples')}"),
        ("measurement", f"{m.get('metric')} errors of {m.get('algorithm')}, {m.get('layers')} layers × "
                        f"{len(m.get('candidates') or [])} candidate specs, {_secs(m.get('seconds'))}" if m else "—"),
        ("budgets", ", ".join(f"{b:g}" for b in doc.get("budgets", [])) + " bits per weight over the quantized layers "
                    "(codes, scales, zero points: every stored bit)"),
        ("methods", "uniform: " + ", ".join(x for x in doc.get("methods", []) if not x.startswith(MIXED_PREFIX)) +
                    "; mixed (exact knapsack): " + ", ".join(x for x in doc.get("methods", [])
                                                             if x.startswith(MIXED_PREFIX))),
        ("intervals", _ci_text(doc)),
        ("zero-shot", (f"offline PTB suite, tasks {doc['zeroshot']['tasks']}, {doc['zeroshot']['n']} items each, "
                       f"seed {doc['zeroshot']['seed']}, Wilson intervals") if doc.get("zeroshot") else "not run"),
        ("machine", doc.get("machine")),
        ("mixq", f"{v.get('version')} @ {v.get('commit') or 'not a git checkout'}"),
        ("command", f"`{doc.get('command')}`" if doc.get("command") else "—"),
    ]
    machines = sorted({r.get("machine") for r in rows if r.get("machine")} - {doc.get("machine")})
    commits = sorted({(r.get("mixq") or {}).get("commit") or "?" for r in rows} - {v.get("commit") or "?"})
    if machines or commits:
        items.append(("resumed runs", "some rows come from earlier runs: " + "; ".join(machines + commits)))
    rep.table(["", "setting"], items)
    if doc.get("overlap_warning"):
        rep.note(doc["overlap_warning"])
    # ---- results
    rep.heading("Results")
    hdr = ["method", "budget", "bpw", "spec(s)", "perplexity", "ppl CI", "KL", "KL CI", "top-1", "predicted",
           "quant s", "status"]
    zs_tasks = sorted({t for r in rows for t in (r.get("zeroshot") or {})} | set((fp.get("zeroshot") or {})))
    hdr[10:10] = [f"{t} acc" for t in zs_tasks]

    def line(r, method, budget):
        zs = [(r.get("zeroshot") or {}).get(t, {}).get("acc") for t in zs_tasks]
        return [method, budget, r.get("bpw"), r.get("specs"), r.get("perplexity"), _ci(r, "perplexity"), r.get("kl"),
                _ci(r, "kl"), r.get("top1_agreement"), r.get("predicted"), *zs, r.get("quant_seconds"),
                r.get("status") if r.get("status") == "ok" else f"{r.get('status')}: {r.get('error', '')}"]

    body = [line(fp, "unquantized", None)] if fp else []
    body += [line(r, r["method"], r.get("budget")) for r in rows]
    if len(names) > 1:
        rep.paragraph(f"Perplexity, KL and top-1 on {names[0]}, the primary evaluation corpus; the other corpora "
                      "are compared below.")
    rep.table(hdr, body, caption=proto)
    if not rows:
        rep.missing("No quantized row has finished yet.")
    dnames, drows = domain_rows(doc)
    if len(dnames) > 1:
        rep.heading("KL on the calibration domain and on text calibration never saw", 3)
        rep.paragraph(f"KL to the unquantized model on each evaluation corpus (calibration: {_calib_text(c)}), and "
                      f"the ratio KL(other) / KL({dnames[0]}): a ratio well above 1 means the quantized model holds "
                      f"up worse off the {dnames[0]} text than on it.")
        if drows:
            rep.table(["method", "budget", "bpw", *(f"KL {n}" for n in dnames),
                       *(f"KL {n} / KL {dnames[0]}" for n in dnames[1:])],
                      [[x["method"], x["budget"], x["bpw"], *(x["kl"][n] for n in dnames),
                        *(x["kl_ratio"][n] for n in dnames[1:])] for x in drows], caption=proto)
        else:
            rep.missing("No quantized row evaluated on every corpus has finished yet.")
    pairs = paired_comparisons(doc)
    if pairs:
        rep.heading("Mixed vs uniform, paired over the same windows", 3)
        rep.paragraph("Difference mixed − uniform at the same budget and algorithm, bootstrap over evaluation "
                      "windows with the same resampled windows for both (their shared difficulty cancels). An "
                      "interval below 0 means the mixed plan is better beyond window noise.")
        rep.table(["budget", "mixed", "uniform (spec)", "ΔKL", "ΔKL CI", "P(mixed not better)", "Δperplexity",
                   "Δppl CI"],
                  [[x["budget"], x["mixed"], f"{x['uniform']} ({x['uniform_spec']})", x["d_kl"], x["d_kl_ci"],
                    x["p_mixed_not_better_kl"], x["d_ppl"], x["d_ppl_ci"]] for x in pairs], caption=proto)
    # ---- figures
    rep.heading("Figures")
    ok = [r for r in rows if r.get("status") == "ok"]
    if ok:
        rep.figure(pareto_plot, _points(ok, "kl", "kl"), y="kl", name="pareto-kl",
                   caption="KL to the unquantized model vs bits per weight; uniform specs dashed, error bars = "
                           "bootstrap CI")
        rep.protocol(proto)
        rep.figure(pareto_plot, _points(ok, "perplexity", "perplexity"), y="perplexity", name="pareto-ppl",
                   reference=fp.get("perplexity"), reference_label="unquantized",
                   caption="Perplexity vs bits per weight; dotted line: the unquantized model")
        rep.protocol(proto)
        for n in dnames[1:]:
            pts = [{"method": x["method"], "bpw": x["bpw"], "kl": x["kl"][n], "uniform": x["uniform"],
                    "ci": x["ci"][n]} for x in drows if x["kl"][n] is not None]
            if pts:
                rep.figure(pareto_plot, _points_ci(pts), y="kl", name=f"pareto-kl-{n}",
                           title=f"KL on {n} (not the primary corpus {dnames[0]}) vs bits per weight",
                           caption=f"KL to the unquantized model on {n} vs bits per weight; compare with the "
                                   f"{dnames[0]} curve above")
                rep.protocol(proto)
        mixed = [r for r in ok if not r.get("uniform") and r.get("plan")]
        if mixed:
            budgets = sorted({r["budget"] for r in mixed})
            mid = budgets[(len(budgets) - 1) // 2]
            pick = sorted((r for r in mixed if r["budget"] == mid),
                          key=lambda r: (r["method"] != "mixq-gptq", r["method"]))[0]
            rep.figure(allocation_heatmap, pick["plan"], name="allocation",
                       title=f"{pick['method']} plan at {mid:g} bpw ({pick['bpw']:.3f} achieved)",
                       caption=f"Spec chosen for each layer by {pick['method']} at {mid:g} bits per weight")
            rep.protocol(proto)
        else:
            rep.missing("Allocation heatmap: no mixed-precision row has finished.")
        pts = [{"label": f"{r['method']} {r['budget']:g}", "size_mib": r["bytes_all"] / 2**20, "kl": r["kl"],
                "quant_seconds": r.get("quant_seconds")} for r in ok if r.get("bytes_all")]
        rep.figure(tradeoff_scatter, pts, color="quant_seconds", name="tradeoff",
                   color_label="quantization time, s (calibration walk included)",
                   title="Size, quality and quantization time (lower-left is better)",
                   caption="Whole-model size (non-quantized parameters at 16 bits) vs KL, coloured by the time "
                           "to quantize")
        rep.protocol(proto)
    else:
        rep.missing("Pareto curves and trade-off chart: no quantized row has finished.")
    if table is not None:
        rep.figure(sensitivity_profile, table, name="sensitivity",
                   caption=f"Measured sensitivity per layer vs depth ({table.metric}, {table.meta.get('algorithm')})")
        rep.protocol(proto)
    else:
        rep.missing("Sensitivity profile: no measurement in this directory.")
    return rep


def _secs(s) -> str:
    return "time unknown" if s is None else f"{s:.0f} s"


def _ci_text(doc: dict) -> str:
    b = doc.get("bootstrap") or {}
    if not b.get("resamples"):
        return "none (--resamples 0)"
    return (f"{b.get('confidence', 0.95):.0%} percentile bootstrap over evaluation windows, {b['resamples']} "
            f"resamples, seed {b.get('seed')} (mixq.eval.stats)")
