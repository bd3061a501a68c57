"""The second embedded model end to end (``gemma3-270m``): BOS convention, and mixed vs uniform RTN.

A small, fast protocol (RTN, measurement on 16 × 256 PTB rows, 4096 PTB test tokens in 512-token
windows), so that it runs on a 2-core CPU in minutes; it is not the SmolLM2 protocol of ``allocation.md``.

* full precision with ``--bos always`` (Gemma's convention, what ``auto`` picks for it) and ``never``;
* each uniform spec of ``--uniform`` against a mixed plan at the same bits per weight, chosen from ``--candidates``
  by the ``--metric`` measurement.

    OMP_NUM_THREADS=1 python bench/second_model.py --out bench/results/second_model

``--recipe default`` runs the default recipe instead (:mod:`mixq.recipe`: self+ptb calibration 32 x 512, kfac
measurement of the default candidates with GPTQ errors, exact solver, GPTQ): for every ``--budgets`` value the
mixed GPTQ plan, the best uniform spec of the same candidates with GPTQ, and that spec with RTN, each scored by
KL to the fp32 model on PTB test and fortunes test (BOS from the model), as ``bench/generalization.py`` does for
SmolLM2.  Rows are written as they finish (an interrupted run resumes).

    OMP_NUM_THREADS=1 python bench/second_model.py --recipe default --out bench/results/second_model_default
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
from mixq.config.composite_check import TCQ_STATE_BITS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--uniform", default="W3-g128,W4-g128")
    ap.add_argument("--candidates", default="W2-g64-asym,W3-g128,W3-g64,W4-g128,W4-g64,W5-g128,W8-g128")
    ap.add_argument("--out", default="bench/results/second_model")
    ap.add_argument("--metric", default="kfac", help="sensitivity metric of the mixed plans (kfac: loss units)")
    ap.add_argument("--recipe", default=None, choices=[None, "default"], help="default: the default recipe, two domains")
    ap.add_argument("--budgets", default="3,3.5,4,4.5", help="--recipe default: bits per weight of the plans")
    ap.add_argument("--variants", default="mixed GPTQ,uniform GPTQ,uniform RTN",
                    help="--recipe default (a variant ending in +e2e adds the recipe's end-to-end fine-tuning)")
    ap.add_argument("--tag", default="", help="--recipe default: a label for the measurement (recorded)")
    ap.add_argument("--nsamples", type=int, default=None, help="--recipe default: calibration rows (default: the "
                                                                "recipe's)")
    ap.add_argument("--gptq-target", default=None, choices=["quantized", "fp"],
                    help="--recipe default: GPTQ's target (default: the recipe's)")
    ap.add_argument("--hessian-shrink", type=float, default=None,
                    help="--recipe default: GPTQ's Hessian shrink toward its diagonal (default: the recipe's)")
    ap.add_argument("--tcq-state-bits", type=int, default=None, choices=TCQ_STATE_BITS,
                    help="--recipe default: state bits of the plans' TCQ layers (default: the recipe's)")
    ap.add_argument("--without", default="", help="--recipe default: plan from the measurement with these candidates "
                    "(comma-separated spec names) left out: an A/B of them on one measurement")
    ap.add_argument("--metrics", default=None, help="e.g. kfac,kfac-tok: instead, an A/B of sensitivity metrics with "
                    "RTN plans (default calibration, --candidates, uniform --uniform specs), KL on PTB and fortunes")
    args = ap.parse_args()
    if args.recipe == "default":
        return default_recipe(args)
    if args.metrics:
        return metric_ab(args)
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


def default_recipe(args) -> None:
    """The default recipe on ``args.model``, both domains; ``args.out`` + .json row by row, + .md at the end."""
    import copy

    from common import domain_scorer, git_rev, machine, score_row

    from mixq.allocate import default_candidates
    from mixq.recipe import DEFAULT_RECIPE

    R = {**DEFAULT_RECIPE, "metric": args.metric}  # --metric: the recipe with another sensitivity metric
    if args.nsamples:
        R["nsamples"] = args.nsamples
    if args.gptq_target:
        R["gptq_target"] = args.gptq_target
    if args.hessian_shrink is not None:
        R["hessian_shrink"] = args.hessian_shrink
    out = Path(args.out)
    path = out.with_suffix(".json")
    doc = json.loads(path.read_text()) if path.exists() else {"rows": []}
    done = {(r["variant"], r["budget"]) for r in doc["rows"]}
    ref, tok = mixq.load_model(args.model)
    evals = domain_scorer(ref, tok, args.model, args.tokens)
    bos = evals.bos
    t = time.perf_counter()
    calib = mixq.build_calibration(ref, tok, R["calib"], nsamples=R["nsamples"], seqlen=R["seqlen"], seed=0,
                                   bos=bos, progress=False)
    cands = default_candidates()
    doc.update(model=args.model, recipe=dict(R), machine=machine(), commit=git_rev(), tag=args.tag,
               command=f"OMP_NUM_THREADS=1 python bench/second_model.py --recipe default --out {args.out}"
                       + (f" --budgets {args.budgets}" if args.budgets != "3,3.5,4,4.5" else "")
                       + (f" --metric {args.metric}" if args.metric != "kfac" else "")
                       + (f" --variants '{args.variants}'" if args.variants != "mixed GPTQ,uniform GPTQ,uniform RTN"
                          else "") + (f" --tag {args.tag}" if args.tag else "")
                       + (f" --tcq-state-bits {args.tcq_state_bits}" if args.tcq_state_bits else "")
                       + (f" --without {args.without}" if args.without else "")
                       + (f" --nsamples {args.nsamples}" if args.nsamples else "")
                       + (f" --gptq-target {args.gptq_target}" if args.gptq_target else "")
                       + (f" --hessian-shrink {args.hessian_shrink}" if args.hessian_shrink is not None else ""),
               calibration=calib.record(), calib_seconds=time.perf_counter() - t, candidates=[c.name for c in cands],
               protocols={c: p.to_dict() for c, p in evals.protocols.items()})
    cached = out.with_name(out.name + "-measurement.json")
    table = None
    for b in [float(x) for x in args.budgets.split(",")]:
        for v in [x.strip() for x in args.variants.split(",")]:
            if (v, b) in done:
                continue
            if table is None:
                table = _default_table(ref, calib, cands, R, cached, doc)
                if args.without:
                    table = table.without([n.strip() for n in args.without.split(",")])
                    doc["without"] = table.meta["without"]
            plan = mixq.plan(table, bpw=b, solver=R["solver"] if v.startswith("mixed") else "uniform",
                             tcq_state_bits=args.tcq_state_bits)
            doc["tcq_state_bits"] = plan.meta.get("tcq_state_bits", 8)
            model = copy.deepcopy(ref)
            method = "rtn" if v.endswith("RTN") else R["method"]
            res = mixq.quantize(model, plan=plan, method=method, damp=R["damp"], act_order=R["act_order"],
                                calib=None if method == "rtn" else calib, progress=False,
                                gptq_target=R.get("gptq_target", "quantized"), amp=R["walk_amp"],
                                hessian_shrink=R["hessian_shrink"])
            row = {"variant": v, "budget": b, "bpw": plan.achieved_bpw, "seconds": res.seconds,
                   "specs": dict(Counter(s.name for s in plan.layers.values()))}
            if v.endswith("+e2e"):  # then the recipe's end-to-end fine-tuning on the same calibration rows
                from mixq.distill_e2e import E2EConfig, finetune_e2e

                _, rep = finetune_e2e(model, ref, res.qtensors, calib.ids, E2EConfig(amp=R["e2e_amp"]), progress=False)
                row["e2e"] = {k: rep[k] for k in ("held_out_before", "held_out_after", "epoch_kept", "seconds")}
            score_row(row, model, evals, doc, path, f"{v} {b}")
            del model
    lines = [f"# Second embedded model, default recipe: {args.model}", "",
             f"- command: `{doc['command']}`; commit {doc['commit']}; {doc['machine']}",
             f"- recipe: {R}", f"- calibration: {doc['calibration']}",
             f"- measurement: {doc.get('measure_seconds')} s; evaluation: first {args.tokens} tokens of PTB test and "
             f"fortunes test, 512-token windows, BOS {bos.bos_id}; KL to the fp32 model", "",
             "| variant | budget | bpw | KL PTB | KL fortunes | ppl PTB | ppl fortunes | specs |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in sorted(doc["rows"], key=lambda r: (r["budget"], r["variant"])):
        lines.append(f"| {r['variant']} | {r['budget']} | {r['bpw']:.3f} | {r['ptb']['kl']:.4f} | "
                     f"{r['fortunes']['kl']:.4f} | {r['ptb']['perplexity']:.2f} | {r['fortunes']['perplexity']:.2f} | "
                     f"{r['specs'] if len(r['specs']) > 1 else next(iter(r['specs']))} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def metric_ab(args) -> None:
    """Sensitivity metrics side by side: for each ``--uniform`` spec, uniform RTN and one mixed RTN plan per metric
    of ``--metrics`` at its bpw, from measurements on the default calibration (RTN errors, ``--candidates``)."""
    import copy

    from common import domain_scorer, git_rev, machine, score_row

    from mixq.allocate import SensitivityTable
    from mixq.config import parse_spec
    from mixq.recipe import DEFAULT_RECIPE

    R = {**DEFAULT_RECIPE, "metric": args.metric}  # --metric: the recipe with another sensitivity metric
    out = Path(args.out)
    path = out.with_suffix(".json")
    doc = json.loads(path.read_text()) if path.exists() else {"rows": []}
    done = {r["label"] for r in doc["rows"]}
    ref, tok = mixq.load_model(args.model)
    evals = domain_scorer(ref, tok, args.model, args.tokens)
    bos = evals.bos
    calib = mixq.build_calibration(ref, tok, R["calib"], nsamples=R["nsamples"], seqlen=R["seqlen"], seed=0,
                                   bos=bos, progress=False)
    cands = [parse_spec(c) for c in args.candidates.split(",")]
    doc.update(model=args.model, machine=machine(), commit=git_rev(), calibration=calib.record(),
               candidates=args.candidates, tokens=args.tokens,
               command=f"OMP_NUM_THREADS=1 python bench/second_model.py --metrics {args.metrics} --out {args.out}")
    tables = {}
    for metric in args.metrics.split(","):
        cached = out.with_name(f"{out.name}-{metric}-measurement.json")
        if cached.exists():
            tables[metric] = SensitivityTable.load(cached)
            continue
        t = time.perf_counter()
        tables[metric] = mixq.measure(ref, calib, candidates=cands, metric=metric, algorithm="rtn", progress=False,
                                      out=cached)
        doc.setdefault("measure_seconds", {})[metric] = time.perf_counter() - t

    def run(label, plan):
        if label in done:
            return
        model = copy.deepcopy(ref)
        mixq.quantize(model, plan=plan, progress=False)
        row = {"label": label, "bpw": plan.achieved_bpw, "specs": dict(Counter(s.name for s in plan.layers.values()))}
        score_row(row, model, evals, doc, path, label)

    first = next(iter(tables.values()))
    for spec in args.uniform.split(","):
        uplan = mixq.plan(first, bpw=16.0, solver="uniform", uniform=spec)
        run(f"uniform RTN {spec}", uplan)
        for metric, table in tables.items():
            run(f"mixed RTN {metric} @{spec}", mixq.plan(table, bpw=uplan.achieved_bpw))
    lines = [f"# Second embedded model, sensitivity metrics A/B: {args.model}", "",
             f"- command: `{doc['command']}`; commit {doc['commit']}; {doc['machine']}",
             f"- calibration: {doc['calibration']}; measurement with RTN errors, candidates {args.candidates}; RTN",
             f"- evaluation: first {args.tokens} tokens of PTB test and fortunes test, 512-token windows, "
             f"BOS {bos.bos_id}; KL to the fp32 model", "",
             "| model | bpw | KL PTB | KL fortunes | ppl PTB | ppl fortunes | specs |", "|---|---:|---:|---:|---:|---:|---|"]
    for r in doc["rows"]:
        lines.append(f"| {r['label']} | {r['bpw']:.3f} | {r['ptb']['kl']:.4f} | {r['fortunes']['kl']:.4f} | "
                     f"{r['ptb']['perplexity']:.2f} | {r['fortunes']['perplexity']:.2f} | {r['specs']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _default_table(ref, calib, cands, R, cached, doc):
    from mixq.allocate import SensitivityTable

    if cached.exists():
        doc["measure_seconds"] = f"reused {cached.name}"
        return SensitivityTable.load(cached)
    t = time.perf_counter()
    table = mixq.measure(ref, calib, candidates=cands, metric=R["metric"], algorithm=R["algorithm"], progress=False,
                         out=cached, amp=R["walk_amp"])
    doc["measure_seconds"] = time.perf_counter() - t
    return table


if __name__ == "__main__":
    main()
