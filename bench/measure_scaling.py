"""Time one layer's sensitivity measurement against its shape, and extrapolate a large model's measurement.

For random layers of several shapes ``[out, in]`` (with a random positive-definite ``H`` and output-gradient ``G``),
:func:`mixq.measure.layer.measure_layer` runs every default candidate with the default recipe's measurement
(``kfac`` errors, ``gptq``-scaled).  Its cost is dominated by the metric's ``ΔW H`` and by GPTQ, both
``O(out · in²)``, plus quantization, ``O(out · in)``; a least-squares fit ``t = a · out·in² + b · out·in`` over the
measured shapes is then summed over the linears of a model (``--model-shape``) to estimate its measurement time
on this machine, with one process.  An estimate, not a measurement: the walk's forward passes and the gradient
pass are not included (they are small next to the candidates, ~1 forward and ~1 backward of the model on the
calibration rows), nor the memory traffic of a model that does not fit in RAM.

    OMP_NUM_THREADS=1 python bench/measure_scaling.py --out bench/results/measure_scaling
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

from mixq.allocate import default_candidates
from mixq.measure.layer import measure_layer
from mixq.measure.metrics import LayerSensitivity, layer_error

SHAPES = [(192, 576), (576, 576), (1536, 576), (576, 1536), (2048, 2048), (2048, 4096)]
# decoder linears [out, in] per block, and blocks: Llama-2/3-70B (hidden 8192, MLP 28672, 64 heads / 8 kv heads)
MODELS = {
    "smollm2-135m": (30, [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]),
    "llama-70b": (80, [(8192, 8192), (1024, 8192), (1024, 8192), (8192, 8192), (28672, 8192), (28672, 8192),
                       (8192, 28672)]),
}


def time_layer(out: int, inp: int, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g) * 0.02
    X = torch.randn(4 * inp, inp, generator=g)
    H = X.T @ X / X.shape[0]
    G = torch.rand(out, generator=g)
    sens = LayerSensitivity(H=H, G=G)
    t0 = time.perf_counter()
    measure_layer("bench", W, sens, default_candidates(), "gptq", lambda Wq: layer_error(W - Wq, sens, "kfac"))
    return time.perf_counter() - t0


def fit(rows: list[dict]) -> tuple[float, float]:
    A = torch.tensor([[r["out"] * r["in"] ** 2, r["out"] * r["in"]] for r in rows], dtype=torch.float64)
    t = torch.tensor([r["seconds"] for r in rows], dtype=torch.float64)
    scale = A.abs().max(0).values
    coef = torch.linalg.lstsq(A / scale, t[:, None]).solution[:, 0] / scale
    return float(coef[0]), float(coef[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/measure_scaling")
    ap.add_argument("--shapes", default=None, help="OUTxIN,... (default: %s)" % SHAPES)
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    rows = []
    for o, i in shapes:
        s = time_layer(o, i)
        rows.append({"out": o, "in": i, "seconds": s})
        print(f"{o}x{i}: {s:.2f} s", flush=True)
    a, b = fit(rows)
    est = {}
    for name, (blocks, lins) in MODELS.items():
        per_block = sum(a * o * i * i + b * o * i for o, i in lins)
        est[name] = {"blocks": blocks, "params": blocks * sum(o * i for o, i in lins),
                     "seconds_per_block": per_block, "seconds": per_block * blocks}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    doc = {"rows": rows, "fit": {"a_out_in2": a, "b_out_in": b}, "estimates": est, "threads": torch.get_num_threads(),
           "torch": torch.__version__, "machine": platform.processor() or platform.machine(), "commit": commit,
           "candidates": len(default_candidates())}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    lines = ["# Measurement time against layer shape (one process, CPU)", "",
             f"- command: `OMP_NUM_THREADS={torch.get_num_threads()} python bench/measure_scaling.py`",
             f"- torch {torch.__version__}, {torch.get_num_threads()} thread(s), commit {commit}; the machine was shared "
             "with other jobs, so times are upper bounds of an idle machine's",
             f"- per layer: every default candidate ({len(default_candidates())}), kfac errors, GPTQ-scaled "
             "(the default recipe's measurement)", "",
             "| layer [out, in] | seconds |", "|---|---:|"]
    lines += [f"| {r['out']} × {r['in']} | {r['seconds']:.2f} |" for r in rows]
    lines += ["", f"Fit: t ≈ {a:.3e} · out·in² + {b:.3e} · out·in seconds.", "",
              "| model | blocks | linear params | est. s / block | est. total, 1 process |", "|---|---:|---:|---:|---:|"]
    for name, e in est.items():
        lines.append(f"| {name} | {e['blocks']} | {e['params'] / 1e9:.2f} B | {e['seconds_per_block']:.0f} | "
                     f"{e['seconds'] / 3600:.1f} h |")
    lines += ["", "Estimates, not measurements: the fit is extrapolated far beyond the measured shapes, and the "
              "walk's forward and gradient passes are left out."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
