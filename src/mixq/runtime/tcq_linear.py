"""``TCQLinear``: a linear layer holding a trellis-coded weight (:mod:`mixq.formats.composite.tcq_storage`) in its
stored form.

``tcq-reference``  unpack the symbol stream, walk the states, ``Ŵ = s · lut[state]``, ``F.linear``: defines the
                   result
``tcq-cpu``        (CPU, ``M <= CPU_MAX_TOKENS``) the native decode-and-dot GEMV of :mod:`mixq.runtime.kernels.tcq_cpu`
                   on the packed stream (a padded copy, ``rate`` bits per weight in RAM): each thread walks the
                   columns of its range top to bottom, four state chains side by side (eight, one per AVX2
                   lane, where the CPU has AVX2)
``tcq-dense``      (longer inputs, or no C compiler) ``Ŵ`` decoded per call (natively: 16 columns a step from the
                   interleaved layout where the CPU has AVX-512, else a column per thread step; in torch without a
                   compiler), dense fp32 GEMM

``triton``         (CUDA) :mod:`mixq.runtime.kernels.tcq_triton`: fused decode + GEMM from the packed stream

``kernel="auto"``: triton on CUDA (tcq-dense without triton: decode on the host, GEMM on the device), else
tcq-cpu for short inputs when the kernel compiles, else tcq-dense.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config.composite_families import TCQ_KERNELS
from ..formats.composite.scales import group_len
from ..formats.composite.tcq_codebook import lut as tcq_lut
from ..formats.composite.tcq_storage import stream_layout, unpack_tcq
from .kernels import tcq_cpu
from .kernels.tcq_step import INPUT_DTYPES, Step
from .packed_codes_linear import PackedCodesLinear

KERNELS = ("auto", *TCQ_KERNELS)  # the names its family lists (mixq.config.composite_families)
CPU_MAX_TOKENS = 16


class TCQLinear(PackedCodesLinear):
    """Drop-in for ``nn.Linear`` holding a TCQ weight's packed tensors (``tcq.codes``, ``scale``)."""

    CODES = "tcq.codes"
    KERNELS = KERNELS

    @staticmethod
    def holds(spec) -> bool:
        return bool(spec.trellis)

    def _part(self, name: str, device="cpu") -> torch.Tensor:
        """Made once per device: ``scale`` float32 ``[R, G]``, ``lut`` the table, ``stream`` padded by 4 bytes (the
        Triton kernel's), ``gemv`` the native kernel's :class:`~mixq.runtime.kernels.tcq_cpu.GemvLayer` (on the
        scales, the table and a padded stream of its own, which it keeps or replaces by its interleaved layout)."""
        key = (name, str(device))
        if key not in self._cache:
            if name == "scale":
                t = self.scale.cpu().contiguous()
            elif name == "lut":
                t = tcq_lut(self.spec.tcq_rate, self.spec.state_bits)
            elif name == "gemv":  # the native kernel's fixed arguments (CPU)
                from .kernels.tcq_cpu import GemvLayer

                P, width, k1 = stream_layout(self.spec)
                stream = torch.cat([self.codes_packed.cpu(), torch.zeros(4, dtype=torch.uint8)])  # its own (or none)
                self._cache[key] = GemvLayer(stream, self._part("scale"), self._part("lut"),
                                             self.out_features, self.in_features, P, width, k1, self.spec.state_bits,
                                             group_len(self.spec, self.in_features))
                return self._cache[key]
            else:
                t = torch.cat([self.codes_packed.cpu(), torch.zeros(4, dtype=torch.uint8)])
            self._cache[key] = t.to(device)
        return self._cache[key]

    def dequantize(self) -> torch.Tensor:
        return unpack_tcq(self.packed.tensors(), self.spec, (self.out_features, self.in_features)).dequantize()

    def choose(self, x: torch.Tensor) -> str:
        if self.kernel != "auto":
            return self.kernel
        from .kernels import vq_triton

        if x.is_cuda:  # vq_triton.available: one notion of "triton can run here" for both codebook kernels
            return "triton" if vq_triton.available() else "tcq-dense"
        m = x.numel() // self.in_features
        return "tcq-cpu" if not x.is_cuda and m <= CPU_MAX_TOKENS and tcq_cpu.available() else "tcq-dense"

    def cpu_step(self, x: torch.Tensor, rot=None):
        """The native :class:`~mixq.runtime.kernels.tcq_step.Step` of this layer's ``tcq-cpu`` kernel with the input
        transform ``rot`` (a :class:`~mixq.runtime.kernels.kron_cpu.KronPlan` or None) in one native call, for a CPU
        decode step ``x`` (float32 or bfloat16, at most ``CPU_MAX_TOKENS`` rows, kernel ``auto`` or ``tcq-cpu``;
        recorded as :attr:`last_kernel`, since the caller runs it), else None.  Made once per ``rot``.  The decode
        path calls it directly (this layer's :meth:`forward`, and
        :class:`~mixq.runtime.composite_linear.IncoherentLinear` with its transform), so that a step's ~200 trellis
        layers do not pay ``choose``'s checks and a module call each."""
        if (x.dtype not in INPUT_DTYPES or x.device.type != "cpu" or self.kernel not in ("auto", "tcq-cpu")
                or x.numel() > CPU_MAX_TOKENS * self.in_features):
            return None
        s = self._cache.get(("step", rot))
        if s is None:
            if not tcq_cpu.available():
                return None
            s = self._cache["step", rot] = Step(self._part("gemv"), rot)
        self.__dict__["last_kernel"] = "tcq-cpu"
        return s

    def decode_step(self, x: torch.Tensor):
        """``f(x, dtype) -> y``, this layer's output for decode inputs like ``x`` through its native step alone, or
        None where :meth:`forward` must run (see :mod:`mixq.runtime.lean_decode`)."""
        return self.cpu_step(x) if self.bias is None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"TCQLinear expects inputs [..., {self.in_features}], got {tuple(x.shape)}")
        step = self.cpu_step(x)
        if step is not None:  # a CPU decode step: one native call
            y = step(x, x.dtype)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        k = self.choose(x)
        if k == "tcq-reference":
            W = self.dequantize().to(device=x.device, dtype=x.dtype)
            y = F.linear(x2, W)
        elif k == "tcq-dense":  # the native kernel's decode (vectorized from its interleaved layout where it has one)
            W = self._part("gemv").dense() if tcq_cpu.available() else self.dequantize()
            W = W.to(x.device)
            y = F.linear(x2.float(), W).to(x.dtype)
        elif k == "tcq-cpu":
            y = self._part("gemv")(x2.float()).to(x.dtype)
        elif k == "triton":
            from .kernels.tcq_triton import tcq_linear_triton

            P, width, k1 = stream_layout(self.spec)
            d = x.device
            y = tcq_linear_triton(x2, self._part("stream", d), self._part("scale", d), self._part("lut", d),
                                  self.out_features, P, width, k1, self.spec.state_bits, group_len(self.spec, self.in_features))
        else:
            raise ValueError(f"unknown TCQ kernel {k!r}")
        self.__dict__["last_kernel"] = k
        y = y.reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)
