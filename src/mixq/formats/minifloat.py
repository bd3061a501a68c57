"""Minifloats (OCP MX v1.0 §5.3): FP8 E4M3 / E5M2, FP6 E3M2 / E2M3, FP4 E2M1, bit-exact.

A code is the real bit pattern ``sign | exponent (ebits) | mantissa (mbits)``, so packing and
export store exactly what a kernel reads.  With ``E`` the exponent field and ``M`` the mantissa::

    E == 0:  value = (-1)^s * M / 2^mbits * 2^(1 - bias)            (subnormal)
    E  > 0:  value = (-1)^s * (1 + M / 2^mbits) * 2^(E - bias)      (normal)

Special values: E5M2 is IEEE-like (``E = 31``: inf for ``M = 0``, NaN otherwise); E4M3 is the
"fn" variant (no inf, only ``S.1111.111`` is NaN, max 448); FP6/FP4 have no special values.

Encoding (:func:`float_to_bits`) rounds to nearest, ties to even mantissa, and *saturates* to
``±max`` (never produces inf/NaN); it is bit-exact against ``torch``'s ``float8_e4m3fn`` /
``float8_e5m2`` casts for every finite in-range input, subnormals included.
As a weight format see :mod:`.floatgrid`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FloatFormat:
    """A sign-exponent-mantissa minifloat. ``special``: ``ieee`` | ``fn`` | ``none`` (see module doc)."""

    name: str
    ebits: int
    mbits: int
    bias: int
    special: str

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def max_field(self) -> tuple[int, int]:
        """(E, M) fields of the largest finite value."""
        top = 2**self.ebits - 1
        if self.special == "ieee":
            return top - 1, 2**self.mbits - 1
        if self.special == "fn":
            return top, 2**self.mbits - 2
        return top, 2**self.mbits - 1

    @property
    def max(self) -> float:
        e, m = self.max_field
        return (1 + m / 2**self.mbits) * 2.0 ** (e - self.bias)

    @property
    def emax(self) -> int:
        """Exponent of the largest normal, ``floor(log2 max)`` (OCP MX ``emax_elem``)."""
        return self.max_field[0] - self.bias

    @property
    def min_exp(self) -> int:
        """Unbiased exponent of the smallest normal, ``1 - bias``."""
        return 1 - self.bias


FORMATS: dict[str, FloatFormat] = {
    "fp8_e4m3": FloatFormat("fp8_e4m3", 4, 3, 7, "fn"),
    "fp8_e5m2": FloatFormat("fp8_e5m2", 5, 2, 15, "ieee"),
    "fp6_e3m2": FloatFormat("fp6_e3m2", 3, 2, 3, "none"),
    "fp6_e2m3": FloatFormat("fp6_e2m3", 2, 3, 1, "none"),
    "fp4_e2m1": FloatFormat("fp4_e2m1", 2, 1, 1, "none"),
}


def get_format(dtype: str) -> FloatFormat:
    if dtype not in FORMATS:
        raise ValueError(f"{dtype!r} is not a minifloat: choose one of {', '.join(FORMATS)}")
    return FORMATS[dtype]


def value_table(fmt: FloatFormat, device=None) -> torch.Tensor:
    """float32 ``[2^bits]``: the value of every code (NaN/inf where the format defines them)."""
    c = torch.arange(2**fmt.bits, device=device)
    s = (c >> (fmt.ebits + fmt.mbits)) & 1
    e = (c >> fmt.mbits) & (2**fmt.ebits - 1)
    m = (c & (2**fmt.mbits - 1)).double()
    mag = torch.where(e == 0, m * 2.0 ** (fmt.min_exp - fmt.mbits),
                      (2**fmt.mbits + m) * torch.pow(2.0, (e - fmt.bias - fmt.mbits).double()))
    top = 2**fmt.ebits - 1
    if fmt.special == "fn":
        mag = torch.where((e == top) & (m == 2**fmt.mbits - 1), math.nan, mag)
    elif fmt.special == "ieee":
        mag = torch.where(e == top, torch.where(m == 0, math.inf, math.nan), mag)
    return torch.where(s == 1, -mag, mag).float()


def levels(fmt: FloatFormat, device=None) -> torch.Tensor:
    """Non-negative finite values of the format, ascending (e.g. E2M1: 0, .5, 1, 1.5, 2, 3, 4, 6)."""
    v = value_table(fmt, device)[: 2 ** (fmt.bits - 1)]
    return v[torch.isfinite(v)]


def float_to_bits(x: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Round ``x`` (any shape) to ``fmt``: nearest, ties to even, saturating. Returns uint8 codes.

    ``|x| = n * 2^(e - mbits)`` with ``e = max(floor(log2|x|), 1 - bias)`` and ``n = rne(|x| / 2^(e-mbits))``;
    ``n < 2^mbits`` is a subnormal, ``n = 2^(mbits+1)`` carries into the next binade.
    """
    x = x.float()
    if torch.isnan(x).any():
        raise ValueError(f"cannot encode NaN to {fmt.name} ({int(torch.isnan(x).sum())} NaN inputs)")
    sign = torch.signbit(x).to(torch.int32)
    a = x.abs().clamp(max=fmt.max)
    _, e2 = torch.frexp(a)  # a = f * 2^e2, f in [0.5, 1)
    exp = (e2 - 1).clamp(min=fmt.min_exp)
    n = torch.round(torch.ldexp(a, (fmt.mbits - exp).to(a.dtype)))
    full = 2 ** (fmt.mbits + 1)
    carry = n >= full
    exp = torch.where(carry, exp + 1, exp)
    n = torch.where(carry, n / 2, n).to(torch.int32)
    normal = n >= 2**fmt.mbits
    e_field = torch.where(normal, exp + fmt.bias, torch.zeros_like(exp))
    m_field = torch.where(normal, n - 2**fmt.mbits, n)
    code = (sign << (fmt.ebits + fmt.mbits)) | (e_field << fmt.mbits) | m_field
    return code.to(torch.uint8)


def bits_to_float(codes: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Decode uint8 codes (any shape) to float32 values of ``fmt``."""
    return value_table(fmt, codes.device)[codes.long()]


def round_to_format(x: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """``value(bits(x))``: a saturating RNE cast to ``fmt``, returned as float32."""
    return bits_to_float(float_to_bits(x, fmt), fmt)
