"""Intra-tensor mixed precision on SmolLM2-135M / PTB: allocation with composite candidates vs layer-level
allocation vs uniform, and each intra-tensor method alone.

    OMP_NUM_THREADS=1 python bench/intra.py [--tokens 4096] [--nsamples 32] [--budgets 2.5,3,3.5,4]
                                            [--intra LIST] [--methods LIST] [--gptq-methods LIST]

1. Curves (RTN, kfac metric, exact solver) at each budget: ``uniform RTN`` (the best single plain spec
   within the budget), ``mixed RTN (kfac)`` (layer-level: mixq's default candidates) and
   ``mixed RTN + intra (kfac)`` (the same plus the composite candidates ``--intra``).
2. Each method alone at its usual setting, one spec for every block linear, RTN (``--methods``), and
   optionally GPTQ (``--gptq-methods``, e.g. ``W3-channel-asym+c1,W3-g16+sq3``).

Measurements live in bench/cache/ (git-ignored) like bench/allocation.py's: the default candidates in
``measure-kfac-rtn-<n>x512.json`` (the file allocation.py uses), the composites alone in
``measure-kfac-rtn-<tag>-<n>x512.json`` (``<tag>`` = ``intra`` for the default ``--intra`` list, else
``intra-<hash>``); with neither file present both are measured in one pass
(``measure-kfac-rtn-default+<tag>-<n>x512.json``) and split.  Rows are saved after each one in
bench/results/<tag>.partial.json, so an interrupted run resumes at the next row.
Writes bench/results/<tag>.{md,json,png}.

Runtime, estimated on 2 busy cores with 1 OpenMP thread (from timings of every spec on SmolLM2's layer
shapes, a random 2-block SmolLM2-shaped model and the forward pass per block): ~21 min without the plain
cache (measurement ~10 min, 12 curve rows ~5 min, 10 method rows ~5.5 min, set-up ~1 min), ~19 min with
it; each ``--gptq-methods`` entry adds ~3-4 min, ``KM3+o0.45`` (SqueezeLLM) ~4.5 min as a method row and
~4.5 min more in ``--intra``.
``--smoke N`` runs everything on a random SmolLM2-shaped model with N blocks (results and caches under
bench/cache/smoke/) to check the script and time it without the real model.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, header, peak_rss_mb  # noqa: E402

import mixq  # noqa: E402
from mixq.allocate import LayerEntry, SensitivityTable, default_candidates  # noqa: E402
from mixq.arch import iter_layers  # noqa: E402
from mixq.config import is_composite, parse_spec  # noqa: E402
from mixq.jsonio import write_json_atomic  # noqa: E402

CACHE = Path(__file__).parent / "cache"
METRIC, ALGO = "kfac", "rtn"
# the composites the allocator may pick: mixq.allocate.intra_candidates' default set without KM3+o0.45 (SqueezeLLM's
# weighted k-means is ~20x slower to quantize than the others: +4.5 min of measurement), plus two
# binarized ones (cheap; they can take the least sensitive layers at the lowest budgets)
INTRA = ("W2-g64-asym+o0.5", "SLIM2-g64-asym", "SLIM3-g64", "NF3-g64+d4", "W3-g16+sq3", "W3-g64+c8", "W3-g64+o0.5",
         "W3-g64+h5", "W4-g64+o0.25", "BIN-g64+r32", "BIN-g64+o2w8")
METHODS = (  # (label, spec): each method alone at its usual setting
    ("SpQR-like", "W3-g16+sq3"),
    ("OWQ W3", "W3-channel-asym+c1"),
    ("OWQ W4", "W4-channel-asym+c1"),
    ("SliM-LLM 2-bit", "SLIM2-g64-asym"),
    ("SliM-LLM 3-bit", "SLIM3-g64"),
    ("MixLLM-like", "W4-g192+h10"),
    ("BlockDialect-like", "FP4-g32+d8"),
    ("BiLLM-like", "BIN-g64+r32"),
    ("BiLLM + PB-LLM", "BIN-g192+r32+o1w8"),
    ("PB-LLM-like", "BIN-g64+o2w8"),
)
LABELS = {s: label for label, s in METHODS} | {"KM3+o0.45": "SqueezeLLM-like", "KM3-channel+o0.45": "SqueezeLLM-like",
                                              "W3-g16-asym+sq3+o0.25": "SpQR (full recipe)"}
VARIANTS = ("uniform RTN", "mixed RTN (kfac)", "mixed RTN + intra (kfac)")


# ---------------------------------------------------------------------------- set-up
class SmokeSetup:
    """Random SmolLM2-shaped model with ``layers`` blocks, byte-level ids of PTB (no tokenizer, no real model)."""

    def __init__(self, layers: int, tokens: int, seqlen: int = 512, nsamples: int = 32):
        import transformers as tf

        from mixq import data
        from mixq.eval import Protocol, ReferenceCache

        cfg = tf.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                             num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                             max_position_embeddings=8192)
        torch.manual_seed(0)
        self.ref = tf.LlamaForCausalLM(cfg).eval()
        self.tok = None
        self._ids = {s: torch.tensor(list(data.load_corpus("ptb", s).encode()[: 400_000]), dtype=torch.long)
                     for s in ("test", "train")}
        self.windows = data.eval_windows(self._ids["test"], seqlen, max_tokens=tokens)
        self.protocol = Protocol.for_windows(self.windows, corpus="ptb", split="test", tokenizer="bytes",
                                             dtype="float32")
        self.cache = ReferenceCache(self.ref, self.windows, progress=False)
        self.seqlen, self.nsamples = seqlen, nsamples
        self.calib = data.calibration_batch(self._ids["train"], nsamples, seqlen, seed=0)  # bytes, no tokenizer: no stage

    def evaluate(self, model) -> dict:
        from mixq.eval import evaluate

        return evaluate(model, self.windows, self.protocol, reference=self.cache, progress=False)


def block_linears(model) -> dict[str, tuple[int, int]]:  # shapes, to check the specs before measuring: no stage
    return {r.fqn: r.shape for r in iter_layers(model) if r.block is not None}


# ---------------------------------------------------------------------------- measurements
def _subset(table: SensitivityTable, keep, meta: dict) -> SensitivityTable:
    layers = []
    for e in table.layers:
        idx = [i for i, c in enumerate(e.candidates) if keep(c)]
        layers.append(LayerEntry(e.fqn, e.shape, tuple(e.candidates[i] for i in idx), tuple(e.errors[i] for i in idx)))
    return SensitivityTable(tuple(layers), table.metric, meta=meta)


def merge(plain: SensitivityTable, intra: SensitivityTable) -> SensitivityTable:
    """One table with every layer's plain and composite candidates (same model, calibration and metric)."""
    for k in ("model", "calibration", "calibration_shape", "algorithm"):
        if plain.meta.get(k) != intra.meta.get(k):
            raise SystemExit(f"the cached measurements disagree on {k} ({plain.meta.get(k)} vs {intra.meta.get(k)}): "
                             f"delete the stale one in {CACHE}")
    if plain.metric != intra.metric:
        raise SystemExit(f"cached metrics differ: {plain.metric} vs {intra.metric}")
    by = {e.fqn: e for e in intra.layers}
    if set(by) != {e.fqn for e in plain.layers}:
        raise SystemExit("the cached measurements cover different layers")
    layers = [LayerEntry(e.fqn, e.shape, e.candidates + by[e.fqn].candidates, e.errors + by[e.fqn].errors)
              for e in plain.layers]
    return SensitivityTable(tuple(layers), plain.metric,
                            meta={**plain.meta, "candidates": [c.name for c in layers[0].candidates]})


