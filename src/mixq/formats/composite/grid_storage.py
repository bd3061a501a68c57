"""Storage of the grid composites and of ``+h`` row splits, at their accounted size (table in
:mod:`mixq.algorithms.composite.storage`).

:func:`pack_grid` / :func:`unpack_grid`: a :class:`~mixq.formats.composite.qtensor.CompositeQTensor` (a grid plus
outliers, fp16 columns, SpQR scales, SLIM bits, dialects); :func:`pack_rows` / :func:`unpack_rows`: a
:class:`~mixq.formats.composite.rows_tensor.RowSplitQTensor` (two :class:`~mixq.formats.bitpack.PackedWeight` tensor
sets and the high rows).  Code streams use :func:`mixq.formats.bitpack.pack` (LSB-first, row-major).
"""
from __future__ import annotations

import torch

from ...config import CompositeSpec, family_of, index_bits
from .. import QParams
from ..bitpack import PackedWeight, pack, unpack
from .qtensor import CompositeQTensor
from .rows_tensor import RowSplitQTensor
from .scales import FLOAT_DTYPES
from .sparse import CSR


def _idx_pack(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Indices below ``n``: int16 holding the uint16 bits when ``index_bits(n) == 16``, else int32."""
    return idx.to(torch.int32).to(torch.int16) if index_bits(n) == 16 else idx.to(torch.int32)


def _idx_unpack(t: torch.Tensor) -> torch.Tensor:
    return (t.to(torch.int32) & 0xFFFF).long() if t.dtype == torch.int16 else t.long()


def pack_rows(qt: RowSplitQTensor) -> dict[str, torch.Tensor]:
    """``hi_rows`` (int16 / int32) and the two row sets' :class:`PackedWeight` tensors under ``lo.`` / ``hi.``."""
    out = {"hi_rows": _idx_pack(qt.hi_rows, qt.shape[0])}
    for tag, q in (("lo", qt.lo), ("hi", qt.hi)):
        if q is not None:
            out.update({f"{tag}.{k}": v for k, v in PackedWeight.from_qtensor(q).tensors().items()})
    return out


def unpack_rows(t: dict[str, torch.Tensor], spec: CompositeSpec, shape: tuple[int, int]) -> RowSplitQTensor:
    """Inverse of :func:`pack_rows`."""
    R, C = int(shape[0]), int(shape[1])
    hi_rows = _idx_unpack(t["hi_rows"])
    parts = []
    for tag, s, rows in (("lo", spec.base, R - hi_rows.numel()), ("hi", spec.hi_spec, hi_rows.numel())):
        sub = {k.split(".", 1)[1]: v for k, v in t.items() if k.startswith(tag + ".")}
        parts.append(PackedWeight.from_tensors(sub, s, (rows, C)).to_qtensor() if sub else None)
    return RowSplitQTensor(spec, (R, C), hi_rows, parts[0], parts[1])


def pack_grid(qt: CompositeQTensor) -> dict[str, torch.Tensor]:
    """Named tensors holding a grid composite at its accounted size."""
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


def unpack_grid(t: dict[str, torch.Tensor], spec: CompositeSpec, shape: tuple[int, int]) -> CompositeQTensor:
    """Inverse of :func:`pack_grid`."""
    R, C = int(shape[0]), int(shape[1])
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
