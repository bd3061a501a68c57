"""BlockDialect-style per-block format choice (the ``+d<D>`` extension).

``NF4-g32+d8``: every group (block) of 32 weights keeps one fp16 absmax scale and picks, by least
(importance-weighted) squared error, one of ``D`` level tables of the same code width -- its
*dialect* -- stored as a ``log2(D)``-bit index per group::

    x̂ = scale · T_d[q],   scale = absmax (rounded to the scale dtype),   T_d ⊂ [-1, 1], 2^b entries

Formatbook (:func:`formatbook`): ``T_0`` is the base's own table (NormalFloat, or FP4 E2M1 / 6), and
``T_1 .. T_{D-1}`` are sign-magnitude power-law tables with ``M = 2^(b-1)`` magnitudes
``m_j = (j / (M-1))^γ`` (zero appears as ±0, so exactly 2^b codes), ``γ_i = 2.5^((i-1)/(D-2))``
(γ = 1 is the uniform grid; larger γ puts more levels near zero, for peaky blocks).  BlockDialect
(Jang & Tambe, 2025) builds its formatbook from FP4 variants with different largest magnitudes; the
tables here are this module's own family, chosen so that ``T_0`` makes ``+d`` never worse than the base.

Cost: the base's ``codes + scales`` plus ``ng · log2(D)`` bits of dialect indices.  In the stored
:class:`~mixq.formats.QParams` of a group column the ``zero`` field carries the dialect index
(integer-valued) and ``codebook`` the derived ``scale · T_d`` (not stored, rebuilt on decode).
"""
from __future__ import annotations

import torch

from .. import QParams
from ..lut import _nearest, nf_levels
from ..minifloat import FORMATS, value_table
from ..mx import round_scale

GAMMA_MAX = 2.5


def formatbook(dtype: str, bits: int, n: int) -> torch.Tensor:
    """float32 ``[n, 2^bits]``: ascending tables, each with max |value| = 1 (module docstring)."""
    if dtype == "nf":
        t0 = nf_levels(bits)
    elif dtype == "fp4_e2m1":
        v = value_table(FORMATS["fp4_e2m1"])
        t0 = (v / v.abs().max()).sort().values
    else:
        raise ValueError(f"no dialect formatbook for {dtype}")
    M = 2 ** (bits - 1)
    u = torch.arange(M, dtype=torch.float64) / (M - 1)
    tables = [t0.float()]
    for i in range(1, n):
        g = GAMMA_MAX ** ((i - 1) / max(n - 2, 1))
        m = u**g
        tables.append(torch.cat([-m, m]).sort().values.float())
    return torch.stack(tables)


def dialect_codebook(scale: torch.Tensor, index: torch.Tensor, cs) -> torch.Tensor:
    """``[N, 2^b]`` codebooks ``scale · T_index`` (``scale``, ``index`` ``[N, 1]``)."""
    book = formatbook(cs.dtype, cs.bits, cs.dialects)
    return scale * book[index.long().flatten()]


def fit_dialects(x: torch.Tensor, cs, w: torch.Tensor | None = None) -> QParams:
    """Per row of ``x [N, g]``: the fp16 absmax scale and the dialect of least ``Σ w (x - x̂)²``."""
    scale = round_scale(x.abs().amax(-1, keepdim=True), cs.scale_dtype, None)
    book = formatbook(cs.dtype, cs.bits, cs.dialects)
    best_err = best = None
    for i in range(cs.dialects):
        cb = scale * book[i]
        xh = cb.gather(1, _nearest(cb, x))
        d2 = (x - xh) ** 2
        err = (d2 if w is None else d2 * w).sum(-1, keepdim=True)
        if best is None:
            best_err, best = err, torch.zeros_like(err)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, torch.full_like(best, float(i)), best)
    return QParams(scale=scale, zero=best, codebook=dialect_codebook(scale, best, cs))
