"""``mixq demo``: the README's main job on the embedded model.

Loads SmolLM2-135M (embedded), quantizes it several ways, evaluates each against the fp32
model on the first ``tokens`` tokens of PTB test (512-token windows) and prints one table.
"""
from __future__ import annotations

import copy
import time

from . import api, data
from .eval import Protocol, ReferenceCache, evaluate
from .models import load_model

DEMO_ROWS = (("rtn", "W4-g128"), ("rtn", "W3-g128"), ("gptq", "W3-g128"))


def run_demo(tokens: int = 16384, out: str | None = None, rows=DEMO_ROWS, nsamples: int = 64, seqlen: int = 512):
    ref, tok = load_model("smollm2-135m")
    ids = data.tokenize(data.load_corpus("ptb", "test"), tok)
    win = data.eval_windows(ids, seqlen, max_tokens=tokens)
    proto = Protocol.for_windows(win, corpus="ptb", split="test", tokenizer="smollm2-135m", dtype="float32")
    cache = ReferenceCache(ref, win)
    calib = None
    results = [dict(method="fp32", spec="-", bpw=32.0, seconds=0.0, **_metrics(evaluate(ref, win, proto, reference=cache)))]
    for method, spec in rows:
        model = copy.deepcopy(ref)
        specs = api.resolve_specs(model, spec)
        if method != "rtn" and calib is None:
            calib = data.calibration_batch(data.tokenize(data.load_corpus("ptb", "train"), tok), nsamples, seqlen, 0)
        t0 = time.perf_counter()
        api.quantize_model(model, specs, method=method, calib_ids=calib)
        secs = time.perf_counter() - t0
        bpw = api.size_report(model, specs)["bpw_quantized"]
        results.append(dict(method=method, spec=spec, bpw=bpw, seconds=secs,
                            **_metrics(evaluate(model, win, proto, reference=cache))))
        del model
    print(format_table(results, proto))
    if out:
        from .cli import write_json_atomic

        write_json_atomic(out, {"protocol": proto.to_dict(), "rows": results})
    return results


def _metrics(r: dict) -> dict:
    return {k: r.get(k) for k in ("perplexity", "kl", "top1_agreement")}


def format_table(rows: list[dict], proto: Protocol) -> str:
    head = f"{'method':<8}{'spec':<12}{'bpw':>7}{'ppl':>9}{'KL':>9}{'top-1':>8}{'time s':>8}"
    lines = [f"SmolLM2-135M on {proto.corpus}/{proto.split}, {proto.n_scored} tokens scored, seqlen {proto.seqlen}",
             head, "-" * len(head)]
    for r in rows:
        kl = "-" if r["kl"] is None else f"{r['kl']:.4f}"
        t1 = "-" if r["top1_agreement"] is None else f"{r['top1_agreement']:.3f}"
        lines.append(f"{r['method']:<8}{r['spec']:<12}{r['bpw']:>7.3f}{r['perplexity']:>9.3f}{kl:>9}{t1:>8}"
                     f"{r['seconds']:>8.1f}")
    return "\n".join(lines)
