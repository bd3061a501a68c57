"""Per-layer Hessian-weighted error of vector codebooks (``VQ..+ip``) against scalar grids at equal bits.

    OMP_NUM_THREADS=1 python bench/vq_layers.py [--blocks 0,15,29] [--variants ...]

SmolLM2-135M: the fp model's block inputs on the default calibration (self+ptb, 32 x 512) give every block
linear's ``H = XᵀX/N`` (cached in ``--cache``); each variant quantizes the layer alone (GPTQ unless it says RTN)
and scores ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)``.  ``learned:<spec>`` is the GPTVQ-style alternative: the spec's fixed
codebook replaced by one fitted to the layer (10 Lloyd steps of k-means on the scaled, +ip-transformed weight
vectors from the fixed one; its fp16 entries cost ``2^k · d · 16`` bits more per tensor).
Writes bench/results/vq_layers.json (bench/results/vq.md quotes it).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from common import RESULTS, git_rev, machine

from mixq.config import parse_spec
from mixq.algorithms.composite.hooks import quantize_layer  # per-layer errors (the unit here): no stage works per layer
from mixq.algorithms.composite.incoherence import rotate, rotate_weight, seeds_for
from mixq.formats.composite.scales import group_len
from mixq.algorithms.composite.vq import fit_scales, quantize_vq
from mixq.formats.composite.vq_storage import spec_codebook
from mixq.algorithms.composite.vq_search import nearest

VARIANTS = ["W2-g64-asym+ip", "VQ2-g64+ip", "VQ2x4-g64+ip", "VQ2.5-g64+ip", "learned:VQ2.5-g64+ip",
            "W3-g64", "VQ3-g64", "W3-g64+ip", "NF3-g64+ip", "VQ3-g64+ip", "VQ3-channel+ip", "VQ3.5-g64+ip",
            "W4-g64+ip", "VQ4-g64+ip", "rtn:W3-g64+ip", "rtn:VQ3-g64+ip"]


def hessians(blocks: set[int], cache: Path):
    if cache.exists():
        return torch.load(cache)
    from mixq import pipeline as P
    from mixq.calib.capture import walk_blocks

    ref, tok = P.load_model()
    cal = P.build_calibration(ref, tok, None, 32, 512, progress=False)
    out = {"H": {}, "W": {}}

    def sink(i, stats):
        if i in blocks:
            for n, s in stats.items():
                out["H"][f"{i}.{n}"] = s.H.clone()
                out["W"][f"{i}.{n}"] = ref.model.layers[i].get_submodule(n).weight.detach().clone()

    with torch.no_grad():
        walk_blocks(ref, cal.ids, None, sequential=False, stats_sink=sink, progress=False)
    torch.save(out, cache)
    return out


def learned(W: torch.Tensor, H: torch.Tensor, spec) -> torch.Tensor:
    """GPTVQ-style: a per-tensor codebook fitted to the +ip-transformed, group-scaled weight, then GPTQ with it."""
    seeds = seeds_for(spec)
    Wp = rotate_weight(W.float(), seeds)
    Hp = rotate(rotate(H.float(), seeds[0]).T.contiguous(), seeds[0])
    inner = spec.inner
    B = spec_codebook(inner).double()
    glen, d = group_len(inner, W.shape[1]), inner.vq_dim
    s = torch.stack([fit_scales(Wp[:, j:j + glen], B.float(), inner) for j in range(0, Wp.shape[1], glen)], 1)
    X = (Wp / s.repeat_interleave(glen, 1)).reshape(-1, d).double()
    for _ in range(10):
        idx = nearest(X, B)
        cnt = torch.zeros(B.shape[0], dtype=torch.float64).index_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))
        acc = torch.zeros_like(B).index_add_(0, idx, X)
        B = torch.where(cnt[:, None] > 0, acc / cnt.clamp_min(1)[:, None], B)
    B = B.half().float()
    _, Wp_hat = quantize_vq(Wp, inner, 0.5 * (Hp + Hp.T), "gptq", codebook=B)
    from mixq.algorithms.composite.incoherence import unrotate_weight

    return unrotate_weight(Wp_hat, seeds)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", default="0,15,29")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--cache", default="/tmp/mixq-vq-hessians.pt")
    args = ap.parse_args()
    blocks = {int(b) for b in args.blocks.split(",")}
    data = hessians(blocks, Path(args.cache))
    layers = [k for k in data["H"] if int(k.split(".")[0]) in blocks]
    out = RESULTS / "vq_layers.json"
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    for name in args.variants.split(","):
        if any(r["variant"] == name for r in rows):
            continue
        method, _, spec_name = name.rpartition(":")
        spec = parse_spec(spec_name)
        errs, secs, bits, n = {}, 0.0, 0, 0
        for k in layers:
            W, H = data["W"][k], data["H"][k]
            t = time.perf_counter()
            try:
                if method == "learned":
                    Wh = learned(W, H, spec)
                else:
                    Wh = quantize_layer(W, spec, H, method or "gptq")[1]
            except ValueError as e:  # a shape the spec cannot hold
                print(name, k, e, flush=True)
                continue
            secs += time.perf_counter() - t
            dW, Wd, Hd = (W - Wh).double(), W.double(), H.double()
            errs[k] = float(((dW @ Hd) * dW).sum() / ((Wd @ Hd) * Wd).sum())
            c = spec.cost(tuple(W.shape)).total
            if method == "learned":
                c += 2 ** spec.vq_bits * spec.vq_dim * 16
            bits += c
            n += W.numel()
        geo = math.exp(sum(math.log(e) for e in errs.values()) / len(errs))
        rows.append({"variant": name, "bpw": bits / n, "geomean_rel_err": geo, "seconds": secs, "errors": errs})
        print(f"{name:24s} bpw {bits / n:.3f}  geomean rel err {geo:.4f}  {secs:.0f} s", flush=True)
        doc = {"command": f"OMP_NUM_THREADS=1 python bench/vq_layers.py --blocks {args.blocks}", "commit": git_rev(),
               "machine": machine(), "layers": layers, "rows": rows}
        out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
