"""``mixq demo``: the README's main job on the embedded model.

Loads SmolLM2-135M (embedded), measures every layer's sensitivity once, solves a mixed-precision
plan at the budget (default 3.5 bits per weight, all metadata counted) and the best uniform spec
within the same budget, quantizes both with RTN and with GPTQ, evaluates each against the fp32
model on the first ``tokens`` tokens of PTB test and prints one table.
"""
from __future__ import annotations

import copy
import time

from . import api, data
from .allocate import Budget, allocate, default_candidates
from .bos import resolve_bos
from .eval import Protocol, ReferenceCache, evaluate
from .measure import measure
from .models import load_model


def run_demo(tokens: int = 4096, bpw: float = 3.5, out: str | None = None, nsamples: int = 32, seqlen: int = 512,
             progress: bool = True, bos: str = "auto"):
    ref, tok = load_model("smollm2-135m")
    bos_decision = resolve_bos(tok, ref, bos)
    ids = data.tokenize(data.load_corpus("ptb", "test"), tok, progress=False)
    win = data.eval_windows(ids, seqlen, max_tokens=tokens, bos_id=bos_decision.bos_id)
    proto = Protocol.for_windows(win, corpus="ptb", split="test", tokenizer="smollm2-135m", dtype="float32",
                                 bos_decision=bos_decision)
    cache = ReferenceCache(ref, win, progress=progress)
    train = data.tokenize(data.load_corpus("ptb", "train"), tok, progress=False)
    calib = data.calibration_batch(train, nsamples, seqlen, seed=0)
    t0 = time.perf_counter()
    table = measure(ref, calib, default_candidates(), metric="kfac", algorithm="rtn", progress=progress)
    t_measure = time.perf_counter() - t0
    plans = {"uniform": allocate(table, Budget(bpw=bpw), method="uniform"),
             "mixed": allocate(table, Budget(bpw=bpw), method="exact")}
    results = [dict(method="fp32", plan="-", bpw=32.0, seconds=0.0,
                    **_metrics(evaluate(ref, win, proto, reference=cache, progress=progress)))]
    for method in ("rtn", "gptq"):
        for kind, plan in plans.items():
            model = copy.deepcopy(ref)
            t = time.perf_counter()
            api.quantize_model(model, dict(plan.layers), method=method, calib_ids=calib, progress=progress)
            label = plan.layers[next(iter(plan.layers))].name if kind == "uniform" else "mixed"
            results.append(dict(method=method, plan=label, bpw=plan.achieved_bpw, seconds=time.perf_counter() - t,
                                **_metrics(evaluate(model, win, proto, reference=cache, progress=progress))))
            del model
    print(format_table(results, proto, bpw, t_measure))
    if out:
        from .cli import write_json_atomic

        write_json_atomic(out, overwrite=True, obj={"protocol": proto.to_dict(), "budget_bpw": bpw, "measure_seconds": t_measure,
                                "rows": results})
    return results


def _metrics(r: dict) -> dict:
    return {k: r.get(k) for k in ("perplexity", "kl", "top1_agreement")}


def format_table(rows: list[dict], proto: Protocol, bpw: float, t_measure: float) -> str:
    head = f"{'method':<8}{'plan':<14}{'bpw':>7}{'ppl':>9}{'KL':>9}{'top-1':>8}{'time s':>8}"
    lines = [f"SmolLM2-135M, budget {bpw} bits/weight (block linears, all metadata counted); "
             f"{proto.corpus}/{proto.split}, {proto.n_scored} tokens scored, seqlen {proto.seqlen}; "
             f"sensitivity measured once in {t_measure:.0f} s",
             head, "-" * len(head)]
    for r in rows:
        kl = "-" if r["kl"] is None else f"{r['kl']:.4f}"
        t1 = "-" if r["top1_agreement"] is None else f"{r['top1_agreement']:.3f}"
        lines.append(f"{r['method']:<8}{r['plan']:<14}{r['bpw']:>7.3f}{r['perplexity']:>9.3f}{kl:>9}{t1:>8}"
                     f"{r['seconds']:>8.1f}")
    lines.append("uniform = the best single spec within the budget; mixed = one spec per layer from the same "
                 "candidates, solved exactly (kfac sensitivity).")
    return "\n".join(lines)
