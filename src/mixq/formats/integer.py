"""Uniform integer grids, 1..8 bits, one scale (and zero point) per row.

Codes are unsigned ``q`` in ``0 .. qmax`` with ``qmax = 2^bits - 1`` and ``mid = 2^(bits-1)``.

Symmetric (GPTQ convention, no stored zero point)::

    x̂ = scale * (q - mid)                 q = clamp(rne(x / scale) + mid, 0, qmax)
    minmax:  scale = 2 * absmax / qmax    (so 0 is exact; +absmax lands half a step off the top)
    e8m0:    scale = 2^(floor(log2 absmax) - (bits - 2))      (OCP MXINT8 for bits = 8:
             shared X = 2^floor(log2 absmax), int8 element with implicit 2^-6)

Binary (``bits == 1``, symmetric)::

    x̂ = scale * (2q - 1)                  q = [x >= 0]
    minmax:  scale = absmax;  clip="mse" also tries the L2-optimal  scale = Σ w|x| / Σ w

Asymmetric with an integer zero point (``zero_dtype="int"``, GPTQ/AWQ)::

    x̂ = scale * (q - zero)               q = clamp(rne(x / scale) + zero, 0, qmax)
    lo = min(min x, 0), hi = max(max x, 0)   (the range always holds 0, so zero is a valid code)
    scale = (hi - lo) / qmax,  zero = clamp(rne(-lo / scale), 0, qmax)

Asymmetric with an fp16 offset (``zero_dtype="fp16"``, llama.cpp Q4_1)::

    x̂ = scale * q + offset               q = clamp(rne((x - offset) / scale), 0, qmax)
    offset = fp16(min x),  scale = (max x - offset) / qmax

``clip="mse"`` multiplies ``absmax`` (int zero: both ``lo`` and ``hi``; fp16 offset: both ends
towards their midpoint) by a shrink factor chosen per row (the search lives in :mod:`.base`).  A zero-range row gets the smallest positive scale of its
``scale_dtype``, so it decodes to its constant (exactly for 0) and never to NaN; with an fp16
offset the scale is at least ``|offset| * 2^-16`` so every code decodes to a distinct float32.
"""
from __future__ import annotations

import torch

from .mx import e8m0_floor, round_scale
from .params import QParams


def qmax(spec) -> int:
    return 2**spec.bits - 1


def scale_unit(spec) -> float:
    """``absmax / scale`` under minmax (``qmax / 2``, or 1 for binary): sizes NVFP4-style tensor scales."""
    return 1.0 if spec.bits == 1 else qmax(spec) / 2


def fit(rows: torch.Tensor, spec, shrink: float = 1.0, tensor_scale=None):
    """Per-row ``scale`` (and ``zero`` or ``offset``), each ``[R, 1]``, for a range shrunk by ``shrink``."""
    ts = tensor_scale if spec.tensor_scale else None
    n = qmax(spec)
    if spec.symmetric:
        amax = rows.abs().amax(-1, keepdim=True) * shrink
        if spec.bits == 1:
            scale = round_scale(amax, spec.scale_dtype, ts)
        elif spec.scale_dtype == "e8m0":
            scale = e8m0_floor(amax, spec.bits - 2)
        else:
            scale = round_scale(2 * amax / n, spec.scale_dtype, ts)
        return QParams(scale=scale, tensor_scale=ts)
    if spec.zero_dtype == "int":
        lo = rows.amin(-1, keepdim=True).clamp(max=0) * shrink
        hi = rows.amax(-1, keepdim=True).clamp(min=0) * shrink
        scale = round_scale((hi - lo) / n, spec.scale_dtype, ts)
        zero = torch.round(-lo / scale).clamp(0, n)
        return QParams(scale=scale, zero=zero, tensor_scale=ts)
    lo, hi = rows.amin(-1, keepdim=True), rows.amax(-1, keepdim=True)
    mid = (lo + hi) / 2
    lo, hi = mid + (lo - mid) * shrink, mid + (hi - mid) * shrink
    offset = lo.clamp(-65504, 65504).to(torch.float16).float()
    step = torch.maximum((hi - offset) / n, offset.abs() * 2.0**-16)  # codes stay distinct in float32
    scale = round_scale(step, spec.scale_dtype, ts)
    return QParams(scale=scale, offset=offset, tensor_scale=ts)


def binary_l2_candidate(rows: torch.Tensor, spec, weight: torch.Tensor | None, tensor_scale=None):
    """L2-optimal binary scale ``Σ w|x| / Σ w`` per row (the mean ``|x|`` when unweighted)."""
    a = rows.abs()
    if weight is None:
        s = a.mean(-1, keepdim=True)
    else:
        w = weight.expand_as(rows)
        s = (w * a).sum(-1, keepdim=True) / w.sum(-1, keepdim=True).clamp(min=1e-30)
    ts = tensor_scale if spec.tensor_scale else None
    return QParams(scale=round_scale(s, spec.scale_dtype, ts), tensor_scale=ts)


def encode(x: torch.Tensor, p, spec) -> torch.Tensor:
    """Unsigned codes (uint8 ``[R, k]``) of ``x`` on the row grids ``p``."""
    x = x.float()
    n = qmax(spec)
    if spec.symmetric:
        if spec.bits == 1:
            return (x >= 0).to(torch.uint8)
        q = torch.round(x / p.scale) + 2 ** (spec.bits - 1)
    elif p.zero is not None:
        q = torch.round(x / p.scale) + p.zero
    else:
        q = torch.round((x - p.offset) / p.scale)
    return q.clamp(0, n).to(torch.uint8)


def decode(codes: torch.Tensor, p, spec) -> torch.Tensor:
    """float32 ``x̂`` of codes ``[R, k]`` (equations in the module docstring)."""
    q = codes.float()
    if spec.symmetric:
        if spec.bits == 1:
            return p.scale * (2 * q - 1)
        return p.scale * (q - 2 ** (spec.bits - 1))
    if p.zero is not None:
        return p.scale * (q - p.zero)
    return p.scale * q + p.offset
