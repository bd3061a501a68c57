"""ggml block formats: bit layouts of llama.cpp's quantized tensor types, fitting their parameters to a
mixq grid, encoding/decoding blocks, and choosing the type for a layer's spec (used by :mod:`.gguf`).

Every layout is written by mixq's own code and checked against ``gguf.quants.dequantize``.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from ..config import QuantSpec
from ..formats import QTensor
from ..granularity import PerTensor, group_len
from .ggml_pack import (  # noqa: F401  (re-exported: part of this module's API)
    pack_iq4_nl,
    pack_mxfp4,
    pack_q2_k,
    pack_q3_k,
    pack_q4_0,
    pack_q4_1,
    pack_q4_k,
    pack_q5_0,
    pack_q5_1,
    pack_q5_k,
    pack_q6_k,
    pack_q8_0,
)

log = logging.getLogger(__name__)

_CHUNK = 1 << 20  # elements encoded at a time (bounds the search's temporary arrays)


# ============================================================================ block formats
@dataclass(frozen=True)
class _Fmt:
    """The part of a ggml block format the encoder needs.

    ``kind``:
      ``sym``     ``x = s_j * (c - mid)``, ``mid = 2^(bits-1)``; ``s_j`` fp16 per block (legacy) or
                  ``d * sc_j`` with integer ``sc_j`` in ``sc_range`` (K-quants)
      ``affine``  ``x = d * c + m`` with fp16 ``d``, ``m`` per block (Q4_1, Q5_1)
      ``kaff``    ``x = (d * sc_j) * c - dmin * m_j`` with unsigned ``sc_j, m_j`` (Q2_K, Q4_K, Q5_K)
      ``lut``     ``x = d * IQ4_NL_LEVELS[c]`` (IQ4_NL)
      ``mx``      ``x = 2^(e - 128) * MXFP4_LEVELS[c]`` with a byte exponent ``e`` (MXFP4)
    ``sub``: elements sharing one scale; ``block``/``type_size``: from ``gguf.GGML_QUANT_SIZES``.
    """

    qtype: QT
    kind: str
    bits: int
    sub: int
    sc_range: tuple[int, int] | None = None

    @property
    def block(self) -> int:
        return gguf.GGML_QUANT_SIZES[self.qtype][0]

    @property
    def type_size(self) -> int:
        return gguf.GGML_QUANT_SIZES[self.qtype][1]

    @property
    def bpw(self) -> float:
        return ggml_bpw(self.qtype)

    @property
    def is_k(self) -> bool:
        return self.block == 256


_FMTS: dict[QT, _Fmt] = {f.qtype: f for f in (
    _Fmt(QT.Q8_0, "sym", 8, 32),
    _Fmt(QT.Q5_0, "sym", 5, 32),
    _Fmt(QT.Q4_0, "sym", 4, 32),
    _Fmt(QT.Q5_1, "affine", 5, 32),
    _Fmt(QT.Q4_1, "affine", 4, 32),
    _Fmt(QT.Q6_K, "sym", 6, 16, (-128, 127)),
    _Fmt(QT.Q3_K, "sym", 3, 16, (-32, 31)),
    _Fmt(QT.Q5_K, "kaff", 5, 32, (0, 63)),
    _Fmt(QT.Q4_K, "kaff", 4, 32, (0, 63)),
    _Fmt(QT.Q2_K, "kaff", 2, 16, (0, 15)),
    _Fmt(QT.IQ4_NL, "lut", 4, 32),
    _Fmt(QT.MXFP4, "mx", 4, 32),
)}

IQ4_NL_LEVELS = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)
# E2M1 magnitudes doubled (0, 0.5, ..., 6 -> 0, 1, ..., 12), codes 8..15 negative, as ggml's MXFP4 block
MXFP4_LEVELS = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.float32)

# spec element width -> class; class -> its candidate types (the first is the nominal type)
_CLASS_OF_BITS = {1: 2, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 7: 8, 8: 8}
_CLASS_ORDER = (2, 3, 4, 5, 6, 8)
_CLASS_TYPES: dict[int, tuple[QT, ...]] = {
    8: (QT.Q8_0,),
    6: (QT.Q6_K,),
    5: (QT.Q5_K, QT.Q5_0, QT.Q5_1),
    4: (QT.Q4_K, QT.Q4_0, QT.IQ4_NL, QT.Q4_1),
    3: (QT.Q3_K,),
    2: (QT.Q2_K,),
}
_KEEP_TYPES = {"fp16": QT.F16, "bf16": QT.BF16, "fp32": QT.F32}


def ggml_bpw(qtype: QT) -> float:
    """Bits per weight of a ggml type (block bytes * 8 / block elements)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return size * 8 / block