def tables(S, intra_specs, tag: str, prefix: str) -> tuple[SensitivityTable, SensitivityTable, dict]:
    """``(plain, plain + intra, seconds)``, from bench/cache or measured (resumable)."""
    cache = CACHE / "smoke" if prefix else CACHE
    cache.mkdir(parents=True, exist_ok=True)
    n = f"{S.nsamples}x{S.seqlen}"
    p_plain = cache / f"{prefix}measure-{METRIC}-{ALGO}-{n}.json"
    p_intra = cache / f"{prefix}measure-{METRIC}-{ALGO}-{tag}-{n}.json"
    p_both = cache / f"{prefix}measure-{METRIC}-{ALGO}-default+{tag}-{n}.json"
    plain_c = default_candidates()
    if not p_plain.exists() and not p_intra.exists():
        both = SensitivityTable.load(p_both) if p_both.exists() else mixq.measure(
            S.ref, S.calib, candidates=plain_c + intra_specs, metric=METRIC, algorithm=ALGO, out=p_both, progress=False)
        meta = dict(both.meta, split_from=p_both.name)
        extra = {c.name for c in intra_specs}  # split by --intra names: the default set holds composites too (TCQ+ip)
        _subset(both, lambda c: c.name not in extra, {**meta, "candidates": [c.name for c in plain_c]}).save(p_plain)
        _subset(both, lambda c: c.name in extra, {**meta, "candidates": [c.name for c in intra_specs]}).save(p_intra)
    secs = {}
    plain = SensitivityTable.load(p_plain) if p_plain.exists() else mixq.measure(
        S.ref, S.calib, candidates=plain_c, metric=METRIC, algorithm=ALGO, out=p_plain, progress=False)
    intra = SensitivityTable.load(p_intra) if p_intra.exists() else mixq.measure(
        S.ref, S.calib, candidates=intra_specs, metric=METRIC, algorithm=ALGO, out=p_intra, progress=False)
    want = [c.name for c in intra_specs]
    if [c.name for c in intra.layers[0].candidates] != want:
        raise SystemExit(f"{p_intra} holds other composites ({[c.name for c in intra.layers[0].candidates]}); "
                         "delete it or pass the same --intra list")
    if plain.meta.get("split_from") and plain.meta.get("split_from") == intra.meta.get("split_from"):
        secs["default+intra (one pass)"] = plain.meta.get("seconds")
    else:
        secs.update(default=plain.meta.get("seconds"), intra=intra.meta.get("seconds"))
    return plain, merge(plain, intra), secs


