"""Scale storage: float scales, E8M0 shared exponents (OCP MX v1.0) and NVFP4's E4M3 block scales.

Every format computes an *ideal* positive scale per row and stores the nearest value its
``scale_dtype`` can hold (:func:`round_scale`):

``fp16`` / ``bf16`` / ``fp32``
    ``scale = cast(s)``, clamped to ``[smallest positive, max]`` so it is never 0 or inf.
``e8m0``  (8-bit exponent, value ``2^(E-127)``, ``E`` in 0..254, i.e. ``2^-127 .. 2^127``)
    MX block formats use the OCP MX v1.0 §6.3 rule :func:`e8m0_floor`:
    ``X = 2^(floor(log2 amax) - emax_elem)`` where ``emax_elem`` is the exponent of the element
    format's largest normal (E4M3: 8, E5M2: 15, E3M2: 4, E2M3: 2, E2M1: 2, INT8: 6 with the MX
    implicit ``2^-6``).  Elements that exceed the element max after scaling saturate.
    Formats without an ``emax_elem`` (NormalFloat, asymmetric int) round *up*:
    ``X = 2^ceil(log2 s)`` (:func:`e8m0_ceil`), so nothing clips.
``e4m3``  (NVFP4; with ``tensor_scale`` ``ts``, an fp32 scalar)
    ``scale = e4m3(s / ts) * ts``, saturating at 448 and never below the smallest E4M3
    subnormal ``2^-9``; NVFP4 sets ``ts = amax_tensor / (448 * 6)`` (:func:`tensor_scale_for`).
"""
from __future__ import annotations

import torch

from .minifloat import FORMATS, round_to_format

E8M0_MIN_EXP, E8M0_MAX_EXP = -127, 127
E4M3 = FORMATS["fp8_e4m3"]
E4M3_MIN = 2.0**-9  # smallest positive E4M3 (subnormal)
_FLOAT_SCALES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _pow2(exp: torch.Tensor) -> torch.Tensor:
    exp = exp.clamp(E8M0_MIN_EXP, E8M0_MAX_EXP).float()
    return torch.ldexp(torch.ones_like(exp), exp)


def floor_log2(a: torch.Tensor) -> torch.Tensor:
    """Exact ``floor(log2 a)`` for ``a > 0`` (int32); ``E8M0_MIN_EXP - 1`` where ``a == 0``."""
    _, e = torch.frexp(a.float())
    return torch.where(a > 0, e - 1, torch.full_like(e, E8M0_MIN_EXP - 1))


def e8m0_floor(amax: torch.Tensor, emax_elem: int) -> torch.Tensor:
    """OCP MX shared scale ``X = 2^clamp(floor(log2 amax) - emax_elem, -127, 127)`` (float32).

    An all-zero block gets ``2^-127`` (a valid E8M0 value; every element encodes to 0).
    """
    return _pow2(floor_log2(amax) - emax_elem)


def e8m0_ceil(s: torch.Tensor) -> torch.Tensor:
    """Smallest power of two ``>= s``: ``2^clamp(ceil(log2 s), -127, 127)``; ``2^-127`` for ``s <= 0``."""
    s = s.float()
    f, e = torch.frexp(s)
    exp = torch.where(f == 0.5, e - 1, e)
    return _pow2(torch.where(s > 0, exp, torch.full_like(exp, E8M0_MIN_EXP)))


def e8m0_exponent(scale: torch.Tensor) -> torch.Tensor:
    """Stored E8M0 byte (uint8, ``E = log2(scale) + 127``) of power-of-two scales."""
    return (floor_log2(scale) + 127).clamp(0, 254).to(torch.uint8)


def e4m3_round(x: torch.Tensor) -> torch.Tensor:
    """Saturating RNE cast to FP8 E4M3 (float32 result)."""
    return round_to_format(x, E4M3)


def round_scale(s: torch.Tensor, scale_dtype: str, tensor_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Nearest positive value of ``scale_dtype`` for ideal scales ``s`` (float32, same shape).

    ``tensor_scale`` (fp32 scalar) is only used for ``e4m3``: ``scale = e4m3(s/ts) * ts``.
    """
    s = s.float()
    if scale_dtype in _FLOAT_SCALES:
        fi = torch.finfo(_FLOAT_SCALES[scale_dtype])
        tiny = fi.smallest_normal if scale_dtype != "fp16" else 2.0**-24
        return s.clamp(min=tiny, max=fi.max).to(_FLOAT_SCALES[scale_dtype]).float()
    if scale_dtype == "e8m0":
        return e8m0_ceil(s)
    if scale_dtype == "e4m3":
        ts = torch.ones((), device=s.device) if tensor_scale is None else tensor_scale.float()
        return e4m3_round(s / ts).clamp(min=E4M3_MIN) * ts
    raise ValueError(f"scale_dtype {scale_dtype!r} stores no scale (use fp16, bf16, fp32, e8m0 or e4m3)")


def tensor_scale_for(amax: torch.Tensor, unit: float) -> torch.Tensor:
    """Second-level fp32 scale ``ts = amax / (448 * unit)`` (NVFP4: ``unit = 6``), 1.0 when ``amax == 0``.

    With it the largest block scale ``amax / unit / ts`` is exactly E4M3's max, 448.
    """
    amax = amax.float().reshape(())
    return torch.where(amax > 0, amax / (E4M3.max * unit), torch.ones_like(amax))


def block_scales_e4m3(scale: torch.Tensor, tensor_scale: torch.Tensor | None) -> torch.Tensor:
    """Recover the stored E4M3 block scales ``e4m3(scale / ts)`` of an NVFP4 QParams (for export)."""
    ts = 1.0 if tensor_scale is None else tensor_scale.float()
    return e4m3_round(scale.float() / ts)
