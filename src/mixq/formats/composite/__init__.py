"""Intra-tensor composites, what they store and decode: mixed precisions inside one weight.

The specs themselves (:class:`~mixq.config.CompositeSpec`, their grammar and exact cost) live in :mod:`mixq.config`
with the plain ones; :mod:`mixq.algorithms.composite` quantizes them, this package holds their stored tensors and
bit-packed forms, and :mod:`mixq.runtime` runs them (``composite_linear``, ``vq_linear``, ``tcq_linear`` and their
kernels in ``runtime/kernels``).  Nothing is imported here: import each name from its module.

``qtensor``       :class:`CompositeQTensor`, ``Ŵ`` of a grid composite (fp16 columns, sparse outliers, SliM group
                  bits, dialects, second-level scales)
``sparse``        :class:`CSR` storage of fp16 outliers
``dialects``      BlockDialect-style per-block level tables (``+dD``)
``second_level``  second-level scales (SpQR)
``binary_tensor`` :class:`BinaryQTensor` (BiLLM / PB-LLM binarization), stored by ``binary_storage``
``rows_tensor``   :class:`RowSplitQTensor` (MixLLM ``+h`` rows), stored by ``grid_storage``
``vq_storage``    :class:`VQQTensor` (``VQ`` bases): decoding through the codebook, ``pack_vq`` / ``unpack_vq``
``tcq_storage``   :class:`TCQQTensor` (``TCQ`` bases): decoding through the trellis, ``pack_tcq`` / ``unpack_tcq``
``scales``        the codebook and sign bases' (VQ, TCQ, BIN) scale dtypes, group lengths and scale rounding
``vq_codebook``   fixed Gaussian-optimal codebooks of ``VQ`` bases, committed in ``vq_tables`` (made, and searched,
                  by :mod:`mixq.algorithms.composite.vq_search`)
``tcq_codebook``  the bitshift trellis of ``TCQ`` bases and its trained tables, committed in ``tcq_tables`` (trained,
                  and searched with Viterbi, by :mod:`mixq.algorithms.composite.tcq_search`)
``families``      the composite families' implementations (:func:`~mixq.formats.composite.families.impl`:
                  quantize, pack, unpack, layer; a registered :class:`~mixq.config.CompositeFormat` brings its own):
                  :func:`pack_composite` / :func:`unpack_composite` (bit-packed at the accounted size; grids and
                  ``+h``: ``grid_storage``), :func:`make_layer` / :func:`install_layers` (any stored weight's module)
``storage``       :class:`PackedComposite` (what the native directory stores), :func:`stored_form` (it or
                  :class:`~mixq.runtime.PackedWeight`, by spec), :func:`pack_layer`

One stored tensor stays in the module of its quantizer, in :mod:`mixq.algorithms.composite`:
:class:`IncoherentQTensor` (``incoherence``; packed by ``families``).  So ``families`` imports that module: this
package is not below :mod:`mixq.algorithms.composite` in the import graph.
"""
