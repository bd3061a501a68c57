"""Validation of :class:`mixq.config.composite.CompositeSpec` fields: which extensions exist, take which values and
combine with which base (run by the spec's ``__post_init__``; a bad combination raises ``ValueError`` naming it)."""
from __future__ import annotations

import math

from ..granularity import PerChannel, PerGroup

FP16_BITS = 16
# a TCQ base's trellis state bits: those with committed tables (formats.composite.tcq_codebook)
TCQ_STATE_BITS = (8, 10, 12)
# a TCQ base's rates, as twice its bits a weight: 1 to 4 by halves, then 5 and 6 whole (a half rate stores a row pair's
# two steps as one symbol, which above 4 bits would not fit the byte symbols of the storage and the kernels' reads)
TCQ_TRELLIS = (2, 3, 4, 5, 6, 7, 8, 10, 12)
TCQ_RATES_TEXT = "1 to 4 bits a weight by halves, 5 or 6"


def check_composite(spec) -> None:
    """Raise ``ValueError`` unless the extension fields of ``spec`` make a valid composite (normalizes the two
    percentages to float)."""
    o = spec.outliers
    if isinstance(o, bool) or not isinstance(o, (int, float)) or not math.isfinite(o) or not 0 <= o < 100:
        raise ValueError(f"outliers is a percentage in [0, 100), got {o!r}")
    object.__setattr__(spec, "outliers", float(o))
    h = spec.hi_rows
    if isinstance(h, bool) or not isinstance(h, (int, float)) or not math.isfinite(h) or not 0 <= h < 100:
        raise ValueError(f"hi_rows is a percentage in [0, 100), got {h!r}")
    object.__setattr__(spec, "hi_rows", float(h))
    for k in ("columns", "sq_bits", "sq_group", "hi_bits", "dialects", "residual", "outlier_bits", "vq_dim",
              "vq_bits", "trellis", "state_bits"):
        v = getattr(spec, k)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{k} must be a non-negative integer, got {v!r}")
    for k in ("slim", "binary", "incoherent", "ip_one_sided"):
        if not isinstance(getattr(spec, k), bool):
            raise ValueError(f"{k} must be a bool, got {getattr(spec, k)!r}")
    if not (spec.outliers > 0 or spec.columns > 0 or spec.sq_bits > 0 or spec.slim or spec.hi_rows > 0
            or spec.dialects > 0 or spec.binary or spec.incoherent or spec.vq_dim or spec.trellis):
        raise ValueError("a CompositeSpec needs at least one extension (+oP, +cK, +sqB, +hP, +dD, +ip, SLIM or BIN): "
                         "use a plain QuantSpec otherwise")
    if spec.ip_one_sided and not spec.incoherent:
        raise ValueError("ip_one_sided (+ip1) is a kind of +ip: it needs incoherent")
    if spec.outlier_bits != FP16_BITS:
        if not 2 <= spec.outlier_bits <= 8:
            raise ValueError(f"outlier bits are 16 (fp16) or 2..8, got {spec.outlier_bits}")
        if not spec.binary or not spec.outliers:
            raise ValueError("integer outliers (+oPw<bits>) need a BIN base and +o")
    if spec.vq_dim or spec.vq_bits:
        _check_vq(spec)
    if spec.trellis:
        _check_tcq(spec)
    elif spec.state_bits != 8:
        raise ValueError(f"state_bits ({spec.state_bits}) is a TCQ base's: this spec has no trellis")
    if spec.residual and not spec.binary:
        raise ValueError("+r (residual-binarized columns) needs a BIN base")
    if spec.binary:
        if spec.dtype != "int" or spec.bits != 1 or not spec.symmetric or spec.clip != "minmax":
            raise ValueError("BIN is the symmetric W1 grid (sign x scale) with its own L2-optimal scale fit")
        if spec.scale_dtype not in ("fp16", "bf16", "fp32"):
            raise ValueError(f"BIN needs a float group scale, not {spec.scale_dtype}")
        if spec.columns or spec.sq_bits or spec.slim or spec.hi_rows or spec.dialects:
            raise ValueError("BIN combines only with +r (residual columns) and +o (salient weights)")
    if spec.dialects:
        if spec.dialects not in (2, 4, 8, 16):
            raise ValueError(f"the dialect formatbook holds 2, 4, 8 or 16 tables, got {spec.dialects}")
        if spec.dtype not in ("nf", "fp4_e2m1") or spec.scale_dtype not in ("fp16", "bf16", "fp32") \
                or spec.tensor_scale or spec.sq_bits:
            raise ValueError("+d (block dialects) needs an NF or FP4 base with a float absmax scale, without +sq")
    if spec.hi_rows:
        if spec.dialects or spec.outliers or spec.columns or spec.sq_bits or spec.slim:
            raise ValueError("+h (high-precision output rows) does not combine with other extensions")
        if spec.dtype != "int" or not spec.bits < spec.hi_bits <= 8:
            raise ValueError(f"+h needs an int base and {spec.bits} < hi bits <= 8, got {spec.hi_bits}")
        if spec.scale_dtype == "e8m0" or spec.tensor_scale:
            raise ValueError("+h needs a float group scale")
    if spec.is_float_keep:
        raise ValueError(f"the base of a composite must be a quantized grid, not {spec.dtype}")
    if not isinstance(spec.granularity, (PerGroup, PerChannel)):
        raise ValueError(f"composites need channel or gN granularity, not {spec.granularity}")
    if spec.sq_bits:
        if not 2 <= spec.sq_bits <= 8:
            raise ValueError(f"second-level scale bits must be in 2..8, got {spec.sq_bits}")
        if spec.sq_group < 1:
            raise ValueError("the second-level group must hold at least one row")
        if spec.dtype == "kmeans" or spec.scale_dtype not in ("fp16", "bf16", "fp32") or spec.tensor_scale:
            raise ValueError("+sq quantizes float group scales: the base needs an fp16/bf16/fp32 scale "
                             f"(not {spec.dtype} with scale {spec.scale_dtype})")
    if spec.slim:
        if spec.dtype != "int" or not 2 <= spec.bits <= 7:
            raise ValueError("SLIM needs an int base of 2..7 bits (groups take b-1, b or b+1 bits)")
        if not isinstance(spec.granularity, PerGroup):
            raise ValueError("SLIM allocates bits per group column: use a gN granularity")
        if spec.scale_dtype == "e8m0":
            raise ValueError("SLIM needs a float scale (e8m0 scales depend on the element bits)")


