"""Intra-tensor composites, how they are quantized: mixed precisions inside one weight (RTN and GPTQ).

The specs are in :mod:`mixq.config`, the stored tensors and bit-packed forms in :mod:`mixq.formats.composite`, the
layers and kernels in :mod:`mixq.runtime`; the ``intra`` / ``default+intra`` candidate sets are
:mod:`mixq.allocate.intra_candidates`.  Nothing is imported here: import each name from its module.

``quant``       :func:`quantize_composite` (RTN / GPTQ) -> :class:`~mixq.formats.composite.qtensor.CompositeQTensor`:
                fp16 columns (OWQ); ``selection``: sparse outliers (SpQR / SqueezeLLM), SliM-LLM group bits;
                ``dense``: the dense part (RTN, GPTQ, weighted k-means as SqueezeLLM); ``importance``: the
                per-weight importances they fit and select by
``rows``        MixLLM high-precision output rows (``+hP``)
                -> :class:`~mixq.formats.composite.rows_tensor.RowSplitQTensor`
``binary``      BiLLM / PB-LLM binarization (``BIN-gN`` bases, ``+r`` residual columns, ``+o..w8``)
                -> :class:`~mixq.formats.composite.binary_tensor.BinaryQTensor`
``incoherence`` ``+ip``: QuIP-style random Hadamard transforms on both sides -> :class:`IncoherentQTensor` (its stored
                parts, here because they decode through the transforms)
``vq``          ``VQ<rate>[x<d>]-GRAN`` bases (for ``+ip``): fixed codebooks
                (:mod:`mixq.formats.composite.vq_codebook`), RTN and GPTQ with vector feedback
                -> :class:`~mixq.formats.composite.vq_storage.VQQTensor`
                (layer: :class:`~mixq.runtime.vq_linear.VQLinear`)
``tcq``         ``TCQ<rate>-GRAN`` bases (for ``+ip``): a QTIP-style bitshift trellis down each column
                (:mod:`mixq.formats.composite.tcq_codebook`), RTN and column-exact GPTQ
                -> :class:`~mixq.formats.composite.tcq_storage.TCQQTensor`
                (layer: :class:`~mixq.runtime.tcq_linear.TCQLinear`)
``vq_search``   the VQ codebooks' nearest-entry search (native C: :mod:`mixq.runtime.kernels.vq_cpu`) and how the
                committed codebooks are made (Lloyd); ``tcq_search``: the trellis's Viterbi search (native C:
                :mod:`mixq.runtime.kernels.tcq_cpu`) and how its tables are trained
``hooks``       :func:`quantize_layer`: the one dispatch from any spec (plain or composite) to its quantizer,
                what ``quantize_model`` calls per layer; :func:`composite_weight` for the measurement driver
``families``    the composite families' implementations (:func:`impl`: quantize, pack, unpack; a registered
                :class:`~mixq.config.CompositeFormat` brings its own): :func:`pack_composite` /
                :func:`unpack_composite` (bit-packed at the accounted size, each family through its module of
                :mod:`mixq.formats.composite`, ``+ip`` here), ``pack_parts`` / ``unpack_parts`` for any spec
``storage``     :class:`PackedComposite` (what the native directory and the walk checkpoint store),
                :func:`stored_form` (it or :class:`~mixq.formats.bitpack.PackedWeight`, by spec), :func:`pack_layer`
                (their layers: :mod:`mixq.runtime.layers`)
"""