@functools.lru_cache(maxsize=1)
def _probe_gguf_quantize() -> tuple[tuple[str, ...], tuple[str, ...]]:
    can, cannot = [], []
    for qt in QT:
        block = gguf.GGML_QUANT_SIZES[qt][0]
        try:
            gguf.quants.quantize(np.zeros((1, max(block, 32)), np.float32), qt)
            can.append(qt.name)
        except Exception:  # noqa: BLE001 - NotImplementedError, or integer tensor types: not weight formats
            cannot.append(qt.name)
    return tuple(can), tuple(cannot)


def gguf_quantize_support() -> dict[str, list[str]]:
    """Which ggml types the installed ``gguf`` package can quantize in Python, and which it can only dequantize.

    Probed once by quantizing one zero block of every type (this module does not use those quantizers).
    """
    can, cannot = _probe_gguf_quantize()
    return {"quantize": list(can), "dequantize_only": list(cannot)}


# ---------------------------------------------------------------------------- small helpers
def _fp16(x: np.ndarray) -> np.ndarray:
    """Round to the nearest fp16 value (saturating), returned as float32."""
    return np.clip(x, -65504.0, 65504.0).astype(np.float16).astype(np.float32)


def _safe_div(x: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``x / d`` with 0 where ``d == 0``."""
    out = np.zeros(np.broadcast_shapes(x.shape, d.shape), np.float32)
    np.divide(x, d, out=out, where=np.broadcast_to(d != 0, out.shape))
    return out


def _quant_sub_scales(a: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Write per-sub-block reals ``a [n, k]`` as ``d * q`` with fp16 ``d [n]`` and integer ``q`` in ``lo..hi``.

    Tries ``d = fp16(a_ext / j)`` for every nonzero code ``j`` (``a_ext`` the entry of largest
    magnitude) and keeps, per row, the ``d`` with the least ``sum((d * q - a)^2)``.  Exact when the
    ``a`` are fp16 multiples of one ``d`` within range (e.g. all equal: ``j = 1``).
    """
    n = a.shape[0]
    ext = a[np.arange(n), np.abs(a).argmax(axis=1)]
    best_err = np.full(n, np.inf, np.float32)
    best_d = np.zeros(n, np.float32)
    best_q = np.zeros(a.shape, np.int32)
    for j in range(lo, hi + 1):
        if j == 0:
            continue
        d = _fp16(ext / j)
        q = np.clip(np.rint(_safe_div(a, d[:, None])), lo, hi)
        err = ((d[:, None] * q - a) ** 2).sum(axis=1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_d = np.where(better, d, best_d)
        best_q = np.where(better[:, None], q.astype(np.int32), best_q)
    return best_d, best_q


def _windows(cols: int, sub: int) -> list[int]:
    """Window lengths whose extremes propose sub-block parameters: the row, common group sizes, the sub-block.

    Longest first: on equal error a sub-block keeps the coarser (shared) parameters, which the
    K-quants' super-block scale then represents best.
    """
    return sorted({w for w in (sub, 32, 64, 128, 256, cols) if w >= sub and cols % w == 0}, reverse=True)


def _window_stat(x: np.ndarray, w: int, sub: int, stat: str) -> np.ndarray:
    """``stat`` (``ext``: signed largest-magnitude element, ``min``, ``max``) of each length-``w`` window of the
    rows of ``x [r, cols]``, repeated for each ``sub``-element sub-block inside it: ``[r * cols // sub]``."""
    r, cols = x.shape
    xw = x.reshape(r, cols // w, w)
    if stat == "ext":
        v = np.take_along_axis(xw, np.abs(xw).argmax(axis=2)[..., None], axis=2)[..., 0]
    else:
        v = xw.min(axis=2) if stat == "min" else xw.max(axis=2)
    return np.repeat(v, w // sub, axis=1).reshape(-1)


def _fit_sym(x: np.ndarray, sub: int, mid: int, src_bits: int | None, fp16_step: bool) -> np.ndarray:
    """Steps ``[n_sub]`` for ``s * (c - mid)`` fit to the values ``x [r, cols]``, least squared error per sub-block.

    Candidates: the extreme element of the sub-block or of a longer window (32 ... 256, the row: a
    coarser mixq group) landing on the lowest or highest code of this grid or of the source int
    grid (``src_bits``), the power-of-two step an OCP MX scale would take, and shrunk variants of
    the sub-block's own.  Any symmetric int grid whose extreme code is used in some window is
    recovered exactly.
    """
    xs = x.reshape(-1, sub)
    bits = {mid.bit_length()} | ({src_bits} if src_bits is not None and src_bits > 1 else set())
    denoms = sorted({j for b in bits for j in (-(2 ** (b - 1)), 2 ** (b - 1) - 1) if j})
    best_err = np.full(xs.shape[0], np.inf, np.float32)
    best = np.zeros(xs.shape[0], np.float32)
    for w in _windows(x.shape[1], sub):
        ext = _window_stat(x, w, sub, "ext")
        log2 = np.floor(np.log2(np.maximum(np.abs(ext), 1e-30)))
        cands = [ext / np.float32(j * shrink) for j in denoms
                 for shrink in ((1.0, 0.96, 0.92, 0.88) if w == sub else (1.0,))]
        cands += [np.exp2(log2 - (b - 2)).astype(np.float32) for b in bits]
        for a in cands:
            if fp16_step:
                a = _fp16(a)
            c = np.clip(np.rint(_safe_div(xs, a[:, None])), -mid, mid - 1)
            err = ((a[:, None] * c - xs) ** 2).sum(axis=1)
            better = err < best_err
            best_err, best = np.where(better, err, best_err), np.where(better, a, best)
    return best


def _fit_affine(x: np.ndarray, sub: int, qmax: int, src_bits: int | None, k_mins: bool,
                fp16_params: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(step, zero)`` per sub-block for ``step * c + zero`` fit to ``x [r, cols]`` (least squared error).

    Candidates: min/max of the sub-block and of longer windows, spread over this grid's or the
    source int grid's code range (or one code less: a symmetric source grid whose lowest code is
    unused).  ``k_mins``: the zero must be <= 0 (K-quants store ``-dmin * m``).
    """
    xs = x.reshape(-1, sub)
    spans = {qmax} | ({2**src_bits - 1, 2**src_bits - 2} if src_bits is not None else set())
    spans.discard(0)
    best_err = np.full(xs.shape[0], np.inf, np.float32)
    best_a = np.zeros(xs.shape[0], np.float32)
    best_b = np.zeros(xs.shape[0], np.float32)
    for w in _windows(x.shape[1], sub):
        lo, hi = _window_stat(x, w, sub, "min"), _window_stat(x, w, sub, "max")
        if k_mins:
            lo = np.minimum(lo, 0)
        for n in sorted(spans):
            b = _fp16(lo) if fp16_params else lo
            a = (hi - b) / n
            if fp16_params:
                a = _fp16(a)
            c = np.clip(np.rint(_safe_div(xs - b[:, None], a[:, None])), 0, qmax)
            err = ((a[:, None] * c + b[:, None] - xs) ** 2).sum(axis=1)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_a, best_b = np.where(better, a, best_a), np.where(better, b, best_b)
    return best_a, best_b


def _sym_codes(x: np.ndarray, step: np.ndarray, mid: int) -> np.ndarray:
    """Nearest codes ``c`` of ``x`` on ``step * (c - mid)`` (``step`` broadcasts; 0 -> the zero code)."""
    return np.clip(np.rint(_safe_div(x, step)) + mid, 0, 2 * mid - 1).astype(np.uint8)


def _aff_codes(x: np.ndarray, step: np.ndarray, zero: np.ndarray, qmax: int) -> np.ndarray:
    """Nearest codes ``c`` of ``x`` on ``step * c + zero``."""
    return np.clip(np.rint(_safe_div(x - zero, step)), 0, qmax).astype(np.uint8)


def _nearest_level(y: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Index of the nearest entry of ``levels`` (any order) for each element of ``y``."""
    order = np.argsort(levels, kind="stable")
    srt = levels[order]
    mids = (srt[1:] + srt[:-1]) / 2
    return order[np.searchsorted(mids, y)].astype(np.uint8)


@dataclass
class _Grid:
    """mixq's own grid for one tensor's rows, when known: ``x = step * code + zero`` per group.

    ``step``/``zero``: ``[rows, groups_per_row]``; ``group``: group length along the row.
    ``integral``: ``zero`` is an integer multiple of ``step`` (symmetric or int zero point), so the
    grid also fits the symmetric ggml types.  ``mx``: the step is an OCP MX power-of-two scale of
    FP4-E2M1 elements (``step`` holds it; ``zero`` is unused).
    """

    step: np.ndarray
    zero: np.ndarray
    group: int
    integral: bool
    mx: bool = False

    def rows(self, sl: slice) -> "_Grid":
        return _Grid(self.step[sl], self.zero[sl], self.group, self.integral, self.mx)

    def per_sub(self, sub: int, cols: int) -> tuple[np.ndarray, np.ndarray] | None:
        """``(step, zero)`` per ``sub``-element sub-block ``[rows, cols // sub]``; None if groups straddle them."""
        if self.group % sub:
            return None
        idx = (np.arange(cols // sub) * sub) // self.group
        return self.step[:, idx], self.zero[:, idx]


def _grid_of(q: QTensor, perm: np.ndarray | None) -> _Grid | None:
    """The int (or MX FP4) grid of a mixq QTensor, rows permuted like the tensor; None for other formats."""
    spec, (rows, cols) = q.spec, q.shape
    p = q.params
    if spec.is_float_keep or p.scale is None:
        return None
    if spec.dtype == "int":
        s = p.scale.detach().float().reshape(-1)
        if spec.symmetric:
            step, zero, integral = (2 * s, -s, False) if spec.bits == 1 else (s, -s * 2 ** (spec.bits - 1), True)
        elif p.zero is not None:
            step, zero, integral = s, -s * p.zero.detach().float().reshape(-1), True
        else:
            step, zero, integral = s, p.offset.detach().float().reshape(-1), False
        mx = False
    elif spec.dtype == "fp4_e2m1" and spec.scale_dtype == "e8m0":
        step = p.scale.detach().float().reshape(-1)
        zero, integral, mx = torch.zeros_like(step), False, True
    else:
        return None
    if isinstance(spec.granularity, PerTensor):
        step, zero, g = step.expand(rows).reshape(rows, 1), zero.expand(rows).reshape(rows, 1), cols
    else:
        g = group_len(spec.granularity, (rows, cols))
        step, zero = step.reshape(rows, cols // g), zero.reshape(rows, cols // g)
    step, zero = step.numpy().astype(np.float32), zero.numpy().astype(np.float32)
    if perm is not None:
        step, zero = step[perm], zero[perm]
    return _Grid(step, zero, g, integral, mx)


# ---------------------------------------------------------------------------- encoders
def _sym_steps(f: _Fmt, x: np.ndarray, grid: _Grid | None, src_bits: int | None, *, fp16_step: bool) -> np.ndarray:
    """One step per ``f.sub``-block of a symmetric type: mixq's own when its grid is integral, else fitted."""
    sub = grid.per_sub(f.sub, x.shape[1]) if grid is not None and grid.integral else None
    if sub is not None:
        return sub[0].reshape(-1)
    return _fit_sym(x, f.sub, 2 ** (f.bits - 1), src_bits, fp16_step=fp16_step)


def _enc_sym_legacy(f: _Fmt, x: np.ndarray, grid: _Grid | None, src_bits: int | None) -> np.ndarray:
    mid = 2 ** (f.bits - 1)
    xb = x.reshape(-1, f.sub)
    d = _fp16(_sym_steps(f, x, grid, src_bits, fp16_step=True))
    c = _sym_codes(xb, d[:, None], mid)
    return {QT.Q8_0: pack_q8_0, QT.Q4_0: pack_q4_0, QT.Q5_0: pack_q5_0}[f.qtype](d, c)


def _enc_affine_legacy(f: _Fmt, x: np.ndarray, grid: _Grid | None, src_bits: int | None) -> np.ndarray:
    qmax = 2**f.bits - 1
    cols = x.shape[1]
    xb = x.reshape(-1, f.sub)
    sub = grid.per_sub(f.sub, cols) if grid is not None and not grid.mx else None
    if sub is not None:
        m, d = _fp16(sub[1].reshape(-1)), _fp16(sub[0].reshape(-1))
    else:
        d, m = _fit_affine(x, f.sub, qmax, src_bits, k_mins=False, fp16_params=True)
    c = _aff_codes(xb, d[:, None], m[:, None], qmax)
    return (pack_q4_1 if f.qtype == QT.Q4_1 else pack_q5_1)(d, m, c)


def _enc_sym_k(f: _Fmt, x: np.ndarray, grid: _Grid | None, src_bits: int | None) -> np.ndarray:
    mid = 2 ** (f.bits - 1)
    xs = x.reshape(-1, f.sub)
    a = _sym_steps(f, x, grid, src_bits, fp16_step=False)
    d, sc = _quant_sub_scales(a.reshape(-1, 256 // f.sub), *f.sc_range)
    eff = (d[:, None] * sc.astype(np.float32)).reshape(-1, 1)  # ggml's d * sc, in float32
    c = _sym_codes(xs, eff, mid).reshape(-1, 256)
    return pack_q6_k(d, sc, c) if f.qtype == QT.Q6_K else pack_q3_k(d, sc, c)


def _enc_kaff(f: _Fmt, x: np.ndarray, grid: _Grid | None, src_bits: int | None) -> np.ndarray:
    qmax = 2**f.bits - 1
    cols = x.shape[1]
    xs = x.reshape(-1, f.sub)
    sub = grid.per_sub(f.sub, cols) if grid is not None and not grid.mx else None
    if sub is not None:
        a, mn = sub[0].reshape(-1), np.maximum(-sub[1].reshape(-1), 0)
    else:
        a, b = _fit_affine(x, f.sub, qmax, src_bits, k_mins=True, fp16_params=False)
        mn = -b
    nsub = 256 // f.sub
    d, sc = _quant_sub_scales(a.reshape(-1, nsub), *f.sc_range)
    dmin, m = _quant_sub_scales(mn.reshape(-1, nsub), *f.sc_range)
    eff = (d[:, None] * sc.astype(np.float32)).reshape(-1, 1)
    off = (dmin[:, None] * m.astype(np.float32)).reshape(-1, 1)
    c = _aff_codes(xs, eff, -off, qmax).reshape(-1, 256)
    pack = {QT.Q4_K: pack_q4_k, QT.Q5_K: pack_q5_k, QT.Q2_K: pack_q2_k}[f.qtype]
    return pack(d, dmin, sc, m, c)


def _enc_iq4_nl(f: _Fmt, x: np.ndarray, grid: _Grid | None, src_bits: int | None) -> np.ndarray:
    """IQ4_NL from values: scale candidates around ``x_ext / L_ext``, each refined once by least squares."""
    xb = x.reshape(-1, 32)
    n = xb.shape[0]
    ext = xb[np.arange(n), np.abs(xb).argmax(axis=1)]
    best_err = np.full(n, np.inf, np.float32)
    best_d = np.zeros(n, np.float32)
    for base in (-127.0, 113.0):
        for shrink in (1.0, 0.95, 0.9, 1.05):
            d = ext / (base * shrink)
            lv = IQ4_NL_LEVELS[_nearest_level(_safe_div(xb, d[:, None]), IQ4_NL_LEVELS)]
            den = (lv * lv).sum(axis=1)
            d_ls = np.where(den > 0, (xb * lv).sum(axis=1) / np.maximum(den, 1e-30), 0)
            for dd in (_fp16(d), _fp16(d_ls)):
                lv2 = IQ4_NL_LEVELS[_nearest_level(_safe_div(xb, dd[:, None]), IQ4_NL_LEVELS)]
                err = ((dd[:, None] * lv2 - xb) ** 2).sum(axis=1)
                better = err < best_err
                best_err, best_d = np.where(better, err, best_err), np.where(better, dd, best_d)
    c = _nearest_level(_safe_div(xb, best_d[:, None]), IQ4_NL_LEVELS)
    return pack_iq4_nl(best_d, c)


def _enc_mxfp4(f: _Fmt, x: np.ndarray, grid: _Grid | None, src_bits: int | None) -> np.ndarray:
    """MXFP4: the mixq power-of-two scale when the grid is MX FP4, else ``floor(log2 amax) - 2`` (and +-1)."""
    cols = x.shape[1]
    xb = x.reshape(-1, 32)
    sub = grid.per_sub(32, cols) if grid is not None and grid.mx else None
    cands: list[np.ndarray] = []
    if sub is not None:
        k = np.log2(np.maximum(sub[0].reshape(-1), 2.0**-149))
        if np.all(k == np.round(k)):
            cands.append(np.clip(k + 127, 0, 254))
    amax = np.abs(xb).max(axis=1)
    e0 = np.where(amax > 0, np.floor(np.log2(np.maximum(amax, 1e-38))) - 2 + 127, 0)
    cands += [np.clip(e0 + o, 0, 254) for o in (0, -1, 1)]
    best_err = np.full(xb.shape[0], np.inf, np.float32)
    best_e = np.zeros(xb.shape[0], np.float32)
    for e in cands:
        scale = np.exp2(e - 128).astype(np.float32)
        lv = MXFP4_LEVELS[_nearest_level(xb / scale[:, None], MXFP4_LEVELS)]
        err = ((scale[:, None] * lv - xb) ** 2).sum(axis=1)
        better = err < best_err
        best_err, best_e = np.where(better, err, best_err), np.where(better, e, best_e)
    scale = np.exp2(best_e - 128).astype(np.float32)
    c = _nearest_level(xb / scale[:, None], MXFP4_LEVELS)
    return pack_mxfp4(best_e.astype(np.uint8), c)


_ENCODERS = {"sym": _enc_sym_legacy, "affine": _enc_affine_legacy, "kaff": _enc_kaff, "lut": _enc_iq4_nl,
             "mx": _enc_mxfp4}


def encode_blocks(qtype: QT, x: np.ndarray, grid: _Grid | None = None, src_bits: int | None = None) -> np.ndarray:
    """Encode ``x [rows, cols]`` (float32) as ggml blocks of ``qtype``: uint8 ``[rows, cols / block * type_size]``.

    ``grid``: mixq's grid for these rows (see :class:`_Grid`), used when it fits the block type;
    otherwise the block parameters are fit to the values, ``src_bits`` (the element width of an
    int spec that produced them) adding candidates.  Works in row chunks.
    """
    f = _FMTS[qtype]
    rows, cols = x.shape
    if cols % f.block:
        raise ValueError(f"{qtype.name} needs rows of a multiple of {f.block} elements, got {cols}")
    enc = _enc_sym_k if (f.kind == "sym" and f.is_k) else _ENCODERS[f.kind]
    out = np.empty((rows, cols // f.block * f.type_size), np.uint8)
    step = max(1, _CHUNK // cols)
    for r0 in range(0, rows, step):
        sl = slice(r0, min(rows, r0 + step))
        g = grid.rows(sl) if grid is not None else None
        out[sl] = enc(f, np.ascontiguousarray(x[sl], np.float32), g, src_bits).reshape(sl.stop - sl.start, -1)
    return out


def decode_blocks(qtype: QT, data: np.ndarray) -> np.ndarray:
    """``gguf.quants.dequantize`` (the reference decoder), float32 ``[rows, cols]``."""
    return gguf.quants.dequantize(data, qtype).astype(np.float32, copy=False)


# ============================================================================ type choice
@dataclass
class _Choice:
    qtype: QT
    data: np.ndarray  # what GGUFWriter.add_tensor takes (uint8 blocks, or float16/float32 values)
    nominal: QT | None
    fallback: str | None
    how: str
    grid_used: bool
    candidates: dict[str, float]  # type -> relative L2 error
    excluded: dict[str, str]


def _rel(err_sq: float, ref_sq: float) -> float:
    return math.sqrt(err_sq / ref_sq) if ref_sq > 0 else (0.0 if err_sq == 0 else math.inf)


def _float_data(x: np.ndarray, qtype: QT) -> np.ndarray:
    if qtype == QT.F32:
        return np.ascontiguousarray(x, np.float32)
    if qtype == QT.F16:
        return np.ascontiguousarray(np.clip(x, -65504, 65504).astype(np.float16))
    return gguf.quants.quantize(np.ascontiguousarray(x, np.float32), QT.BF16)  # uint8, raw_dtype BF16


def _choose_type(x: np.ndarray, spec: QuantSpec, grid: _Grid | None) -> _Choice:
    """Pick and encode the ggml type for one quantized tensor (rules in the module docstring)."""
    rows, cols = x.shape
    if spec.is_float_keep:
        qt = _KEEP_TYPES[spec.dtype]
        return _Choice(qt, _float_data(x, qt), qt, None, "mixq keeps this tensor in floating point", False, {}, {})
    spec_bpw = spec.bpw((rows, cols))
    cls = _CLASS_OF_BITS[spec.bits]
    nominal = _CLASS_TYPES[cls][0]
    ref_sq = float(np.square(x, dtype=np.float64).sum())
    excluded: dict[str, str] = {}
    tried: dict[str, float] = {}
    fallback = None
    if cols % _FMTS[nominal].block:
        fallback = (f"{nominal.name} needs rows of a multiple of {_FMTS[nominal].block} elements; "
                    f"this tensor's rows (input dimension) have {cols}")
    while True:
        types = list(_CLASS_TYPES[cls])
        if cls == 4 and spec.dtype == "fp4_e2m1":
            types.insert(0, QT.MXFP4)
        budget = max(spec_bpw, _FMTS[_CLASS_TYPES[cls][0]].bpw) + 1e-9
        cands = []
        for i, t in enumerate(types):
            f = _FMTS[t]
            if f.bpw > budget:
                excluded[t.name] = f"{f.bpw:g} bpw is over the budget of {budget:.4g} bpw"
            elif cols % f.block:
                excluded[t.name] = f"needs rows of a multiple of {f.block}, got {cols}"
            else:
                cands.append((f.bpw, i, t))
        if cands:
            break
        nxt = [c for c in _CLASS_ORDER if c > cls]
        if not nxt:
            data = _float_data(x, QT.F16)
            fb = fallback or f"no block type fits rows of {cols} elements"
            return _Choice(QT.F16, data, nominal, fb + "; wrote F16", "no quantized type fits the row", False,
                           tried, excluded)
        cls = nxt[0]
    def grid_fits(f: _Fmt) -> bool:
        return (grid is not None and f.kind != "lut" and grid.per_sub(f.sub, cols) is not None
                and (f.kind == "mx") == grid.mx and (f.kind != "sym" or grid.integral))

    # mixq's grid first (cheap, often exact), then by bits; once a type reproduces the weight exactly,
    # the others are only tried through mixq's grid (a refit of on-grid values onto an unrelated grid
    # is not exact in practice, and is the slow part)
    order = sorted(cands, key=lambda c: (not grid_fits(_FMTS[c[2]]), c[0], c[1]))
    best: tuple[float, float, int, QT, np.ndarray, bool] | None = None
    src_bits = spec.bits if spec.dtype == "int" else None
    for bpw, i, t in order:
        if best is not None and best[0] == 0 and (bpw, i) > best[1:3]:
            continue  # cannot beat an exact candidate with fewer (or as many, earlier listed) bits
        options = ([True] if grid_fits(_FMTS[t]) else []) + ([False] if best is None or best[0] > 0 else [])
        for use_grid in options:
            data = encode_blocks(t, x, grid if use_grid else None, src_bits)
            err_sq = float(np.square(decode_blocks(t, data) - x, dtype=np.float64).sum())
            if best is None or (err_sq, bpw, i) < best[:3]:
                best = (err_sq, bpw, i, t, data, use_grid)
            tried[t.name] = min(tried.get(t.name, math.inf), _rel(err_sq, ref_sq))
            if err_sq == 0:
                break
    err_sq, _, _, qt, data, used = best
    if err_sq == 0:
        how = "reproduces the mixq weight exactly"
    elif len(tried) > 1:
        how = "least error of " + ", ".join(tried)
    else:
        how = "only candidate"
    if fallback is not None:
        fallback += f"; wrote {qt.name}" + (" (exact)" if err_sq == 0 else "")
    return _Choice(qt, data, nominal, fallback, how, used, tried, excluded)
