"""``VQLinear``: a linear layer holding a VQ weight (:mod:`mixq.formats.composite.vq_storage`) in its stored form, three
kernels.

Weight ``Ŵ[r, v·d : (v+1)·d] = s[r, g(v)] · B[code[r, v]]`` (``B [K, d]`` the fixed codebook, ``P = C/d`` vectors
per row, groups of ``N/d`` vectors).

``vq-reference``  unpack the bit stream, decode ``Ŵ`` (:func:`mixq.formats.composite.vq_storage.decode`), ``F.linear``:
                  defines the result, holds only the packed bits
``vq-lut``        (CPU, ``M <= LUT_MAX_TOKENS`` rows) the codebook-product table of the input::

                      T[m, v, k] = x[m, v·d : (v+1)·d] · B[k]             [M, P, K]   (one small GEMM)
                      y[m, r]    = Σ_g s[r, g] Σ_{v in g} T[m, v, code[r, v]]

                  one gather of ``R·P`` table entries per row of ``x`` through the prepared flat index
                  ``v·K + code[r, v]`` (int32, ``R·P·32`` bits: 16 bits per weight at d = 2 in RAM) and a
                  grouped sum -- no ``Ŵ`` is ever formed
``vq-cpu``        (CPU, ``M <= CPU_MAX_TOKENS``) the native C decode-and-dot / table GEMV of
                  :mod:`mixq.runtime.kernels.vq_cpu` on the codes unpacked once to uint8 (``8/d`` bits per weight in RAM)
``vq-dense``      (CPU, longer inputs) the codes unpacked once to uint8 (``8/d`` bits per weight in RAM),
                  ``Ŵ`` decoded per call, dense GEMM
``triton``        (CUDA) :mod:`mixq.runtime.kernels.vq_triton`: fused decode + GEMM

``kernel="auto"`` picks triton on CUDA, else vq-cpu for short inputs (vq-lut without a C compiler) and vq-dense
for long ones.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config.composite_families import VQ_KERNELS
from ..formats.bitpack import unpack
from ..formats.composite.scales import group_len
from ..formats.composite.vq_storage import decode, spec_codebook
from .packed_codes_linear import PackedCodesLinear

LUT_MAX_TOKENS = 8
KERNELS = ("auto", *VQ_KERNELS)  # the names its family lists (mixq.config.composite_families)
CPU_MAX_TOKENS = 16


class VQLinear(PackedCodesLinear):
    """Drop-in for ``nn.Linear`` holding a VQ weight's packed tensors (``vq.codes``, ``scale``)."""

    CODES = "vq.codes"
    KERNELS = KERNELS

    @staticmethod
    def holds(spec) -> bool:
        return bool(spec.vq_dim)

    def codes(self) -> torch.Tensor:
        """uint8 ``[R, P]`` (unpacked from the bit stream)."""
        P = self.in_features // self.spec.vq_dim
        return unpack(self.codes_packed.cpu(), self.spec.vq_bits, self.out_features * P).reshape(-1, P)

    def _on(self, name: str, device) -> torch.Tensor:
        """A decoded part on ``device``, made once per device (not on every call: no unpacking, no host copy):
        ``dense`` codes uint8 ``[R, P]``, ``lut`` the flat table index, ``scale`` float32 ``[R, G]``, ``codebook``."""
        key = (name, str(device))
        if key not in self._cache:
            if name == "scale":
                t = self.scale.to(device)
            elif name == "codebook":
                t = spec_codebook(self.spec).to(device)
            else:
                t = self.codes().to(device)
                if name == "lut":
                    K, P = 2 ** self.spec.vq_bits, t.shape[1]
                    base = torch.arange(P, device=device, dtype=torch.int32) * K
                    t = (t.to(torch.int32) + base).reshape(-1).contiguous()
            self._cache[key] = t
        return self._cache[key]

    # -------------------------------------------------------------- forward
    def choose(self, x: torch.Tensor) -> str:
        if self.kernel != "auto":
            return self.kernel
        if x.is_cuda:
            from .kernels import vq_triton

            if vq_triton.available():
                return "triton"
            return "vq-dense"
        m = x.numel() // self.in_features
        from .kernels import vq_cpu

        if m <= CPU_MAX_TOKENS and vq_cpu.available():
            return "vq-cpu"
        return "vq-lut" if m <= LUT_MAX_TOKENS else "vq-dense"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"VQLinear expects inputs [..., {self.in_features}], got {tuple(x.shape)}")
        k = self.choose(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        B = self._on("codebook", x.device)
        glen = group_len(self.spec, self.in_features)
        if k == "vq-reference":
            W = self.packed.dequantize().to(device=x.device, dtype=x.dtype)
            y = F.linear(x2, W)
        elif k == "vq-dense":
            W = decode(self._on("dense", x.device), self._on("scale", x.device), B, glen)
            y = F.linear(x2.float(), W).to(x.dtype)
        elif k == "vq-cpu":
            from .kernels.vq_cpu import vq_gemv

            y = vq_gemv(x2, self._on("dense", x.device), self._on("scale", x.device), B, glen).to(x.dtype)
        elif k == "vq-lut":
            y = lut_linear(x2, self._on("lut", x.device), self._on("scale", x.device), B, glen,
                           self.out_features).to(x.dtype)
        elif k == "triton":
            from .kernels.vq_triton import vq_linear_triton

            y = vq_linear_triton(x2, self._on("dense", x.device), self._on("scale", x.device), B, glen)
        else:
            raise ValueError(f"unknown VQ kernel {k!r}")
        self.__dict__["last_kernel"] = k
        y = y.reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def lut_linear(x: torch.Tensor, flat_idx: torch.Tensor, scale: torch.Tensor, B: torch.Tensor, glen: int,
               rows: int) -> torch.Tensor:
    """``y [M, R]`` float32 from ``x [M, C]`` by table lookup (module docstring); ``flat_idx`` int32 ``[R·P]``."""
    M, C = x.shape
    d = B.shape[1]
    P = C // d
    T = (x.float().reshape(M, P, d) @ B.T).reshape(M, -1)          # [M, P·K]
    g = torch.index_select(T, 1, flat_idx).reshape(M, rows, -1, glen // d).sum(-1)  # [M, R, G]
    return (g * scale[None]).sum(-1)
