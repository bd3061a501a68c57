"""The stored parts of a ``+h`` weight (MixLLM high-precision output rows): :class:`RowSplitQTensor`.

``W3-g64+h10`` stores ``k = floor(10 % * R)`` output rows at 8 bits (``+h10w6``: 6) and the others on the base grid,
each set as an ordinary :class:`~mixq.formats.QTensor` of its rows, plus the ``k`` row indices (``index_bits(R)`` bits
each).  Quantized by :mod:`mixq.algorithms.composite.rows`; bit-packed by
:func:`mixq.formats.composite.grid_storage.pack_rows`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ... import formats
from ...config import BitCost, CompositeSpec, index_bits
from ..base import QTensor


@dataclass
class RowSplitQTensor:
    """``hi_rows`` (int64 ascending) at ``hi.spec``; the other rows, in order, at ``lo.spec``."""

    spec: CompositeSpec
    shape: tuple[int, int]
    hi_rows: torch.Tensor
    lo: QTensor | None
    hi: QTensor | None
    proxy_loss: float | None = None

    def cost(self) -> BitCost:
        return self.spec.cost(self.shape)

    def lo_rows(self) -> torch.Tensor:
        keep = torch.ones(self.shape[0], dtype=torch.bool)
        keep[self.hi_rows] = False
        return keep.nonzero().flatten()

    def dequantize(self) -> torch.Tensor:
        W = torch.zeros(self.shape)
        if self.lo is not None:
            W[self.lo_rows()] = formats.dequantize(self.lo)
        if self.hi is not None:
            W[self.hi_rows] = formats.dequantize(self.hi)
        return W

    def stored_bits(self) -> int:
        R = self.shape[0]
        bits = self.hi_rows.numel() * index_bits(R)
        for q in (self.lo, self.hi):
            if q is not None:
                if int(q.codes.max()) >= 2**q.spec.bits:
                    raise ValueError("codes wider than their spec")
                bits += q.cost().total
        return bits
