"""Quantization specs: what one tensor stores, its exact bit cost, and the one name grammar.

``spec``       :class:`QuantSpec` (plain element grids), :class:`BitCost`, canonical names, presets
``composite``  :class:`CompositeSpec` (intra-tensor composites: a plain base plus extensions) and its cost
``grammar``    :func:`parse_spec`: every spec name, plain or composite (``W4-g128``, ``W3-g64+o0.5``), and
               :func:`compose`

Imports run one way: ``spec`` -> ``composite`` -> ``grammar``.
"""
from .composite import CompositeSpec, index_bits, is_composite
from .grammar import compose, parse_spec
from .spec import DTYPES, FLOAT_DTYPES, KEEP_DTYPES, PRESETS, SCALE_BITS, SPEC_VERSION, BitCost, QuantSpec, spec_name

__all__ = [
    "BitCost", "CompositeSpec", "DTYPES", "FLOAT_DTYPES", "KEEP_DTYPES", "PRESETS", "QuantSpec", "SCALE_BITS",
    "SPEC_VERSION", "compose", "index_bits", "is_composite", "parse_spec", "spec_name",
]
