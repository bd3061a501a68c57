"""Second-level scales (``+sq``, SpQR): a group column's scales (and fp16 offsets) quantized along the rows.

``sq_group`` rows at a time share an fp16 scale and offset; the scales are stored as ``sq_bits`` codes and
the codes of the dense part are encoded against the decoded (quantized) scales.
"""
from __future__ import annotations

import torch

from ... import formats
from ...config import QuantSpec
from ...config.composite import CompositeSpec
from ...granularity import PerChannel
from .. import QParams

SCALE_FLOOR = 2.0**-24  # a second-level-decoded scale never reaches 0


def second_level(p: QParams, cs: CompositeSpec) -> tuple[QParams, dict | None]:
    """``+sq``: quantize one group column's scales (and fp16 offsets) along the rows."""
    if not cs.sq_bits:
        return p, None
    l2 = {"scale": _l2_quantize(p.scale, cs)}
    if p.offset is not None:
        l2["offset"] = _l2_quantize(p.offset, cs)
    return l2_params(p, l2, cs, p.scale.shape[0]), l2


def _l2_spec(cs: CompositeSpec) -> QuantSpec:
    return QuantSpec(dtype="int", bits=cs.sq_bits, granularity=PerChannel(), symmetric=False, zero_dtype="fp16")


def _l2_quantize(v: torch.Tensor, cs: CompositeSpec) -> tuple[torch.Tensor, QParams]:
    """Second-level grid of a ``[R, 1]`` statistic: rows in chunks of ``sq_group`` (last one padded by
    repeating its final value), ``sq_bits`` codes with an fp16 scale and offset per chunk."""
    m, R = cs.sq_group, v.shape[0]
    nc = -(-R // m)
    x = v[:, 0]
    if nc * m > R:
        x = torch.cat([x, x[-1:].expand(nc * m - R)])
    rows = x.reshape(nc, m)
    sp = _l2_spec(cs)
    p2 = formats.fit(rows, sp)
    return formats.encode(rows, p2, sp).reshape(-1)[:R].contiguous(), p2


def _l2_decode(codes: torch.Tensor, p2: QParams, cs: CompositeSpec) -> torch.Tensor:
    m, R = cs.sq_group, codes.shape[0]
    nc = p2.offset.shape[0]
    c = torch.zeros(nc * m, dtype=torch.uint8)
    c[:R] = codes
    return formats.decode(c.reshape(nc, m), p2, _l2_spec(cs)).reshape(-1)[:R, None]


def l2_params(p: QParams, l2: dict, cs: CompositeSpec, R: int) -> QParams:
    scale = _l2_decode(*l2["scale"], cs).clamp(min=SCALE_FLOOR)
    offset = _l2_decode(*l2["offset"], cs) if "offset" in l2 else None
    return QParams(scale=scale, zero=p.zero, offset=offset, codebook=p.codebook, tensor_scale=p.tensor_scale)
