"""Rates per output row inside a trellis layer: is there quality to win, and does it need the output transform?

    OMP_NUM_THREADS=1 python bench/row_alloc.py [--rate 3] [--state-bits 10] [--nsamples 8] [--tokens 4096]

A study for the frontier issue (mixed precision *inside* tensors), before any format is built.  Every block
linear of SmolLM2 is quantized on its own (GPTQ on the fp model's inputs, layer by layer, not the sequential
walk) three ways, all at ``--rate`` bits per weight in the codes:

- ``two-sided``: ``TCQ<rate>L<b>-channel+ip`` (what the recipe stores): random Hadamard transforms on both
  sides, ``W' = Q_out W Q_inᵀ``.
- ``one-sided``: the input transform only (``W Q_inᵀ`` quantized as ``TCQ<rate>L<b>-channel``, GPTQ on
  ``Q_in H Q_inᵀ``): the output rows stay the model's own rows, the precondition for giving rows different rates.
- ``one-sided rows``: each output row ``r`` takes one of the whole-layer quantizations at the rates of
  ``LEVELS`` around ``--rate``, chosen by a Lagrangian on ``G_rr · (ΔW H ΔWᵀ)_rr`` (its loss under the
  measurement's K-FAC model: ``G`` the output-gradient energy of labels sampled from the model, ``H`` the inputs'
  second moment) so that the rows' mean rate is ``--rate``.  Rows are taken from whole-layer quantizations, so
  each row's trellis path is the one of all rows of its column, not of its own rate's rows: an estimate of
  what a stored layer of row groups (one trellis per group) would give, not that format.
- ``one-sided rows, G = 1``: the same with every ``G_rr`` taken as 1 (rows ranked by their ``H``-weighted error
  alone): what a quantizer that has no output gradients (the GPTQ walk after the plan) could do.

KL to the fp32 model on the first ``--tokens`` of PTB test and of the fortunes, and the K-FAC loss each variant
predicts, relative to ``two-sided``.  Writes bench/results/row_alloc_<rate>.{md,json}.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
from common import RESULTS, domain_scorer, header, metrics_with, relative_kl_table

from mixq.algorithms.composite.hooks import quantize_layer
from mixq.algorithms.composite.incoherence import SEED_IN, rotate, rotate_hessian
from mixq.calib.statistics import collect_statistics
from mixq.config import parse_spec
from mixq.jsonio import write_json_atomic
from mixq.measure.gradients import gradient_stats
from mixq.pipeline import build_calibration, load_model

LEVELS = {2.0: (1, 1.5, 2, 2.5, 3, 4), 2.5: (1.5, 2, 2.5, 3, 3.5, 4), 3.0: (2, 2.5, 3, 3.5, 4, 5),
          3.5: (2.5, 3, 3.5, 4, 5, 6), 4.0: (3, 3.5, 4, 5, 6)}


def layer_statistics(model, ids):
    """The block linears, their ``G [R]`` (output-gradient energy under labels sampled from the model: the
    measurement's own pass, :func:`mixq.measure.gradients.gradient_stats`) and ``H [C, C]`` (the calibration
    walk's, :func:`mixq.calib.statistics.collect_statistics`)."""
    G = {n: st["G"].double() for n, st in gradient_stats(model, ids, labels="model", progress=False).items()}
    H = collect_statistics(model, ids, hessian=True, fingerprint=False).hessians()
    lin = {n: model.get_submodule(n) for n in G}
    return lin, G, {n: H[n].float() for n in lin}


def row_rates(E: torch.Tensor, rates: torch.Tensor, target: float) -> torch.Tensor:
    """Per row, the index into ``rates`` minimising ``E[r, i] + λ · rates[i]`` at the smallest λ whose mean rate
    is at most ``target`` (bisection on λ)."""
    lo, hi = 1e-30, 1e12
    for _ in range(100):
        lam = math.sqrt(lo * hi)
        if float(rates[(E + lam * rates).argmin(1)].mean()) > target:
            lo = lam
        else:
            hi = lam
    return (E + hi * rates).argmin(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=3.0, choices=sorted(LEVELS))
    ap.add_argument("--state-bits", type=int, default=10)
    ap.add_argument("--nsamples", type=int, default=8, help="self+ptb calibration rows x 512 for G and H")
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args()
    levels = LEVELS[args.rate]
    model, tok = load_model("smollm2-135m")
    cal = build_calibration(model, tok, "self+ptb", nsamples=args.nsamples, seqlen=512, seed=0, progress=False)
    scorer = domain_scorer(model, tok, "smollm2-135m", args.tokens)
    scorer.metrics(model)  # the reference's log-probs are made on first use: now, while the model is still fp32
    t0 = time.time()
    lin, G, H = layer_statistics(model, cal.ids)
    two, one, rows, rows_g1 = {}, {}, {}, {}
    loss = {"two-sided": 0.0, "one-sided": 0.0, "one-sided rows": 0.0, "one-sided rows, G = 1": 0.0}
    rates = torch.tensor(levels, dtype=torch.float64)
    L = args.state_bits

    def kfac(n, W, Wq):
        d = (W - Wq).double()
        return G[n] * ((d @ H[n].double()) * d).sum(1)

    for i, (n, m) in enumerate(lin.items()):
        W = m.weight.detach().float()
        two[n] = quantize_layer(W, parse_spec(f"TCQ{args.rate:g}L{L}-channel+ip"), H[n], "gptq")[1]
        Wp, Hp = rotate(W, SEED_IN).contiguous(), rotate_hessian(H[n], SEED_IN)
        each = [rotate(quantize_layer(Wp, parse_spec(f"TCQ{k:g}L{L}-channel"), Hp, "gptq")[1], SEED_IN,
                       transpose=True).contiguous() for k in levels]
        E = torch.stack([kfac(n, W, Wq) for Wq in each], 1)
        ch = row_rates(E, rates, args.rate)
        ch1 = row_rates(E / G[n].clamp_min(1e-30)[:, None], rates, args.rate)
        r = torch.arange(W.shape[0])
        one[n] = each[levels.index(args.rate)]
        rows[n] = torch.stack(each)[ch, r]
        rows_g1[n] = torch.stack(each)[ch1, r]
        loss["two-sided"] += float(kfac(n, W, two[n]).sum())
        loss["one-sided"] += float(E[:, levels.index(args.rate)].sum())
        loss["one-sided rows"] += float(E[r, ch].sum())
        loss["one-sided rows, G = 1"] += float(E[r, ch1].sum())
        if i % 30 == 0:
            print(f"{i:3d} {n}: mean row rate {float(rates[ch].mean()):.3f}  ({time.time() - t0:.0f} s)", flush=True)
    quant_s = time.time() - t0
    out = []
    for tag, wd in (("two-sided", two), ("one-sided", one), ("one-sided rows", rows),
                    ("one-sided rows, G = 1", rows_g1)):
        r = {"variant": tag, "kfac_loss": loss[tag], **metrics_with(model, lin, wd, scorer)}
        out.append(r)
        print(f"{tag:22s} KL ptb {r['ptb']['kl']:.4f} fortunes {r['fortunes']['kl']:.4f} "
              f"K-FAC loss {loss[tag]:.4g}", flush=True)
    cmd = (f"OMP_NUM_THREADS=1 python bench/row_alloc.py --rate {args.rate:g} --state-bits {L} "
           f"--nsamples {args.nsamples} --tokens {args.tokens}")
    doc = {"command": cmd, "levels": levels, "calibration": cal.record(), "quantize_seconds": quant_s, "rows": out}
    name = f"row_alloc_{args.rate:g}"
    write_json_atomic(RESULTS / f"{name}.json", doc, overwrite=True)
    base = out[0]
    lines = header("Rates per output row inside trellis layers (SmolLM2-135M, layer-wise GPTQ)", cmd)
    lines += [f"Every block linear at {args.rate:g} bits per weight in the codes, `L = {L}`; row rates from "
              f"{', '.join(f'{k:g}' for k in levels)}; G and H from {args.nsamples} x 512 self+ptb rows.  See the "
              "script's docstring for what each variant is and what the row variant only estimates.", ""]
    lines += relative_kl_table(out, "variant", lambda r: r["variant"], base, "two-sided")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
