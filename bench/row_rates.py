"""Rates per output row *inside one trellis*: rows sorted into rate groups down each column (a study).

    OMP_NUM_THREADS=1 python bench/row_rates.py [--rate 3] [--state-bits 10] [--powers 0.5,1] [--nsamples 8]

The follow-up of ``row_alloc.py`` (rates per row from whole-layer quantizations at each rate: -15 to -18 % KL at 3
bits) and ``row_weight.py`` (the trellis search weighting rows by ``G_r ** 0.5``: what the recipe does).  A trellis
column runs down the rows, each step taking ``k_t`` bits (``mixq.formats.composite.tcq_codebook``).  If the rows are
put in the order of their rate, a column's step schedule can give each row its own ``k``: the row's rate.  A rate
table trained for ``rate`` loses 2 % of Gaussian MSE when stepped at ``rate ± 1`` (measured on this machine, L = 10:
table 3 at k = 2 0.0789 against table 2's 0.0776, at k = 4 0.00600 against 0.00588), and contiguous groups of rows
at one ``k`` each keep that group's own error (interleaved, the search evens the error out across the steps).

So a stored layer would be: one rate table, a per-row rate map (2 bits a row), the rows in the trellis in the stable
order of their rate.  Which rows get more bits: each row's importance ``I_r = G_r ** p · mean(W_r ** 2)`` (after
``+ip1`` and a scale per row a row's error is its scale squared times the table's Gaussian error at its ``k``), and
rows move from ``rate`` to ``rate ± 1`` in pairs (one up, one down) while the predicted K-FAC loss falls; the
mean stays ``rate`` exactly.  The search keeps its row weights (``G ** 0.5``).

Every block linear of SmolLM2 is quantized on its own (layer-wise GPTQ on the fp model's inputs, as in
``row_weight.py``) as ``TCQ<rate>L<b>-channel+ip1``, uniform and with row rates.  Writes
bench/results/row_rates_<rate>.{md,json}.
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
from mixq.formats.composite import tcq_storage
from mixq.formats.composite.tcq_codebook import lut as tcq_lut, schedule, states
from mixq.jsonio import write_json_atomic
from mixq.pipeline import build_calibration, load_model
from mixq.runtime.kernels import tcq_cpu
from mixq.algorithms.composite.tcq_search import viterbi_torch


def gaussian_mse(table, k: int, L: int, n: int = 128, T: int = 512) -> float:
    X = torch.randn(n, T, generator=torch.Generator().manual_seed(1))
    ks = torch.full((T,), k, dtype=torch.uint8)
    got = tcq_cpu.viterbi(X, torch.ones_like(X), ks, table, L)
    v = (got if got is not None else viterbi_torch(X, torch.ones_like(X), ks, table, L))[1]
    return float((X - v).pow(2).mean())


def assign(I: torch.Tensor, rate: int, D: dict) -> torch.Tensor:
    """Per row ``k`` in ``rate - 1, rate, rate + 1``, as many up as down: pairs (most important up, least down)
    while the up-move saves more ``I · ΔD`` than the down-move costs."""
    R = I.numel()
    k = torch.full((R,), rate, dtype=torch.long)
    order = torch.argsort(I, descending=True)
    up, down = D[rate] - D[rate + 1], D[rate - 1] - D[rate]
    for i in range(R // 2):
        a, b = order[i], order[R - 1 - i]
        if float(I[a]) * up <= float(I[b]) * down:
            break
        k[a], k[b] = rate + 1, rate - 1
    return k


class Schedule:
    """Monkeypatches of ``tcq``'s search and decode that step a column of ``R`` rows by ``ks`` (rows in rate order)."""

    def __init__(self):
        self.ks = None
        self._viterbi, self._unit = tcq.viterbi, tcq.unit_values

    def __enter__(self):
        me = self

        def viterbi(x, w, rate, lut):
            if me.ks is None or x.shape[1] != me.ks.numel():
                return me._viterbi(x, w, rate, lut)
            L = lut.numel().bit_length() - 1
            w = torch.ones_like(x) if w is None else w
            got = tcq_cpu.viterbi(x, w, me.ks, lut, L)
            return got if got is not None else viterbi_torch(x, w, me.ks, lut, L)

        def unit_values(bits, spec):
            if me.ks is None:
                return me._unit(bits, spec)
            return tcq_lut(spec.tcq_rate, spec.state_bits)[states(bits, me.ks, spec.state_bits)].T.contiguous()

        tcq.viterbi, tcq.unit_values = viterbi, unit_values
        return self

    def __exit__(self, *exc):
        tcq.viterbi, tcq.unit_values = self._viterbi, self._unit


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=int, default=3)
    ap.add_argument("--state-bits", type=int, default=10)
    ap.add_argument("--powers", default="0.5,1")
    ap.add_argument("--nsamples", type=int, default=8, help="self+ptb calibration rows x 512 for G and H")
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args()
    spec = parse_spec(f"TCQ{args.rate}L{args.state_bits}-channel+ip1")
    table = tcq_lut(args.rate, args.state_bits)
    D = {k: gaussian_mse(table, k, args.state_bits) for k in (args.rate - 1, args.rate, args.rate + 1)}
    print("Gaussian MSE of the rate table at k:", D, flush=True)
    model, tok = load_model("smollm2-135m")
    cal = build_calibration(model, tok, "self+ptb", nsamples=args.nsamples, seqlen=512, seed=0, progress=False)
    scorer = domain_scorer(model, tok, "smollm2-135m", args.tokens)
    scorer.metrics(model)
    lin, G, H = layer_statistics(model, cal.ids)
    out = []
    variants = [("uniform", None)] + [(f"row rates, I = G^{p:g} W^2", p) for p in
                                      [float(x) for x in args.powers.split(",") if x]]
    for name, p in variants:
        t0, loss, new, moved = time.time(), 0.0, {}, 0
        with Schedule() as sch:
            for n, m in lin.items():
                W = m.weight.detach().float()
                R = W.shape[0]
                if p is None:
                    sch.ks = None
                    Wq = quantize_layer(W, spec, H[n], "gptq", row_weight=G[n])[1]
                else:
                    I = G[n].float().clamp_min(0) ** p * W.pow(2).mean(1)
                    k = assign(I, args.rate, D)
                    moved += int((k != args.rate).sum())
                    perm = torch.sort(k, stable=True).indices
                    sch.ks = k[perm].to(torch.uint8)
                    Wq_p = quantize_layer(W[perm], spec, H[n], "gptq", row_weight=G[n][perm])[1]
                    Wq = torch.empty_like(Wq_p)
                    Wq[perm] = Wq_p
                d = (W - Wq).double()
                loss += float((G[n] * ((d @ H[n].double()) * d).sum(1)).sum())
                new[n] = Wq
        rows = sum(m.weight.shape[0] for m in lin.values())
        r = {"variant": name, "power": p, "rows_moved": moved, "rows": rows, "kfac_loss": loss,
             "seconds": time.time() - t0, **metrics_with(model, lin, new, scorer)}
        out.append(r)
        print(f"{name}: KL ptb {r['ptb']['kl']:.4f} fortunes {r['fortunes']['kl']:.4f} K-FAC loss {loss:.4g} "
              f"rows moved {moved}/{rows} ({r['seconds']:.0f} s)", flush=True)
    cmd = (f"OMP_NUM_THREADS=1 python bench/row_rates.py --rate {args.rate} --state-bits {args.state_bits} "
           f"--powers {args.powers} --nsamples {args.nsamples} --tokens {args.tokens}")
    doc = {"command": cmd, "spec": spec.name, "gaussian_mse": {str(k): v for k, v in D.items()},
           "calibration": cal.record(), "rows": out}
    name = f"row_rates_{args.rate}"
    write_json_atomic(RESULTS / f"{name}.json", doc, overwrite=True)
    lines = header("Rates per output row inside one trellis (SmolLM2-135M, layer-wise GPTQ)", cmd)
    lines += [f"Every block linear as `{spec.name}` (search rows weighted by `G ** 0.5` in every variant); row rates "
              f"{args.rate - 1}, {args.rate}, {args.rate + 1} at mean {args.rate}; G and H from {args.nsamples} x 512 "
              f"self+ptb rows.  Gaussian MSE of the rate-{args.rate} table stepped at k: "
              + ", ".join(f"{k}: {v:.5f}" for k, v in D.items()) + ".  See the script's docstring.", ""]
    lines += relative_kl_table(out, "variant", lambda r: r["variant"], out[0], "uniform")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
