"""The bitshift trellis of ``TCQ`` bases (QTIP-style trellis-coded quantization) and its trained lookup tables.

A sequence of ``T`` weights (one column of a weight matrix, top to bottom: :mod:`mixq.algorithms.composite.tcq`) is
stored as ``T · rate`` bits: step ``t`` appends ``k_t`` bits ``b_t`` to the stream, and its weight decodes from the
**state**, the last ``L`` bits of the stream so far::

    s_t = ((s_{t-1} << k_t) | b_t) mod 2^L,   s_{-1} = 0,      ŵ_t = scale · lut[s_t]

``k_t = floor((t+1)·rate) - floor(t·rate)``: ``k`` bits a step at a whole rate, ``floor(rate)`` then
``ceil(rate)`` at a half rate (2.5 bpw: 2, 3, 2, 3, ...).  Each step picks among ``2^{k_t}`` values only, but the
Viterbi search (:func:`viterbi`) chooses the whole string jointly, so the reachable sequences cover the Gaussian
better than any fixed grid of the same rate (the trellis's granular gain; QTIP, Tseng et al. 2024, with
``L = 16`` on a GPU; ``L = 8`` here keeps the search ~0.3 µs a weight on this CPU).  Decoding a weight needs
only the ``L`` stream bits ending at it: no sequential dependence, random access.

``lut(rate)``: ``2^L`` fp16-exact values, trained for i.i.d. N(0, 1) targets (what ``+ip`` weights divided by
their scale look like) by Lloyd over the trellis: from the Gaussian quantiles in a seeded order, ``ITERS`` times
(Viterbi-encode seeded N(0, 1) sequences; set each entry to the mean of the targets that decoded from it).
Committed in :mod:`mixq.formats.composite.tcq_tables` (``tests/test_tcq.py`` pins them) so that machines whose
arithmetic differs in the last bit still decode a stored model identically; they were made by an earlier build of
the native search, and :func:`generate` now gives tables equal to them up to that search's float rounding (same MSE
to 0.1 %).  MSE per weight on N(0, 1) (:func:`mse`), against the 2-D vector codebooks of
:mod:`mixq.formats.composite.vq_codebook` at the same rate: see ``tcq_tables.MSE``.
"""
from __future__ import annotations

from fractions import Fraction
from functools import lru_cache

import torch

from ...runtime.kernels import tcq_cpu

L = 8
SEED = 0x7C9
ITERS = 10
TRAIN_SEQS, TRAIN_LEN = 1024, 256
RATES = tuple(Fraction(n, 2) for n in range(2, 9))  # 1 .. 4 bits a weight, by halves


def check_rate(rate) -> Fraction:
    r = Fraction(rate).limit_denominator(2)
    if r != Fraction(rate) or r not in RATES:
        raise ValueError(f"TCQ rates are 1 to 4 bits a weight in steps of 0.5, got {float(rate):g}")
    return r


def period(rate) -> tuple[int, ...]:
    """Bits of the steps of one period: ``(k,)`` at a whole rate, ``(floor, ceil)`` at a half one."""
    r = check_rate(rate)
    return (int(r),) if r.denominator == 1 else (int(r), int(r) + 1)


def schedule(rate, T: int) -> torch.Tensor:
    """uint8 ``[T]``: the bits of each step of a ``T``-step sequence."""
    return _schedule(check_rate(rate), int(T)).clone()


@lru_cache(maxsize=64)
def _schedule(rate: Fraction, T: int) -> torch.Tensor:
    p = period(rate)
    return torch.tensor([p[t % len(p)] for t in range(T)], dtype=torch.uint8)


def states(bits: torch.Tensor, ks: torch.Tensor, L: int = L) -> torch.Tensor:
    """int64 ``[N, T]``: the state of every step from the step bits ``[N, T]``."""
    N, T = bits.shape
    out = torch.empty(N, T, dtype=torch.long)
    s = torch.zeros(N, dtype=torch.long)
    for t in range(T):
        s = ((s << int(ks[t])) | bits[:, t].long()) & ((1 << L) - 1)
        out[:, t] = s
    return out


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


def viterbi(x: torch.Tensor, w: torch.Tensor | None, rate, lut: torch.Tensor, L: int = L):
    """``(bits uint8 [N, T], values [N, T], cost [N])``: the least-cost path for each row of targets ``x [N, T]``
    under weights ``w`` (ones when None) and the table values it decodes to; native when the kernel compiles,
    else torch."""
    ks = _schedule(check_rate(rate), x.shape[1])
    w = torch.ones_like(x) if w is None else w
    got = tcq_cpu.viterbi(x, w, ks, lut, L)
    return got if got is not None else viterbi_torch(x, w, ks, lut, L)


def _init(L: int) -> torch.Tensor:
    S = 1 << L
    perm = torch.randperm(S, generator=torch.Generator().manual_seed(SEED))
    return torch.distributions.Normal(0.0, 1.0).icdf((perm.double() + 0.5) / S).float()


def generate(rate, L: int = L) -> torch.Tensor:
    """Train the ``[2^L]`` table of a rate (module docstring; about a second natively at ``L = 8``; ``L`` = 10 is
    for experiments: ``bench/tcq.py``)."""
    ks = schedule(rate, TRAIN_LEN)
    x = torch.randn(TRAIN_SEQS, TRAIN_LEN, generator=torch.Generator().manual_seed(SEED + 1))
    table = _init(L)
    for _ in range(ITERS):
        bits, _, _ = viterbi(x, None, rate, table, L)
        st = states(bits, ks, L).reshape(-1)
        cnt = torch.zeros(1 << L, dtype=torch.float64).index_add_(0, st, torch.ones(st.numel(), dtype=torch.float64))
        acc = torch.zeros(1 << L, dtype=torch.float64).index_add_(0, st, x.reshape(-1).double())
        table = torch.where(cnt > 0, acc / cnt.clamp_min(1), table.double()).float()
    return table.to(torch.float16).float()


@lru_cache(maxsize=None)
def _lut(rate: Fraction) -> torch.Tensor:
    from .tcq_tables import TABLES

    hexs = TABLES.get(str(rate))
    if hexs is None:
        raise ValueError(f"no TCQ table for rate {rate}; have {sorted(TABLES)} "
                         "(add one with mixq.formats.composite.tcq_codebook.generate and tcq_tables.py)")
    return torch.frombuffer(bytearray(bytes.fromhex(hexs)), dtype=torch.float16).float()


def lut(rate) -> torch.Tensor:
    """The ``[2^L]`` float32 table (fp16-exact values) of a rate (a copy)."""
    return _lut(check_rate(rate)).clone()


def to_hex(table: torch.Tensor) -> str:
    return table.to(torch.float16).contiguous().view(torch.uint8).numpy().tobytes().hex()


def mse(rate, n: int = 256, T: int = 256, table: torch.Tensor | None = None) -> float:
    """Mean squared error per weight of the trellis at ``rate`` (the committed table, or ``table`` of ``2^L'``
    entries) on ``n`` seeded N(0, 1) sequences of ``T``."""
    table = lut(rate) if table is None else table
    x = torch.randn(n, T, generator=torch.Generator().manual_seed(SEED + 2))
    _, _, cost = viterbi(x, None, rate, table, table.numel().bit_length() - 1)
    return float(cost.double().sum() / x.numel())
