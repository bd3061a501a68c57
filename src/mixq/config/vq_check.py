"""Validation of the vector-codebook (VQ) bases of composite specs (:mod:`mixq.intra.vq` quantizes them)."""
from __future__ import annotations

from ..granularity import PerGroup


def check_vq(spec) -> None:
    """Raise ``ValueError`` unless ``spec``'s VQ fields (``vq_dim`` weights per vector, ``vq_bits`` code bits)
    and the rest of the spec make a valid VQ base."""
    d, k = spec.vq_dim, spec.vq_bits
    if not (1 <= d <= 8 and 1 <= k <= 8):
        raise ValueError(f"VQ needs 1..8 weights per vector and 1..8 code bits, got d={d}, k={k}")
    if spec.bits != -(-k // d):
        raise ValueError(f"a VQ base carries bits = ceil(code bits / d) = {-(-k // d)}, got {spec.bits}")
    if spec.dtype != "int" or not spec.symmetric or spec.clip != "minmax" or spec.tensor_scale:
        raise ValueError("VQ bases are written VQ<rate>[x<d>][-GRAN][-sDTYPE]: no -asym, -mse or -ts")
    if spec.scale_dtype not in ("fp16", "bf16", "fp32"):
        raise ValueError(f"VQ needs a float group scale, not {spec.scale_dtype}")
    if isinstance(spec.granularity, PerGroup) and spec.granularity.size % d:
        raise ValueError(f"the VQ group ({spec.granularity.size}) must hold whole {d}-vectors")
    if spec.binary or spec.slim or spec.outliers or spec.columns or spec.sq_bits or spec.hi_rows or spec.dialects:
        raise ValueError("VQ combines only with +ip")
