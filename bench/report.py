"""The committed benchmark results as one report: bench/results/report.html (self-contained, figures
embedded) and bench/results/report.md, built from the JSON files only — nothing is rerun.

    python bench/report.py [--results bench/results] [--figures DIR]

One section per benchmark (formats, allocation RTN/GPTQ, algorithms, deployment, activations + KV
cache, intra-tensor candidates, quantization cost) with its table(s) and figure(s); a benchmark whose
JSON is missing gets a section saying it was not run, an interrupted one (``*.partial.json`` only) is
shown and marked partial, and any other JSON with rows gets a generic table.  Next to every table and
figure: the protocol of its numbers (from the JSON) and the command, machine and commit (from the
header of the Markdown file the benchmark wrote beside it).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

from mixq.bench.html import Report, generic_rows
from mixq.report.plots import pareto_plot, tradeoff_scatter

RESULTS = Path(__file__).resolve().parent / "results"
OUTPUTS = {"report.html", "report.md"}


# ---------------------------------------------------------------------------- provenance
def md_header(md: Path | list[str]) -> dict:
    """``command``, ``machine``, ``commit``, ``python`` and the ``Protocol:`` paragraph of a bench .md
    (a path, or the header lines some benches also keep in their JSON)."""
    out = {}
    if isinstance(md, Path) and not md.exists():
        return out
    for line in (md.read_text().splitlines() if isinstance(md, Path) else md):
        m = re.match(r"- (command|machine|commit|date|python): (.*)", line)
        if m and m.group(1) not in out:
            out[m.group(1)] = m.group(2).strip()
        elif line.startswith("Protocol:") and "protocol" not in out:
            out["protocol"] = line.removeprefix("Protocol:").strip()
    return out


def protocol_text(doc: dict, head: dict) -> str:
    """One line: the evaluation protocol of the JSON, then where and how it was run."""
    p = doc.get("protocol") or {}
    parts = []
    if p:
        stride = "" if p.get("stride") in (None, p.get("seqlen")) else f", stride {p['stride']}"
        parts.append(f"eval {p.get('corpus')}/{p.get('split')}: first {p.get('max_tokens')} tokens = "
                     f"{p.get('n_windows')} windows of {p.get('seqlen')}{stride}, {p.get('n_scored')} scored, "
                     f"BOS {p.get('bos')}, {p.get('dtype')}, tokenizer {p.get('tokenizer')}")
    cmd = head.get("command") or (f"`{doc['command']}`" if doc.get("command") else None)
    if not p and isinstance(doc.get("key"), dict):  # partial files record only their run settings
        parts.append("run settings " + ", ".join(f"{k}={v}" for k, v in doc["key"].items()))
    for k, v in (("command", cmd), ("machine", head.get("machine")), ("commit", head.get("commit")),
                 ("date", head.get("date") if not head.get("commit") else None)):
        if v:
            parts.append(f"{k}: {v}")
    if doc.get("threads"):
        parts.append(f"{doc['threads']} torch threads")
    return " · ".join(parts) if parts else "protocol not recorded in the JSON"


def _f(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


# ---------------------------------------------------------------------------- sections
def family(spec: str) -> str:
    s = spec.upper()
    if s.startswith("NVFP"):
        return "NVFP4"
    if s.startswith("MX"):
        return "MX (OCP microscaling)"
    if s.startswith("NF"):
        return "NormalFloat"
    if s.startswith("FP"):
        return "minifloat"
    if s.startswith("KM"):
        return "k-means"
    return "integer"


def sec_formats(rep: Report, doc: dict, proto: str) -> None:
    rows = doc.get("rows", [])
    rep.table(["spec", "bpw (quantized linears)", "bpw (all params)", "perplexity", "KL", "KL p99", "top-1",
               "quant s", "group-fallback layers"],
              [[r["spec"], r.get("bpw_linears"), r.get("bpw_all"), r.get("perplexity"),
                None if r["spec"] == "fp32" else r.get("kl"), None if r["spec"] == "fp32" else r.get("kl_p99"),
                r.get("top1_agreement"), r.get("seconds"), r.get("fallback")] for r in rows], caption=proto)
    q = [r for r in rows if r["spec"] != "fp32" and r.get("kl") is not None]
    fp = next((r for r in rows if r["spec"] == "fp32"), {})
    if any(r["spec"] == "W4-g32-asymf" for r in q):
        rep.paragraph("`W4-g32-asymf` is the grid the embedded model was distributed in (llama.cpp Q4_1), so it "
                      "lands back on the original weights almost exactly: its point is an artefact of the model's "
                      "origin, not a property of the format (see the notes in `formats_rtn.md`).")
    rep.figure(pareto_plot, [{"method": family(r["spec"]), "bpw": r["bpw_linears"], "kl": r["kl"], "uniform": True}
                             for r in q], y="kl", name="formats-kl",
               title="RTN: KL to fp32 vs bits per weight, by format family",
               caption="RTN with every format family: KL vs bits per weight (each point one spec)")
    rep.protocol(proto)
    rep.figure(pareto_plot, [{"method": family(r["spec"]), "bpw": r["bpw_linears"], "perplexity": r["perplexity"],
                              "uniform": True} for r in q], y="perplexity", name="formats-ppl",
               reference=_f(fp.get("perplexity")), reference_label="fp32",
               caption="RTN with every format family: perplexity vs bits per weight")
    rep.protocol(proto)


def sec_allocation(rep: Report, doc: dict, proto: str) -> None:
    rows = sorted(doc.get("rows", []), key=lambda r: r.get("budget") or 0)
    fp = doc.get("fp32") or {}
    ms = doc.get("measure_seconds") or {}
    if fp or ms:
        rep.paragraph(f"fp32 perplexity {fp.get('perplexity', float('nan')):.3f} on these windows. "
                      + ("Measurement times: " + ", ".join(f"{k} {v:.0f} s" for k, v in ms.items()) + "."
                         if ms else ""))
    rep.table(["budget", "variant", "bpw", "KL", "perplexity", "top-1", "predicted", "spec(s)", "solver ms",
               "quant s", "from"],
              [[r.get("budget"), r.get("variant"), r.get("bpw"), r.get("kl"), r.get("perplexity"), r.get("top1"),
                r.get("predicted"), r.get("specs"), r.get("solve_ms"), r.get("quant_s"),
                "earlier run" if r.get("source") else "this run"] for r in rows], caption=proto)
    carried = sorted({r["source"] for r in rows if r.get("source")})
    if carried:
        rep.paragraph("Rows marked *earlier run* come from: " + "; ".join(carried) + ".")
    for y, name in (("kl", "KL"), ("perplexity", "perplexity")):
        pts = [{"method": r["variant"], "bpw": r["bpw"], y: r[y], "uniform": r["variant"].startswith("uniform")}
               for r in rows if r.get(y) is not None]
        rep.figure(pareto_plot, pts, y=y, name=f"alloc-{y}", reference=_f(fp.get("perplexity")) if y == "perplexity"
                   else None, reference_label="fp32",
                   caption=f"{name} vs bits per weight: mixed-precision plans (solid) vs the best uniform spec (dashed)")
        rep.protocol(proto)


def sec_algorithms(rep: Report, doc: dict, proto: str) -> None:
    rows = doc.get("rows", [])
    rep.table(["spec", "method", "calib samples", "bpw", "perplexity", "KL", "top-1", "quant s", "extra RSS MB"],
              [[r.get("spec"), r.get("method"), r.get("nsamples") or None, r.get("bpw"), r.get("perplexity"),
                None if r.get("method") == "fp32" else r.get("kl"), r.get("top1_agreement"), r.get("seconds"),
                r.get("extra_rss_mb")] for r in rows], caption=proto)
    q = [r for r in rows if r.get("method") != "fp32" and r.get("kl") is not None]
    fp = next((r for r in rows if r.get("method") == "fp32"), {})

    def label(r):
        return r["method"] + (f" ({r['nsamples']} samples)" if r.get("nsamples") else "")

    rep.figure(pareto_plot, [{"method": label(r), "bpw": r["bpw"], "kl": r["kl"]} for r in q], y="kl",
               name="algorithms-kl", front=False, title="PTQ algorithms: KL to fp32 vs bits per weight",
               caption="KL vs bits per weight, one line per algorithm (and calibration size)")
    rep.protocol(proto)
    rep.figure(tradeoff_scatter, [{"label": f"{r['spec']} {label(r)}", "bpw": r["bpw"], "kl": r["kl"],
                                   "seconds": r.get("seconds")} for r in q], x="bpw", color="seconds",
               name="algorithms-time", xlabel="bits per weight (quantized layers, metadata included)",
               color_label="quantization time, s", title="Quality vs quantization time",
               caption="KL vs bits per weight, coloured by the time each algorithm took")
    rep.protocol(proto)
    if fp:
        rep.paragraph(f"fp32 perplexity on these windows: {fp.get('perplexity'):.3f}.")


def sec_deploy(rep: Report, doc: dict, proto: str) -> None:
    rows = doc.get("rows", [])

    def mib(x):
        return None if x is None else x / 2**20

    rep.table(["row", "spec", "bpw (linears)", "disk MiB", "RAM MiB", "decode tok/s", "prefill ms", "perplexity",
               "ppl packed bf16", "KL", "packed = fake-quant", "GGUF MiB", "GGUF ppl"],
              [[r.get("row"), r.get("spec"), r.get("bpw_linears"), mib(r.get("disk_bytes")), mib(r.get("ram_resident")),
                r.get("decode_tok_s"), r.get("prefill_ms"), r.get("ppl"), r.get("ppl_packed_bf16"), r.get("kl_fake"),
                r.get("agree"), mib(r.get("gguf_bytes")), r.get("gguf_ppl")] for r in rows], caption=proto)
    pts = [{"label": r.get("row"), "size_mib": mib(r.get("disk_bytes")), "ppl": r.get("ppl"),
            "tokens_per_s": r.get("decode_tok_s")} for r in rows]
    rep.figure(tradeoff_scatter, pts, y="ppl", name="deploy", ylabel="perplexity (log scale)",
               xlabel="size on disk, MiB", caption="Size on disk vs perplexity, coloured by greedy decode speed")
    rep.protocol(proto)


def sec_intra(rep: Report, doc: dict, proto: str) -> None:
    rows = doc.get("rows", [])
    fp = doc.get("fp32") or {}
    curves = sorted((r for r in rows if r.get("kind") == "curve"), key=lambda r: r.get("budget") or 0)
    meths = sorted((r for r in rows if r.get("kind") == "method"), key=lambda r: r.get("bpw") or 0)
    if doc.get("intra_candidates"):
        rep.paragraph("Intra-tensor candidates added to the allocation: " +
                      ", ".join(f"`{c}`" for c in doc["intra_candidates"]) + ".")
    if curves:
        rep.heading("Allocation with and without intra-tensor candidates", 3)
        rep.table(["budget", "variant", "bpw", "KL", "perplexity", "top-1", "predicted", "specs", "composite layers",
                   "quant s"],
                  [[r.get("budget"), r.get("variant"), r.get("bpw"), r.get("kl"), r.get("perplexity"), r.get("top1"),
                    r.get("predicted"), r.get("n_specs"), r.get("composite_layers"), r.get("quant_s")] for r in curves],
                  caption=proto)
        for y in ("kl", "perplexity"):
            rep.figure(pareto_plot, [{"method": r["variant"], "bpw": r["bpw"], y: r[y],
                                      "uniform": str(r["variant"]).startswith("uniform")} for r in curves if r.get(y)],
                       y=y, name=f"intra-{y}", reference=_f(fp.get("perplexity")) if y == "perplexity" else None,
                       reference_label="fp32",
                       caption=f"{y} vs bits per weight: uniform, layer-level mixed, and mixed with intra-tensor "
                               "candidates")
            rep.protocol(proto)
    if meths:
        rep.heading("Each intra-tensor method alone (one spec for every block linear)", 3)
        rep.table(["method", "spec", "algorithm", "bpw", "KL", "perplexity", "top-1", "quant s"],
                  [[r.get("label"), r.get("spec"), r.get("method"), r.get("bpw"), r.get("kl"), r.get("perplexity"),
                    r.get("top1"), r.get("quant_s")] for r in meths], caption=proto)
        rep.figure(tradeoff_scatter, [{"label": r.get("label"), "bpw": r["bpw"], "kl": r["kl"],
                                       "quant_s": r.get("quant_s")} for r in meths if r.get("kl") is not None],
                   x="bpw", color="quant_s", name="intra-methods", color_label="quantization time, s",
                   xlabel="bits per weight (quantized layers, metadata included)",
                   title="Intra-tensor methods alone: KL vs bits per weight",
                   caption="Each intra-tensor method with one spec for every layer: KL vs bits per weight")
        rep.protocol(proto)
    if not curves and not meths:
        sec_generic(rep, doc, proto)


def _bar_chart(labels, values, out, *, title, xlabel):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 0.28 * len(labels) + 1.4))
    ax = fig.add_subplot()
    ys = range(len(labels))
    ax.barh(list(ys), values, color="#4477aa")
    ax.set_yticks(list(ys), labels, fontsize=8)
    ax.invert_yaxis()
    if all(v > 0 for v in values):
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(True, axis="x", which="both", alpha=0.3)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    return out


SECTION_NAMES = {"fp": "unquantized reference", "wa": "weights × activations", "kv": "KV-cache bits (KIVI)",
                 "kvmix": "mixed per-layer KV bits", "joint": "one memory budget for weights + KV cache"}


def sec_act_kv(rep: Report, doc: dict, proto: str) -> None:
    rows = doc.get("rows", [])
    for sec in dict.fromkeys(r.get("section", "?") for r in rows):
        rs = [r for r in rows if r.get("section", "?") == sec]
        rep.heading(SECTION_NAMES.get(sec, sec), 3)
        cols = ["label", "perplexity", "kl", "top1_agreement", "seconds"]
        extra = [k for k in generic_rows(rs, max_columns=40)[0] if k not in cols + ["section"]][:6]
        rep.table(cols + extra, [[r.get(k) for k in cols + extra] for r in rs], caption=proto)
        kl = [(r.get("label", "?"), r["kl"]) for r in rs if isinstance(r.get("kl"), (int, float))]
        if len(kl) > 1 and sec != "fp":
            rep.figure(_bar_chart, [k for k, _ in kl], [v for _, v in kl], name=f"actkv-{sec}",
                       title=f"{SECTION_NAMES.get(sec, sec)}: KL to fp32 per row",
                       xlabel="KL(P_fp32 ‖ P_quantized), nats per token (log scale)",
                       caption=f"{SECTION_NAMES.get(sec, sec)}: KL to the fp32 model")
            rep.protocol(proto)


def sec_generic(rep: Report, doc, proto: str) -> None:
    rows = doc.get("rows") if isinstance(doc, dict) else doc
    if isinstance(rows, dict):  # {name: {metric: value}}
        rows = [{"row": k, **(v if isinstance(v, dict) else {"value": v})} for k, v in rows.items()]
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows) or not rows:
        keys = ", ".join(sorted(doc)) if isinstance(doc, dict) else type(doc).__name__
        rep.paragraph(f"No rows to tabulate; the file holds: {keys}.")
        return
    hdr, cells = generic_rows(rows)
    rep.table(hdr, cells, caption=proto)
    name_key = next((k for k in ("method", "variant", "label", "spec", "row") if k in hdr), None)
    if name_key and "bpw" in hdr and "kl" in hdr:
        pts = [{"method": str(r.get(name_key)), "bpw": r["bpw"], "kl": r["kl"]} for r in rows
               if isinstance(r.get("bpw"), (int, float)) and isinstance(r.get("kl"), (int, float))]
        if pts:
            rep.figure(pareto_plot, pts, y="kl", name=f"generic-{len(rep.blocks)}",
                       caption="KL vs bits per weight")
            rep.protocol(proto)


# (file stem, title, renderer, script that writes it)
SECTIONS = [
    ("formats_rtn", "RTN across formats", sec_formats, "bench/formats_rtn.py"),
    ("allocation_rtn", "Mixed-precision allocation vs uniform (RTN)", sec_allocation, "bench/allocation.py --tag allocation_rtn"),
    ("allocation_gptq", "Mixed-precision allocation vs uniform (GPTQ)", sec_allocation, "bench/allocation.py --tag allocation_gptq"),
    ("algorithms", "PTQ algorithms: RTN, GPTQ, AWQ, rotation", sec_algorithms, "bench/algorithms.py"),
    ("deploy", "Deployment: size, memory, speed, exactness", sec_deploy, "bench/deploy.py"),
    ("act_kv", "Activations and the KV cache", sec_act_kv, "bench/act_kv.py"),
    ("intra", "Intra-tensor mixed precision", sec_intra, "bench/intra.py"),
    ("quantize_cost", "Cost of mixed-precision quantization", sec_generic, "bench/quantize_cost.py"),
]


def _load(path: Path):
    try:
        return json.loads(path.read_text()), None
    except (OSError, json.JSONDecodeError) as e:
        return None, f"{type(e).__name__}: {e}"


def build(results: Path) -> Report:
    rep = Report("mixq — committed benchmark results",
                 f"Built by `python bench/report.py` from the JSON files in `{_rel(results)}`; nothing was rerun. "
                 "Each section's small print gives the protocol, command, machine and commit of its numbers.")
    seen: set[str] = set()
    rep.heading("Contents")
    status = []
    for stem, title, _, script in SECTIONS:
        full, part = results / f"{stem}.json", results / f"{stem}.partial.json"
        st = "present" if full.exists() else ("partial (interrupted run)" if part.exists() else "not run")
        status.append([title, f"{stem}.json", st, f"python {script}"])
    rep.table(["benchmark", "file", "status", "written by"], status)
    for stem, title, render, script in SECTIONS:
        full, part = results / f"{stem}.json", results / f"{stem}.partial.json"
        seen.update({full.name, part.name})
        rep.heading(title)
        path = full if full.exists() else part if part.exists() else None
        if path is None:
            rep.missing(f"Not run: `{stem}.json` is not in {_rel(results)} (`python {script}` writes it).")
            continue
        _section(rep, path, render, results, partial=path is part)
    others = sorted(p for p in results.glob("*.json") if p.name not in seen and p.name not in OUTPUTS)
    for p in others:
        rep.heading(f"Other results: {p.name}")
        _section(rep, p, sec_generic, results, partial=p.name.endswith(".partial.json"))
    return rep


def _section(rep: Report, path: Path, render, results: Path, *, partial: bool) -> None:
    doc, err = _load(path)
    if doc is None:
        rep.note(f"`{path.name}` could not be read ({err}); section skipped.")
        return
    stem = path.name.removesuffix(".json").removesuffix(".partial")
    md = next((m for m in (results / f"{stem}.md", results / f"{stem}_partial.md") if m.exists()), None)
    head = md_header(md) if md else {}
    if isinstance(doc, dict) and isinstance(doc.get("header"), list):  # the JSON's own header wins
        head = {**head, **md_header([str(x) for x in doc["header"]])}
    if partial or (isinstance(doc, dict) and doc.get("partial")):
        rep.note(f"Partial: `{path.name}` holds the rows an interrupted run saved; missing rows were not measured.")
    rep.paragraph(f"Source: `{path.name}`" + (f", report `{md.name}`" if md else "") + ".")
    if head.get("protocol"):
        rep.paragraph("Protocol (as the benchmark wrote it): " + head["protocol"])
    proto = protocol_text(doc if isinstance(doc, dict) else {}, head)
    try:
        render(rep, doc, proto)
    except Exception as e:  # noqa: BLE001 - an unexpected layout falls back to the generic table
        rep.note(f"`{path.name}` has an unexpected layout ({type(e).__name__}: {e}); shown as a plain table.")
        sec_generic(rep, doc, proto)


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def main(argv: list[str] | None = None) -> tuple[Path, Path]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(RESULTS), help="folder of the bench JSONs (default bench/results)")
    ap.add_argument("--figures", default=None, help="also write the figures as PNG here and link them from report.md")
    args = ap.parse_args(argv)
    results = Path(args.results)
    if not results.is_dir():
        raise SystemExit(f"{results} is not a folder")
    rep = build(results)
    html, md = results / "report.html", results / "report.md"
    rep.write(html, md, figure_dir=args.figures)
    print(f"wrote {html} and {md}")
    return html, md


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
