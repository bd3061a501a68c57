"""llama.cpp's IQ4_NL as a mixq grid: blocks of 32, one fp16 scale ``d``, ``x = d * KVALUES_IQ4NL[c]``.

:func:`fit_weighted` tries, per block, inverse scales that put the element of largest magnitude on or near
either end of the table (``-127`` or ``113``), assigns every element its nearest entry, refits ``d`` by weighted
least squares on those entries, rounds it to fp16 and keeps the ``d`` of least weighted error (element weights
``sqrt(mean(x^2) + x^2)``, times the importance when given, as for the K-quants).  Written from the format; the
values decode as ``gguf.quants.dequantize`` computes them (``d * L[c]`` in float32, an exact product).
"""
from __future__ import annotations

import torch

from ..config.ggml_types import KVALUES_IQ4NL
from .params import QParams

_LEVELS = torch.tensor(KVALUES_IQ4NL, dtype=torch.float32)
_MIDS = (_LEVELS[1:] + _LEVELS[:-1]) / 2


def _nearest(y: torch.Tensor) -> torch.Tensor:
    """Index of the nearest table entry of each element of ``y`` (the table is ascending)."""
    return torch.bucketize(y.contiguous(), _MIDS.to(y.device))


def _scaled(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    nz = d != 0
    return torch.where(nz, x / torch.where(nz, d, torch.ones_like(d)), torch.zeros_like(x))


def encode(x: torch.Tensor, p: QParams, spec) -> torch.Tensor:
    return _nearest(_scaled(x, p.scale)).to(torch.uint8)


def decode(codes: torch.Tensor, p: QParams, spec) -> torch.Tensor:
    return p.scale * _LEVELS.to(codes.device)[codes.long()]


def fit_weighted(rows: torch.Tensor, spec, weight: torch.Tensor | None = None) -> QParams:
    x = rows.to(torch.float32)
    w = torch.sqrt((x * x).mean(1, keepdim=True) + x * x)
    if weight is not None:
        h = weight.to(torch.float32).clamp_min(0).expand_as(x)
        w = w * (h + 1e-6 * h.mean(1, keepdim=True).clamp_min(1e-30))
    lv = _LEVELS.to(x.device)
    ext = x.gather(1, x.abs().argmax(1, keepdim=True))  # [N, 1], signed
    best_d = torch.zeros_like(ext)
    best_e = (w * x * x).sum(1, keepdim=True)
    for end in (-127.0, 113.0):
        for t in range(-6, 7, 2):
            d0 = _scaled(ext, torch.full_like(ext, end + t))
            L = lv[_nearest(_scaled(x, d0))]
            den = (w * L * L).sum(1, keepdim=True)
            d_ls = _scaled((w * L * x).sum(1, keepdim=True), den)
            for d in (d0, d_ls):
                d = d.clamp(-65504.0, 65504.0).to(torch.float16).to(torch.float32)
                e = (w * (d * lv[_nearest(_scaled(x, d))] - x) ** 2).sum(1, keepdim=True)
                better = e < best_e
                best_d, best_e = torch.where(better, d, best_d), torch.where(better, e, best_e)
    return QParams(scale=best_d)
