"""The VQ Triton kernel (fused codebook decode + GEMM) against dense bf16 ``F.linear`` on a CUDA GPU.

    python bench/vq_triton.py [--peak-gbps 4800] [--specs VQ2-channel,VQ2.5-channel,VQ3-channel,VQ4-channel]
                              [--tokens 1,16] [--reps 30] [--note '...']

Layers as ``bench/triton_kernel.py`` (SmolLM2-135M's four linear shapes and two 7B-class ones).  Codes, scales
and inputs are random (the kernel's speed does not depend on which codes an encoder chose); the codebook is the
spec's own.  For each (layer, spec, M):

- ``kernel``: :func:`mixq.runtime.kernels.vq_triton.vq_linear_triton` on prepared device tensors, CUDA-graph replays
  cycling through enough copies of the codes to exceed 2.5x L2 (as ``triton_kernel.py``), median of ``--reps``;
- ``VQLinear``: the layer a loaded model calls (``kernel="auto"``), eager, one weight: what a user gets per
  call, launch and host overhead included;
- ``bf16``: ``F.linear`` with the decoded weight in bf16, timed like ``kernel``;
- ``rel. err``: max |kernel - F.linear(x, decoded fp32 weight)| / max |ref| for bf16 inputs.

Bytes = codes (uint8 as the kernel reads them: ``8/d`` bits per weight) + scales (fp32) + x.
Writes bench/results/vq_triton.{md,json}.  Needs a CUDA GPU and triton.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F
from triton_kernel import SHAPES, copies_for, time_us


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peak-gbps", type=float, default=4800.0, help="peak HBM bandwidth of the device, GB/s")
    ap.add_argument("--specs", default="VQ2-channel,VQ2.5-channel,VQ3-channel,VQ4-channel")
    ap.add_argument("--tokens", default="1,16")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/vq_triton.py needs a CUDA GPU: nothing was measured or written")

    from common import RESULTS, git_rev, header, machine

    from mixq.config import parse_spec
    from mixq.algorithms.composite.storage import PackedComposite
    from mixq.formats.composite.scales import group_len
    from mixq.formats.composite.vq_storage import decode, spec_codebook
    from mixq.runtime.vq_linear import VQLinear
    from mixq.runtime.kernels.vq_triton import vq_linear_triton
    from mixq.formats.bitpack import pack

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    l2 = int(getattr(props, "L2_cache_size", 50 * 2**20))
    ms = [int(m) for m in args.tokens.split(",")]
    rows, t0 = [], time.time()
    for label, out, cols in SHAPES:
        gen = torch.Generator(device=dev).manual_seed(out + cols)
        for name in args.specs.split(","):
            spec = parse_spec(name)
            d, bits = spec.vq_dim, spec.vq_bits
            B = spec_codebook(spec).float().to(dev)
            glen = group_len(spec, cols)
            codes = torch.randint(0, 2 ** bits, (out, cols // d), generator=gen, device=dev, dtype=torch.int32)
            codes = codes.to(torch.uint8)
            scale = torch.rand(out, cols // glen, generator=gen, device=dev) * 0.02 + 0.01
            W = decode(codes, scale, B, glen)
            wbf = W.to(torch.bfloat16)
            nbytes_w = codes.numel() + scale.numel() * 4
            n = copies_for(nbytes_w, l2, False)
            sets = [(codes, scale)] + [(codes.clone(), scale.clone()) for _ in range(n - 1)]
            packed = PackedComposite({"vq.codes": pack(codes.cpu(), bits), "scale": scale.cpu().to(torch.float16)},
                                     spec, (out, cols))
            layer = VQLinear(packed, None, kernel="auto").to(dev)
            for m in ms:
                x = torch.randn(m, cols, generator=gen, device=dev).to(torch.bfloat16)
                y = vq_linear_triton(x, codes, scale, B, glen)
                ref = F.linear(x.float(), W)
                err = float((y.float() - ref).abs().max() / ref.abs().max().clamp(min=1e-30))
                k_us, mode = time_us([lambda x=x, c=c, s=s: vq_linear_triton(x, c, s, B, glen) for c, s in sets],
                                     args.reps, True)
                nd = copies_for(out * cols * 2, l2, False)
                ws = [wbf] + [torch.randn_like(wbf) for _ in range(nd - 1)]
                d_us, _ = time_us([lambda x=x, w=w: F.linear(x, w) for w in ws], args.reps, True)
                l_us = time_us([lambda x=x: layer(x)], args.reps, False)[0]  # eager: what a user gets
                kb = nbytes_w + x.numel() * 2
                rows.append({"layer": label, "out": out, "in": cols, "spec": name, "M": m, "kernel_us": k_us,
                             "kernel_gbps": kb / k_us / 1e3, "kernel_peak_frac": kb / k_us / 1e3 / args.peak_gbps,
                             "vqlinear_us": l_us, "vqlinear_kernel": layer.last_kernel, "bf16_us": d_us,
                             "speedup_kernel": d_us / k_us, "speedup_vqlinear": d_us / l_us, "rel_err": err,
                             "copies": n, "launch": mode})
                print(f"{label:22s} {name:14s} M={m:<3d} kernel {k_us:8.2f} us {rows[-1]['kernel_gbps']:6.0f} GB/s | "
                      f"VQLinear {l_us:8.2f} us | bf16 {d_us:8.2f} us | x{d_us / k_us:.2f} | err {err:.1e}",
                      file=sys.stderr, flush=True)
            del sets, W, wbf, layer
        torch.cuda.empty_cache()

    cmd = (f"python bench/vq_triton.py --peak-gbps {args.peak_gbps:g} --specs {args.specs} --tokens {args.tokens} "
           f"--reps {args.reps}" + (f" --note '{args.note}'" if args.note else ""))
    import triton

    device = (f"{torch.cuda.get_device_name(dev)} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
              f"L2 {l2 / 2**20:.0f} MiB), torch {torch.__version__}, triton {triton.__version__}")
    lines = header("VQ Triton kernel (fused decode + GEMM) vs bf16 F.linear", cmd)
    lines += [f"- device: {device}", f"- peak bandwidth taken as {args.peak_gbps:g} GB/s. {args.note}", "",
              "| layer [out x in] | spec | M | kernel µs | GB/s | % peak | VQLinear µs (eager) | bf16 µs | "
              "kernel speedup | rel. err |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['layer']} [{r['out']}x{r['in']}] | {r['spec']} | {r['M']} | {r['kernel_us']:.2f} | "
                     f"{r['kernel_gbps']:.0f} | {100 * r['kernel_peak_frac']:.0f}% | {r['vqlinear_us']:.2f} | "
                     f"{r['bf16_us']:.2f} | {r['speedup_kernel']:.2f}x | {r['rel_err']:.1e} |")
    lines += ["", f"Total bench time {time.time() - t0:.0f} s."]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "vq_triton.md").write_text("\n".join(lines) + "\n")
    meta = {"command": cmd, "machine": machine(), "device": device, "commit": git_rev(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "peak_gbps": args.peak_gbps}
    (RESULTS / "vq_triton.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