# ---------------------------------------------------------------------------- rows
def _quantize_eval(S, spec=None, *, plan=None, method: str) -> tuple[dict, float, dict]:
    model = copy.deepcopy(S.ref)
    res = mixq.quantize(model, spec, plan=plan, method=method, calib=S.calib if method == "gptq" else None,
                        progress=False)
    r = S.evaluate(model)
    del model
    return r, res.seconds, res.meta["size"]


def curve_row(S, table, budget: float, variant: str, tag: str) -> dict:
    t = time.perf_counter()
    plan = mixq.plan(table, bpw=budget, solver="uniform" if variant.startswith("uniform") else "exact")
    solve_ms = (time.perf_counter() - t) * 1000
    specs = dict(plan.layers)
    r, q_s, _ = _quantize_eval(S, plan=plan, method=ALGO)
    counts = Counter(s.name for s in specs.values())
    comp = sum(v for k, v in counts.items() if is_composite(parse_spec(k)))
    return dict(kind="curve", id=f"curve|{variant}|{budget:g}" + (f"|{tag}" if "intra" in variant else ""),
                budget=budget, variant=variant, bpw=plan.achieved_bpw, predicted=plan.predicted_error,
                kl=r["kl"], perplexity=r["perplexity"], top1=r["top1_agreement"], solve_ms=solve_ms, quant_s=q_s,
                eval_s=r.get("seconds"), n_specs=len(counts), composite_layers=comp,
                spec_counts=dict(counts.most_common()))


