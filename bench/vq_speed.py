"""Decode speed of codebook layers (``VQ..+ip``, ``TCQ..+ip``, plain ``VQ``) on CPU next to int4 and fp32, in one run.

    OMP_NUM_THREADS=2 python bench/vq_speed.py [--new-tokens 32] [--repeats 3] [--specs ...]

1. One layer (SmolLM2's up_proj shape, 1536 x 576, and down_proj, 576 x 1536), batch 1: microseconds per call of
   each VQ kernel (``vq-lut``, ``vq-dense``, ``vq-reference``), of int4 (``cpu-int4``) and of dense fp32 / bf16.
2. SmolLM2-135M, every block linear in the row's spec (RTN: speed does not depend on how codes were chosen),
   saved and loaded packed in bf16 with ``kernel="auto"``: greedy decode of ``--new-tokens`` after a 64-token PTB
   prompt, median of ``--repeats`` after a warm-up (as bench/ip_speed.py); then each mixed plan of ``--plans``
   (``TABLE:BPW[:cpu]``: the exact plan of a saved measurement at that budget, ``:cpu`` under ``--fast-on cpu``).
Writes bench/results/vq_speed.json (``--no-layers``: part 2 only, into vq_speed_model.json).
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from common import RESULTS, decode_speed_rows, git_rev, machine

from mixq.config import parse_spec
from mixq.algorithms.composite.storage import PackedComposite
from mixq.algorithms.composite.hooks import quantize_layer  # one layer's kernel timing: no stage works per layer
from mixq.runtime.vq_linear import VQLinear
from mixq.runtime import PackedWeight, QuantLinear

SPECS = ["W4-g64", "W4-g64+ip", "VQ4-g64+ip", "VQ3-g64+ip", "VQ2.5-g64+ip", "VQ2-g64+ip", "VQ3-g64"]


def _time(f, n=50) -> float:
    for _ in range(5):
        f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n * 1e6


def layer_rows() -> list[dict]:
    rows = []
    for R, C in ((1536, 576), (576, 1536)):
        W = torch.randn(R, C) * 0.02
        x = torch.randn(1, C)
        xb = x.bfloat16()
        r = {"shape": [R, C], "fp32 dense": _time(lambda: F.linear(x, W)),
             "bf16 dense": _time(lambda: F.linear(xb, W.bfloat16()) if False else F.linear(xb, Wb))} \
            if (Wb := W.bfloat16()) is not None else {}
        q = QuantLinear(PackedWeight.from_qtensor(quantize_layer(W, parse_spec("W4-g64"), None, "rtn")[0]), None, "auto")
        r["int4 (cpu-int4, bf16)"] = _time(lambda: q(xb))
        for name in ("VQ3-g64", "VQ2.5-g64"):
            lin = VQLinear(PackedComposite.from_qtensor(quantize_layer(W, parse_spec(name), None, "rtn")[0]))
            for k in ("vq-cpu", "vq-lut", "vq-dense", "vq-reference"):
                lin.kernel = k
                r[f"{name} {k} (bf16 in)"] = _time(lambda: lin(xb), 20 if k == "vq-reference" else 50)
        rows.append(r)
        print(r, flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--specs", default=",".join(SPECS))
    ap.add_argument("--no-layers", action="store_true", help="skip part 1 (the per-layer timings)")
    ap.add_argument("--plans", default=None, help="mixed plans as rows of part 2, comma-separated TABLE:BPW[:cpu] "
                    "(a saved measurement, the budget, and :cpu for Constraints(fast_on='cpu'))")
    ap.add_argument("--out", default=None, help="result file name in bench/results (default vq_speed.json, "
                                                "vq_speed_model.json with --no-layers)")
    args = ap.parse_args()
    torch.manual_seed(0)
    layers = [] if args.no_layers else layer_rows()
    plans = {}
    for item in (args.plans.split(",") if args.plans else []):
        from pathlib import Path

        import mixq

        path, bpw, *fast = item.split(":")
        row = f"mixed {float(bpw):g}{' --fast-on ' + fast[0] if fast else ''} ({Path(path).stem})"
        plans[row] = mixq.plan(path, bpw=float(bpw), fast_on=fast[0] if fast else None).layers
    specs = [s for s in args.specs.split(",") if s]
    rows = decode_speed_rows(specs, args.new_tokens, args.prompt_tokens, args.repeats, plans)
    doc = {"command": f"OMP_NUM_THREADS={torch.get_num_threads()} python bench/vq_speed.py --specs {args.specs} --new-tokens {args.new_tokens}"
                      f" --repeats {args.repeats}" + (" --no-layers" if args.no_layers else "") +
                      (f" --plans {args.plans}" if args.plans else "") +
                      (f" --out {args.out}" if args.out else ""),
           "commit": git_rev(), "machine": machine(),
           "args": vars(args), "layer_us_per_call": layers, "rows": rows}
    out = RESULTS / (args.out or ("vq_speed_model.json" if args.no_layers else "vq_speed.json"))
    out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
