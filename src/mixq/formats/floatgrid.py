"""Minifloat elements (:mod:`.minifloat`) as a weight format.

With ``dtype`` ``fp8_*``, ``fp6_*`` or ``fp4_*`` each row ``x`` (one group) gets one scale and is
stored as ``codes = bits(x / scale)``, ``x̂ = scale * value(codes)``:

* float scales (fp16/bf16/fp32):  ``scale = absmax / max_elem``
* e8m0 (MX, OCP MX §6.3):         ``scale = 2^(floor(log2 absmax) - emax_elem)``
* e4m3 (NVFP4):                   ``scale = e4m3(absmax / max_elem / ts) * ts``  (see :mod:`.mx`)
"""
from __future__ import annotations

import torch

from .minifloat import bits_to_float, float_to_bits, get_format
from .mx import e8m0_floor, round_scale
from .params import QParams


def scale_unit(spec) -> float:
    """``absmax / scale`` under minmax with a float scale: the format's largest value."""
    return get_format(spec.dtype).max


def fit(rows: torch.Tensor, spec, shrink: float = 1.0, tensor_scale=None):
    """One scale per row ``[R, 1]`` for ``absmax * shrink`` (see module doc for the equations)."""
    fmt = get_format(spec.dtype)
    amax = rows.abs().amax(-1, keepdim=True) * shrink
    if spec.scale_dtype == "e8m0":
        scale = e8m0_floor(amax, fmt.emax)
    else:
        scale = round_scale(amax / fmt.max, spec.scale_dtype, tensor_scale)
    return QParams(scale=scale, tensor_scale=tensor_scale if spec.tensor_scale else None)


def encode(x: torch.Tensor, p, spec) -> torch.Tensor:
    """``codes = bits(x / scale)``, saturating: uint8 ``[R, k]``."""
    return float_to_bits(x.float() / p.scale, get_format(spec.dtype))


def decode(codes: torch.Tensor, p, spec) -> torch.Tensor:
    """``x̂ = scale * value(codes)``: float32 ``[R, k]``."""
    return bits_to_float(codes, get_format(spec.dtype)) * p.scale
