"""Quantization specs: what one tensor stores, its exact bit cost, and the one name grammar.

``protocol``   :class:`ElementFormat` (what one element-format family knows: names, cost, stored tensors,
               kernels, export mappings), :class:`Export`, :class:`BitCost`
``families``   the built-in families: int, NF, k-means, minifloat, MX, NVFP4, float keep, and (``ggml_types``)
               llama.cpp's K-quants and IQ4_NL
``registry``   :func:`register` a family; :func:`family_of` a spec; the lookups the rest of mixq uses
``spec``       :class:`QuantSpec` (plain element grids): validation, cost and names through its family; presets
``composite``  :class:`CompositeSpec` (intra-tensor composites: a plain base plus extensions) and its cost
``grammar``    :func:`parse_spec`: every spec name, plain or composite (``W4-g128``, ``W3-g64+o0.5``), and
               :func:`compose`

Imports run one way: ``protocol``, ``composite_protocol`` -> ``ggml_types`` -> ``families`` -> ``registry`` -> ``spec``
-> ``composite`` -> ``composite_families``, ``grammar``.
"""
from .composite import CompositeSpec, index_bits, is_composite
from .composite_families import BUILTIN as BUILTIN_COMPOSITES
from .composite_protocol import CompositeFormat
from .families import FLOAT_DTYPES, KEEP_DTYPES
from .grammar import compose, parse_spec
from .protocol import SCALE_BITS, BitCost, ElementFormat, Export
from .registry import composite_of, family_of, register
from .spec import PRESETS, SPEC_VERSION, QuantSpec, spec_name

__all__ = [
    "BUILTIN_COMPOSITES", "BitCost", "CompositeFormat", "CompositeSpec", "ElementFormat", "Export", "FLOAT_DTYPES",
    "KEEP_DTYPES", "PRESETS", "QuantSpec", "SCALE_BITS", "SPEC_VERSION", "composite_of", "compose", "family_of",
    "index_bits", "is_composite", "parse_spec", "register", "spec_name",
]
