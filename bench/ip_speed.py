"""Decode speed of incoherence-processed (+ip) layers through their CPU path, next to int4 and fp32, in one run.

    OMP_NUM_THREADS=2 python bench/ip_speed.py [--new-tokens 64] [--repeats 3]

SmolLM2-135M, every block linear quantized with RTN (the speed does not depend on how the codes were chosen), saved
as a native directory and loaded packed in bf16 with ``kernel="auto"``: plain int grids run ``cpu-int4``; ``+ip``
layers run two Kronecker-factored Hadamard transforms (:func:`mixq.algorithms.composite.incoherence.rotate`) around
the same ``cpu-int4`` call on the transformed weight.  fp32 and bf16 are the unquantized model.  Greedy decode of
``--new-tokens`` after a ``--prompt-tokens`` PTB prompt, median of ``--repeats`` after a warm-up.
Writes bench/results/ip_speed.{md,json}.
"""
from __future__ import annotations

import argparse
import json

from common import RESULTS, decode_speed_rows, git_rev, header, machine


SPECS = ["W4-g64", "W4-g64+ip", "W3-g64", "W3-g64+ip", "W2-g64-asym+ip"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = decode_speed_rows(SPECS, args.new_tokens, args.prompt_tokens, args.repeats)
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


if __name__ == "__main__":
    main()
