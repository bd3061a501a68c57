"""Deployment runtime: bit-packed weights, ``QuantLinear`` and its kernels.

``bitpack``   pack / unpack b-bit codes (1..8, little-endian bit stream), params in their stored
              dtypes, :class:`PackedWeight` (a QTensor at its accounted size)
``qlinear``   :class:`QuantLinear` (packed buffers, kernel registry), :func:`quantize_to_qlinear`,
              :func:`install_qlinear` (from packed weights, e.g. a native checkpoint), :func:`memory_report`
``kernels``   ``reference`` (dequantize + F.linear, always) and fast paths checked against it
              (``cpu-int4``, ``cpu-int4-exact``)
``generate``  :func:`greedy_generate`: timed greedy decoding with a KV cache
"""
from .bitpack import (
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
