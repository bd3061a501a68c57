"""Round-to-nearest (RTN): every weight goes to its nearest grid point, no calibration.

``Ŵ = decode(encode(W; fit(W)))`` per group — the baseline every other algorithm is compared to.
"""
from __future__ import annotations

import torch

from .. import formats
from ..config import QuantSpec
from ..formats import QTensor


@torch.no_grad()
def rtn_quantize(W: torch.Tensor, spec: QuantSpec) -> tuple[QTensor, torch.Tensor]:
    """Quantize ``W [out, in]``; returns the stored form and the dequantized float32 weight."""
    q = formats.quantize(W.detach().to(torch.float32), spec)
    return q, formats.dequantize(q).to(torch.float32)
