"""Deployment runtime: ``QuantLinear`` and its kernels over bit-packed weights.

The bit-packing itself (``pack`` / ``unpack``, ``pack_params`` / ``unpack_params``, :class:`PackedWeight`) is
:mod:`mixq.formats.bitpack`; its names are also importable from here.

``qlinear``   :class:`QuantLinear` (packed buffers, kernel registry), :func:`quantize_to_qlinear`,
              :func:`install_qlinear` (from packed weights, e.g. a native checkpoint), :func:`memory_report`
``kernels``   ``reference`` (dequantize + F.linear, always) and fast paths checked against it
              (``cpu-int4``, ``cpu-int4-exact``)
``generate``  :func:`greedy_generate`: timed greedy decoding with a KV cache, through ``lean_decode`` (mixq's own
              forward of Llama-shaped families, the block glue in native calls: ``kernels/glue_cpu``) where it
              can run the model, else transformers' forward
``dense_gemv`` :func:`use_gemv`: a packed model's full-precision bf16 linears (the head) decode one token through
              ``torch.mv`` (the same bits, about twice as fast on CPU)

Layers of intra-tensor composites (:mod:`mixq.formats.composite`; not imported here: ``composite_linear`` runs the
``+ip`` transforms of :mod:`mixq.algorithms.composite.incoherence`):

``layers``              :func:`make_layer` (the module that runs any stored weight: a :class:`QuantLinear`, or its
                        composite family's layer below) and :func:`install_layers` (all of them into a model)

``composite_linear``    :class:`CompositeLinear` (dequantized per call, the reference path) and
                        :class:`IncoherentLinear` (``+ip``: two fast transforms around the inner layer)
``packed_codes_linear`` :class:`PackedCodesLinear`, the shared base of the codebook layers
``vq_linear``           :class:`VQLinear` (kernels ``kernels/vq_cpu``, native C, and ``kernels/vq_triton``)
``tcq_linear``          :class:`TCQLinear` (kernels ``kernels/tcq_cpu`` with its C sources ``kernels/tcq_csrc``
                        and ``kernels/tcq_gemv_csrc``, and ``kernels/tcq_triton``)

Activations and the KV cache in the forward pass (not imported here: they pull in ``transformers``' cache):

``act_quant``    simulated activation quantization: one forward pre-hook per chosen linear
                 (:func:`apply_act_quant`; the formats are :mod:`mixq.formats.act`)
``act_outliers`` LLM.int8() fp columns, Atom/QUIK high-precision channels, the rotate → smooth order
``kv_codec``     how cache tokens are quantized: KIVI grids, important tokens (MiKV), pre-RoPE keys,
                 Hadamard rotation — shared by the cache and the simulation
``kv_cost``      the cache's exact bit / byte count; per-layer K/V widths
``kv_settings``  :class:`KVSettings` (the KIVI layout and options), its ``--kv`` names, per-layer K/V costs
``kv_cache``     :class:`KIVICache` for Hugging Face generation
``kv_feed``      :func:`kv_cache_feed` (attention probabilities / rotary tables for the cache) and
                 :func:`decode_logits` (prefill, then chunk by chunk through a cache)
``kv_sim``       an exact one-forward decode simulation of the KIVI cache (:func:`simulate_kivi`)
"""
from ..formats.bitpack import (
    PARAM_FIELDS,
    PackedWeight,
    pack,
    pack_params,
    packed_len,
    packed_nbits,
    param_fields,
    unpack,
    unpack_params,
)
from .generate import GenerateResult, greedy_generate
from .kernels import (
    ALIASES,
    AUTO_ORDER,
    KERNELS,
    Kernel,
    KernelUnsupported,
    canonical_name,
    fast_kernel_for,
    get_kernel,
    kernel_names,
    pick_kernel,
    select_kernel,
    usable_kernels,
)
from .qlinear import QuantLinear, install_qlinear, kernel_usage, memory_report, quantize_to_qlinear

__all__ = [
    "PARAM_FIELDS", "PackedWeight", "pack", "unpack", "packed_len", "packed_nbits", "pack_params", "unpack_params",
    "param_fields", "ALIASES", "AUTO_ORDER", "KERNELS", "Kernel", "KernelUnsupported", "canonical_name",
    "fast_kernel_for", "get_kernel", "kernel_names", "pick_kernel", "select_kernel", "usable_kernels",
    "QuantLinear", "install_qlinear", "kernel_usage", "memory_report", "quantize_to_qlinear",
    "GenerateResult", "greedy_generate",
]
