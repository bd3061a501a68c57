"""The stored parts of a ``VQ<rate>[x<d>]-GRAN`` weight (:class:`VQQTensor`), their decoding and bit-packed form.

A row of ``W [R, C]`` is cut into ``C/d`` vectors of ``d`` consecutive weights; vector ``v`` of row ``r`` in
quantization group ``g`` is stored as a ``k``-bit index into the fixed codebook ``B [2^k, d]``
(:mod:`mixq.formats.composite.vq_codebook`) and decoded as::

    ŵ[r, v] = s[r, g] · B[code[r, v]]            k = d · rate,  s fp16

Stored (:func:`pack_vq`): ``vq.codes``, the codes bit-packed at ``k`` bits, and ``scale`` ``[R, G]`` in the scale
dtype.  Quantized by :mod:`mixq.algorithms.composite.vq`; run by :class:`~mixq.runtime.vq_linear.VQLinear`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config import BitCost, CompositeSpec
from ..bitpack import pack, unpack
from .scales import FLOAT_DTYPES, group_len
from .vq_codebook import codebook


def spec_codebook(spec: CompositeSpec) -> torch.Tensor:
    """``[2^k, d]`` float32: the codebook of a VQ spec."""
    return codebook(spec.vq_dim, spec.vq_bits)


@dataclass
class VQQTensor:
    """Stored parts of a VQ weight: ``codes`` uint8 ``[R, C/d]``, ``scale`` float32 ``[R, G]`` (values exact in
    the scale dtype)."""

    spec: CompositeSpec
    shape: tuple[int, int]
    codes: torch.Tensor
    scale: torch.Tensor
    proxy_loss: float | None = None

    def cost(self) -> BitCost:
        return self.spec.cost(self.shape)

    def stored_bits(self) -> int:
        from ...config.protocol import SCALE_BITS

        return self.codes.numel() * self.spec.vq_bits + self.scale.numel() * SCALE_BITS[self.spec.scale_dtype]

    def dequantize(self) -> torch.Tensor:
        """float32 ``[R, C]`` (the reference decode: codebook gather, times the group scale)."""
        return decode(self.codes, self.scale, spec_codebook(self.spec), group_len(self.spec, self.shape[1]))


def decode(codes: torch.Tensor, scale: torch.Tensor, B: torch.Tensor, glen: int) -> torch.Tensor:
    """``Ŵ [R, C]`` float32 from ``codes [R, C/d]``, ``scale [R, G]`` and the codebook ``B [K, d]``."""
    R, nv = codes.shape
    d = B.shape[1]
    W = B[codes.long()].reshape(R, nv * d)
    return (W.reshape(R, -1, glen) * scale.float()[:, :, None]).reshape(R, nv * d)


def pack_vq(qt: VQQTensor) -> dict[str, torch.Tensor]:
    """``vq.codes``: the codes bit-packed at ``k`` bits (LSB-first, row-major); ``scale`` ``[R, G]`` in the scale
    dtype.  Exactly the accounted bits, plus < 8 bits of padding."""
    return {"vq.codes": pack(qt.codes.contiguous(), qt.spec.vq_bits),
            "scale": qt.scale.to(FLOAT_DTYPES[qt.spec.scale_dtype]).contiguous()}


def unpack_vq(t: dict[str, torch.Tensor], spec: CompositeSpec, shape: tuple[int, int]) -> VQQTensor:
    R, C = int(shape[0]), int(shape[1])
    nv = C // spec.vq_dim
    codes = unpack(t["vq.codes"], spec.vq_bits, R * nv).reshape(R, nv).to(torch.uint8)
    G = C // group_len(spec, C)
    scale = t["scale"].float().reshape(R, G)
    return VQQTensor(spec, (R, C), codes, scale)
