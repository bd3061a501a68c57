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
``grid_storage``  bit-packing at the accounted size of the grid composites (:func:`pack_grid`) and of ``+h`` row splits
                  (:func:`pack_rows`); ``binary_storage``: of BIN bases

Nothing here imports :mod:`mixq.algorithms` or :mod:`mixq.runtime` (``tests/test_house.py`` checks it).  The ``+ip``
stored tensor (:class:`~mixq.algorithms.composite.incoherence.IncoherentQTensor`) stays with its transforms (decoding
it runs them, natively through :mod:`mixq.runtime.kernels.kron_cpu`), so the one dispatch over every family's pack /
unpack (``pack_composite``, ``unpack_composite``) and the stored form of a composite weight (``PackedComposite``,
``stored_form``, ``pack_layer``) are in :mod:`mixq.algorithms.composite.families` and
:mod:`mixq.algorithms.composite.storage`, and the layers that run them in :mod:`mixq.runtime.layers` (``make_layer``,
``install_layers``).
"""
