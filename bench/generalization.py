"""Does a plan hold off its calibration text?  KL in domain (PTB test) and out of domain (fortunes test).

    python bench/generalization.py --calib ptb            # one calibration choice per run (resumable)
    python bench/generalization.py --calib self+ptb --damp 0.1 --tag damp0.1
    python bench/generalization.py --report               # merge every run into generalization.md

For one calibration choice (``--calib``, as `mixq quantize --calib`): the measurement that
`mixq quantize --bpw X --method gptq` makes (kfac, errors after GPTQ), then for every budget the mixed
plan and the best uniform spec from the same candidates, both quantized with GPTQ on the same
calibration rows, and uniform RTN (no calibration), each scored against the fp32 model on the first
``--tokens`` tokens of PTB test (the calibration domain of the `ptb` choice) and of the fortunes test split
(text no choice calibrates on).  ratio = KL(fortunes) / KL(PTB).
Each run writes bench/results/generalization/<tag>.json, row by row (an interrupted run resumes).
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from common import RESULTS, header, machine, git_rev

from mixq import api, data
from mixq.allocate import Budget, allocate, default_candidates
from mixq.bos import resolve_bos
from mixq.calibset import build_calibration
from mixq.eval import Protocol, ReferenceCache, evaluate
from mixq.jsonio import write_json_atomic
from mixq.measure import measure
from mixq.models import load_model

OUT = RESULTS / "generalization"
CACHE = Path(__file__).parent / "cache"
DOMAINS = ("ptb", "fortunes")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", default="ptb")
    ap.add_argument("--tag", default=None, help="run name (default: the --calib value)")
    ap.add_argument("--budgets", default="2.5,3,3.5,4,4.5")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--variants", default="mixed GPTQ,uniform GPTQ,uniform RTN")
    ap.add_argument("--spec", default=None, help="instead of plans: GPTQ with this one spec on every layer (no "
                                                 "measurement; isolates how GPTQ itself fits its calibration rows)")
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    if args.report:
        return report()
    tag = args.tag or args.calib
    path = OUT / f"{tag}.json"
    doc = json.loads(path.read_text()) if path.exists() else {"rows": []}
    done = {(r["variant"], r["budget"]) for r in doc["rows"]}
    cmd = ("python bench/generalization.py --calib " + args.calib + (f" --tag {tag}" if args.tag else "")
           + (f" --damp {args.damp}" if args.damp != 0.01 else "") + (" --act-order" if args.act_order else "")
           + (f" --nsamples {args.nsamples}" if args.nsamples != 32 else ""))
    ref, tok = load_model("smollm2-135m")
    bos = resolve_bos(tok, ref, "auto")
    evals = {}
    for corpus in DOMAINS:
        ids = data.tokenize(data.load_corpus(corpus, "test"), tok, progress=False)
        win = data.eval_windows(ids, args.seqlen, max_tokens=args.tokens, bos_id=bos.bos_id)
        proto = Protocol.for_windows(win, corpus=corpus, split="test", tokenizer="smollm2-135m", dtype="float32",
                                     bos_decision=bos)
        evals[corpus] = (win, proto, ReferenceCache(ref, win, progress=False))
    t0 = time.perf_counter()
    calib = build_calibration(ref, tok, args.calib, args.nsamples, args.seqlen, seed=0, bos_id=bos.bos_id)
    t_calib = time.perf_counter() - t0
    doc.update(command=cmd, machine=machine(), commit=git_rev(), calibration=calib.record(), damp=args.damp,
               act_order=args.act_order, calib_seconds=t_calib,
               protocols={c: e[1].to_dict() for c, e in evals.items()})
    if args.spec:
        return _one_spec(args, ref, calib, evals, doc, path, tag)
    variants = [v.strip() for v in args.variants.split(",")]
    budgets = [float(b) for b in args.budgets.split(",")]
    table = None
    for b in budgets:
        for v in variants:
            if (v, b) in done:
                continue
            if table is None:
                table = _measurement(ref, calib, doc)
            plan = allocate(table, Budget(bpw=b),
                            method="exact" if v.startswith("mixed") else "uniform")
            model = copy.deepcopy(ref)
            t = time.perf_counter()
            method = "rtn" if v.endswith("RTN") else "gptq"
            api.quantize_model(model, dict(plan.layers), method=method, damp=args.damp, act_order=args.act_order,
                               calib_ids=None if method == "rtn" else calib.ids, progress=False)
            row = {"variant": v, "budget": b, "bpw": plan.achieved_bpw, "seconds": time.perf_counter() - t,
                   "spec": None if v.startswith("mixed") else next(iter(plan.layers.values())).name}
            _finish(row, model, evals, doc, path, tag)
            del model


def _finish(row, model, evals, doc, path, tag):
    for corpus, (win, proto, cache) in evals.items():
        r = evaluate(model, win, proto, reference=cache, progress=False)
        row[corpus] = {k: r.get(k) for k in ("kl", "perplexity", "top1_agreement")}
    doc["rows"].append(row)
    write_json_atomic(path, doc, overwrite=True)
    print(f"{tag:<14}{row['variant']:<14}{row['budget']:>5} bpw {row['bpw']:.3f}  KL ptb {row['ptb']['kl']:.4f}  "
          f"fortunes {row['fortunes']['kl']:.4f}  ({row['seconds']:.0f} s)", flush=True)


def _one_spec(args, ref, calib, evals, doc, path, tag):
    from mixq.config import parse_spec

    v = f"GPTQ {args.spec}"
    if any(r["variant"] == v for r in doc["rows"]):
        return
    model = copy.deepcopy(ref)
    specs = api.resolve_specs(model, parse_spec(args.spec), group_fallback="shrink")
    t = time.perf_counter()
    api.quantize_model(model, specs, method="gptq", damp=args.damp, act_order=args.act_order, calib_ids=calib.ids,
                       progress=False)
    bpw = api.size_report(model, specs)["bpw_quantized"]
    row = {"variant": v, "budget": round(bpw, 3), "bpw": bpw, "seconds": time.perf_counter() - t, "spec": args.spec}
    _finish(row, model, evals, doc, path, tag)


def _measurement(ref, calib, doc):
    """kfac errors after GPTQ on these rows; kept in bench/cache (git-ignored) by the rows' sha256, so runs that
    change only how GPTQ quantizes (damping, act-order) share one measurement."""
    from mixq.allocate import SensitivityTable

    path = CACHE / f"generalization-{calib.sha256[:16]}.json"
    if path.exists():
        doc["measure_seconds"] = f"reused {path.name}"
        return SensitivityTable.load(path)
    t = time.perf_counter()
    table = measure(ref, calib.ids, default_candidates(), metric="kfac", algorithm="gptq", progress=False)
    doc["measure_seconds"] = time.perf_counter() - t
    table.save(path, overwrite=True)
    return table


def report():
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))}
    lines = header("Generalization: KL in domain (PTB test) and out of domain (fortunes test)",
                   "python bench/generalization.py --calib C [...]; python bench/generalization.py --report")
    lines += ["SmolLM2-135M-Instruct; KL to the fp32 model on the first tokens of each test split (512-token "
              "windows); bpw counts every stored bit of the block linears.  ratio = KL fortunes / KL PTB.  "
              "Each run's calibration: the rows of `--calib` (its sha256 is in the JSON).", ""]
    lines += ["## All runs side by side", "",
              "| budget | variant | calibration run | bpw | KL PTB | KL fortunes | ratio |", "|---:|---|---|---:|---:|---:|---:|"]
    every = [(r["budget"], r["variant"], tag, r) for tag, doc in runs.items() for r in doc["rows"]]
    for b, v, tag, r in sorted(every, key=lambda x: (x[0], x[1], x[2])):
        lines.append(f"| {b} | {v} | {tag} | {r['bpw']:.3f} | {r['ptb']['kl']:.4f} | {r['fortunes']['kl']:.4f} | "
                     f"{_ratio(r):.2f} |")
    lines.append("")
    for tag, doc in runs.items():
        cal = doc.get("calibration", {})
        p = doc.get("protocols", {}).get("ptb", {})
        lines += [f"## {tag}", "", f"- command: `{doc.get('command')}` (commit {doc.get('commit')})",
                  f"- calibration: {cal.get('corpus')} rows {cal.get('rows')}, {cal.get('nsamples')}×{cal.get('seqlen')}, "
                  f"seed {cal.get('seed')}, damp {doc.get('damp')}, act-order {doc.get('act_order')}; "
                  f"made in {doc.get('calib_seconds', 0):.0f} s; measurement {_secs(doc.get('measure_seconds'))}",
                  f"- evaluation: {p.get('n_scored')} scored tokens per domain, BOS {p.get('bos')}", "",
                  "| variant | budget | bpw | spec | KL PTB | KL fortunes | ratio | ppl PTB | ppl fortunes |",
                  "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
        for r in sorted(doc["rows"], key=lambda r: (r["variant"], r["budget"])):
            lines.append(f"| {r['variant']} | {r['budget']} | {r['bpw']:.3f} | {r.get('spec') or 'mixed'} | "
                         f"{r['ptb']['kl']:.4f} | {r['fortunes']['kl']:.4f} | {_ratio(r):.2f} | "
                         f"{r['ptb']['perplexity']:.2f} | {r['fortunes']['perplexity']:.2f} |")
        lines.append("")
    (RESULTS / "generalization.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _ratio(r) -> float:
    return r["fortunes"]["kl"] / r["ptb"]["kl"] if r["ptb"]["kl"] else float("nan")


def _secs(v) -> str:
    return f"{v:.0f} s" if isinstance(v, (int, float)) else str(v)


if __name__ == "__main__":
    main()
