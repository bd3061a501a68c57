"""Bit-packed storage of composite weights, at their accounted size.

:func:`pack_composite` turns a :class:`~mixq.intra.qtensor.CompositeQTensor` (or a ``+h``
:class:`~mixq.intra.rows.RowSplitQTensor`) into named tensors whose bits are exactly the terms of
:meth:`CompositeSpec.cost` (plus < 8 bits of byte padding per packed stream);
:func:`unpack_composite` rebuilds the stored parts from them, the spec and the shape, so that
``unpack_composite(pack_composite(q), q.spec, q.shape).dequantize()`` equals ``q.dequantize()`` bit
for bit.  Code streams use :func:`mixq.runtime.bitpack.pack` (LSB-first, row-major).

=====================  ==============================================================================
tensor                 content
=====================  ==============================================================================
``codes.b<k>``         uint8 stream: codes of the group columns with ``k`` bits, ``[R, n_k]`` row-major
                       (one stream unless SLIM, where ``k`` is b-1, b, b+1)
``scale``              ``[R, G]`` in the scale dtype (without ``+sq``/``+d``... see below)
``zero.b<k>``          asym int zero points of the ``k``-bit group columns, packed at ``k`` bits
``offset``             asymf: fp16 ``[R, G]``
``codebook``           kmeans: fp16 ``[R * G, 2^b]``
``l2.scale.codes``     ``+sq``: ``[G, R]`` second-level codes packed at ``sq_bits``; ``l2.scale.s`` /
``l2.scale.o``         ``.o``: fp16 ``[G, ceil(R / m)]`` second-level scale and offset (``l2.offset.*`` alike)
``dialect``            ``+d``: ``[R, G]`` dialect indices packed at ``log2(D)`` bits (with ``scale``)
``slim``               SLIM map: ``bits_j - (b - 1)`` per group column, packed at 2 bits
``tensor_scale``       fp32 ``[1]`` (NVFP4-style bases)
``fp16_cols``          int16 (uint16 bits) or int32 ``[K_c]``; ``fp16_values`` fp16 ``[R, K_c]``
``csr.values``         fp16 ``[K]``; ``csr.cols`` int16 (uint16 bits) / int32 ``[K]``; ``csr.row_ptr`` int32 ``[R+1]``
``hi_rows``, ``lo.*``  ``+h``: row indices (int16 / int32) and the two :class:`PackedWeight` tensor sets
``hi.*``
BIN bases              :func:`mixq.intra.binary_storage.pack_binary` (sign stream, scales, residual planes, CSR)
VQ bases               :func:`mixq.intra.vq.pack_vq`: ``vq.codes`` (k-bit codes of d-vectors), ``scale``
TCQ bases              :func:`mixq.intra.tcq.pack_tcq`: ``tcq.codes`` (column-major trellis symbols), ``scale``
``ip.seeds``, ``in.*`` ``+ip``: int32 ``[2]`` seeds of the input and output transforms, and the transformed
                       weight's tensors under ``in.`` (a :class:`PackedWeight`'s, or the composite's above)
=====================  ==============================================================================

:class:`PackedComposite` is the composite counterpart of :class:`~mixq.runtime.PackedWeight`: these
named tensors with the spec and shape (``tensors()``, ``nbytes``, ``dequantize()``), what the native
directory stores under ``<fqn>.<name>`` and :class:`~mixq.intra.linear.CompositeLinear` holds.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats import QParams
from ..runtime.bitpack import PackedWeight, pack, unpack
from .binary_storage import pack_binary, unpack_binary
from .binary_tensor import BinaryQTensor
from .incoherence import IncoherentQTensor
from .qtensor import CompositeQTensor
from .rows import RowSplitQTensor
from .tcq import TCQQTensor, pack_tcq, unpack_tcq
from .vq import VQQTensor, pack_vq, unpack_vq
from .sparse import CSR
from ..config import CompositeSpec, family_of, index_bits
from .scales import FLOAT_DTYPES



def _idx_pack(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Indices below ``n``: int16 holding the uint16 bits when ``index_bits(n) == 16``, else int32."""
    return idx.to(torch.int32).to(torch.int16) if index_bits(n) == 16 else idx.to(torch.int32)


def _idx_unpack(t: torch.Tensor) -> torch.Tensor:
    return (t.to(torch.int32) & 0xFFFF).long() if t.dtype == torch.int16 else t.long()


