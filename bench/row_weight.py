"""Rows weighted in the trellis search (``+ip1``): how much, and how strongly to weight them.

    OMP_NUM_THREADS=1 python bench/row_weight.py [--rate 3] [--state-bits 10] [--powers 0,1,0.5] [--nsamples 8]

A study for the frontier issue, the follow-up of ``row_alloc.py``: there, rates per output row gained 15-18 % KL, and
they need the output rows to stay the model's (the one-sided transform ``+ip1``).  A cheaper way to the same end
needs no new format: a trellis column's rows share one path, so a Viterbi search whose per-row error weights are the
rows' output-gradient energy ``G_r`` (what an error in row ``r`` costs the model, the K-FAC metric's output factor)
moves error off the rows that matter (:mod:`mixq.algorithms.composite.tcq`).

Every block linear of SmolLM2 is quantized on its own (GPTQ on the fp model's inputs, layer by layer, not the
sequential walk) as ``TCQ<rate>L<b>-channel+ip1`` with the search's row weights ``G_r ** p`` for each ``--powers``
``p`` (0: unweighted).  ``G`` and ``H`` as in ``row_alloc.py`` (labels sampled from the model; the calibration walk's
``H``).  The search applies its own power (:data:`mixq.algorithms.composite.tcq.ROW_WEIGHT_POWER`); this script sets
it per run.  KL to the fp32 model on the first ``--tokens`` of PTB test and of the fortunes, and the K-FAC loss
``Σ_r G_r (ΔW H ΔWᵀ)_rr``.  Writes bench/results/row_weight_<rate>.{md,json}.
"""
from __future__ import annotations

import argparse
import time

import torch
from common import RESULTS, domain_scorer, header, metrics_with, relative_kl_table
from row_alloc import layer_statistics

from mixq.algorithms.composite import tcq
from mixq.algorithms.composite.hooks import quantize_layer
from mixq.config import parse_spec
from mixq.jsonio import write_json_atomic
from mixq.pipeline import build_calibration, load_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=3.0)
    ap.add_argument("--state-bits", type=int, default=10)
    ap.add_argument("--powers", default="0,1,0.5")
    ap.add_argument("--nsamples", type=int, default=8, help="self+ptb calibration rows x 512 for G and H")
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args()
    powers = [float(p) for p in args.powers.split(",")]
    model, tok = load_model("smollm2-135m")
    cal = build_calibration(model, tok, "self+ptb", nsamples=args.nsamples, seqlen=512, seed=0, progress=False)
    scorer = domain_scorer(model, tok, "smollm2-135m", args.tokens)
    scorer.metrics(model)  # the reference's log-probs are made on first use: now, while the model is still fp32
    lin, G, H = layer_statistics(model, cal.ids)
    spec = parse_spec(f"TCQ{args.rate:g}L{args.state_bits}-channel+ip1")
    out = []
    for p in powers:
        t0, loss, new = time.time(), 0.0, {}
        tcq.ROW_WEIGHT_POWER = p
        for n, m in lin.items():
            W = m.weight.detach().float()
            Wq = quantize_layer(W, spec, H[n], "gptq", row_weight=None if p == 0 else G[n])[1]
            d = (W - Wq).double()
            loss += float((G[n] * ((d @ H[n].double()) * d).sum(1)).sum())
            new[n] = Wq
        r = {"power": p, "kfac_loss": loss, "seconds": time.time() - t0, **metrics_with(model, lin, new, scorer)}
        out.append(r)
        print(f"power {p:g}: KL ptb {r['ptb']['kl']:.4f} fortunes {r['fortunes']['kl']:.4f} K-FAC loss {loss:.4g} "
              f"({r['seconds']:.0f} s)", flush=True)
    cmd = (f"OMP_NUM_THREADS=1 python bench/row_weight.py --rate {args.rate:g} --state-bits {args.state_bits} "
           f"--powers {args.powers} --nsamples {args.nsamples} --tokens {args.tokens}")
    doc = {"command": cmd, "spec": spec.name, "calibration": cal.record(), "rows": out}
    name = f"row_weight_{args.rate:g}"
    write_json_atomic(RESULTS / f"{name}.json", doc, overwrite=True)
    base = next((r for r in out if r["power"] == 0), out[0])
    lines = header("Rows weighted in the trellis search (SmolLM2-135M, layer-wise GPTQ)", cmd)
    lines += [f"Every block linear as `{spec.name}`, the search's row weights `G_r ** power` (0: unweighted); G and "
              f"H from {args.nsamples} x 512 self+ptb rows.  See the script's docstring.", ""]
    lines += relative_kl_table(out, "power", lambda r: f"{r['power']:g}", base, "unweighted")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
