"""Sparse fp16 outliers in CSR form (the ``+o`` extension's storage).

For a ``[R, C]`` tensor with ``K`` kept entries, in row-major order::

    values   fp16  [K]        the kept weights
    cols     int   [K]        their column indices, stored in ``index_bits(C)`` bits (16 up to 65536 columns)
    row_ptr  int32 [R + 1]    row r holds entries row_ptr[r] .. row_ptr[r+1]-1;  row_ptr[0] = 0, row_ptr[R] = K

bits = K * (16 + index_bits(C)) + (R + 1) * 32 -- the ``+o`` term of :meth:`CompositeSpec.cost`.
In memory ``cols`` is int32 (torch has no general uint16); :func:`CSR.check` verifies every index
fits its stored width, so packing to that width loses nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config.composite import FP16_BITS, ROW_PTR_BITS, index_bits


@dataclass
class CSR:
    values: torch.Tensor    # float16 [K]
    cols: torch.Tensor      # int32 [K]
    row_ptr: torch.Tensor   # int32 [R + 1]
    shape: tuple[int, int]

    @classmethod
    def from_mask(cls, W: torch.Tensor, mask: torch.Tensor) -> "CSR":
        """The entries of ``W`` where ``mask`` is set, rounded to fp16, in row-major order."""
        if W.shape != mask.shape or W.dim() != 2:
            raise ValueError(f"W {tuple(W.shape)} and mask {tuple(mask.shape)} must be the same 2-D shape")
        r, c = mask.shape
        rows, cols = mask.nonzero(as_tuple=True)  # row-major order
        counts = torch.bincount(rows, minlength=r)
        ptr = torch.zeros(r + 1, dtype=torch.int64)
        ptr[1:] = counts.cumsum(0)
        out = cls(W[rows, cols].to(torch.float16), cols.to(torch.int32), ptr.to(torch.int32), (int(r), int(c)))
        out.check()
        return out

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    def check(self) -> None:
        r, c = self.shape
        k = self.nnz
        if self.values.dtype != torch.float16 or self.cols.dtype != torch.int32 or self.row_ptr.dtype != torch.int32:
            raise ValueError("CSR dtypes must be float16 values, int32 cols and int32 row_ptr")
        if self.cols.shape != (k,) or self.row_ptr.shape != (r + 1,):
            raise ValueError("CSR cols must have one entry per value and row_ptr R + 1 entries")
        if int(self.row_ptr[0]) != 0 or int(self.row_ptr[-1]) != k or bool((self.row_ptr.diff() < 0).any()):
            raise ValueError("CSR row_ptr must rise from 0 to the number of values")
        if k and (int(self.cols.min()) < 0 or int(self.cols.max()) >= min(c, 2 ** index_bits(c))):
            raise ValueError(f"CSR column index out of range for {c} columns")

    def rows(self) -> torch.Tensor:
        """Row index of every value (int64 [K])."""
        return torch.repeat_interleave(torch.arange(self.shape[0]), self.row_ptr.diff().long())

    def mask(self) -> torch.Tensor:
        m = torch.zeros(self.shape, dtype=torch.bool)
        m[self.rows(), self.cols.long()] = True
        return m

    def to_dense(self) -> torch.Tensor:
        """float32 ``[R, C]``: the values at their positions, 0 elsewhere."""
        d = torch.zeros(self.shape, dtype=torch.float32)
        d[self.rows(), self.cols.long()] = self.values.float()
        return d

    def apply(self, W: torch.Tensor) -> torch.Tensor:
        """``W`` with the kept entries overwritten by their fp16 values (in place; returns ``W``)."""
        W[self.rows(), self.cols.long()] = self.values.to(W.dtype)
        return W

    def bits(self) -> int:
        """Stored bits: values, column indices at ``index_bits(C)``, int32 row pointers."""
        return self.nnz * (FP16_BITS + index_bits(self.shape[1])) + (self.shape[0] + 1) * ROW_PTR_BITS
