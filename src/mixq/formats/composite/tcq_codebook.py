"""The bitshift trellis of ``TCQ`` bases (QTIP-style trellis-coded quantization) and its trained lookup tables: how a
stored bit string decodes.

A sequence of ``T`` weights (one column of a weight matrix, top to bottom: :mod:`mixq.algorithms.composite.tcq`) is
stored as ``T · rate`` bits: step ``t`` appends ``k_t`` bits ``b_t`` to the stream, and its weight decodes from the
**state**, the last ``L`` bits of the stream so far::

    s_t = ((s_{t-1} << k_t) | b_t) mod 2^L,   s_{-1} = 0,      ŵ_t = scale · lut[s_t]

``k_t = floor((t+1)·rate) - floor(t·rate)``: ``k`` bits a step at a whole rate, ``floor(rate)`` then
``ceil(rate)`` at a half rate (2.5 bpw: 2, 3, 2, 3, ...).  Rates: 1 to 4 by halves, then 5 and 6 (whole only: a half
rate's pair of steps is stored as one symbol, which above 4 bits would outgrow a byte).  At 5-6 bits the 8-bit
state leaves the trellis 3 or 2 bits of memory and little gain over a scalar grid (6 bits: more error than the
Gaussian Lloyd-Max quantizer); ``L = 10`` keeps 10-27 % below it.  Each step picks among ``2^{k_t}`` values only,
but the Viterbi search (:func:`mixq.algorithms.composite.tcq_search.viterbi`) chooses the whole string jointly, so the
reachable sequences cover the Gaussian better than any fixed grid of the same rate (the trellis's granular gain;
QTIP, Tseng et al. 2024, with ``L = 16`` on a GPU; ``L = 8`` here keeps the search ~0.3 µs a weight on this CPU).
Decoding a weight needs only the ``L`` stream bits ending at it: no sequential dependence, random access.

``lut(rate, L)``: ``2^L`` fp16-exact values, trained for i.i.d. N(0, 1) targets (what ``+ip`` weights divided by
their scale look like) by Lloyd over the trellis (:func:`mixq.algorithms.composite.tcq_search.generate`), committed
in :mod:`mixq.formats.composite.tcq_tables` (``L = 8``), :mod:`mixq.formats.composite.tcq_tables_l10` (``L = 10``)
and :mod:`mixq.formats.composite.tcq_tables_l12` (``L = 12``; ``tests/test_tcq.py`` pins all three) so that machines
whose arithmetic differs in the last bit still decode a stored model identically.

**State bits.**  ``L = 8`` (:data:`L`, what a plain ``TCQ<rate>`` spec decodes with), ``L = 10`` (``TCQ<rate>L10``,
the spec's ``state_bits``) or ``L = 12`` (``TCQ<rate>L12``): the same bits a weight and the same stream; each step
up is a 4x larger table (2 KB, 8 KB of fp16) and a Viterbi search about 4x as long, for 5-13 % (L = 10 against 8)
and a further 5-10 % at 2-4 bits, 11-20 % at 5-6 (12 against 10) less squared error on Gaussian targets
(``bench/results/tcq.md``).
"""
from __future__ import annotations

from fractions import Fraction
from functools import lru_cache
from importlib import import_module

import torch

from ...config.composite_check import TCQ_RATES_TEXT, TCQ_STATE_BITS as STATE_BITS, TCQ_TRELLIS

L = 8                   # the state bits of a plain TCQ<rate> spec; STATE_BITS: those with committed tables
TABLE_MODULES = {8: "tcq_tables", 10: "tcq_tables_l10", 12: "tcq_tables_l12"}  # the committed tables of each L
RATES = tuple(Fraction(n, 2) for n in TCQ_TRELLIS)  # 1 .. 4 bits a weight by halves, 5, 6


def check_rate(rate) -> Fraction:
    r = Fraction(rate).limit_denominator(2)
    if r != Fraction(rate) or r not in RATES:
        raise ValueError(f"TCQ rates are {TCQ_RATES_TEXT}, got {float(rate):g}")
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


def check_state_bits(L) -> int:
    if isinstance(L, bool) or L not in STATE_BITS:
        raise ValueError(f"TCQ state bits are one of {STATE_BITS}, got {L!r}")
    return int(L)


@lru_cache(maxsize=None)
def _lut(rate: Fraction, L: int) -> torch.Tensor:
    TABLES = import_module(f".{TABLE_MODULES[L]}", __package__).TABLES
    hexs = TABLES.get(str(rate))
    if hexs is None:
        raise ValueError(f"no TCQ table for rate {rate} at L = {L}; have {sorted(TABLES)} "
                         "(add one with mixq.algorithms.composite.tcq_search.generate and the tables module)")
    return torch.frombuffer(bytearray(bytes.fromhex(hexs)), dtype=torch.float16).float()


def lut(rate, L: int = L) -> torch.Tensor:
    """The ``[2^L]`` float32 table (fp16-exact values) of a rate at ``L`` state bits (a copy)."""
    return _lut(check_rate(rate), check_state_bits(L)).clone()


def to_hex(table: torch.Tensor) -> str:
    return table.to(torch.float16).contiguous().view(torch.uint8).numpy().tobytes().hex()
