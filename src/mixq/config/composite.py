"""Composite (intra-tensor mixed-precision) specs: a base :class:`QuantSpec` plus extensions.

A :class:`CompositeSpec` *is a* :class:`~mixq.config.QuantSpec` (a frozen dataclass subclass): its
inherited fields describe the base grid of the dense part, and its own fields the extensions.  So
everything that only needs ``name``, ``bits``, ``cost(shape)`` and equality (candidate sets,
sensitivity tables, the solvers, plans, ``size_report``) takes composites unchanged; the
rest of mixq asks its family (:mod:`mixq.config.composite_families`: kernels, export mappings; their quantizers and
stored forms: :mod:`mixq.algorithms.composite.families`, their layers: :mod:`mixq.runtime.layers`).

Names (:func:`mixq.config.parse_spec`, ``spec.name``)::

    CANDIDATE := BASE ( "+" EXT )*           extensions in any order; canonical order sq, c, r, o, d, h, ip
    BASE      := a plain spec name (W3-g64, W3-g16-asym, NF3-g64, KM3, FP4-g32, ...)
               | "SLIM" <b> ["-" OPTS]        SliM-LLM int grid W<b>-OPTS with per-group-column bits
               | "BIN" ["-" GRAN]             binarization (BiLLM / PB-LLM): sign x per-group L2-optimal scale,
                                              the W1-GRAN grid (default g128); :mod:`mixq.algorithms.composite.binary`
               | "VQ" <rate> ["x" <d>] ["-" GRAN]   vector codebook (QuIP# / GPTVQ style): each run of d
                                              consecutive weights of a row (default d = 2) is one of the
                                              2^(d*rate) entries of a fixed Gaussian-optimal codebook times
                                              the group's fp16 scale (default g64); rate a multiple of 1/d,
                                              d*rate <= 8 code bits; combines only with +ip, which it is
                                              meant for; :mod:`mixq.algorithms.composite.vq`
               | "TCQ" <rate> ["L10"] ["-" GRAN]  trellis-coded (QTIP-style bitshift trellis, 1..4 bits a weight
                                              by halves, 5 or 6): each column is one Viterbi-chosen bit string,
                                              a weight decodes from the last 8 bits (``L10``: the last 10,
                                              a larger table, same bits); default channel scales; combines
                                              only with +ip; :mod:`mixq.algorithms.composite.tcq`
    EXT       := "o" <percent> ["w" <bits>]   sparse outliers, <percent> % of the weights (SpQR, SqueezeLLM),
                                              kept in fp16; ``w<bits>`` (BIN bases only, 2..8): PB-LLM's salient
                                              weights on a <bits>-bit symmetric grid with an fp16 scale per row
               | "r" <k>                      BIN only, BiLLM: k salient input columns residual-binarized
                                              (two sign planes, two scales per row)
               | "c" <k>                      OWQ: k whole input columns kept in fp16
               | "sq" <B> ["g" <m>]           SpQR: group scales (and fp16 offsets) quantized to B bits in
                                              second-level groups of m (default 16) consecutive output rows
               | "d" <D>                      BlockDialect-style: each group picks one of D level tables
                                              (NF / FP4 bases; D in 2, 4, 8, 16)
               | "h" <percent> ["w" <bits>]   MixLLM: <percent> % of the output rows at <bits> (default 8);
                                              does not combine with other extensions
               | "ip"                         incoherence processing (QuIP / QuIP#): the weight is stored as
                                              ``W' = Q_out W Q_inᵀ`` with seeded random-sign Hadamard
                                              transforms on both sides and the rest of the spec (base and
                                              other extensions) applied to ``W'``;
                                              :mod:`mixq.algorithms.composite.incoherence`
               | "ip1"                        one-sided: the input transform only, ``W' = W Q_inᵀ``; the output
                                              rows stay the model's own, so a trellis search can weight each
                                              row by its output-gradient energy (:mod:`mixq.algorithms.composite.tcq`)

``SLIM<b>-gN[-asym...]`` (SliM-LLM) is the int grid ``W<b>-gN...`` whose groups of N input columns
(all rows) take b-1, b or b+1 bits, as many b+1 as b-1, so the average is exactly b.

Exact cost of a ``[R, C]`` tensor (:meth:`CompositeSpec.cost`, every term an integer; ``b`` bits,
``K_c`` fp16 columns, ``n = C - K_c`` dense columns, ``G`` group columns = ceil(n / N) for ``gN``
(the last one may be partial when ``K_c > 0``) or 1 for ``channel``, ``ng = R * G`` groups,
``ib = 16 if C <= 65536 else 32`` index bits, ``n2 = G * ceil(R / m)`` second-level groups)::

    codes     R * n * b
    scales    ng * scale_bits                        | sq: ng * B + n2 * 32   (fp16 scale + fp16 offset
    zeros     asym int: ng * b;  asymf: ng * 16      |     per second-level group; asymf offsets alike)
    codebook  kmeans: ng * 2^b * 16
    extra     fp16 columns:  R * K_c * 16 + K_c * ib               (values, column indices)
              outliers:      K_o * (16 + ib) + (R + 1) * 32         (CSR: fp16 values, column indices,
                             K_o = floor(percent * R * C / 100)      int32 row pointers)
              SLIM bit map:  G * 2                                   (one of {b-1, b, b+1} per group column)
              dialects:      ng * log2(D)
              NVFP4 tensor scale: 32
    +h        base.cost((R - k, C)) + hi.cost((k, C)) + k * index_bits(R),   k = floor(percent * R / 100)
    BIN       (``K_r`` residual columns, ``n = C - K_r``, ``G`` group columns over them as above, ``sb`` the
              scale dtype's bits; outliers anywhere, their sign bits still stored)
              codes   R * n + 2 * R * K_r                       (one sign plane; two on the residual columns)
              scales  R * G * sb + 2 * R * sb  (the latter with K_r > 0)
              extra   K_r * ib                                  (residual column indices)
                      K_o * (ob + ib) + (R + 1) * 32 [+ R * 16]  (CSR outliers of ``ob`` bits: 16 = fp16,
                                                                  else ob-bit codes + an fp16 scale per row)

    VQ        codes   R * (C / d) * k        (k = d * rate code bits per d-vector, bit-packed)
              scales  R * G * sb             (the codebook is fixed, never stored)
    TCQ       codes   R * C * rate           (R even at a half rate), scales as VQ (the table is fixed)

    +ip       the cost of the same spec without ``+ip`` plus 64 bits (the two 32-bit seeds of the transforms);
              both R and C must be orders of a constructible Hadamard matrix (:mod:`mixq.hadamard`)
    +ip1      the same with 32 bits (one seed) and only C needing a Hadamard order

(percentages are read as the decimal written: ``0.45`` is exactly 45/10000).  Extensions combine
(``W3-g16+sq3+o0.25`` is SpQR's full recipe) except ``+h``; the base must be a quantized grid with
``channel`` or ``gN`` granularity whose group size divides ``C`` (a composite fits exactly the layers
its base fits).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from fractions import Fraction

from ..granularity import PerGroup
from .protocol import SCALE_BITS, BitCost
from .registry import composite_of, family_of
from .spec import QuantSpec
from .composite_check import FP16_BITS, check_composite

COMPOSITE_VERSION = 1
BASE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(QuantSpec))
ROW_PTR_BITS = 32
IP_SEED_BITS = 32       # +ip: one 32-bit seed per transform (two; +ip1: the input's only)
L2_STATS_BITS = 32      # second-level fp16 scale + fp16 offset
SLIM_MAP_BITS = 2       # per group column: one of {b-1, b, b+1}
SQ_GROUP = 16           # SpQR's second-level group (beta_2)


def index_bits(cols: int) -> int:
    """Bits of one stored column index: int16 (unsigned) up to 65536 columns, else int32."""
    return 16 if cols <= 2**16 else 32


@dataclass(frozen=True)
class CompositeSpec(QuantSpec):
    """A base grid (the inherited :class:`QuantSpec` fields) plus intra-tensor extensions.

    outliers  percent of the weights kept as sparse fp16 values (CSR), e.g. 0.5
    columns   number of input columns kept in fp16 (OWQ)
    sq_bits   second-level bits of the group scales / fp16 offsets (SpQR), 0 = off
    sq_group  rows per second-level group
    slim      SliM-LLM per-group-column bits {b-1, b, b+1} averaging ``bits``
    hi_rows   percent of the output rows stored at ``hi_bits`` (MixLLM), 0 = off
    hi_bits   bits of those rows (same grid family and group size)
    dialects  BlockDialect: each group picks one of this many level tables (a power of two, 0 = off)
    binary    BiLLM / PB-LLM binarization of the dense part (base W1-gN/channel, symmetric, float scale)
    residual  BIN only: input columns residual-binarized (BiLLM's salient columns)
    outlier_bits  bits of a stored outlier: 16 (fp16), or 2..8 (BIN only; symmetric int, fp16 scale per row)
    incoherent    ``+ip``: everything else applies to the weight seen through random Hadamard transforms
    ip_one_sided  ``+ip1``: the input transform only (needs ``incoherent``)
    vq_dim        VQ base: weights per codebook vector (0 = not VQ); ``vq_bits`` the code bits per vector
    trellis       TCQ base: twice its bits per weight (0 = not TCQ)
    state_bits    TCQ base: the trellis state's bits ``L``, 8 or 10 (:mod:`mixq.formats.composite.tcq_codebook`)
    """

    outliers: float = 0.0
    columns: int = 0
    sq_bits: int = 0
    sq_group: int = SQ_GROUP
    slim: bool = False
    hi_rows: float = 0.0
    hi_bits: int = 8
    dialects: int = 0
    binary: bool = False
    residual: int = 0
    outlier_bits: int = FP16_BITS
    incoherent: bool = False
    ip_one_sided: bool = False
    vq_dim: int = 0
    vq_bits: int = 0
    trellis: int = 0
    state_bits: int = 8

    def __post_init__(self):
        super().__post_init__()
        check_composite(self)

    @property
    def vq_rate(self) -> Fraction:
        """Code bits per weight of a VQ base (``vq_bits / vq_dim``)."""
        return Fraction(self.vq_bits, self.vq_dim)

    @property
    def ip_sides(self) -> int:
        """Transforms of an ``+ip`` spec: 2 (both sides), 1 (``+ip1``: the input side), 0 without ``+ip``."""
        return 0 if not self.incoherent else 1 if self.ip_one_sided else 2

    @property
    def weights_rows(self) -> bool:
        """Whether this spec's quantizer uses each output row's weight in the loss (``row_weight``, the measured
        ``G``): a trellis whose rows are the layer's own (no ``+ip`` or ``+ip1``) and ``+h``'s choice of rows."""
        return bool(self.hi_rows) or (bool(self.trellis) and self.ip_sides != 2)

    @property
    def tcq_rate(self) -> Fraction:
        """Bits per weight of a TCQ base."""
        return Fraction(self.trellis, 2)

    # ------------------------------------------------------------------ parts
    @property
    def base(self) -> QuantSpec:
        """The plain spec of the dense part."""
        return QuantSpec(**{k: getattr(self, k) for k in BASE_FIELDS})

    @property
    def inner(self) -> QuantSpec:
        """``+ip``: what is applied to the transformed weight (this spec without ``+ip``: plain when nothing else
        is left); otherwise the spec itself."""
        if not self.incoherent:
            return self
        if self.binary or self.slim or self.outliers or self.columns or self.sq_bits or self.hi_rows or self.dialects \
                or self.vq_dim or self.trellis:
            return replace(self, incoherent=False, ip_one_sided=False)
        return self.base

    @property
    def name(self) -> str:
        head = self.base.name
        if self.slim:
            head = "SLIM" + head[1:]  # W3-g64 -> SLIM3-g64
        if self.binary:
            head = "BIN" + head[2:]  # W1-g64 -> BIN-g64
        if self.vq_dim:  # W3-g64 -> VQ2.5-g64 (d = 2), VQ2x4-g64 (d = 4)
            rate = self.vq_rate
            r = str(rate.numerator) if rate.denominator == 1 else repr(float(rate))
            head = f"VQ{r}" + ("" if self.vq_dim == 2 else f"x{self.vq_dim}") + head[len(f"W{self.bits}"):]
        if self.trellis:  # W3-channel -> TCQ2.5-channel
            r = str(self.trellis // 2) if self.trellis % 2 == 0 else repr(self.trellis / 2)
            head = f"TCQ{r}" + ("" if self.state_bits == 8 else f"L{self.state_bits}") + head[len(f"W{self.bits}"):]
        ext = []
        if self.sq_bits:
            ext.append(f"sq{self.sq_bits}" + ("" if self.sq_group == SQ_GROUP else f"g{self.sq_group}"))
        if self.columns:
            ext.append(f"c{self.columns}")
        if self.residual:
            ext.append(f"r{self.residual}")
        if self.outliers:
            ext.append("o" + _fmt_pct(self.outliers) + ("" if self.outlier_bits == FP16_BITS else f"w{self.outlier_bits}"))
        if self.dialects:
            ext.append(f"d{self.dialects}")
        if self.hi_rows:
            ext.append("h" + _fmt_pct(self.hi_rows) + ("" if self.hi_bits == 8 else f"w{self.hi_bits}"))
        if self.incoherent:
            ext.append("ip1" if self.ip_one_sided else "ip")
        return "+".join([head, *ext])

    def n_outliers(self, shape: tuple[int, int]) -> int:
        """``floor(percent * R * C / 100)`` on the decimal written (``0.45`` is 45/100 exactly)."""
        r, c = int(shape[0]), int(shape[1])
        return math.floor(Fraction(repr(self.outliers)) * r * c / 100)

    @property
    def dialect_bits(self) -> int:
        return self.dialects.bit_length() - 1 if self.dialects else 0

    def n_hi_rows(self, shape: tuple[int, int]) -> int:
        """``floor(percent * R / 100)`` output rows at ``hi_bits``."""
        return math.floor(Fraction(repr(self.hi_rows)) * int(shape[0]) / 100)

    @property
    def hi_spec(self) -> QuantSpec:
        """The plain spec of the high-precision rows (``+h``)."""
        return QuantSpec(**{k: getattr(self, k) for k in BASE_FIELDS if k != "bits"}, bits=self.hi_bits)

    def layout(self, shape: tuple[int, int]) -> tuple[int, list[tuple[int, int]]]:
        """``(n, bounds)``: dense column count and the group columns' ``[start, end)`` in the dense part."""
        r, c = int(shape[0]), int(shape[1])
        self.base.cost((r, c))  # the base must fit the full shape (raises ValueError otherwise)
        apart = self.columns + self.residual
        if apart >= c:
            raise ValueError(f"{apart} {'fp16' if self.columns else 'residual'} columns leave no dense column "
                             f"of a {c}-wide row")
        n = c - apart
        g = self.granularity.size if isinstance(self.granularity, PerGroup) else n
        return n, [(s, min(s + g, n)) for s in range(0, n, g)]

    # ------------------------------------------------------------------ accounting
    def cost(self, shape: tuple[int, int]) -> BitCost:
        """Exact bits of a ``[R, C]`` tensor (formulas in the module docstring)."""
        r, c = int(shape[0]), int(shape[1])
        if self.incoherent:
            from ..hadamard import hadamard_orders

            for n, side in ((c, "input"), (r, "output"))[:self.ip_sides]:
                if hadamard_orders(n) is None:
                    raise ValueError(f"+ip needs a Hadamard matrix of order {n} ({side} side); none is constructible "
                                     "(orders are 2^k times a Paley order): drop +ip for this layer")
            return self.inner.cost((r, c)) + BitCost(0, 0, extra=IP_SEED_BITS * self.ip_sides)
        if self.hi_rows:  # the two row sets are plain tensors, plus the high rows' indices
            self.base.cost((r, c))
            k = self.n_hi_rows((r, c))
            lo = self.base.cost((r - k, c)) if k < r else BitCost(0, 0)
            hi = self.hi_spec.cost((k, c)) if k else BitCost(0, 0)
            return lo + hi + BitCost(0, 0, extra=k * index_bits(r))
        if self.binary:
            return self._binary_cost(r, c)
        if self.vq_dim:
            n, bounds = self.layout((r, c))
            if c % self.vq_dim:
                raise ValueError(f"{self.name}: {c} columns are not whole {self.vq_dim}-vectors")
            return BitCost(r * c, r * (c // self.vq_dim) * self.vq_bits, r * len(bounds) * SCALE_BITS[self.scale_dtype])
        if self.trellis:
            n, bounds = self.layout((r, c))
            if self.trellis % 2 and r % 2:
                raise ValueError(f"{self.name}: a half-bit rate codes rows in pairs; {r} rows are odd")
            return BitCost(r * c, r * c * self.trellis // 2, r * len(bounds) * SCALE_BITS[self.scale_dtype])
        n, bounds = self.layout((r, c))
        G = len(bounds)
        ng = r * G
        ib = index_bits(c)
        n2 = G * -(-r // self.sq_group)
        codes = r * n * self.bits
        scales = ng * self.sq_bits + n2 * L2_STATS_BITS if self.sq_bits else ng * SCALE_BITS[self.scale_dtype]
        zeros = 0
        if not self.symmetric:  # only families that store zero points validate asymmetric
            if self.zero_dtype == "int":
                zeros = ng * self.bits
            else:
                zeros = ng * self.sq_bits + n2 * L2_STATS_BITS if self.sq_bits else ng * FP16_BITS
        codebook = ng * self.n_levels * FP16_BITS if "codebook" in family_of(self).params(self) else 0
        extra = 32 if self.tensor_scale else 0
        if self.columns:
            extra += r * self.columns * FP16_BITS + self.columns * ib
        k = self.n_outliers((r, c))
        if k > r * n:
            raise ValueError(f"{k} outliers do not fit in {r}x{n} dense weights")
        if self.outliers:
            extra += k * (FP16_BITS + ib) + (r + 1) * ROW_PTR_BITS
        if self.slim:
            extra += G * SLIM_MAP_BITS
        if self.dialects:
            extra += ng * self.dialect_bits
        return BitCost(r * c, codes, scales, zeros, codebook, extra)

    def _binary_cost(self, r: int, c: int) -> BitCost:
        n, bounds = self.layout((r, c))
        k, sb, ib = self.residual, SCALE_BITS[self.scale_dtype], index_bits(c)
        codes = r * n + 2 * r * k
        scales = r * len(bounds) * sb + (2 * r * sb if k else 0)
        extra = k * ib
        ko = self.n_outliers((r, c))
        if self.outliers:
            extra += ko * (self.outlier_bits + ib) + (r + 1) * ROW_PTR_BITS
            if self.outlier_bits != FP16_BITS:
                extra += r * FP16_BITS
        return BitCost(r * c, codes, scales, 0, 0, extra)

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict:
        return {"_type": "CompositeSpec", "_version": COMPOSITE_VERSION, "base": self.base.to_dict(),
                "outliers": self.outliers, "columns": self.columns, "sq_bits": self.sq_bits,
                "sq_group": self.sq_group, "slim": self.slim, "hi_rows": self.hi_rows, "hi_bits": self.hi_bits,
                "dialects": self.dialects, "binary": self.binary, "residual": self.residual,
                "outlier_bits": self.outlier_bits, **({"incoherent": True} if self.incoherent else {}),
                **({"ip_one_sided": True} if self.ip_one_sided else {}),
                **({"vq_dim": self.vq_dim, "vq_bits": self.vq_bits} if self.vq_dim else {}),
                **({"trellis": self.trellis} if self.trellis else {}),
                **({"state_bits": self.state_bits} if self.state_bits != 8 else {})}

    @classmethod
    def from_dict(cls, d: dict) -> "CompositeSpec":
        if not isinstance(d, dict) or d.get("_type") != "CompositeSpec":
            raise ValueError(f"not a CompositeSpec dict: {d!r}")
        if d.get("_version") != COMPOSITE_VERSION:
            raise ValueError(f"CompositeSpec version {d.get('_version')} is not supported "
                             f"(this mixq reads {COMPOSITE_VERSION})")
        ext = ("outliers", "columns", "sq_bits", "sq_group", "slim", "hi_rows", "hi_bits", "dialects", "binary",
               "residual", "outlier_bits", "incoherent", "ip_one_sided", "vq_dim", "vq_bits", "trellis", "state_bits")
        unknown = set(d) - {"_type", "_version", "base", *ext}
        if unknown:
            raise ValueError(f"unknown CompositeSpec fields {sorted(unknown)}")
        return extend(QuantSpec.from_dict(d["base"]), **{k: d[k] for k in ext if k in d})


def extend(base: QuantSpec, **ext) -> CompositeSpec:
    """A composite from a plain base spec and extension fields (:func:`mixq.config.compose` takes names too)."""
    if isinstance(base, CompositeSpec):
        raise ValueError(f"{base.name} is already a composite")
    return CompositeSpec(**{k: getattr(base, k) for k in BASE_FIELDS}, **ext)


def is_composite(spec) -> bool:
    """Whether an intra-tensor composite family (built in or registered) claims ``spec``."""
    return composite_of(spec) is not None


def _fmt_pct(p: float) -> str:
    s = repr(float(p))
    return s[:-2] if s.endswith(".0") else s