def pack_composite(qt) -> dict[str, torch.Tensor]:
    """Named tensors holding ``qt`` at its accounted size (table in the module docstring)."""
    if isinstance(qt, IncoherentQTensor):
        inner = qt.inner
        t = pack_composite(inner) if isinstance(inner.spec, CompositeSpec) else PackedWeight.from_qtensor(inner).tensors()
        return {"ip.seeds": torch.tensor(qt.seeds, dtype=torch.int32), **{f"in.{k}": v for k, v in t.items()}}
    if isinstance(qt, BinaryQTensor):
        return pack_binary(qt)
    if isinstance(qt, VQQTensor):
        return pack_vq(qt)
    if isinstance(qt, TCQQTensor):
        return pack_tcq(qt)
    if isinstance(qt, RowSplitQTensor):
        out = {"hi_rows": _idx_pack(qt.hi_rows, qt.shape[0])}
        for tag, q in (("lo", qt.lo), ("hi", qt.hi)):
            if q is not None:
                out.update({f"{tag}.{k}": v for k, v in PackedWeight.from_qtensor(q).tensors().items()})
        return out
    cs: CompositeSpec = qt.spec
    R, C = qt.shape
    n, bounds = cs.layout(qt.shape)
    out: dict[str, torch.Tensor] = {}
    by_bits: dict[int, list[int]] = {}
    for j, b in enumerate(qt.group_bits):
        by_bits.setdefault(b, []).append(j)
    for b, js in sorted(by_bits.items()):
        cols = torch.cat([torch.arange(*bounds[j]) for j in js])
        out[f"codes.b{b}"] = pack(qt.codes[:, cols].contiguous(), b)
        if qt.params[js[0]].zero is not None and not cs.dialects:
            out[f"zero.b{b}"] = pack(torch.cat([qt.params[j].zero for j in js], 1).to(torch.uint8), b)
    ps = qt.params
    if cs.sq_bits:
        for key in qt.l2[0]:
            out[f"l2.{key}.codes"] = pack(torch.stack([qt.l2[j][key][0] for j in range(len(bounds))]), cs.sq_bits)
            out[f"l2.{key}.s"] = torch.cat([qt.l2[j][key][1].scale.T for j in range(len(bounds))]).half()
            out[f"l2.{key}.o"] = torch.cat([qt.l2[j][key][1].offset.T for j in range(len(bounds))]).half()
    elif ps[0].scale is not None:
        out["scale"] = torch.cat([p.scale for p in ps], 1).to(FLOAT_DTYPES[cs.scale_dtype])
    if ps[0].offset is not None and not cs.sq_bits:
        out["offset"] = torch.cat([p.offset for p in ps], 1).half()
    if "codebook" in family_of(cs).params(cs):
        out["codebook"] = torch.stack([p.codebook for p in ps], 1).reshape(R * len(bounds), -1).half()
    if cs.dialects:
        out["dialect"] = pack(torch.cat([p.zero for p in ps], 1).to(torch.uint8), cs.dialect_bits)
    if cs.slim:
        out["slim"] = pack(torch.tensor([b - (cs.bits - 1) for b in qt.group_bits], dtype=torch.uint8), 2)
    if ps[0].tensor_scale is not None:
        out["tensor_scale"] = ps[0].tensor_scale.reshape(1).float()
    if cs.columns:
        out["fp16_cols"] = _idx_pack(qt.fp16_cols, C)
        out["fp16_values"] = qt.fp16_values.half().contiguous()
    if qt.sparse is not None:
        out["csr.values"] = qt.sparse.values
        out["csr.cols"] = _idx_pack(qt.sparse.cols, C)
        out["csr.row_ptr"] = qt.sparse.row_ptr
    return out