def _check_codebook_base(spec, what: str) -> None:
    if spec.dtype != "int" or not spec.symmetric or spec.clip != "minmax" or spec.tensor_scale:
        raise ValueError(f"{what} bases are written {what}<rate>[-GRAN][-sDTYPE]: no -asym, -mse or -ts")
    if spec.scale_dtype not in ("fp16", "bf16", "fp32"):
        raise ValueError(f"{what} needs a float group scale, not {spec.scale_dtype}")
    if spec.binary or spec.slim or spec.outliers or spec.columns or spec.sq_bits or spec.hi_rows or spec.dialects:
        raise ValueError(f"{what} combines only with +ip")


def _check_vq(spec) -> None:
    """VQ fields: ``vq_dim`` weights per vector, ``vq_bits`` code bits (:mod:`mixq.algorithms.composite.vq`)."""
    d, k = spec.vq_dim, spec.vq_bits
    if not (1 <= d <= 8 and 1 <= k <= 8):
        raise ValueError(f"VQ needs 1..8 weights per vector and 1..8 code bits, got d={d}, k={k}")
    if spec.bits != -(-k // d):
        raise ValueError(f"a VQ base carries bits = ceil(code bits / d) = {-(-k // d)}, got {spec.bits}")
    _check_codebook_base(spec, "VQ")
    if isinstance(spec.granularity, PerGroup) and spec.granularity.size % d:
        raise ValueError(f"the VQ group ({spec.granularity.size}) must hold whole {d}-vectors")
    if spec.trellis:
        raise ValueError("a base is VQ or TCQ, not both")


def _check_tcq(spec) -> None:
    """TCQ field: ``trellis`` = 2 x bits per weight, one of :data:`TCQ_TRELLIS`
    (:mod:`mixq.algorithms.composite.tcq`)."""
    if spec.trellis not in TCQ_TRELLIS:
        raise ValueError(f"TCQ rates are {TCQ_RATES_TEXT}, got {spec.trellis / 2:g}")
    if spec.bits != -(-spec.trellis // 2):
        raise ValueError(f"a TCQ base carries bits = ceil(rate) = {-(-spec.trellis // 2)}, got {spec.bits}")
    if spec.state_bits not in TCQ_STATE_BITS:
        raise ValueError(f"TCQ state bits are one of {TCQ_STATE_BITS} (TCQ<rate>L10, TCQ<rate>L12), "
                         f"got {spec.state_bits}")
    _check_codebook_base(spec, "TCQ")
