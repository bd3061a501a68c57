"""Deployment runtime: bit-packed weights, ``QuantLinear`` and its kernels.

``bitpack``   pack / unpack b-bit codes (1..8, little-endian bit stream), params in their stored
              dtypes, :class:`PackedWeight` (a QTensor at its accounted size)
``qlinear``   :class:`QuantLinear` (packed buffers, kernel registry), :func:`quantize_to_qlinear`
``kernels``   ``reference`` (dequantize + F.linear, always) and fast paths checked against it
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
from .kernels import (
    AUTO_ORDER,
    KERNELS,
    Kernel,
    KernelUnsupported,
    get_kernel,
    pick_kernel,
    select_kernel,
    usable_kernels,
)
from .qlinear import QuantLinear, quantize_to_qlinear

__all__ = [
    "PARAM_FIELDS", "PackedWeight", "pack", "unpack", "packed_len", "packed_nbits", "pack_params", "unpack_params",
    "param_fields", "AUTO_ORDER", "KERNELS", "Kernel", "KernelUnsupported", "get_kernel", "pick_kernel",
    "select_kernel", "usable_kernels",
    "QuantLinear", "quantize_to_qlinear",
]
