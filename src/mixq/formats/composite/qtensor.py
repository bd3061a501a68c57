"""The stored parts of a composite over a plain grid (:class:`CompositeQTensor`), decoded and recounted.

What :func:`mixq.algorithms.composite.quant.quantize_composite` returns for specs without ``+h``, ``BIN`` or ``VQ``
bases: dense codes per group column, their parameters (decoded from the second level under ``+sq``, a dialect
codebook under ``+dD``), fp16 input columns and CSR outliers.  :meth:`CompositeQTensor.dequantize` rebuilds
``Ŵ`` bit for bit from them; :meth:`CompositeQTensor.stored_bits` recounts what
:meth:`~mixq.config.CompositeSpec.cost` counts.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ... import formats
from ...config import SCALE_BITS, BitCost, QuantSpec
from ...config.composite import FP16_BITS, SLIM_MAP_BITS, CompositeSpec, index_bits
from ...granularity import PerChannel
from .. import QParams
from .dialects import dialect_codebook
from .second_level import l2_params
from .sparse import CSR


@dataclass
class CompositeQTensor:
    """The stored parts of one ``[R, C]`` weight quantized with a composite spec.

    codes        uint8 ``[R, n]``: the dense columns (all but ``fp16_cols``, natural order)
    params       per group column ``j``, rows ``[R, ...]`` (``QParams`` of the base format); with
                 ``+sq`` the scales / offsets are those decoded from ``l2``, which is what is stored
    group_bits   bits of each group column (SLIM: b-1, b or b+1; stored as a 2-bit map)
    fp16_cols    int64 ``[K_c]`` ascending input columns kept in fp16, values float16 ``[R, K_c]``
    sparse       :class:`CSR` outliers (original column indices) or None
    l2           ``+sq``: per group column ``{"scale": (codes uint8 [R], QParams [ceil(R/m), 1]),
                 "offset": ...}`` (second-level int grid with fp16 scale and offset per m rows)
    """

    spec: CompositeSpec
    shape: tuple[int, int]
    codes: torch.Tensor
    params: list[QParams]
    group_bits: tuple[int, ...]
    fp16_cols: torch.Tensor
    fp16_values: torch.Tensor
    sparse: CSR | None = None
    l2: list[dict] | None = None
    proxy_loss: float | None = None

    def cost(self) -> BitCost:
        return self.spec.cost(self.shape)

    def group_params(self, j: int) -> QParams:
        """The parameters group column ``j`` decodes with (from the second-level codes under ``+sq``)."""
        p = self.params[j]
        if self.spec.dialects:  # the codebook is derived from the stored scale and dialect index
            return QParams(scale=p.scale, zero=p.zero, codebook=dialect_codebook(p.scale, p.zero, self.spec))
        if self.l2 is None:
            return p
        return l2_params(p, self.l2[j], self.spec, self.shape[0])

    def dequantize(self) -> torch.Tensor:
        """float32 ``[R, C]`` from the stored parts alone."""
        R, C = self.shape
        n, bounds = self.spec.layout(self.shape)
        dense = dense_cols(C, self.fp16_cols)
        Qd = torch.empty(R, n)
        for j, (s, e) in enumerate(bounds):
            sp = group_spec(self.spec, self.group_bits[j])
            Qd[:, s:e] = formats.decode(self.codes[:, s:e], self.group_params(j), sp)
        W = torch.zeros(R, C)
        W[:, dense] = Qd
        W[:, self.fp16_cols] = self.fp16_values.float()
        if self.sparse is not None:
            self.sparse.apply(W)
        return W

    def stored_bits(self) -> int:
        """Bits counted from the stored tensors themselves (must equal ``cost().total``)."""
        R, C = self.shape
        cs = self.spec
        n, bounds = cs.layout(self.shape)
        if tuple(self.codes.shape) != (R, n) or len(self.params) != len(bounds) or len(self.group_bits) != len(bounds):
            raise ValueError("stored parts do not match the spec's layout")
        bits = 0
        for j, (s, e) in enumerate(bounds):
            bj = self.group_bits[j]
            if int(self.codes[:, s:e].max()) >= 2**bj:
                raise ValueError(f"group column {j} has codes wider than {bj} bits")
            bits += R * (e - s) * bj
            p = self.params[j]
            if self.l2 is not None:
                for c2, p2 in self.l2[j].values():
                    bits += c2.numel() * cs.sq_bits + (p2.scale.numel() + p2.offset.numel()) * FP16_BITS
            else:
                bits += p.scale.numel() * SCALE_BITS[cs.scale_dtype] if p.scale is not None else 0
                bits += p.offset.numel() * FP16_BITS if p.offset is not None else 0
            if cs.dialects:  # zero holds the dialect index, the codebook is derived
                bits += p.zero.numel() * cs.dialect_bits
                continue
            bits += p.zero.numel() * bj if p.zero is not None else 0
            bits += p.codebook.numel() * FP16_BITS if p.codebook is not None else 0
        if self.params and self.params[0].tensor_scale is not None:
            bits += 32
        bits += self.fp16_values.numel() * FP16_BITS + self.fp16_cols.numel() * index_bits(C)
        if self.sparse is not None:
            bits += self.sparse.bits()
        if cs.slim:
            bits += len(bounds) * SLIM_MAP_BITS
        return bits


def dense_cols(C: int, fp16_cols: torch.Tensor) -> torch.Tensor:
    """The input columns not in ``fp16_cols`` (kept apart), ascending."""
    keep = torch.ones(C, dtype=torch.bool)
    keep[fp16_cols] = False
    return keep.nonzero().flatten()


def group_spec(cs: CompositeSpec, bits: int) -> QuantSpec:
    """The plain spec a group column of ``bits`` bits is encoded and decoded with."""
    b = cs.base
    if cs.dialects:  # decoded through a per-row codebook: scale * table[dialect]
        return QuantSpec(dtype="kmeans", bits=bits, granularity=PerChannel(), scale_dtype="none")
    if bits == b.bits:
        return b
    if bits == 1 and not b.symmetric and b.clip == "mse":
        # mixq.formats cannot fit W1-asym-mse (its binary L2 candidate has no zero point): minmax there
        return replace(b, bits=1, clip="minmax")
    return replace(b, bits=bits)
