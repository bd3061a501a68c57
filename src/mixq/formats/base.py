"""Format-agnostic entry points: per-row parameters, fit / encode / decode, whole-tensor quantize.

Everything works on *rows*: a 2-D tensor viewed as ``[R, n]`` where each row is one group that
shares its parameters (:func:`mixq.granularity.rows_view`).  For a weight ``W[out, in]`` with
``PerGroup(g)``, row ``r = o * (in // g) + j`` holds ``W[o, j*g:(j+1)*g]``.

::

    p = fit(rows, spec)              # QParams, each field [R, 1] (codebook [R, 2^bits])
    codes = encode(x, p, spec)       # x [R, k] -> uint8 [R, k]   (k may be 1: one column, GPTQ)
    x_hat = decode(codes, p, spec)   # float32 [R, k]

``clip="mse"`` (all formats but kmeans, whose Lloyd fit already minimises the error) tries the
shrink factors ``p ∈ {1, 0.975, ..., 0.5}`` of the row's range and keeps, per row, the one with the
least ``Σ_i w_i (x_i - x̂_i)²`` (``w`` = ``weight`` or 1); ``p = 1`` (minmax) is always a candidate,
so mse error <= minmax error.  Binary grids also try the L2-optimal scale ``Σ w|x| / Σ w``.

"Keep" dtypes (fp16/bf16/fp32) are not quantizers: :func:`fit`/:func:`encode` reject them,
:func:`quantize` stores the raw bits (codes = the tensor cast to the dtype and viewed as
int16/int32, empty QParams) and :func:`fake_quantize` casts through the dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from ..config import BitCost, QuantSpec
from ..config.families import IntFormat, KMeansFormat, MinifloatFormat, NFFormat
from ..config.ggml_types import IQ4NLFormat, KQuantFormat
from ..config.registry import owner
from ..granularity import rows_view
from . import floatgrid, integer, iq4nl, kquant, lut, mx
from .params import QParams

SHRINK_GRID = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0 down to 0.5
_KEEP = {"fp16": (torch.float16, torch.int16), "bf16": (torch.bfloat16, torch.int16), "fp32": (torch.float32, torch.int32)}


@dataclass
class QTensor:
    """A whole ``[rows, cols]`` weight quantized with one spec.

    codes   uint8 ``[rows, cols]`` (keep dtypes: the raw int16/int32 bits)
    params  one row per group, in the order of ``rows_view`` (``n_groups`` rows)
    """

    codes: torch.Tensor
    params: QParams
    spec: QuantSpec
    shape: tuple[int, int]

    def cost(self) -> BitCost:
        return self.spec.cost(self.shape)


class _Ops(NamedTuple):
    fit: Callable | None
    encode: Callable
    decode: Callable
    unit: Callable | None
    fit_weighted: Callable | None = None  # fits the whole row set at once from the importance (k-means, ggml types)
    column: Callable | None = None  # (p, spec, j) -> the params of column j of a group alone (K-quant sub-blocks)


# the built-in families' math (mixq.config.families); a registered family brings its own fit/encode/decode
_MATH = {
    IntFormat: _Ops(integer.fit, integer.encode, integer.decode, integer.scale_unit),
    NFFormat: _Ops(lut.fit_nf, lut.encode_nf, lut.decode_nf, lut.nf_scale_unit),
    KMeansFormat: _Ops(None, lut.encode_kmeans, lut.decode_kmeans, None, lut.fit_kmeans),
    MinifloatFormat: _Ops(floatgrid.fit, floatgrid.encode, floatgrid.decode, floatgrid.scale_unit),
    KQuantFormat: _Ops(None, kquant.encode, kquant.decode, None, kquant.fit_weighted, kquant.column_params),
    IQ4NLFormat: _Ops(None, iq4nl.encode, iq4nl.decode, None, iq4nl.fit_weighted),
}


def _ops(spec: QuantSpec) -> _Ops:
    fam = owner(spec.dtype)
    if fam.keeps_float:
        raise ValueError(f"{spec.name} keeps the tensor in floating point: use quantize/fake_quantize, not fit/encode")
    if type(fam) in _MATH:
        return _MATH[type(fam)]
    if not all(callable(getattr(fam, f, None)) for f in ("fit", "encode", "decode")):
        raise ValueError(f"no quantizer for dtype {spec.dtype!r}: its family {fam.family!r} has no fit/encode/decode")
    return _Ops(fam.fit, fam.encode, fam.decode, getattr(fam, "scale_unit", None))


def _check_2d(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"{what} must be 2-D [R, n], got shape {tuple(x.shape)}")
    return x.float()


def compute_tensor_scale(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor | None:
    """NVFP4 second-level scale ``amax(w) / (448 * 6)`` (fp32 scalar); ``None`` unless ``spec.tensor_scale``.

    In general ``amax / (448 * unit)`` with ``unit = absmax / scale`` of the element format.
    """
    if not spec.tensor_scale:
        return None
    return mx.tensor_scale_for(w.detach().abs().amax(), _ops(spec).unit(spec))


def fit(rows: torch.Tensor, spec: QuantSpec, *, weight: torch.Tensor | None = None,
        tensor_scale: torch.Tensor | None = None) -> QParams:
    """Fit per-row params for ``rows [R, n]``.

    weight        optional importance ``[R, n]`` or ``[1, n]``: used by ``clip="mse"`` and kmeans
    tensor_scale  precomputed NVFP4 global scale; computed from ``rows`` when ``None`` and needed
    """
    rows = _check_2d(rows, "rows")
    if weight is not None:
        weight = _check_2d(weight, "weight")
        if weight.shape[1] != rows.shape[1] or weight.shape[0] not in (1, rows.shape[0]):
            raise ValueError(f"weight shape {tuple(weight.shape)} does not broadcast to rows {tuple(rows.shape)}")
    ops = _ops(spec)
    if ops.fit_weighted is not None:
        return ops.fit_weighted(rows, spec, weight)
    if spec.tensor_scale and tensor_scale is None:
        tensor_scale = compute_tensor_scale(rows, spec)
    best = ops.fit(rows, spec, 1.0, tensor_scale)
    if spec.clip == "minmax":
        return best
    best_err = _row_error(rows, best, spec, weight)
    binary = ops is _MATH[IntFormat] and spec.bits == 1 and spec.symmetric  # asym 1-bit is a {0, s} grid: no L2 scale
    extra = [integer.binary_l2_candidate(rows, spec, weight, tensor_scale)] if binary else []
    for cand in [*(ops.fit(rows, spec, s, tensor_scale) for s in SHRINK_GRID[1:]), *extra]:
        err = _row_error(rows, cand, spec, weight)
        better = err < best_err
        best = _merge(better, cand, best)
        best_err = torch.where(better, err, best_err)
    return best


def _row_error(rows, p: QParams, spec, weight) -> torch.Tensor:
    d2 = (round_to_grid(rows, p, spec) - rows) ** 2
    return (d2 if weight is None else d2 * weight).sum(-1, keepdim=True)


def _merge(mask: torch.Tensor, a: QParams, b: QParams) -> QParams:
    """Row-wise ``a if mask else b`` (mask ``[R, 1]``)."""
    pick = [None if getattr(a, f) is None else torch.where(mask, getattr(a, f), getattr(b, f)) for f in QParams._ROW_FIELDS]
    return QParams(*pick, tensor_scale=a.tensor_scale)


def encode(x: torch.Tensor, p: QParams, spec: QuantSpec) -> torch.Tensor:
    """Integer codes (uint8 ``[R, k]``) of ``x [R, k]`` under row params ``p`` (``[R, 1]``)."""
    return _ops(spec).encode(_check_2d(x, "x"), p, spec)


def decode(codes: torch.Tensor, p: QParams, spec: QuantSpec) -> torch.Tensor:
    """float32 ``[R, k]`` values of ``codes``."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [R, k], got shape {tuple(codes.shape)}")
    return _ops(spec).decode(codes, p, spec)


