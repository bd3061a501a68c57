"""Mixed-precision allocation vs uniform quantization on SmolLM2-135M / PTB: KL and perplexity vs bpw.

    python bench/allocation.py [--tokens 8192] [--budgets 2.5,3,3.25,3.5,4,4.5]

One measurement per (metric, algorithm) serves every budget.  For each budget: the uniform
baseline (the single candidate spec the `uniform` solver picks within the budget — the same
candidate set the mixed plans choose from) and the mixed plans from each metric, all quantized with
RTN and with GPTQ, evaluated side by side against the same fp32 reference.
Writes bench/results/allocation.{md,json,png}.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

from common import RESULTS, Setup, header, peak_rss_mb

import mixq
from mixq.allocate import SensitivityTable, default_candidates
from mixq.jsonio import write_json_atomic

VARIANTS = [  # (label, algorithm used to quantize, metric, solver)
    ("uniform RTN", "rtn", "kfac", "uniform"),
    ("mixed RTN (kfac)", "rtn", "kfac", "exact"),
    ("mixed RTN (hessian)", "rtn", "hessian", "exact"),
    ("mixed RTN (fisher)", "rtn", "fisher", "exact"),
    ("mixed RTN (block)", "rtn", "block", "exact"),
    ("uniform GPTQ", "gptq", "kfac", "uniform"),
    ("mixed GPTQ (kfac)", "gptq", "kfac", "exact"),
    ("mixed GPTQ (hessian)", "gptq", "hessian", "exact"),
    ("mixed GPTQ (fisher)", "gptq", "fisher", "exact"),
    ("mixed GPTQ (block)", "gptq", "block", "exact"),
    ("uniform rot+GPTQ", "rot+gptq", "kfac", "uniform"),
    ("mixed rot+GPTQ (kfac)", "rot+gptq", "kfac", "exact"),
]
# "rot+gptq": QuaRot rotation of the residual stream (no online rotation, as in a saved directory), then the
# measurement and GPTQ on the rotated weights; evaluated against the unrotated fp32 reference.
CACHE = Path(__file__).parent / "cache"  # measurements (git-ignored): reused by reruns and by `mixq plan`


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--budgets", default="2.5,3,3.25,3.5,4,4.5")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--variants", default=None, help="comma-separated labels subset")
    ap.add_argument("--tag", default="allocation", help="output file stem in bench/results/")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from bench/results/<tag>.json")
    args = ap.parse_args()
    if args.report_only:
        doc = json.loads((RESULTS / f"{args.tag}.json").read_text())

        class _S:  # the parts of Setup the report needs
            protocol = type("P", (), {"to_dict": lambda self: doc["protocol"], **doc["protocol"]})()
            seqlen = 512
        peak = doc.get("peak_rss_mb")
        if peak is None:  # older JSON: the figure is only in the report it wrote
            import re

            m = re.search(r"Peak RSS (\d+) MB", (RESULTS / f"{args.tag}.md").read_text())
            peak = float(m.group(1)) if m else float("nan")
        return write(doc["rows"], doc["fp32"], _S, doc["measure_seconds"], args, peak=peak)
    budgets = [float(b) for b in args.budgets.split(",")]
    variants = [v for v in VARIANTS if not args.variants or v[0] in args.variants.split(",")]
    S = Setup(tokens=args.tokens, nsamples=args.nsamples)
    tables, mtimes = {}, {}
    CACHE.mkdir(exist_ok=True)
    base = {"rtn": S.ref, "gptq": S.ref}
    if any(v[1] == "rot+gptq" for v in variants):
        from mixq.algorithms.rotation import rotate_model  # rotated before measuring: no stage does that (as the CLI)

        base["rot+gptq"] = copy.deepcopy(S.ref)
        rotate_model(base["rot+gptq"], online_down=False)
    for _, algo, metric, _ in variants:
        if (metric, algo) not in tables:
            path = CACHE / f"measure-{metric}-{algo}-{args.nsamples}x{S.seqlen}.json"
            if path.exists():  # finished by an earlier run (its own time is in its meta)
                tables[(metric, algo)] = SensitivityTable.load(path)
            else:  # measure() resumes from path.partial after an interrupt
                tables[(metric, algo)] = mixq.measure(base[algo], S.calib, metric=metric,
                                                      algorithm=algo.removeprefix("rot+"), out=path, progress=False)
            mtimes[f"{metric}/{algo}"] = tables[(metric, algo)].meta["seconds"]
            print("measured", metric, algo, f"{mtimes[f'{metric}/{algo}']:.0f}s", flush=True)
    partial = RESULTS / f"{args.tag}.partial.json"
    key = dict(tokens=args.tokens, nsamples=args.nsamples)
    state = json.loads(partial.read_text()) if partial.exists() else {}
    rows = state.get("rows", []) if state.get("key") == key else []
    done = {(r["budget"], r["variant"]) for r in rows}
    fp = S.evaluate(S.ref)
    for b in budgets:
        for label, algo, metric, solver in variants:
            if (b, label) in done:
                continue
            t = time.perf_counter()
            plan = mixq.plan(tables[(metric, algo)], bpw=b, solver=solver)
            solve_s = time.perf_counter() - t
            model = copy.deepcopy(base[algo])
            method = algo.removeprefix("rot+")
            res = mixq.quantize(model, plan=plan, method=method, calib=S.calib if method == "gptq" else None,
                                progress=False)
            specs, q_s = res.specs, res.seconds
            r = S.evaluate(model)
            uni = sorted({s.name for s in specs.values()})
            rows.append(dict(budget=b, variant=label, bpw=plan.achieved_bpw, predicted=plan.predicted_error,
                             kl=r["kl"], perplexity=r["perplexity"], top1=r["top1_agreement"], solve_ms=solve_s * 1000,
                             quant_s=q_s, specs=uni[0] if len(uni) == 1 else f"{len(uni)} specs"))
            print(rows[-1], flush=True)
            write_json_atomic(partial, {"key": key, "rows": rows}, overwrite=True)
            del model
    rows.sort(key=lambda r: (r["budget"], [v[0] for v in VARIANTS].index(r["variant"])))
    write(rows, fp, S, mtimes, args)
    partial.unlink(missing_ok=True)


def write(rows, fp, S, mtimes, args, peak=None):
    peak = peak_rss_mb() if peak is None else peak
    p = S.protocol
    lines = header("Mixed-precision allocation vs uniform — SmolLM2-135M-Instruct, PTB test",
                   f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python bench/allocation.py --tokens {args.tokens} "
                   f"--budgets {args.budgets} --nsamples {args.nsamples} --variants '{args.variants or ''}' --tag {args.tag}")
    lines += [f"Protocol: PTB test, first {p.max_tokens} tokens ({p.n_windows} windows of {p.seqlen}, {p.n_scored} scored), "
              f"fp32 perplexity {fp['perplexity']:.3f}. Calibration: {args.nsamples} × {S.seqlen} tokens of PTB train "
              f"(seed 0), gradient statistics from the first 16. Candidates: mixq's default set "
              f"({len(default_candidates())} specs incl. FP16). bpw counts every stored bit of the 210 block linears. "
              f"Measurement times: " + ", ".join(f"{k} {v:.0f} s" for k, v in mtimes.items()) +
              f". Peak RSS {peak:.0f} MB.", "",
              "| budget | variant | bpw | KL | perplexity | top-1 | predicted error | uniform spec | solver ms | quant s |",
              "|---:|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        mark = " †" if r.get("source") else ""
        lines.append(f"| {r['budget']:g} | {r['variant']}{mark} | {r['bpw']:.3f} | {r['kl']:.4f} | {r['perplexity']:.2f} | "
                     f"{r['top1']:.3f} | {r['predicted']:.4g} | {r['specs']} | {r['solve_ms']:.0f} | {r['quant_s']:.0f} |")
    sources = sorted({r["source"] for r in rows if r.get("source")})
    if sources:
        lines += ["", "† rows carried over from " + "; ".join(sources) + " (same protocol and command, measured "
                  "before this run; kept to spare the CPU time of re-running them)."]
    lines += ["", "Proxy validation: predicted error (sum of per-layer errors in the plan) against measured KL, "
              "over all budgets of each variant (Spearman rank correlation; for kfac the prediction is in nats of "
              "loss increase, so the ratio KL/predicted says how far the additive second-order model is off).", "",
              "| variant | Spearman ρ(predicted, KL) | median KL / predicted |", "|---|---:|---:|"]
    for label in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == label]
        if len(rs) > 2:
            from scipy.stats import spearmanr

            rho = spearmanr([r["predicted"] for r in rs], [r["kl"] for r in rs]).statistic
            ratios = sorted(r["kl"] / r["predicted"] for r in rs if r["predicted"] > 0)
            med = ratios[len(ratios) // 2] if ratios else float("nan")
            lines.append(f"| {label} | {rho:.3f} | {med:.3g} |")
    (RESULTS / f"{args.tag}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{args.tag}.json").write_text(json.dumps({"protocol": p.to_dict(), "fp32": fp, "rows": rows, "peak_rss_mb": peak,
                                                         "measure_seconds": mtimes}, indent=2))
    plot(rows, RESULTS / f"{args.tag}.png")
    print("\n".join(lines))


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for label in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == label]
        style = "--" if label.startswith("uniform") else "-"
        for ax, key in zip(axes, ("kl", "perplexity")):
            ax.plot([r["bpw"] for r in rs], [r[key] for r in rs], style, marker="o", label=label)
    axes[0].set(xlabel="bits per weight (block linears, all metadata)", ylabel="KL(fp32 ‖ quantized), nats/token",
                yscale="log", title="KL vs bpw (lower is better)")
    axes[1].set(xlabel="bits per weight (block linears, all metadata)", ylabel="perplexity (PTB test)",
                yscale="log", title="Perplexity vs bpw")
    axes[0].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle("SmolLM2-135M: mixed-precision plans (solid) vs uniform (dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
