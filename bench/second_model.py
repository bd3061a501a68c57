"""The second embedded model end to end (``gemma3-270m``): BOS convention, and mixed vs uniform RTN.

A small, fast protocol (RTN, measurement on 16 × 256 PTB rows, 4096 PTB test tokens in 512-token
windows), so that it runs on a 2-core CPU in minutes; it is not the SmolLM2 protocol of ``allocation.md``.

* full precision with ``--bos always`` (Gemma's convention, what ``auto`` picks for it) and ``never``;
* each uniform spec of ``--uniform`` against a mixed plan at the same bits per weight, chosen from ``--candidates``
  by the ``--metric`` measurement.

    OMP_NUM_THREADS=1 python bench/second_model.py --out bench/results/second_model
"""
from __future__ import annotations

import argparse
import json
import subprocess
import time
from collections import Counter
from pathlib import Path

import torch

import mixq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--uniform", default="W3-g128,W4-g128")
    ap.add_argument("--candidates", default="W2-g64-asym,W3-g128,W3-g64,W4-g128,W4-g64,W5-g128,W8-g128")
    ap.add_argument("--out", default="bench/results/second_model")
    ap.add_argument("--metric", default="kfac", help="sensitivity metric of the mixed plans (kfac: loss units)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    out = Path(args.out)
    ref, tok = mixq.load_model(args.model)
    rows = []

    def ev(model, label, bos="auto", **extra):
        r = mixq.evaluate(model, tok, reference=None if model is ref else ref, corpus="ptb", tokens=args.tokens,
                          bos=bos, progress=False)
        row = {"label": label, "perplexity": r["perplexity"], "kl": r.get("kl"), "top1": r.get("top1_agreement"),
               "bos": bos, **extra}
        rows.append(row)
        print(json.dumps(row), flush=True)

    for bos in ("always", "never"):
        ev(ref, f"fp32, bos={bos}", bos=bos)
    calib = mixq.build_calibration(ref, tok, "ptb", nsamples=16, seqlen=256, progress=False)
    cached = out.with_name(out.name + "-measurement.json")
    if cached.exists():  # a rerun of the same protocol reuses the table
        from mixq.allocate import SensitivityTable

        table = SensitivityTable.load(cached)
    else:
        table = mixq.measure(ref, calib, metric=args.metric, algorithm="rtn", candidates=args.candidates.split(","),
                             progress=False)
        table.save(cached)
    for spec in args.uniform.split(","):
        uplan = mixq.plan(table, bpw=16.0, solver="uniform", uniform=spec)  # every layer at spec: its exact bpw
        bpw = uplan.achieved_bpw
        model, _ = mixq.load_model(args.model)
        mixq.quantize(model, plan=uplan, progress=False)
        ev(model, f"uniform {spec}", bpw=bpw)
        del model
        plan = mixq.plan(table, bpw=bpw)
        model, _ = mixq.load_model(args.model)
        mixq.quantize(model, plan=plan, progress=False)
        ev(model, f"mixed at {plan.achieved_bpw:.3f} bpw", bpw=plan.achieved_bpw,
           specs=dict(Counter(s.name for s in plan.layers.values())))
        del model
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    doc = {"model": args.model, "metric": args.metric, "rows": rows, "tokens": args.tokens, "commit": commit, "torch": torch.__version__,
           "threads": torch.get_num_threads(), "seconds": time.perf_counter() - t0}
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    lines = [f"# Second embedded model: {args.model}", "",
             f"- command: `OMP_NUM_THREADS={torch.get_num_threads()} python bench/second_model.py`; commit {commit}, "
             f"torch {torch.__version__}; {doc['seconds'] / 60:.1f} min on a shared 2-core CPU",
             f"- protocol: PTB test, first {args.tokens} tokens, 512-token windows; RTN; measurement `{args.metric}` "
             "(RTN errors) on 16 × 256 PTB rows; KL against the fp32 model", "",
             "| model | bpw | perplexity | KL | top-1 | specs |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        bpw = f"{r['bpw']:.3f}" if r.get("bpw") else "32"
        kl = f"{r['kl']:.4f}" if r.get("kl") is not None else ""
        top1 = f"{r['top1']:.3f}" if r.get("top1") is not None else ""
        lines.append(f"| {r['label']} | {bpw} | {r['perplexity']:.2f} | {kl} | {top1} | {r.get('specs', '')} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
