"""The Viterbi search through the bitshift trellis of :mod:`mixq.formats.composite.tcq_codebook` (what
:mod:`mixq.algorithms.composite.tcq` encodes each column with; native in :mod:`mixq.runtime.kernels.tcq_cpu`, else in
torch), and how the trellis's lookup tables are trained.

``generate(rate)``: Lloyd over the trellis, from the Gaussian quantiles in a seeded order, ``ITERS`` times
(Viterbi-encode seeded N(0, 1) sequences; set each entry to the mean of the targets that decoded from it).  The tables
committed in :mod:`mixq.formats.composite.tcq_tables` (``L = 8``) were made by an earlier build of the native search, and
:func:`generate` now gives tables equal to them up to that search's float rounding (same MSE to 0.1 %).  MSE per
weight on N(0, 1) of a table: :func:`mse` (compare the 2-D vector codebooks' with
:func:`mixq.algorithms.composite.vq_search.mse`; measured figures: ``bench/results/tcq.md``).
"""
from __future__ import annotations

import torch

from ...formats.composite.tcq_codebook import L, lut as tcq_lut, schedule, states
from ...runtime.kernels import tcq_cpu

SEED = 0x7C9
ITERS = 10
TRAIN_SEQS, TRAIN_LEN = 1024, 256


def viterbi_torch(x: torch.Tensor, w: torch.Tensor, ks: torch.Tensor, lut: torch.Tensor, L: int = L):
    """The search of the native kernel in torch (``[N, 2^L]`` costs a step; the fallback and its test oracle)."""
    N, T = x.shape
    S = 1 << L
    lut = lut.float()
    cost = torch.full((N, S), float("inf"))
    cost[:, 0] = 0.0
    back = []
    for t in range(T):
        k = int(ks[t])
        U = S >> k
        prev = cost.reshape(N, 1 << k, U)  # [n, h, u]: the state (h << (L-k)) | u
        m, h = prev.min(1)
        back.append(h.to(torch.uint8))
        err = w[:, t:t + 1].float() * (x[:, t:t + 1].float() - lut[None]) ** 2
        cost = m.repeat_interleave(1 << k, 1) + err
    best, s = cost.min(1)
    bits = torch.empty(N, T, dtype=torch.uint8)
    vals = torch.empty(N, T)
    for t in range(T - 1, -1, -1):
        k = int(ks[t])
        bits[:, t] = (s & ((1 << k) - 1)).to(torch.uint8)
        vals[:, t] = lut[s]
        u = s >> k
        s = (back[t].gather(1, u[:, None])[:, 0].long() << (L - k)) | u
    return bits, vals, best


def viterbi(x: torch.Tensor, w: torch.Tensor | None, rate, lut: torch.Tensor):
    """``(bits uint8 [N, T], values [N, T], cost [N])``: the least-cost path for each row of targets ``x [N, T]``
    under weights ``w`` (ones when None) and the table values it decodes to, through the trellis of the table's
    ``2^L`` states; native when the kernel compiles, else torch."""
    L = lut.numel().bit_length() - 1
    ks = schedule(rate, x.shape[1])
    w = torch.ones_like(x) if w is None else w
    got = tcq_cpu.viterbi(x, w, ks, lut, L)
    return got if got is not None else viterbi_torch(x, w, ks, lut, L)


def _init(L: int) -> torch.Tensor:
    S = 1 << L
    perm = torch.randperm(S, generator=torch.Generator().manual_seed(SEED))
    return torch.distributions.Normal(0.0, 1.0).icdf((perm.double() + 0.5) / S).float()


def generate(rate, L: int = L) -> torch.Tensor:
    """Train the ``[2^L]`` table of a rate (module docstring; about a second natively at ``L = 8`` or ``10``: the
    committed ``tcq_tables`` and ``tcq_tables_l10``)."""
    ks = schedule(rate, TRAIN_LEN)
    x = torch.randn(TRAIN_SEQS, TRAIN_LEN, generator=torch.Generator().manual_seed(SEED + 1))
    table = _init(L)
    for _ in range(ITERS):
        bits, _, _ = viterbi(x, None, rate, table)
        st = states(bits, ks, L).reshape(-1)
        cnt = torch.zeros(1 << L, dtype=torch.float64).index_add_(0, st, torch.ones(st.numel(), dtype=torch.float64))
        acc = torch.zeros(1 << L, dtype=torch.float64).index_add_(0, st, x.reshape(-1).double())
        table = torch.where(cnt > 0, acc / cnt.clamp_min(1), table.double()).float()
    return table.to(torch.float16).float()


def mse(rate, n: int = 256, T: int = 256, table: torch.Tensor | None = None) -> float:
    """Mean squared error per weight of the trellis at ``rate`` (the committed table, or ``table`` of ``2^L'``
    entries) on ``n`` seeded N(0, 1) sequences of ``T``."""
    table = tcq_lut(rate) if table is None else table
    x = torch.randn(n, T, generator=torch.Generator().manual_seed(SEED + 2))
    _, _, cost = viterbi(x, None, rate, table)
    return float(cost.double().sum() / x.numel())