def column_params(p: QParams, spec: QuantSpec, j: int) -> QParams:
    """The params that encode / decode column ``j`` (0-based, within its group) of a group alone: ``p`` itself
    for one scale per group; a K-quant's super-block gives that column's sub-block scale (GPTQ's sweep)."""
    col = _ops(spec).column
    return p if col is None else col(p, spec, j)


def round_to_grid(x: torch.Tensor, p: QParams, spec: QuantSpec) -> torch.Tensor:
    """``decode(encode(x))``: the nearest representable values, float32 ``[R, k]``."""
    return decode(encode(x, p, spec), p, spec)


def quantize(w: torch.Tensor, spec: QuantSpec, *, weight: torch.Tensor | None = None) -> QTensor:
    """Quantize a 2-D weight ``[rows, cols]`` group by group (``rows_view(w, spec.granularity)``).

    weight: optional importance broadcastable to ``w.shape`` (e.g. ``[1, cols]`` diag of ``XᵀX``).
    """
    if w.dim() != 2:
        raise ValueError(f"quantize expects a 2-D weight [rows, cols], got shape {tuple(w.shape)}")
    shape = (int(w.shape[0]), int(w.shape[1]))
    if spec.is_float_keep:
        dt, it = _KEEP[spec.dtype]
        return QTensor(w.detach().to(dt).contiguous().view(it), QParams(), spec, shape)
    rows = rows_view(w.detach().float(), spec.granularity)
    wt = None
    if weight is not None:
        try:
            wt = rows_view(weight.detach().float().expand(shape), spec.granularity)
        except RuntimeError as e:
            raise ValueError(f"weight shape {tuple(weight.shape)} does not broadcast to {shape}") from e
    p = fit(rows, spec, weight=wt, tensor_scale=compute_tensor_scale(w, spec))
    return QTensor(encode(rows, p, spec).reshape(shape), p, spec, shape)


def dequantize(q: QTensor) -> torch.Tensor:
    """float32 ``[rows, cols]`` reconstruction of a :class:`QTensor`."""
    if q.spec.is_float_keep:
        return q.codes.view(_KEEP[q.spec.dtype][0]).float()
    codes = rows_view(q.codes, q.spec.granularity)
    return decode(codes, q.params, q.spec).reshape(q.shape)


def fake_quantize(w: torch.Tensor, spec: QuantSpec, *, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``dequantize(quantize(w))`` in ``w``'s dtype; keep dtypes just cast through ``spec.dtype``."""
    if spec.is_float_keep:
        return w.to(_KEEP[spec.dtype][0]).to(w.dtype)
    return dequantize(quantize(w, spec, weight=weight)).to(w.dtype)
