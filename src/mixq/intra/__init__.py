"""Intra-tensor mixed precision: composite specs that mix precisions inside one weight.

The specs themselves (:class:`~mixq.config.CompositeSpec`, their grammar and exact cost) live in
:mod:`mixq.config` with the plain ones; this package quantizes and stores them, and :mod:`mixq.runtime` runs
them (``composite_linear``, ``vq_linear``, ``tcq_linear`` and their kernels in ``runtime/kernels``).

``quant``       :func:`quantize_composite` (RTN / GPTQ) -> :class:`CompositeQTensor` (``qtensor``), ``Ŵ``:
                fp16 columns (OWQ); ``selection``: sparse outliers (SpQR / SqueezeLLM), SliM-LLM group bits;
                ``dense``: the dense part (RTN, GPTQ, weighted k-means as SqueezeLLM); ``second_level``:
                second-level scales (SpQR)
``sparse``      :class:`CSR` storage of fp16 outliers
``dialects``    BlockDialect-style per-block level tables (``+dD``)
``rows``        MixLLM high-precision output rows (``+hP``) -> :class:`RowSplitQTensor`
``binary``      BiLLM / PB-LLM binarization (``BIN-gN`` bases, ``+r`` residual columns, ``+o..w8``)
                -> :class:`BinaryQTensor` (``binary_tensor``), stored by ``binary_storage``
``incoherence`` ``+ip``: QuIP-style random Hadamard transforms on both sides -> :class:`IncoherentQTensor`
``vq``          ``VQ<rate>[x<d>]-GRAN`` bases (for ``+ip``): fixed Gaussian-optimal codebooks (``vq_codebook``,
                ``vq_tables``), RTN and GPTQ with vector feedback -> :class:`VQQTensor` (layer:
                :class:`~mixq.runtime.vq_linear.VQLinear`)
``tcq``         ``TCQ<rate>-GRAN`` bases (for ``+ip``): a QTIP-style bitshift trellis down each column with trained
                tables (``tcq_codebook``, ``tcq_tables``), the Viterbi search (native C:
                :mod:`mixq.runtime.kernels.tcq_cpu`) for RTN and column-exact GPTQ -> :class:`TCQQTensor` (layer:
                :class:`~mixq.runtime.tcq_linear.TCQLinear`)
``families``    the composite families' implementations (:func:`~mixq.intra.families.impl`: quantize, pack,
                unpack, layer; a registered :class:`~mixq.config.CompositeFormat` brings its own):
                :func:`pack_composite` / :func:`unpack_composite` (bit-packed at the accounted size; grids and
                ``+h``: ``grid_storage``), :func:`make_layer` / :func:`install_layers` (any stored weight's module)
``storage``     :class:`PackedComposite` (what the native directory stores), :func:`stored_form` (it or
                :class:`~mixq.runtime.PackedWeight`, by spec), :func:`pack_layer`
``candidates``  :func:`intra_candidates` (the ``intra`` / ``default+intra`` sets: :mod:`mixq.allocate.candidates`)
``hooks``       :func:`quantize_layer`: the one dispatch from any spec (plain or composite) to its quantizer,
                what ``quantize_model`` calls per layer; :func:`composite_weight` for the measurement driver
"""
from .binary_tensor import BinaryQTensor
from .candidates import INTRA_CANDIDATE_NAMES, intra_candidates
from .hooks import composite_weight, quantize_layer
from .qtensor import CompositeQTensor
from .quant import dequantize_composite, quantize_composite
from .rows import RowSplitQTensor
from .sparse import CSR
from .families import install_layers, make_layer, pack_composite, unpack_composite
from .storage import PackedComposite, pack_layer, stored_form
from .incoherence import IncoherentQTensor
from .tcq import TCQQTensor
from .vq import VQQTensor

__all__ = [
    "BinaryQTensor", "CSR", "CompositeQTensor", "INTRA_CANDIDATE_NAMES", "IncoherentQTensor",
    "PackedComposite", "RowSplitQTensor", "composite_weight", "dequantize_composite",
    "install_layers", "intra_candidates", "make_layer",
    "pack_composite", "pack_layer", "quantize_composite", "quantize_layer", "stored_form",
    "unpack_composite", "TCQQTensor", "VQQTensor",
]
