"""What values are representable: pure tensor functions over rows ``[R, n]`` (no nn.Module).

``base``       QTensor, fit / encode / decode dispatch, quantize / dequantize / fake_quantize
``params``     QParams (per-row parameters; the format modules below build them)
``integer``    uniform int grids (sym GPTQ-style, asym with int zero or fp16 offset, binary)
``lut``        NormalFloat NF2/NF3/NF4 and per-row k-means codebooks
``floatgrid``  minifloat elements as a weight format (one scale per row)
``minifloat``  bit-exact FP8 E4M3/E5M2, FP6 E3M2/E2M3, FP4 E2M1 (the element codec)
``kquant``     llama.cpp's K-quants (two-level super-block scales); ``iq4nl``: its IQ4_NL table
``mx``         scale storage: float, E8M0 (OCP MX), E4M3 block + fp32 tensor scale (NVFP4)
``act``        activation formats: ``parse_act_spec`` / W/A presets, ``fake_quant_act`` on ``[T, n]`` (not imported here)
``bitpack``    b-bit code streams and params at their stored size, :class:`PackedWeight` (a QTensor at its accounted
               size, what the runtime and the native directory hold; not imported here)

Imports run one way: ``base`` -> ``integer`` / ``lut`` / ``floatgrid`` -> ``mx`` -> ``minifloat``; all use ``params``.
"""
from .base import (
    QTensor,
    column_params,
    compute_tensor_scale,
    decode,
    dequantize,
    encode,
    fake_quantize,
    fit,
    quantize,
    round_to_grid,
)
from .lut import NF4, nf_levels, normal_float_levels
from .minifloat import FORMATS as FLOAT_FORMATS
from .minifloat import FloatFormat, bits_to_float, float_to_bits, levels, round_to_format, value_table
from .mx import e4m3_round, e8m0_ceil, e8m0_exponent, e8m0_floor, round_scale
from .params import QParams

__all__ = [
    "QParams", "QTensor", "fit", "encode", "decode", "round_to_grid", "compute_tensor_scale", "column_params",
    "quantize", "dequantize", "fake_quantize",
    "NF4", "nf_levels", "normal_float_levels",
    "FLOAT_FORMATS", "FloatFormat", "float_to_bits", "bits_to_float", "levels", "round_to_format", "value_table",
    "e8m0_floor", "e8m0_ceil", "e8m0_exponent", "e4m3_round", "round_scale",
]
