"""GPTQ with and without the full-precision target (``--gptq-target``), one spec on every layer, two domains.

    OMP_NUM_THREADS=2 python bench/gptq_target.py --model gemma3-270m --spec W3-g64 [--nsamples 32]

The same calibration rows (the default ``self+ptb``) and the same spec quantize the model twice with GPTQ: toward
each layer's own output on the partly quantized model's inputs (``quantized``), and with the layers that read
their block's input aimed at the fp model's output (``fp``, :func:`mixq.algorithms.gptq.fp_target`).  KL to the
fp32 model on PTB test and fortunes test (first ``--tokens`` tokens, 512-token windows).  Writes
``bench/results/gptq_target_<model>_<spec>.{md,json}``; SmolLM2's runs of the same comparison are in
generalization.md (``g_W3_*``, ``g_W4_*``).
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import mixq
from common import RESULTS, domain_scorer, git_rev, header, machine
from mixq.calibset import DEFAULT_CALIB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--spec", default="W3-g64")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args()
    cmd = (f"OMP_NUM_THREADS=2 python bench/gptq_target.py --model {args.model} --spec {args.spec}"
           + (f" --nsamples {args.nsamples}" if args.nsamples != 32 else ""))
    ref, tok = mixq.load_model(args.model)
    scorer = domain_scorer(ref, tok, args.model, args.tokens)
    calib = mixq.build_calibration(ref, tok, DEFAULT_CALIB, args.nsamples, 512, seed=0, bos=scorer.bos,
                                   progress=False)
    rows = []
    for target in ("quantized", "fp"):
        model = copy.deepcopy(ref)
        t = time.perf_counter()
        res = mixq.quantize(model, args.spec, method="gptq", calib=calib, group_fallback="shrink", progress=False,
                            gptq_target=target)
        rows.append({"target": target, "seconds": time.perf_counter() - t, "bpw": res.meta["size"]["bpw_quantized"],
                     **scorer.metrics(model)})
        print(target, {d: round(rows[-1][d]["kl"], 4) for d in ("ptb", "fortunes")}, flush=True)
        del model
    name = f"gptq_target_{args.model}_{args.spec}"
    doc = {"command": cmd, "commit": git_rev(), "machine": machine(), "calibration": calib.record(), "rows": rows}
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = header(f"GPTQ toward the fp model's outputs: {args.model}, {args.spec} on every layer", cmd)
    lines += [f"Calibration: {DEFAULT_CALIB}, {args.nsamples} x 512 rows; KL to fp32 on the first {args.tokens} "
              "tokens of each test text, 512-token windows.", "",
              "| GPTQ target | bpw | KL PTB | KL fortunes | PPL PTB | PPL fortunes | GPTQ s |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['bpw']:.3f} | {r['ptb']['kl']:.4f} | {r['fortunes']['kl']:.4f} | "
                     f"{r['ptb']['perplexity']:.2f} | {r['fortunes']['perplexity']:.2f} | {r['seconds']:.0f} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
