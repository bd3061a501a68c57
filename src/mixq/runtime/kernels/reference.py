"""The reference kernel: ``y = x Ŵᵀ + b`` with ``Ŵ = decode(unpack(codes), params)`` on every call.

Runs any format on any device and dtype; it defines what every fast kernel must compute.
Nothing is cached, so memory stays at the packed size (the price: a full dequantize per call).
``Ŵ`` is float32 and cast to ``x.dtype`` before ``F.linear``, exactly as a fake-quant model in
that dtype computes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def why_not(pw, x: torch.Tensor) -> str | None:
    return None


def prepare(pw) -> None:
    return None


def linear(x: torch.Tensor, pw, state, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [M, in]`` -> ``[M, out]`` in ``x.dtype``."""
    w = pw.dequantize().to(device=x.device, dtype=x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