def method_row(S, spec_name: str, method: str) -> dict:
    spec = parse_spec(spec_name)
    r, q_s, size = _quantize_eval(S, spec, method=method)  # every block linear
    return dict(kind="method", id=f"method|{spec.name}|{method}", label=LABELS.get(spec_name, spec.name),
                spec=spec.name, method=method, bpw=size["bpw_quantized"], kl=r["kl"], perplexity=r["perplexity"],
                top1=r["top1_agreement"], quant_s=q_s, eval_s=r.get("seconds"))


# ---------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--budgets", default="2.5,3,3.5,4")
    ap.add_argument("--intra", default=",".join(INTRA), help="composite candidates added to the default set")
    ap.add_argument("--methods", default=",".join(s for _, s in METHODS),
                    help="specs applied alone to every block linear with RTN ('' for none; KM3+o0.45 adds ~4.5 min)")
    ap.add_argument("--gptq-methods", default="", help="specs applied alone with GPTQ (~4 min each), "
                                                       "e.g. W3-channel-asym+c1,W3-g16+sq3")
    ap.add_argument("--tag", default=None, help="output stem in bench/results/ (default intra)")
    ap.add_argument("--smoke", type=int, default=0, metavar="N",
                    help="random SmolLM2-shaped model with N blocks; outputs under bench/cache/smoke/")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from <tag>.json")
    args = ap.parse_args()
    results = CACHE / "smoke" if args.smoke else RESULTS
    results.mkdir(parents=True, exist_ok=True)
    tag = args.tag or "intra"
    if args.report_only:
        doc = json.loads((results / f"{tag}.json").read_text())
        return write(doc, results, tag)

    budgets = [float(b) for b in args.budgets.split(",") if b]
    intra_specs = [parse_spec(n) for n in args.intra.split(",") if n]
    bad = [s.name for s in intra_specs if not is_composite(s)]
    if bad:
        raise SystemExit(f"--intra takes composite specs only, got {bad}")
    names = [s.name for s in intra_specs]
    ctag = "intra" if names == [parse_spec(n).name for n in INTRA] else \
        "intra-" + hashlib.sha256(",".join(names).encode()).hexdigest()[:8]
    methods = [(parse_spec(n).name, "rtn") for n in args.methods.split(",") if n] + \
              [(parse_spec(n).name, "gptq") for n in args.gptq_methods.split(",") if n]
    t_start = time.perf_counter()
    if args.smoke:
        S = SmokeSetup(args.smoke, args.tokens, nsamples=args.nsamples)
    else:
        from common import Setup

        S = Setup(tokens=args.tokens, nsamples=args.nsamples)
    shapes = block_linears(S.ref)
    for name, _ in methods:  # fail before the measurement, not after
        s = parse_spec(name)
        for f, sh in shapes.items():
            s.cost(sh)
    plain, both, msecs = tables(S, intra_specs, ctag, f"smoke{args.smoke}-" if args.smoke else "")
    print("measurements:", msecs, flush=True)
    partial = results / f"{tag}.partial.json"
    key = dict(tokens=args.tokens, nsamples=args.nsamples, smoke=args.smoke)
    state = json.loads(partial.read_text()) if partial.exists() else {}
    rows = state.get("rows", []) if state.get("key") == key else []
    done = {r["id"] for r in rows}
    fp = state.get("fp32") if state.get("key") == key else None
    if fp is None:
        fp = S.evaluate(S.ref)
    todo = [("curve", b, v) for b in budgets for v in VARIANTS] + [("method", n, m) for n, m in methods]
    for kind, a, b in todo:
        rid = (f"curve|{b}|{a:g}" + (f"|{ctag}" if "intra" in b else "")) if kind == "curve" else f"method|{a}|{b}"
        if rid in done:
            continue
        if kind == "curve":
            row = curve_row(S, both if "intra" in b else plain, a, b, ctag)
        else:
            row = method_row(S, a, b)
        rows.append(row)
        print({k: v for k, v in row.items() if k != "spec_counts"}, flush=True)
        write_json_atomic(partial, {"key": key, "fp32": fp, "rows": rows}, overwrite=True)
    wanted = {(f"curve|{v}|{b:g}" + (f"|{ctag}" if "intra" in v else "")) for b in budgets for v in VARIANTS} | \
             {f"method|{n}|{m}" for n, m in methods}
    rows = [r for r in rows if r["id"] in wanted]
    cmd = (f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python bench/intra.py --tokens {args.tokens} "
           f"--nsamples {args.nsamples} --budgets {args.budgets}"
           + "".join(f" --{k.replace('_', '-')} '{v}'" for k, v in vars(args).items()
                     if k in ("intra", "methods", "gptq_methods") and v != ap.get_default(k))
           + (f" --smoke {args.smoke}" if args.smoke else "") + (f" --tag {args.tag}" if args.tag else ""))
    doc = {"header": header("Intra-tensor mixed precision — SmolLM2-135M-Instruct, PTB test"
                            + (f" (SMOKE: random {args.smoke}-block model)" if args.smoke else ""), cmd),
           "protocol": S.protocol.to_dict(), "nsamples": args.nsamples, "fp32": fp, "rows": rows,
           "measure_seconds": msecs,
           "intra_candidates": names, "plain_candidates": [c.name for c in default_candidates()],
           "budgets": budgets, "seconds": time.perf_counter() - t_start, "peak_rss_mb": peak_rss_mb(),
           "bpw_of_candidates": _model_bpw(intra_specs + [parse_spec(n) for n, _ in methods], shapes)}
    write(doc, results, tag)
    partial.unlink(missing_ok=True)


