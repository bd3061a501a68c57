"""``mixq demo``: the README's main job on the embedded model.

Loads SmolLM2-135M (embedded), builds the default calibration set (:data:`mixq.calibset.DEFAULT_CALIB`),
measures every layer's sensitivity once (the default recipe's metric and errors, :mod:`mixq.recipe`), solves a
mixed-precision plan at the budget (default 3.5 bits per weight, all metadata counted) -- the plan
``mixq quantize --bpw`` makes, though from 32 calibration rows where the recipe takes 64, to keep the demo
short -- and the best uniform spec within the same budget, quantizes both with
RTN and with GPTQ, evaluates each against the fp32 model on the first ``tokens`` tokens of every
evaluation domain (:data:`mixq.eval.domains.DEFAULT_DOMAINS`: PTB test and text no calibration saw) and
prints one table.
"""
from __future__ import annotations

import copy
import time

from . import pipeline as P
from .calibset import DEFAULT_CALIB
from .eval.scorer import DomainScorer
from .models import load_model
from .recipe import DEFAULT_RECIPE as RECIPE


def run_demo(tokens: int = 4096, bpw: float = 3.5, out: str | None = None, nsamples: int = 32, seqlen: int = 512,
             progress: bool = True, bos: str = "auto", calib: str = DEFAULT_CALIB):
    ref, tok = load_model("smollm2-135m")
    scorer = DomainScorer(ref, tok, tokens=tokens, seqlen=seqlen, bos=bos, tokenizer_name="smollm2-135m",
                          progress=progress)
    cset = P.build_calibration(ref, tok, calib, nsamples, seqlen, seed=0, bos=scorer.bos, progress=progress)
    t0 = time.perf_counter()
    # the default recipe's measurement (mixq.recipe): the plans are the ones `mixq quantize --bpw` makes
    table = P.measure(ref, cset, algorithm=RECIPE["algorithm"], progress=progress, amp=RECIPE["walk_amp"])
    t_measure = time.perf_counter() - t0
    plans = {"uniform": P.plan(table, bpw, solver="uniform"), "mixed": P.plan(table, bpw, solver="exact")}

    results = [dict(method="fp32", plan="-", bpw=32.0, seconds=0.0, domains=scorer.metrics(ref, progress=progress))]
    for method in ("rtn", "gptq"):
        for kind, plan in plans.items():
            model = copy.deepcopy(ref)
            t = time.perf_counter()
            P.quantize(model, plan=plan, method=method, calib=cset, progress=progress, amp=RECIPE["walk_amp"],
                       hessian_shrink=RECIPE["hessian_shrink"])  # GPTQ as the recipe runs it (RTN ignores it)
            label = plan.layers[next(iter(plan.layers))].name if kind == "uniform" else "mixed"
            results.append(dict(method=method, plan=label, bpw=plan.achieved_bpw, seconds=time.perf_counter() - t,
                                domains=scorer.metrics(model, progress=progress)))
            del model
    protos = scorer.protocols
    print(format_table(results, protos, bpw, t_measure, cset.record()))
    if out:
        from .jsonio import write_json_atomic

        write_json_atomic(out, overwrite=True, obj={"protocols": {c: p.to_dict() for c, p in protos.items()},
                                                    "budget_bpw": bpw, "measure_seconds": t_measure,
                                                    "calibration": cset.record(), "rows": results})
    return results


def format_table(rows: list[dict], protos: dict, bpw: float, t_measure: float, calib: dict) -> str:
    names = list(protos)
    w = max([14, *(len(r["plan"]) + 2 for r in rows)])  # the plan column fits the longest spec name
    head = f"{'method':<8}{'plan':<{w}}{'bpw':>7}" + "".join(f"{'ppl ' + c[:8]:>14}{'KL ' + c[:8]:>13}" for c in names)
    head += f"{'top-1':>8}{'time s':>8}"
    first = protos[names[0]]
    lines = [f"SmolLM2-135M, budget {bpw} bits/weight (block linears, all metadata counted); "
             f"{', '.join(f'{p.corpus}/{p.split}' for p in protos.values())}: {first.n_scored} tokens scored each, "
             f"seqlen {first.seqlen}; calibration {calib['corpus']} {calib['rows']} × {calib['seqlen']}; "
             f"sensitivity measured once in {t_measure:.0f} s",
             head, "-" * len(head)]
    for r in rows:
        cells = ""
        for c in names:
            m = r["domains"][c]
            cells += f"{m['perplexity']:>14.3f}{'-' if m['kl'] is None else format(m['kl'], '.4f'):>13}"
        t1 = r["domains"][names[0]]["top1_agreement"]
        lines.append(f"{r['method']:<8}{r['plan']:<{w}}{r['bpw']:>7.3f}{cells}"
                     f"{'-' if t1 is None else format(t1, '.3f'):>8}{r['seconds']:>8.1f}")
    lines.append("uniform = the best single spec within the budget; mixed = one spec per layer from the same "
                 f"candidates, solved exactly ({RECIPE['metric']} sensitivity with {RECIPE['algorithm']} errors, the "
                 "default recipe); top-1 on the first domain.")
    if len(names) == 1:
        lines.append("(the out-of-domain text was not available here: `apt-get install fortunes` adds it)")
    return "\n".join(lines)
