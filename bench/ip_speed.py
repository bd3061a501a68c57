"""Decode speed of incoherence-processed (+ip) layers through their CPU path, next to int4 and fp32, in one run.

    OMP_NUM_THREADS=2 python bench/ip_speed.py [--new-tokens 64] [--repeats 3]

SmolLM2-135M, every block linear quantized with RTN (the speed does not depend on how the codes were chosen), saved
as a native directory and loaded packed in bf16 with ``kernel="auto"``: plain int grids run ``cpu-int4``; ``+ip``
layers run two Kronecker-factored Hadamard transforms (:func:`mixq.intra.incoherence.rotate`) around the same
``cpu-int4`` call on the transformed weight.  fp32 and bf16 are the unquantized model.  Greedy decode of
``--new-tokens`` after a ``--prompt-tokens`` PTB prompt, median of ``--repeats`` after a warm-up.
Writes bench/results/ip_speed.{md,json}.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
from pathlib import Path

import torch
from common import RESULTS, git_rev, header, machine

from mixq import api, data
from mixq.config import parse_spec
from mixq.export.native import load_quantized, save_quantized
from mixq.models import load_model
from mixq.runtime import greedy_generate, kernel_usage

SPECS = ["W4-g64", "W4-g64+ip", "W3-g64", "W3-g64+ip", "W2-g64-asym+ip"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    ref, tok = load_model("smollm2-135m")
    ids = data.tokenize(data.load_corpus("ptb", "test"), tok, progress=False)[: args.prompt_tokens][None]
    rows = []
    for name, model in (("fp32", ref), ("bf16", copy.deepcopy(ref).to(torch.bfloat16))):
        rows.append({"row": name, **_speed(model, ids, args), "kernels": {}})
        print(rows[-1], flush=True)
    with tempfile.TemporaryDirectory() as work:
        for name in SPECS:
            model = copy.deepcopy(ref)
            specs = api.resolve_specs(model, parse_spec(name))
            res = api.quantize_model(model, specs, method="rtn", progress=False)
            d = save_quantized(Path(work) / name, model, tok, res.qtensors, {"base_model": "smollm2-135m",
                                                                               "method": "rtn"})
            packed, _, _ = load_quantized(d, packed=True, dtype=torch.bfloat16)
            r = _speed(packed, ids, args)
            rows.append({"row": name, "bpw": api.size_report(model, specs)["bpw_quantized"], **r,
                         "kernels": kernel_usage(packed)})
            print(rows[-1], flush=True)
            del model, packed
    cmd = "OMP_NUM_THREADS=2 python bench/ip_speed.py"
    doc = {"command": cmd, "commit": git_rev(), "machine": machine(), "args": vars(args), "rows": rows}
    (RESULTS / "ip_speed.json").write_text(json.dumps(doc, indent=1) + "\n")
    fp32 = rows[0]["decode_tok_s"]
    lines = header("Decode speed of +ip layers on CPU (SmolLM2-135M, batch 1, bf16 packed)", cmd)
    lines += [f"Greedy decode of {args.new_tokens} tokens after a {args.prompt_tokens}-token PTB prompt, median of "
              f"{args.repeats} after a warm-up; every block linear in the row's spec (RTN).", "",
              "| row | bpw | decode tok/s | vs fp32 | kernels |", "|---|---:|---:|---:|---|"]
    for r in rows:
        k = ", ".join(f"{n} × {c}" for n, c in r["kernels"].items()) or "dense"
        lines.append(f"| {r['row']} | {r.get('bpw', 32 if r['row'] == 'fp32' else 16):.3f} | {r['decode_tok_s']:.1f} | "
                     f"{r['decode_tok_s'] / fp32:.2f}x | {k} |")
    (RESULTS / "ip_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _speed(model, ids, args) -> dict:
    greedy_generate(model, ids, args.new_tokens, stop_at_eos=False)
    runs = [greedy_generate(model, ids, args.new_tokens, stop_at_eos=False) for _ in range(args.repeats)]
    return {"decode_tok_s": statistics.median(r.decode_tokens_per_s for r in runs),
            "decode_tok_s_runs": [r.decode_tokens_per_s for r in runs]}


if __name__ == "__main__":
    main()
