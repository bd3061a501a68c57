"""Which ggml type a layer's spec is written as, when the GGUF export is not exact (a plan made without
``--target gguf``), and the encoded candidate of least error; and the exact write of a ``--target gguf`` plan
(:func:`exact_choice`: mixq's codes and scales in the type that holds the spec).  :func:`layer_choice` picks one
of the two for a dense layer; :mod:`.gguf_moe` for a stack of experts.

A spec's element width picks a *class* of same-width ggml types, and a budget::

    bits   class types (bpw)                                     nominal   next class
    8, 7   Q8_0 (8.5)                                            Q8_0      F16
    6      Q6_K (6.5625)                                         Q6_K      8
    5      Q5_K (5.5), Q5_0 (5.5), Q5_1 (6.0)                    Q5_K      6
    4      Q4_K (4.5), Q4_0 (4.5), IQ4_NL (4.5), Q4_1 (5.0)       Q4_K      5
           (+ MXFP4 (4.25) for FP4-E2M1 element specs)
    3      Q3_K (3.4375)                                         Q3_K      4
    2, 1   Q2_K (2.625)                                          Q2_K      3
    keep   fp16 -> F16, bf16 -> BF16, fp32 -> F32 (exact)

The candidates are the class's types whose bits per weight do not exceed
``max(bpw of the mixq spec on this tensor, bpw of the nominal type)`` and whose block fits the
row (K-quants: the row length, i.e. the input dimension, must be a multiple of 256; every other
block type a multiple of 32).  Candidates are encoded and decoded, and the one with the least
squared error against mixq's dequantized weight is written (ties: fewer bits, then table order).
Types that can take mixq's grid directly are tried first; once one reproduces the weight exactly,
the rest are tried only through mixq's grid (refitting on-grid values to an unrelated grid is the
slow part and is not exact in practice), and none with more bits.  Consequences for int specs whose
groups are a multiple of 32 long: ``W4-gN`` symmetric is written as Q4_0, ``W5-gN`` symmetric as
Q5_0, ``W8`` symmetric and MXINT8 as Q8_0, ``W4-g32-asymf`` (fp16 offset) as Q4_1 and
``W5-g32-asymf`` as Q5_1, MXFP4 as MXFP4, and ``W3``/``W2`` symmetric on rows that no K-quant
fits as Q4_0 -- all bit-exact, since each mixq group is one or more whole ggml blocks with the
same scale (and offset), and the codes carry over.  Per-channel int specs (symmetric or with an
int zero point) are exact in their K-quant (every sub-block scale is ``d * 1``), e.g.
``W4-channel`` -> Q4_K, ``W3-channel`` -> Q3_K, ``W6-channel`` -> Q6_K.  Other specs are
approximations: grouped scales re-quantized to the K-quants' 6-bit (4-bit for Q2_K, 8-bit for
Q6_K) sub-block scales, or a refit of non-uniform grids (NF, k-means, FP) onto the ggml grid.

Fallbacks: when no type of the class fits the row (e.g. Q3_K or Q6_K on SmolLM2's 576-wide
rows), the next class up is tried with its own budget (Q3_K -> the 4-bit types, Q6_K -> Q8_0,
...; F16 when nothing fits).  A tensor whose nominal type does not fit its row gets a
``fallback`` entry naming the type, the row length and what was written instead -- also when a
same-width type was exact (W4-g32 on a 576-wide row: nominal Q4_K, written Q4_0, exact).

How the blocks are filled
-------------------------
With the mixq codes and parameters at hand (a native directory, or ``qtensors``) and an int spec
whose groups do not straddle the ggml sub-blocks, each sub-block takes mixq's step and zero
(``x = step * code + zero``); without them, or when that is worse, the sub-block parameters are
refit from the values (absmax / min-max with a short search).  K-quant sub-block scales are then
quantized against one fp16 super-block scale (a search over the largest sub-scale code), and
every value is re-encoded to the nearest point of the final ggml grid, so on-grid values keep
their codes.  The block layouts are written here from the format description and checked
against ``gguf.quants.dequantize`` in the tests.

What the gguf package (0.19.0) can quantize in Python: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1,
Q8_0, TQ1_0, TQ2_0, MXFP4; only dequantize: Q2_K..Q6_K, IQ4_NL, IQ4_XS, the other IQ types and
NVFP4.  Its quantizers choose their own scales (absmax), which would move mixq's grid, so this
module packs every block type itself, K-quants and IQ4_NL included (:func:`mixq.export.ggml.gguf_quantize_support`
probes the installed package).  A spec that *is* a ggml type (``Q4_K``, ``IQ4_NL``, ...: :mod:`mixq.config.ggml_types`)
is written from its own codes and scales (:mod:`.ggml_direct`) whenever they are at hand, exact or not.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from ..config import QuantSpec
from ..formats import QTensor
from .ggml import _FMTS, _Fmt, decode_blocks, encode_blocks
from .ggml_direct import DIRECT_TYPES, pack_direct
from .ggml_exact import ggml_exact_type
from .ggml_fit import _Grid, _grid_of

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


def exact_choice(x: np.ndarray, spec: QuantSpec, q: QTensor | None, perm, name: str) -> _Choice:
    """The ggml type holding ``spec`` exactly, filled with mixq's own codes and scales (``q``), or ValueError."""
    tname = ggml_exact_type(spec, x.shape)
    if tname is None:
        raise ValueError(f"{name}: no ggml type holds {spec.name} exactly on rows of {x.shape[1]} elements (the "
                         f"exact export takes only the specs of a --target gguf plan; see mixq.export.ggml_exact)")
    qt = QT[tname]
    if qt in (QT.F16, QT.BF16, QT.F32):
        return _Choice(qt, _float_data(x, qt), qt, None, "exact: kept in floating point", False, {}, {})
    if q is None:
        raise ValueError(f"{name}: the exact export needs mixq's codes and scales (qtensors) for {spec.name}")
    if tname in DIRECT_TYPES:
        data = pack_direct(tname, q, perm)
    else:
        data = encode_blocks(qt, x, _grid_of(q, perm), spec.bits if spec.dtype == "int" else None)
    return _Choice(qt, data, qt, None, "exact: mixq's codes and scales as they are", True, {}, {})


def is_exact_write(spec: QuantSpec, q: QTensor | None, shape, exact: bool) -> bool:
    """Whether a tensor is written by :func:`exact_choice`: an exact export, or a spec that *is* a ggml type
    (K-quants, IQ4_NL) with its codes at hand (exact in any case)."""
    return exact or (q is not None and ggml_exact_type(spec, shape) in DIRECT_TYPES)


def layer_choice(x: np.ndarray, spec: QuantSpec, q: QTensor | None, perm, name: str, exact: bool) -> _Choice:
    """The block type and blocks of one quantized tensor: :func:`exact_choice` when :func:`is_exact_write`, else
    :func:`_choose_type` (through mixq's grid when its codes are at hand)."""
    if is_exact_write(spec, q, x.shape, exact):
        return exact_choice(x, spec, q, perm, name)
    return _choose_type(x, spec, _grid_of(q, perm) if q is not None else None)
