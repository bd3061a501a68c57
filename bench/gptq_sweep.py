"""GPTQ's column sweep with the native block steps against the torch column loop, side by side in one run.

    OMP_NUM_THREADS=1 python bench/gptq_sweep.py

On real SmolLM2-135M layers (one of each shape: q_proj 576 x 576, k_proj 192 x 576, gate_proj 1536 x 576,
down_proj 576 x 1536, block 10) with a Hessian from 8 x 512 PTB-train rows: each spec the measurement uses as a
GPTQ/RTN reference (the trellis at 8 state bits on its 256 sampled rows, as :func:`mixq.measure.layer.gptq_ratio`
runs them; the integer grids likewise) and the trellis the GPTQ walk stores (``TCQ3L12``, all rows), quantized
by GPTQ with the native sweep (:mod:`mixq.runtime.kernels.tcq_cpu` ``SweepSearch``,
:mod:`mixq.runtime.kernels.grid_sweep`) and with it switched off (the torch loop), best of three each, the
inverse-Hessian factor computed once outside the timing (the measurement shares it across a layer's specs).
Asserts both give the same weights to the bit.  Writes bench/results/gptq_sweep.{md,json}.
"""
from __future__ import annotations

import json
import time

import torch
from common import RESULTS, Setup, header

from mixq.algorithms import gptq
from mixq.arch import get_blocks
from mixq.calib.statistics import collect_statistics
from mixq.config import parse_spec
from mixq.measure.layer import RATIO_ROWS, _gptq, ratio_rows
from mixq.runtime.kernels import tcq_cpu

REFS = ("TCQ2-channel", "TCQ3-channel", "TCQ5-channel", "W2-g64-asym", "W3-g64-asym", "W6-g64")
WALK = ("TCQ3L12-channel",)
LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.down_proj")
BLOCK = 10


def best_of(fn, n=3):
    t = []
    for _ in range(n):
        t0 = time.perf_counter()
        out = fn()
        t.append(time.perf_counter() - t0)
    return min(t), out


def main() -> None:
    torch.manual_seed(0)
    s = Setup(nsamples=8)
    block = get_blocks(s.ref)[BLOCK]
    stats = collect_statistics(s.ref, s.calib, [f"model.layers.{BLOCK}.{n}" for n in LAYERS], hessian=True,
                               fingerprint=False)
    make_tcq, make_grid = tcq_cpu.SweepSearch.make, gptq.GridSweep.make
    rows = []
    for name in LAYERS:
        W = dict(block.named_modules())[name].weight.detach().float()
        H = stats.layers[f"model.layers.{BLOCK}.{name}"].H
        hc = gptq.prepare_hessian(H)
        for spec_name in REFS + WALK:
            spec = parse_spec(spec_name)
            Ws = W if spec_name in WALK else W[ratio_rows(W.shape[0], spec)]
            run = lambda: _gptq(Ws, H, spec, hc)  # noqa: E731
            t_nat, a = best_of(run)
            tcq_cpu.SweepSearch.make = classmethod(lambda cls, *x: None)
            gptq.GridSweep.make = staticmethod(lambda *x: None)
            try:
                t_torch, b = best_of(run)
            finally:
                tcq_cpu.SweepSearch.make, gptq.GridSweep.make = make_tcq, make_grid
            assert torch.equal(a, b), f"{name} {spec_name}: native and torch sweeps differ"
            C = Ws.shape[1]
            rows.append({"layer": name, "shape": list(Ws.shape), "spec": spec_name, "native_s": t_nat,
                         "torch_s": t_torch, "native_us_per_column": 1e6 * t_nat / C,
                         "torch_us_per_column": 1e6 * t_torch / C, "speedup": t_torch / t_nat})
            print(rows[-1], flush=True)
    cmd = "OMP_NUM_THREADS=1 python bench/gptq_sweep.py"
    lines = header("GPTQ's column sweep: native block steps against the torch loop", cmd) + [
        f"SmolLM2-135M block {BLOCK}, Hessian from 8 x 512 PTB-train rows; the measurement's GPTQ references on "
        f"their {RATIO_ROWS} sampled rows (k_proj has 192), `TCQ3L12-channel` on all rows (what the GPTQ walk "
        "stores); time of one GPTQ call, best of three, the inverse-Hessian factor given; both paths give the same "
        "weights to the bit (asserted).", "",
        "| layer | rows x cols | spec | torch us/col | native us/col | speed-up |", "|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['shape'][0]} x {r['shape'][1]} | {r['spec']} | "
                     f"{r['torch_us_per_column']:.0f} | {r['native_us_per_column']:.0f} | {r['speedup']:.2f}x |")
    tot_t = sum(r["torch_s"] for r in rows if r["spec"] in REFS)
    tot_n = sum(r["native_s"] for r in rows if r["spec"] in REFS)
    lines += ["", f"The six references of these four layers: {tot_t:.2f} s in the torch loop, {tot_n:.2f} s native "
              f"({tot_t / tot_n:.2f}x)."]
    (RESULTS / "gptq_sweep.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "gptq_sweep.json").write_text(json.dumps({"command": cmd, "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
