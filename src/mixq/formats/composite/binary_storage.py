"""Storage of ``BIN`` composites: :func:`pack_binary` / :func:`unpack_binary` (bits exactly the cost plus
byte padding per tensor)::

    codes      1-bit stream of the dense signs [R, n] (dense columns in natural order)
    scale      [R, G] in the scale dtype
    res_cols   int16 (uint16 bits) / int32 [k];  res_codes  1-bit stream [2, R, k];  res_scale [R, 2]
    csr.cols   int16 / int32 [K];  csr.row_ptr int32 [R + 1];
    csr.values fp16 [K]  |  csr.codes  b-bit stream of (code + 2^(b-1)) [K] and csr.scale fp16 [R]
"""
from __future__ import annotations

import torch

from ...config.composite import FP16_BITS, CompositeSpec, index_bits
from ..bitpack import pack, unpack
from .binary_tensor import BinaryQTensor
from .scales import FLOAT_DTYPES



def _idx_pack(idx: torch.Tensor, n: int) -> torch.Tensor:
    return idx.to(torch.int32).to(torch.int16) if index_bits(n) == 16 else idx.to(torch.int32)


def _idx_unpack(t: torch.Tensor) -> torch.Tensor:
    return (t.to(torch.int32) & 0xFFFF).long() if t.dtype == torch.int16 else t.long()


def pack_binary(qt: BinaryQTensor) -> dict[str, torch.Tensor]:
    """Named tensors holding ``qt`` at its accounted size (module docstring)."""
    cs = qt.spec
    R, C = qt.shape
    sdt = FLOAT_DTYPES[cs.scale_dtype]
    out = {"codes": pack(qt.codes.contiguous(), 1), "scale": qt.scale.to(sdt).contiguous()}
    if cs.residual:
        out["res_cols"] = _idx_pack(qt.res_cols, C)
        out["res_codes"] = pack(qt.res_codes.contiguous(), 1)
        out["res_scale"] = qt.res_scale.to(sdt).contiguous()
    if qt.out_cols is not None:
        out["csr.cols"] = _idx_pack(qt.out_cols, C)
        out["csr.row_ptr"] = qt.out_row_ptr.to(torch.int32)
        if qt.out_values is not None:
            out["csr.values"] = qt.out_values.half()
        else:
            off = 2 ** (cs.outlier_bits - 1)
            out["csr.codes"] = pack((qt.out_codes.to(torch.int32) + off).to(torch.uint8), cs.outlier_bits)
            out["csr.scale"] = qt.out_scale.half()
    return out


def unpack_binary(t: dict[str, torch.Tensor], spec: CompositeSpec, shape: tuple[int, int]) -> BinaryQTensor:
    """Inverse of :func:`pack_binary` (raises ``ValueError`` on tensors that do not fit the spec)."""
    R, C = int(shape[0]), int(shape[1])
    n, bounds = spec.layout((R, C))
    k = spec.residual
    want = {"codes", "scale"} | ({"res_cols", "res_codes", "res_scale"} if k else set())
    if spec.outliers:
        want |= {"csr.cols", "csr.row_ptr"} | ({"csr.values"} if spec.outlier_bits == FP16_BITS
                                                else {"csr.codes", "csr.scale"})
    if set(t) != want:
        raise ValueError(f"{spec.name} stores {sorted(want)}, got {sorted(t)}")
    codes = unpack(t["codes"], 1, R * n).reshape(R, n)
    scale = t["scale"].float()
    if tuple(scale.shape) != (R, len(bounds)):
        raise ValueError(f"scale has shape {tuple(scale.shape)}, expected {(R, len(bounds))}")
    if k:
        res_cols = _idx_unpack(t["res_cols"])
        if res_cols.numel() != k or (k and (int(res_cols.max()) >= C or bool((res_cols.diff() <= 0).any()))):
            raise ValueError("residual column indices out of range or not ascending")
        res_codes = unpack(t["res_codes"], 1, 2 * R * k).reshape(2, R, k)
        res_scale = t["res_scale"].float().reshape(R, 2)
    else:
        res_cols, res_codes, res_scale = torch.zeros(0, dtype=torch.long), torch.zeros(2, R, 0, dtype=torch.uint8), \
            torch.zeros(R, 0)
    qt = BinaryQTensor(spec, (R, C), codes, scale, res_cols, res_codes, res_scale)
    if spec.outliers:
        K = spec.n_outliers((R, C))
        cols = _idx_unpack(t["csr.cols"]).to(torch.int32)
        ptr = t["csr.row_ptr"]
        if cols.numel() != K or ptr.dtype != torch.int32 or tuple(ptr.shape) != (R + 1,) or int(ptr[0]) != 0 \
                or int(ptr[-1]) != K or bool((ptr.diff() < 0).any()) or (K and int(cols.max()) >= C):
            raise ValueError("outlier positions (csr.cols / csr.row_ptr) do not fit the shape")
        qt.out_cols, qt.out_row_ptr = cols, ptr
        if spec.outlier_bits == FP16_BITS:
            if t["csr.values"].dtype != torch.float16 or t["csr.values"].numel() != K:
                raise ValueError("csr.values must be fp16 [K]")
            qt.out_values = t["csr.values"]
        else:
            off = 2 ** (spec.outlier_bits - 1)
            qt.out_codes = (unpack(t["csr.codes"], spec.outlier_bits, K).to(torch.int16) - off)
            qt.out_scale = t["csr.scale"].float().reshape(R)
    return qt
