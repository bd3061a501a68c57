"""MixLLM-style high-precision output rows (the ``+h`` extension).

``W3-g64+h10`` stores ``k = floor(10 % * R)`` output rows (output features) at 8 bits (``+h10w6``: 6)
and the others on the base grid, each set as an ordinary :class:`~mixq.formats.QTensor` of its rows,
plus the ``k`` row indices (``index_bits(R)`` bits each).  Rows are independent under both RTN and
GPTQ (GPTQ's update of a row uses only that row's errors), so quantizing the two row sets apart is
exactly quantizing the tensor with a per-row grid.

Which rows: the largest predicted loss saved by the upgrade, per row ``o``::

    gain_o = g_o · [ (ΔW_lo H ΔW_loᵀ)_oo − (ΔW_hi H ΔW_hiᵀ)_oo ]       (RTN errors of each grid)

with ``g_o`` the output-gradient energy ``G_o`` when known (the ``kfac`` metric's weighting, MixLLM's
loss-based salience), else 1; without ``H`` the row norm ``‖ΔW_o‖²`` replaces the quadratic form.
*Global* ranking across layers (MixLLM) is what the allocator does with candidates of several
percentages (``+h5``, ``+h10``, ``+h20``): the exact knapsack picks each layer's share of high rows
under one budget, i.e. a global threshold on gain per bit, in steps of the offered percentages.
The stored parts: :class:`~mixq.formats.composite.rows_tensor.RowSplitQTensor`.
"""
from __future__ import annotations

import torch

from ... import formats
from ...config import CompositeSpec
from ...formats.composite.rows_tensor import RowSplitQTensor
from ..gptq import gptq_quantize


def select_hi_rows(W: torch.Tensor, spec: CompositeSpec, H: torch.Tensor | None,
                   row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The ``n_hi_rows`` rows with the largest gain (module docstring), ascending."""
    k = spec.n_hi_rows(tuple(W.shape))
    if k == 0:
        return torch.zeros(0, dtype=torch.long)

    def row_err(s):
        d = W - formats.fake_quantize(W, s)
        if H is None:
            return (d * d).sum(1, dtype=torch.float64)
        return ((d @ H) * d).sum(1, dtype=torch.float64)

    gain = row_err(spec.base) - row_err(spec.hi_spec)
    if row_weight is not None:
        gain = gain * row_weight.detach().double().cpu().reshape(-1)
    return torch.topk(gain, k).indices.sort().values


def quantize_rows(W0: torch.Tensor, spec: CompositeSpec, H: torch.Tensor | None, method: str, *,
                  row_weight=None, damp: float = 0.01, block_size: int = 128,
                  hinv_chol=None) -> tuple[RowSplitQTensor, torch.Tensor]:
    R, C = W0.shape
    hi_rows = select_hi_rows(W0, spec, H, row_weight)
    out = RowSplitQTensor(spec, (R, C), hi_rows, None, None)
    lo_rows = out.lo_rows()
    parts = []
    for rows, s in ((lo_rows, spec.base), (hi_rows, spec.hi_spec)):
        if rows.numel() == 0:
            parts.append(None)
            continue
        Wr = W0[rows]
        if method == "gptq":
            parts.append(gptq_quantize(Wr, H, s, damp=damp, block_size=block_size, hinv_chol=hinv_chol).qtensor)
        else:
            parts.append(formats.quantize(Wr, s))
    out.lo, out.hi = parts
    return out, out.dequantize()
