"""Composite candidates for the allocator, next to the plain specs.

:func:`intra_candidates` returns a modest set of composites between about 2.3 and 4.4 bpw (each
one a published intra-tensor recipe at its usual setting); :func:`mixq.allocate.extended_candidates`
appends them to the default plain set, and the candidate-file loader accepts the set names ``intra``
and ``default+intra`` (``mixq measure --candidates default+intra``; :mod:`mixq.allocate.candidates`).

Bits per weight of the ``default`` set on SmolLM2's shapes (576x576 / 1536x576 / 576x1536), every
stored bit counted (:meth:`CompositeSpec.cost`):

==========================  ==================  ===============================================
composite                   bpw                 recipe
==========================  ==================  ===============================================
``SLIM2-g64-asym``          2.28                SliM-LLM: 1/2/3-bit group columns, mean 2
``W2-g64-asym+o0.5``        2.50 / 2.50 / 2.46  2-bit grid + 0.5 % fp16 outliers (SpQR-style CSR)
``SLIM3-g64``               3.25                SliM-LLM: 2/3/4-bit group columns, mean 3
``NF3-g64+d4``              3.28                BlockDialect-style: 4 NF3-width tables per block
``W3-g16+sq3``              3.31                SpQR: groups of 16, 3-bit second-level scales
``W3-g64+c8``               3.43 / 3.43 / 3.32  OWQ: 8 fp16 input columns
``W3-g64+o0.5``             3.47 / 3.47 / 3.43  3-bit grid + 0.5 % fp16 outliers
``KM3-channel+o0.45``       3.42 / 3.42 / 3.25  SqueezeLLM: weighted k-means + 0.45 % outliers
``W3-g64+h5``               3.49 / 3.50 / 3.49  MixLLM: 5 % of output rows at 8 bits
``W4-g64+o0.25``            4.39 / 4.39 / 4.35  4-bit grid + 0.25 % fp16 outliers
==========================  ==================  ===============================================

``small`` keeps 4 of them; ``all`` adds 10 combinations and siblings (SpQR's full
``W3-g16-asym+sq3+o0.25``, ``W3-g64+c8+o0.25``, ``NF4-g64+d8``, ``W4-g64+h10``, ...) and three
binarized ones (:mod:`mixq.algorithms.composite.binary`) below 2 bpw:

==========================  ==================  ===============================================
``BIN-g64+r32``             1.36 / 1.36 / 1.29  BiLLM: signs + 32 residual-binarized salient columns
``BIN-g192+r32+o1w8``       1.52 / 1.52 / 1.40  BiLLM columns + 1 % salient weights at 8 bits
``BIN-g64+o2w8``            1.81 / 1.81 / 1.76  PB-LLM: 2 % salient weights at 8 bits
==========================  ==================  ===============================================
  The 2-bit
grids are minmax like the plain default set (a controlled comparison); ``-mse`` variants
(``W2-g64-asym-mse+o0.5``, in ``all``) cost the same bits and err much less at 2 bits.
"""
from __future__ import annotations

from ..config import QuantSpec
from ..config import parse_spec

INTRA_CANDIDATE_NAMES: dict[str, tuple[str, ...]] = {
    "small": ("SLIM3-g64", "W3-g16+sq3", "W3-g64+o0.5", "KM3+o0.45"),
    "default": ("W2-g64-asym+o0.5", "SLIM2-g64-asym", "SLIM3-g64", "NF3-g64+d4", "W3-g16+sq3", "W3-g64+c8",
                "W3-g64+o0.5", "KM3+o0.45", "W3-g64+h5", "W4-g64+o0.25"),
}
INTRA_CANDIDATE_NAMES["all"] = INTRA_CANDIDATE_NAMES["default"] + (
    "W3-g16-asym+sq3+o0.25", "W2-g16-asym+sq3+o0.5", "SLIM3-g64+o0.25", "W3-g64+c8+o0.25", "KM4+o0.45",
    "SLIM4-g64", "W2-g64-asym+h10", "W4-g64+h10", "NF4-g64+d8", "W2-g64-asym-mse+o0.5",
    "BIN-g64+r32", "BIN-g192+r32+o1w8", "BIN-g64+o2w8")


def intra_candidates(level: str = "default") -> list[QuantSpec]:
    """The composite candidates of ``level`` (``small`` 4, ``default`` 10, ``all`` 23)."""
    if level not in INTRA_CANDIDATE_NAMES:
        raise ValueError(f"unknown intra candidate level {level!r}: choose one of {', '.join(INTRA_CANDIDATE_NAMES)}")
    return [parse_spec(n) for n in INTRA_CANDIDATE_NAMES[level]]
