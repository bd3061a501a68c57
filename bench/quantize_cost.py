"""End-to-end cost of the default recipe `mixq quantize --bpw B` on SmolLM2-135M, and of further budgets.

    python bench/quantize_cost.py [--bpw 3.0] [--nsamples N] [--budgets 2.5,3,3.25,4,4.5]

Runs the real CLI in child processes under ``/usr/bin/time -v`` (wall time and peak RSS of the
whole process), side by side in one run:

1. ``mixq eval --tokens 512`` of the fp32 model: the baseline RSS of "the model loaded and run";
2. ``mixq quantize --bpw B`` (the default recipe, :mod:`mixq.recipe`: self+ptb calibration, kfac measurement of
   the default candidates with GPTQ errors, GPTQ): calibration + measurement + plan + GPTQ + save, cold start
   (the self-generated rows come from the cache when an earlier run made them: the results say which);
3. ``mixq plan MEASUREMENT --bpw ...``: every further budget from the saved measurement;
4. ``mixq eval OUT --tokens T`` (not a cost: what the default run gave, KL to fp32 in and out of domain).

Also states the memory a non-streaming GPTQ would need: the fp32 model plus the inputs of every
block kept for all calibration samples.  Writes bench/results/quantize_cost.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, header

from mixq.recipe import DEFAULT_RECIPE
from mixq.selfgen import cache_root

MIXQ = [sys.executable, "-m", "mixq.cli"]


def timed(cmd: list[str]) -> dict:
    """Run ``cmd`` under /usr/bin/time -v; returns wall seconds, peak RSS MB and the output tail."""
    t = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) / 1024
    return {"seconds": wall, "peak_rss_mb": rss, "stdout": p.stdout.strip().splitlines()[-3:]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bpw", type=float, default=3.0)
    ap.add_argument("--nsamples", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--budgets", default="2.5,3,3.25,4,4.5")
    ap.add_argument("--eval-tokens", type=int, default=4096, help="tokens of each domain `mixq eval` scores the "
                                                                  "output on (0: skip)")
    ap.add_argument("--quantize-args", default="", help="more flags for `mixq quantize` (a deviation from the "
                    "default recipe, e.g. '--tcq-state-bits 10'), recorded")
    ap.add_argument("--name", default="quantize_cost", help="results file stem in bench/results")
    ap.add_argument("--keep", default=None, help="copy the quantized directory here (e.g. for bench/deploy.py --dirs)")
    args = ap.parse_args()
    nsamples = args.nsamples or DEFAULT_RECIPE["nsamples"]
    work = Path(tempfile.mkdtemp(prefix="mixq-cost-"))
    try:
        base = timed([*MIXQ, "eval", "--tokens", "512"])
        out = work / "q"
        selfgen = cache_root()
        before = set(selfgen.glob("*.safetensors"))
        q = timed([*MIXQ, "quantize", "--bpw", str(args.bpw), *(["--nsamples", str(args.nsamples)] if args.nsamples
                                                                  else []), *args.quantize_args.split(), "--out", str(out)])
        info = json.loads((out / "mixq.json").read_text())
        generated = bool(set(selfgen.glob("*.safetensors")) - before)  # a new cache entry: rows written in this run
        ev = timed([*MIXQ, "eval", str(out), "--tokens", str(args.eval_tokens)]) if args.eval_tokens else None
        p = timed([*MIXQ, "plan", str(out / "measurement.json"), "--bpw", args.budgets, "--out", str(work / "plans")])
        n_plans = len(list((work / "plans").glob("plan-*.json")))
        if args.keep:
            shutil.copytree(out, args.keep)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # what keeping every block's inputs for all samples would take (hidden 576, 30 blocks, fp32)
    hidden, blocks, seqlen = 576, 30, 512
    all_acts_mb = nsamples * seqlen * hidden * 4 * blocks / 2**20
    rows = {"fp32 eval (baseline)": base, f"quantize --bpw {args.bpw}": q,
            f"plan {n_plans} more budgets": p}
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    lines = header("Cost of mixed-precision quantization — SmolLM2-135M-Instruct",
                   f"OMP_NUM_THREADS={threads} python bench/quantize_cost.py --bpw {args.bpw} "
                   + (f"--nsamples {args.nsamples} " if args.nsamples else "") + f"--budgets {args.budgets}"
                   + (f" --quantize-args '{args.quantize_args}'" if args.quantize_args else "")
                   + (f" --name {args.name}" if args.name != "quantize_cost" else ""))
    lines += [f"Each row is one `mixq` process under `/usr/bin/time -v` (cold start: Python, torch, model load "
              f"included), run one after another on an otherwise idle machine. Calibration {nsamples} × "
              f"{seqlen} tokens of the default calibration (self+ptb); recipe {info.get('recipe', {}).get('name', '?')}: "
              f"measurement metric {info.get('plan', {}).get('metric', '?')} with GPTQ-scaled errors, exact solver. "
              f"Measurement + plan took "
              f"{info.get('measure_plan_seconds', float('nan')):.0f} s of the quantize run; the whole quantize run "
              f"(measure, plan, GPTQ, save) {info['seconds']:.0f} s inside the process.", "",
              ("The self-generated calibration rows were written in this run (none of this model's were in the cache: "
               "what a first run on a model pays once)." if generated else "The self-generated calibration rows came "
               "from the cache (an earlier run on this model wrote them; a first run also writes them)."), "",
              "| step | wall s | peak RSS MB |", "|---|---:|---:|"]
    for k, r in rows.items():
        lines.append(f"| {k} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} |")
    mp, inside = info.get("measure_plan_seconds"), info["seconds"]
    e2e = ((info.get("finetune") or {}).get("e2e") or {}).get("seconds")
    if mp is not None:
        lines += ["", f"Where the quantize run's time went (`mixq.json`): calibration rows, measurement and plan "
                  f"{mp:.0f} s; GPTQ and save {inside - mp:.0f} s"
                  + (f"; the end-to-end epoch {e2e:.0f} s" if e2e is not None else "")
                  + f"; the rest of the {q['seconds']:.0f} s (start-up, model load, the epoch's own loading and "
                  f"writing) {q['seconds'] - inside - (e2e or 0):.0f} s."]
    if ev is not None:
        lines += ["", f"What the run gave (`mixq eval OUT --tokens {args.eval_tokens}`, KL to the fp32 model; not part "
                  f"of the cost, {ev['seconds']:.0f} s):", "", "```", *ev["stdout"], "```"]
    lines += ["", f"Peak RSS of the GPTQ run is {q['peak_rss_mb'] / base['peak_rss_mb']:.2f}× the fp32 baseline "
              f"process. Holding the inputs of all {blocks} blocks for {nsamples} × {seqlen} tokens in fp32 "
              f"would take {all_acts_mb:.0f} MB on top of the model; the block walk keeps two "
              f"[{nsamples}, {seqlen}, {hidden}] buffers ({2 * all_acts_mb / blocks:.0f} MB)."]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"rows": rows, "eval": ev, "all_block_inputs_mb": all_acts_mb,
                                                          "quantize_info_seconds": info["seconds"],
                                                          "recipe": info.get("recipe"),
                                                          "selfgen_generated": generated}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
