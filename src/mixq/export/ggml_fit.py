"""Fitting ggml block parameters: mixq's own grid of a tensor (:class:`_Grid`, when its codes and scales are at
hand) and, without it, the search for sub-block steps / zeros and K-quant super-block scales from the values
(the approximate GGUF export; :mod:`.ggml` encodes with them).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..formats import QTensor
from ..granularity import PerTensor, group_len


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
