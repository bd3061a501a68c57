"""The stored parts of a ``TCQ<rate>-GRAN`` weight (:class:`TCQQTensor`), their decoding and bit-packed form.

Each **column** ``j`` of ``W [R, C]`` is one trellis sequence, top row first
(:mod:`mixq.formats.composite.tcq_codebook`): the bits each step appended decode, through the states, to table values
times the row's group scale::

    ŵ[r, j] = s[r, g(j)] · lut[state_j(r)]                          s fp16, one per row and group

Stored (:func:`pack_tcq`): ``tcq.codes``, the column-major stream of symbols (each period's steps as one
``P · rate``-bit symbol, first step high), and ``scale`` ``[R, G]`` in the scale dtype.  Quantized by
:mod:`mixq.algorithms.composite.tcq`; run by :class:`~mixq.runtime.tcq_linear.TCQLinear` (:func:`stream_layout`: what
its CPU kernel reads).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config import BitCost, CompositeSpec
from ..bitpack import pack, unpack
from .scales import FLOAT_DTYPES, group_len
from .tcq_codebook import lut as tcq_lut, period, schedule, states


@dataclass
class TCQQTensor:
    """Stored parts of a TCQ weight: ``bits`` uint8 ``[C, R]`` (the bits each step appended, column-major),
    ``scale`` float32 ``[R, G]`` (values exact in the scale dtype)."""

    spec: CompositeSpec
    shape: tuple[int, int]
    bits: torch.Tensor
    scale: torch.Tensor
    proxy_loss: float | None = None

    def cost(self) -> BitCost:
        return self.spec.cost(self.shape)

    def stored_bits(self) -> int:
        """The bits the stored parts hold: each column's steps (their widths from the schedule) and the scales."""
        from ...config.protocol import SCALE_BITS

        steps = int(schedule(self.spec.tcq_rate, self.bits.shape[1]).sum(dtype=torch.int64))
        return self.bits.shape[0] * steps + self.scale.numel() * SCALE_BITS[self.spec.scale_dtype]

    def unit(self) -> torch.Tensor:
        """float32 ``[R, C]``: the table values before the scales."""
        return unit_values(self.bits, self.spec)

    def dequantize(self) -> torch.Tensor:
        """float32 ``[R, C]`` (the reference decode)."""
        return apply_scale(self.unit(), self.scale, group_len(self.spec, self.shape[1]))


def unit_values(bits: torch.Tensor, spec: CompositeSpec) -> torch.Tensor:
    C, R = bits.shape
    rate, L = spec.tcq_rate, spec.state_bits
    return tcq_lut(rate, L)[states(bits, schedule(rate, R), L)].T.contiguous()


def apply_scale(U: torch.Tensor, scale: torch.Tensor, glen: int) -> torch.Tensor:
    R, C = U.shape
    return (U.reshape(R, -1, glen) * scale.float()[:, :, None]).reshape(R, C)


def symbols(bits: torch.Tensor, spec: CompositeSpec) -> tuple[torch.Tensor, int]:
    """``(symbols uint8 [C, R/P], width)``: each period's steps as one ``P · rate``-bit symbol, first step high."""
    p = period(spec.tcq_rate)
    if len(p) == 1:
        return bits, p[0]
    b = bits.reshape(bits.shape[0], -1, 2)
    return ((b[..., 0] << p[1]) | b[..., 1]).to(torch.uint8), p[0] + p[1]


def _from_symbols(sym: torch.Tensor, spec: CompositeSpec) -> torch.Tensor:
    p = period(spec.tcq_rate)
    if len(p) == 1:
        return sym
    return torch.stack([sym >> p[1], sym & ((1 << p[1]) - 1)], -1).reshape(sym.shape[0], -1).to(torch.uint8)


def pack_tcq(qt: TCQQTensor) -> dict[str, torch.Tensor]:
    """``tcq.codes``: the column-major symbol stream bit-packed (LSB-first); ``scale`` ``[R, G]`` in the scale
    dtype.  Exactly the accounted bits, plus < 8 bits of padding."""
    sym, width = symbols(qt.bits, qt.spec)
    return {"tcq.codes": pack(sym.contiguous(), width),
            "scale": qt.scale.to(FLOAT_DTYPES[qt.spec.scale_dtype]).contiguous()}


def unpack_tcq(t: dict[str, torch.Tensor], spec: CompositeSpec, shape: tuple[int, int]) -> TCQQTensor:
    R, C = int(shape[0]), int(shape[1])
    p = period(spec.tcq_rate)
    width = sum(p)
    sym = unpack(t["tcq.codes"], width, C * R // len(p)).reshape(C, R // len(p))
    scale = t["scale"].float().reshape(R, C // group_len(spec, C))
    return TCQQTensor(spec, (R, C), _from_symbols(sym, spec), scale)


def stream_layout(spec: CompositeSpec) -> tuple[int, int, int]:
    """``(P rows a symbol, symbol bits, bits of a symbol's second step)`` for the kernels (the state bits are the
    spec's ``state_bits``)."""
    p = period(spec.tcq_rate)
    return len(p), sum(p), p[1] if len(p) == 2 else 0