def unpack_composite(t: dict[str, torch.Tensor], spec: CompositeSpec, shape: tuple[int, int]):
    """Inverse of :func:`pack_composite`."""
    R, C = int(shape[0]), int(shape[1])
    if spec.incoherent:
        seeds = tuple(int(v) for v in t["ip.seeds"].tolist())
        if len(seeds) != 2:
            raise ValueError(f"ip.seeds holds {len(seeds)} values, expected 2")
        sub = {k[3:]: v for k, v in t.items() if k.startswith("in.")}
        inner_spec = spec.inner
        if isinstance(inner_spec, CompositeSpec):
            inner = unpack_composite(sub, inner_spec, (R, C))
        else:
            inner = PackedWeight.from_tensors(sub, inner_spec, (R, C)).to_qtensor()
        return IncoherentQTensor(spec, (R, C), inner, seeds)
    if spec.binary:
        return unpack_binary(t, spec, (R, C))
    if spec.vq_dim:
        return unpack_vq(t, spec, (R, C))
    if spec.trellis:
        return unpack_tcq(t, spec, (R, C))
    if spec.hi_rows:
        hi_rows = _idx_unpack(t["hi_rows"])
        parts = []
        for tag, s, rows in (("lo", spec.base, R - hi_rows.numel()), ("hi", spec.hi_spec, hi_rows.numel())):
            sub = {k.split(".", 1)[1]: v for k, v in t.items() if k.startswith(tag + ".")}
            parts.append(PackedWeight.from_tensors(sub, s, (rows, C)).to_qtensor() if sub else None)
        return RowSplitQTensor(spec, (R, C), hi_rows, parts[0], parts[1])
    n, bounds = spec.layout((R, C))
    G = len(bounds)
    if spec.slim:
        gbits = tuple(int(v) + spec.bits - 1 for v in unpack(t["slim"], 2, G))
    else:
        gbits = (spec.bits,) * G
    by_bits: dict[int, list[int]] = {}
    for j, b in enumerate(gbits):
        by_bits.setdefault(b, []).append(j)
    codes = torch.empty(R, n, dtype=torch.uint8)
    zero = [None] * G
    for b, js in by_bits.items():
        cols = torch.cat([torch.arange(*bounds[j]) for j in js])
        codes[:, cols] = unpack(t[f"codes.b{b}"], b, R * cols.numel()).reshape(R, -1)
        if f"zero.b{b}" in t:
            z = unpack(t[f"zero.b{b}"], b, R * len(js)).reshape(R, len(js)).float()
            for jj, j in enumerate(js):
                zero[j] = z[:, jj:jj + 1]
    l2 = None
    scale = offset = [None] * G
    if spec.sq_bits:
        l2 = [dict() for _ in range(G)]
        for key in ("scale", "offset"):
            if f"l2.{key}.codes" not in t:
                continue
            c2 = unpack(t[f"l2.{key}.codes"], spec.sq_bits, G * R).reshape(G, R)
            s2, o2 = t[f"l2.{key}.s"].float(), t[f"l2.{key}.o"].float()
            for j in range(G):
                l2[j][key] = (c2[j].clone(), QParams(scale=s2[j][:, None].clone(), offset=o2[j][:, None].clone()))
    else:
        if "scale" in t:
            scale = list(t["scale"].float().split(1, 1))
        if "offset" in t:
            offset = list(t["offset"].float().split(1, 1))
    if spec.dialects:
        zero = list(unpack(t["dialect"], spec.dialect_bits, R * G).reshape(R, G).float().split(1, 1))
    codebook = [None] * G
    if "codebook" in family_of(spec).params(spec):
        codebook = list(t["codebook"].float().reshape(R, G, -1).unbind(1))
    ts = t["tensor_scale"].reshape(()) if "tensor_scale" in t else None
    params = [QParams(scale=scale[j], zero=zero[j], offset=offset[j], codebook=codebook[j], tensor_scale=ts)
              for j in range(G)]
    fp16_cols = _idx_unpack(t["fp16_cols"]) if "fp16_cols" in t else torch.zeros(0, dtype=torch.long)
    fp16_values = t["fp16_values"] if "fp16_values" in t else torch.zeros(R, 0, dtype=torch.float16)
    sparse = None
    if "csr.values" in t:
        sparse = CSR(t["csr.values"], _idx_unpack(t["csr.cols"]).to(torch.int32), t["csr.row_ptr"], (R, C))
        sparse.check()
    qt = CompositeQTensor(spec, (R, C), codes, params, gbits, fp16_cols, fp16_values, sparse, l2)
    if l2 is not None:  # the decoding params are the second-level ones, as when quantized
        qt.params = [qt.group_params(j) for j in range(G)]
    return qt


def packed_bits(tensors: dict[str, torch.Tensor]) -> int:
    """Bits the named tensors occupy."""
    return sum(v.numel() * v.element_size() * 8 for v in tensors.values())



@dataclass
class PackedComposite:
    """A composite-quantized ``[rows, cols]`` weight as its stored tensors (:func:`pack_composite`).

    Same surface as :class:`~mixq.runtime.PackedWeight` where the native format and the loaders
    need it: ``spec``, ``shape``, :meth:`tensors`, :attr:`nbytes`, :meth:`to_qtensor`, :meth:`dequantize`.
    """

    parts: dict[str, torch.Tensor]
    spec: CompositeSpec
    shape: tuple[int, int]

    @classmethod
    def from_qtensor(cls, qt) -> "PackedComposite":
        return cls(pack_composite(qt), qt.spec, (int(qt.shape[0]), int(qt.shape[1])))

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], spec: CompositeSpec, shape) -> "PackedComposite":
        """Rebuild from stored tensors, checking that they decode under ``spec`` and hold exactly its
        accounted bits (plus < 8 bits of padding per tensor); raises ``ValueError`` otherwise."""
        shape = (int(shape[0]), int(shape[1]))
        out = cls(dict(tensors), spec, shape)
        want = spec.cost(shape).total
        have = packed_bits(out.parts)
        if not 0 <= have - want < 8 * max(len(out.parts), 1):
            raise ValueError(f"{spec.name} {shape}: stored tensors hold {have} bits, the spec accounts {want}")
        try:
            qt = out.to_qtensor()
            if qt.stored_bits() != want:
                raise ValueError(f"stored parts count {qt.stored_bits()} bits, the spec accounts {want}")
        except (KeyError, IndexError, RuntimeError, TypeError) as e:
            raise ValueError(f"{spec.name} {shape}: stored tensors do not decode ({type(e).__name__}: {e})") from None
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.parts)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())

    def to_qtensor(self):
        """The stored parts (:class:`CompositeQTensor`, :class:`RowSplitQTensor`, ``BinaryQTensor`` or
        ``IncoherentQTensor``)."""
        return unpack_composite(self.parts, self.spec, self.shape)

    def dequantize(self) -> torch.Tensor:
        """float32 ``[rows, cols]``."""
        return self.to_qtensor().dequantize()