def _model_bpw(specs, shapes) -> dict[str, float]:
    numel = sum(r * c for r, c in shapes.values())
    return {s.name: sum(s.cost(sh).total for sh in shapes.values()) / numel for s in specs}


# ---------------------------------------------------------------------------- report
def write(doc: dict, results: Path, tag: str) -> None:
    rows, fp, p = doc["rows"], doc["fp32"], doc["protocol"]
    curves = [r for r in rows if r["kind"] == "curve"]
    meths = [r for r in rows if r["kind"] == "method"]
    lines = list(doc["header"])
    lines += [f"Protocol: PTB test, first {p['max_tokens']} tokens ({p['n_windows']} windows of {p['seqlen']}, "
              f"{p['n_scored']} scored), fp32 perplexity {fp['perplexity']:.3f}. Calibration: "
              f"{doc['nsamples']} × 512 tokens of PTB train (seed 0), gradient statistics from the "
              f"first 16. Every row quantizes with RTN unless marked GPTQ; bpw counts every stored bit of the block "
              f"linears (codes, scales, zero points, codebooks, indices, fp16 values). Metric kfac, exact solver. "
              f"Plain candidates: mixq's default set ({len(doc['plain_candidates'])} specs incl. FP16); "
              f"intra candidates added: {', '.join(doc['intra_candidates'])}. Measurement seconds: "
              + ", ".join(f"{k} {v:.0f}" for k, v in doc["measure_seconds"].items() if v is not None)
              + f". Whole run {doc['seconds']:.0f} s, peak RSS {doc['peak_rss_mb']:.0f} MB.", "",
              "## KL / perplexity vs bpw: allocation with and without intra-tensor candidates", "",
              "| budget | variant | bpw | KL | perplexity | top-1 | predicted | specs | composite layers | quant s |",
              "|---:|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in sorted(curves, key=lambda r: (r["budget"], VARIANTS.index(r["variant"]))):
        counts = list(r["spec_counts"].items())
        comp = [(k, v) for k, v in counts if "+" in k or k.startswith(("SLIM", "BIN"))]
        top = ", ".join(f"{k} ×{v}" for k, v in (comp or counts)[:3])
        spec = counts[0][0] if r["n_specs"] == 1 else f"{r['n_specs']} specs" + (f"; {top}" if comp else f": {top}")
        lines.append(f"| {r['budget']:g} | {r['variant']} | {r['bpw']:.3f} | {r['kl']:.4f} | {r['perplexity']:.2f} | "
                     f"{r['top1']:.3f} | {r['predicted']:.4g} | {spec} | {r['composite_layers']} | "
                     f"{r['quant_s']:.0f} |")
    lines += ["", "## Each method alone (one spec for every block linear)", "",
              "| method | spec | algorithm | bpw | KL | perplexity | top-1 | quant s |",
              "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in sorted(meths, key=lambda r: r["bpw"]):
        lines.append(f"| {r['label']} | `{r['spec']}` | {r['method'].upper()} | {r['bpw']:.3f} | {r['kl']:.4f} | "
                     f"{r['perplexity']:.2f} | {r['top1']:.3f} | {r['quant_s']:.0f} |")
    lines += ["", "Notes", "",
              "- Uniform rows pick the best single plain spec within the budget (so their bpw may sit below it); "
              "mixed rows may use FP16 for a layer; composite layers counts the layers of a plan on an intra spec.",
              "- Method settings on SmolLM2's 576/1536-wide rows: OWQ keeps 1 fp16 column per layer (its 3.01/4.01 bpw "
              "settings keep ~0.08 % of the columns of 4096-wide models; 1 of 576 is the nearest), MixLLM uses groups "
              "of 192 (128 does not divide 576), BlockDialect FP4 blocks of 32 with an fp16 scale and one of 8 "
              "level tables (its own FP4 variants use an 8-bit shared exponent).",
              "- Not run by default to keep the bench under ~25 min on 2 cores (pass them with `--methods` / "
              "`--gptq-methods` as the command above does): SqueezeLLM's `KM3+o0.45` (weighted k-means: ~4.5 min "
              "to quantize SmolLM2 once, ~4.5 min more in the measurement), SpQR's full `W3-g16-asym+sq3+o0.25` "
              "(~1.5 min), GPTQ rows (~4 min each).", ""]
    carried = sorted({r["source"] for r in rows if r.get("source")})
    if carried:
        n_old = sum(bool(r.get("source")) for r in rows)
        lines += [f"Rows carried over from {'; '.join(carried)} (same protocol, resumed from its rows): {n_old}; "
                  f"measured in this run (the commit above): {len(rows) - n_old}. The whole-run time is this run's.", ""]
    (results / f"{tag}.md").write_text("\n".join(lines) + "\n")
    (results / f"{tag}.json").write_text(json.dumps(doc, indent=2))
    plot(curves, meths, results / f"{tag}.png", doc["header"][0].removeprefix("# "))
    print("\n".join(lines))


def plot(curves, meths, path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for v in VARIANTS:
        rs = sorted((r for r in curves if r["variant"] == v), key=lambda r: r["bpw"])
        if not rs:
            continue
        style = "--" if v.startswith("uniform") else "-"
        for ax, key in zip(axes, ("kl", "perplexity")):
            ax.plot([r["bpw"] for r in rs], [r[key] for r in rs], style, marker="o", label=v)
    for r in meths:
        for ax, key in zip(axes, ("kl", "perplexity")):
            ax.scatter([r["bpw"]], [r[key]], marker="^" if r["method"] == "gptq" else "x", color="k", s=28, zorder=3)
            ax.annotate(r["label"] + (" (GPTQ)" if r["method"] == "gptq" else ""), (r["bpw"], r[key]), fontsize=6,
                        xytext=(3, 2), textcoords="offset points")
    axes[0].set(xlabel="bits per weight (block linears, all metadata)", ylabel="KL(fp32 ‖ quantized), nats/token",
                yscale="log", title="KL vs bpw (lower is better)")
    axes[1].set(xlabel="bits per weight (block linears, all metadata)", ylabel="perplexity (PTB test)", yscale="log",
                title="Perplexity vs bpw")
    axes[0].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}\nRTN: allocation with intra-tensor candidates vs layer-level vs uniform; "
                 "x = a method alone", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
