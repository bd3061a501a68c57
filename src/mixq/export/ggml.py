"""ggml block formats: what each llama.cpp quantized type stores (:class:`_Fmt`), and encoding values into its
blocks (fitting: :mod:`.ggml_fit`; byte layouts: :mod:`.ggml_pack`; which type a spec becomes: :mod:`.ggml_choice`).

Every layout is written by mixq's own code and checked against ``gguf.quants.dequantize``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from .ggml_fit import (
    _aff_codes,
    _fit_affine,
    _fit_sym,
    _fp16,
    _Grid,
    _nearest_level,
    _quant_sub_scales,
    _safe_div,
    _sym_codes,
)
from .ggml_pack import (
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

_CHUNK = 1 << 20  # elements encoded at a time (bounds the search's temporary arrays)


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
