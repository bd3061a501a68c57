"""The stored parts of a ``BIN`` composite (:class:`BinaryQTensor`, :mod:`mixq.algorithms.composite.binary`), decoded
and recounted."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config.composite import FP16_BITS, ROW_PTR_BITS, CompositeSpec, index_bits
from .qtensor import dense_cols


@dataclass
class BinaryQTensor:
    """The stored parts of one ``[R, C]`` weight quantized with a ``BIN`` composite.

    codes      uint8 ``[R, n]`` signs (1 = +α) of the dense columns (all but ``res_cols``, natural order)
    scale      float32 ``[R, G]`` group scales (values of the scale dtype)
    res_cols   int64 ``[k]`` ascending residual-binarized columns; ``res_codes`` uint8 ``[2, R, k]``;
               ``res_scale`` float32 ``[R, 2]`` (α₁, α₂)
    out_cols   int32 ``[K]`` original column indices of the kept weights, row-major; ``out_row_ptr``
               int32 ``[R + 1]``; ``out_values`` float16 ``[K]`` (fp16 outliers) or ``out_codes``
               int16 ``[K]`` signed with ``out_scale`` float32 ``[R]`` (``b``-bit outliers)
    """

    spec: CompositeSpec
    shape: tuple[int, int]
    codes: torch.Tensor
    scale: torch.Tensor
    res_cols: torch.Tensor
    res_codes: torch.Tensor
    res_scale: torch.Tensor
    out_cols: torch.Tensor | None = None
    out_row_ptr: torch.Tensor | None = None
    out_values: torch.Tensor | None = None
    out_codes: torch.Tensor | None = None
    out_scale: torch.Tensor | None = None
    proxy_loss: float | None = None

    def cost(self):
        return self.spec.cost(self.shape)

    @property
    def n_outliers(self) -> int:
        return 0 if self.out_cols is None else int(self.out_cols.numel())

    def outlier_rows(self) -> torch.Tensor:
        return torch.repeat_interleave(torch.arange(self.shape[0]), self.out_row_ptr.diff().long())

    def outlier_values(self) -> torch.Tensor:
        """float32 ``[K]`` decoded kept weights."""
        if self.out_values is not None:
            return self.out_values.float()
        return self.out_scale[self.outlier_rows()] * self.out_codes.float()

    def dequantize(self) -> torch.Tensor:
        """float32 ``[R, C]`` from the stored parts alone."""
        R, C = self.shape
        n, bounds = self.spec.layout(self.shape)
        dense = dense_cols(C, self.res_cols)
        Qd = torch.empty(R, n)
        for j, (s, e) in enumerate(bounds):
            Qd[:, s:e] = bin_decode(self.codes[:, s:e], self.scale[:, j:j + 1])
        W = torch.zeros(R, C)
        W[:, dense] = Qd
        if self.res_cols.numel():
            W[:, self.res_cols] = res_decode(self.res_codes[0], self.res_codes[1], self.res_scale)
        if self.n_outliers:
            W[self.outlier_rows(), self.out_cols.long()] = self.outlier_values()
        return W

    def stored_bits(self) -> int:
        """Bits counted from the stored parts (must equal ``cost().total``)."""
        R, C = self.shape
        cs = self.spec
        n, bounds = cs.layout(self.shape)
        sb = {"fp16": 16, "bf16": 16, "fp32": 32}[cs.scale_dtype]
        k = self.res_cols.numel()
        if tuple(self.codes.shape) != (R, n) or tuple(self.scale.shape) != (R, len(bounds)) or k != cs.residual:
            raise ValueError("stored parts do not match the spec's layout")
        if int(self.codes.max()) > 1 or (k and int(self.res_codes.max()) > 1):
            raise ValueError("binary codes must be 0 or 1")
        bits = R * n + self.scale.numel() * sb
        if k:
            bits += self.res_codes.numel() + self.res_scale.numel() * sb + k * index_bits(C)
        if self.out_cols is not None:
            K = self.n_outliers
            bits += K * index_bits(C) + self.out_row_ptr.numel() * ROW_PTR_BITS
            if self.out_values is not None:
                bits += K * FP16_BITS
            else:
                lim = 2 ** (cs.outlier_bits - 1) - 1
                if K and int(self.out_codes.abs().max()) > lim:
                    raise ValueError(f"outlier codes wider than {cs.outlier_bits} bits")
                bits += K * cs.outlier_bits + self.out_scale.numel() * FP16_BITS
        return bits


def bin_decode(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``α (2q − 1)``: signs ``q`` (1 = +α) with their scales."""
    return scale * (2 * q.float() - 1)


def res_decode(q1: torch.Tensor, q2: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``α₁ s₁ + α₂ s₂``: two sign planes with a pair of row scales ``a [R, 2]``."""
    return a[:, 0:1] * (2 * q1.float() - 1) + a[:, 1:2] * (2 * q2.float() - 1)
