"""The ``triton`` kernel against dense bf16 ``F.linear`` on a CUDA GPU: time and memory bandwidth per layer.

    python bench/triton_kernel.py [--peak-gbps 3350] [--specs W4-g128,W3-g128,W8-g128] [--tokens 1,16]
                                  [--reps 30] [--no-graph] [--warm-l2] [--note '...']

Layers ``[out, in]``: SmolLM2-135M's four linear shapes (576x576 q/o_proj, 192x576 k/v_proj, 1536x576
gate/up_proj, 576x1536 down_proj) and two 7B-class ones (4096x4096, 11008x4096).  A group that does not
divide ``in`` falls back to the largest multiple of 32 that does (g128 -> g96 on 576 columns, as
``--group-fallback shrink`` does).  Random N(0, 0.02) weights, bf16 activations ``x [M, in]``.

For each (layer, spec, M): median over ``--reps`` of the time per call, measured with CUDA events around a
block of calls captured in a CUDA graph (``--no-graph``: launched eagerly, so small layers then measure
launch overhead).  Unless ``--warm-l2``, the block cycles through enough copies of the weight to exceed
2.5x the L2 cache, so weights stream from HBM as in a real decode step.  Bandwidth = bytes read / time,
bytes = the kernel's weight layout (int32 code words + scales / zeros: ``state["nbytes"]``) + ``x``; for
``F.linear`` the bf16 weight + ``x``.  Fraction of peak = bandwidth / ``--peak-gbps`` (default 3350: H100
SXM HBM3; H100 PCIe 2000, H200 4800, A100 80GB 2039).  Each row also checks the kernel's output against
``F.linear`` with the dequantized weight in bf16 (max |diff| / max |ref|).

Writes bench/results/triton_kernel.{md,json}.  Needs a CUDA GPU and triton (``pip install 'mixq[gpu]'``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = [("smollm2 q_proj/o_proj", 576, 576), ("smollm2 k_proj/v_proj", 192, 576),
          ("smollm2 gate/up_proj", 1536, 576), ("smollm2 down_proj", 576, 1536),
          ("7B attention", 4096, 4096), ("7B gate/up_proj", 11008, 4096)]


def fit_spec(name: str, cols: int) -> str:
    """``name`` with its group shrunk to the largest multiple of 32 dividing ``cols`` (if needed)."""
    from mixq.config import parse_spec
    from mixq.granularity import PerGroup

    g = parse_spec(name).granularity
    if not isinstance(g, PerGroup) or cols % g.size == 0:
        return name
    new = next((d for d in range(g.size - g.size % 32, 31, -32) if cols % d == 0), None)
    if new is None:
        raise SystemExit(f"{name}: no group size multiple of 32 divides {cols}")
    return name.replace(f"g{g.size}", f"g{new}")


def time_us(fns: list, reps: int, graph: bool) -> tuple[float, str]:
    """Median microseconds per call of a block calling each of ``fns`` once; also how it was launched."""
    for fn in fns[:4]:  # compile / autotune / allocate outside the timing
        fn()
    torch.cuda.synchronize()

    def block():
        for fn in fns:
            fn()

    mode, run = "eager", block
    if graph:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                block()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                block()
            mode, run = "graph", g.replay
        except Exception as e:  # noqa: BLE001  (capture unsupported: time eagerly, say so)
            torch.cuda.synchronize()
            mode = f"eager (graph capture failed: {type(e).__name__})"
    run()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / len(fns))
    return statistics.median(times), mode


def copies_for(nbytes: int, l2: int, warm: bool) -> int:
    return 1 if warm else max(1, min(4096, -(-int(2.5 * l2) // max(nbytes, 1))))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peak-gbps", type=float, default=3350.0, help="peak HBM bandwidth of the device, GB/s")
    ap.add_argument("--specs", default="W4-g128,W3-g128,W8-g128")
    ap.add_argument("--tokens", default="1,16", help="rows M of x (comma-separated)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--no-graph", action="store_true", help="launch eagerly instead of replaying a CUDA graph")
    ap.add_argument("--warm-l2", action="store_true", help="reuse one weight copy (L2-resident for small layers)")
    ap.add_argument("--note", default="", help="a sentence on the conditions")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/triton_kernel.py needs a CUDA GPU: torch.cuda.is_available() is False "
                         f"(torch {torch.__version__}); nothing was measured or written")

    from common import RESULTS, git_rev, header, machine

    from mixq.config import parse_spec
    from mixq.formats import quantize
    from mixq.runtime import PackedWeight
    from mixq.runtime.kernels import triton_gpu as tg

    if tg.triton is None:
        raise SystemExit("triton is not installed: pip install 'mixq[gpu]'; nothing was measured or written")
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    l2 = int(getattr(props, "L2_cache_size", 50 * 2**20))
    specs, ms = args.specs.split(","), [int(m) for m in args.tokens.split(",")]
    graph = not args.no_graph
    rows = []
    t0 = time.time()
    for label, out, cols in SHAPES:
        gen = torch.Generator(device=dev).manual_seed(out * 7 + cols)
        w = torch.randn(out, cols, generator=gen, device=dev) * 0.02
        dense = {}
        for name in specs:
            used = fit_spec(name, cols)
            q = quantize(w, parse_spec(used))
            pw = PackedWeight.from_qtensor(q)
            state = tg.prepare(pw)
            wq = pw.dequantize().to(torch.bfloat16)
            n_copies = copies_for(state["nbytes"], l2, args.warm_l2)
            states = [state] + [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
                                for _ in range(n_copies - 1)]
            for m in ms:
                x = torch.randn(m, cols, generator=gen, device=dev).to(torch.bfloat16)
                y, ref = tg.linear(x, None, state, None), F.linear(x, wq)
                rel_err = float((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-30))
                if m not in dense:  # F.linear on the bf16 weight: the same for every spec of this layer
                    n_dense = copies_for(out * cols * 2, l2, args.warm_l2)
                    ws = [wq] + [torch.randn_like(wq) for _ in range(n_dense - 1)]
                    us, _ = time_us([lambda x=x, wd=wd: F.linear(x, wd) for wd in ws], args.reps, graph)
                    dense[m] = (us, out * cols * 2 + x.numel() * 2)
                us, mode = time_us([lambda x=x, st=st: tg.linear(x, None, st, None) for st in states], args.reps, graph)
                nbytes = state["nbytes"] + x.numel() * 2
                d_us, d_bytes = dense[m]
                grid, _, cx, _ = tg.launch_args(x, state, None)
                rows.append({"layer": label, "out": out, "in": cols, "spec": name, "spec_used": used, "M": m,
                             "packed_bytes": pw.nbytes, "kernel_bytes": nbytes, "triton_us": us,
                             "triton_gbps": nbytes / us / 1e3, "triton_peak_frac": nbytes / us / 1e3 / args.peak_gbps,
                             "bf16_us": d_us, "bf16_gbps": d_bytes / d_us / 1e3,
                             "bf16_peak_frac": d_bytes / d_us / 1e3 / args.peak_gbps, "speedup": d_us / us,
                             "rel_err_vs_bf16": rel_err, "split_k": grid[2], "copies": n_copies, "launch": mode,
                             "blocks": [cx["BLOCK_M"], cx["BLOCK_N"], cx["BLOCK_K"]]})
                print(f"{label:22s} {used:9s} M={m:<3d} triton {us:8.2f} us {rows[-1]['triton_gbps']:7.0f} GB/s | "
                      f"bf16 {d_us:8.2f} us {rows[-1]['bf16_gbps']:7.0f} GB/s | x{d_us / us:.2f} | {mode}",
                      file=sys.stderr, flush=True)
            del states, state, q, pw, wq
        del w
        torch.cuda.empty_cache()

    cmd = (f"python bench/triton_kernel.py --peak-gbps {args.peak_gbps:g} --specs {args.specs} "
           f"--tokens {args.tokens} --reps {args.reps}" + (" --no-graph" if args.no_graph else "")
           + (" --warm-l2" if args.warm_l2 else "") + (f" --note '{args.note}'" if args.note else ""))
    import triton

    device = f"{torch.cuda.get_device_name(dev)} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, " \
             f"L2 {l2 / 2**20:.0f} MiB), triton {triton.__version__}"
    lines = header("Triton dequant + matmul kernel vs bf16 F.linear", cmd)
    launches = ", ".join(sorted({r["launch"] for r in rows}))
    weights = "L2-warm (one copy)" if args.warm_l2 else "cycled through copies > 2.5x L2 (up to 4096 copies)"
    lines += [f"- device: {device}",
              f"- peak bandwidth taken as {args.peak_gbps:g} GB/s; launch: {launches}; weights {weights}",
              "", "Time per call (median of %d blocks), bandwidth = bytes read / time. Kernel bytes: int32 code words "
              "+ params as the kernel stores them, + x. %s" % (args.reps, args.note), "",
              "| layer [out x in] | spec | M | triton µs | triton GB/s | % peak | bf16 µs | bf16 GB/s | % peak | "
              "speedup | split-K | rel. err |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['layer']} [{r['out']}x{r['in']}] | {r['spec_used']} | {r['M']} | {r['triton_us']:.2f} | "
                     f"{r['triton_gbps']:.0f} | {100 * r['triton_peak_frac']:.0f}% | {r['bf16_us']:.2f} | "
                     f"{r['bf16_gbps']:.0f} | {100 * r['bf16_peak_frac']:.0f}% | {r['speedup']:.2f}x | "
                     f"{r['split_k']} | {r['rel_err_vs_bf16']:.1e} |")
    lines += ["", f"Total bench time {time.time() - t0:.0f} s."]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "triton_kernel.md").write_text("\n".join(lines) + "\n")
    meta = {"command": cmd, "machine": machine(), "device": device, "commit": git_rev(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "peak_gbps": args.peak_gbps, "graph": graph,
            "warm_l2": args.warm_l2, "note": args.note}
    (RESULTS / "triton_kernel.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
