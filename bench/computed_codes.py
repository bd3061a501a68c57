"""Trellis codebooks a CPU can compute instead of look up: how much Gaussian error do they cost?

    OMP_NUM_THREADS=1 python bench/computed_codes.py

The decode of a trellis layer reads one table entry per weight (a gather from the 4096-entry table at L = 12),
which is most of its cost on a CPU (issue 15: decode at 1.5x fp32).  Codes that are *computed* from the state
in a few vector instructions avoid the gather.  Compared here at L = 12, rates 2-4, on N(0, 1) sequences (the
native Viterbi search, the same one the quantizer runs):

- ``trained``: mixq's tables (Lloyd over the trellis; :mod:`mixq.formats.composite.tcq_codebook`).
- ``1MAD``: QTIP's computed Gaussian code: ``v = a·s + b mod 2³²``, the sum of its four bytes, centred and
  scaled (one multiply, one add and one byte-sum a weight).
- ``hashed``: the four bytes of the same hash, each read as a 7-bit index into one learned 128-entry table whose
  four entries are summed (on AVX-512: ``vpmulld``, ``vpermi2b``, ``vpdpbusd``).  The table is fitted by
  alternating the search and a least-squares fit of its 128 entries, from a random start; three hash
  constants.

Each table is fitted on ``--train`` sequences and scored on as many other ones.  Writes
bench/results/computed_codes.{md,json}.
"""
from __future__ import annotations

import argparse

import torch
from common import RESULTS, header

from mixq.algorithms.composite import tcq_search as ts
from mixq.formats.composite import tcq_codebook as cb
from mixq.jsonio import write_json_atomic

L = 12
HASHES = ((34038481, 76625530), (0x9E3779B1, 0x7F4A7C15), (89226354, 64248484))


def search_mse(x: torch.Tensor, k: int, lut: torch.Tensor) -> tuple[float, torch.Tensor]:
    """MSE of the quantizer's search through ``lut`` at rate ``k``, and the states its paths visit."""
    bits, vals, _ = ts.viterbi(x, None, k, lut.float().contiguous())
    return float(((vals - x) ** 2).mean()), cb.states(bits.long(), cb.schedule(k, x.shape[1]), L)


def hash_bytes(a: int, b: int) -> torch.Tensor:
    """``[2^L, 4]`` the four bytes of ``a·s + b mod 2^32`` for every state ``s``."""
    v = (torch.arange(1 << L, dtype=torch.int64) * a + b) & 0xFFFFFFFF
    return torch.stack([(v >> (8 * i)) & 255 for i in range(4)], 1)


def one_mad(a: int, b: int) -> torch.Tensor:
    return (hash_bytes(a, b).sum(1).double() - 510.0) / 147.8  # mean and sd of four uniform bytes


def hashed(x: torch.Tensor, k: int, a: int, b: int, iters: int) -> torch.Tensor:
    idx = hash_bytes(a, b) & 127
    A = torch.zeros(1 << L, 128, dtype=torch.float64)
    for i in range(4):
        A.index_put_((torch.arange(1 << L), idx[:, i]), torch.ones(1 << L, dtype=torch.float64), accumulate=True)
    t = torch.randn(128, generator=torch.Generator().manual_seed(k), dtype=torch.float64) * 0.5
    target = x.reshape(-1, 1).double()
    for _ in range(iters):
        _, states = search_mse(x, k, A @ t)
        t = torch.linalg.lstsq(A[states.reshape(-1)], target, driver="gelsd").solution.squeeze(1)
    return A @ t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=128, help="training sequences (of --length)")
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--iters", type=int, default=12)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.train, args.length, generator=g)
    xv = torch.randn(args.train, args.length, generator=g)
    rows = []
    for k in (2, 3, 4):
        row = {"rate": k, "trained": search_mse(xv, k, cb.lut(k, L))[0],
               "1mad": [search_mse(xv, k, one_mad(a, b))[0] for a, b in HASHES],
               "hashed": [search_mse(xv, k, hashed(x, k, a, b, args.iters))[0] for a, b in HASHES]}
        rows.append(row)
        print(row, flush=True)
    cmd = f"OMP_NUM_THREADS=1 python bench/computed_codes.py --train {args.train} --length {args.length} --iters {args.iters}"
    write_json_atomic(RESULTS / "computed_codes.json", {"command": cmd, "state_bits": L, "hashes": HASHES, "rows": rows},
                      overwrite=True)
    lines = header("Computed trellis codes against trained tables (Gaussian MSE, L = 12)", cmd)
    lines += ["MSE of the Viterbi search on held-out N(0, 1) sequences (the quantizer's search); `1MAD` and "
              "`hashed` for three hash constants (`a`, `b`): see the script's docstring.", "",
              "| rate | trained | 1MAD (best / worst) | hashed 4 x T[128] (best / worst) | best hashed vs trained |",
              "|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['rate']} | {r['trained']:.5f} | {min(r['1mad']):.5f} / {max(r['1mad']):.5f} | "
                     f"{min(r['hashed']):.5f} / {max(r['hashed']):.5f} | {min(r['hashed']) / r['trained']:.3f} |")
    (RESULTS / "computed_codes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
