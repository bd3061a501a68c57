"""``CompositeLinear``: a linear layer holding a composite weight in its stored form.

::

    y = x Ŵᵀ + b        Ŵ [out, in] = unpack_composite(buffers).dequantize(), in x.dtype

The reference path for composites (``load_quantized(DIR, packed=True)``): the packed tensors of
:class:`~mixq.algorithms.composite.storage.PackedComposite` are buffers (names with ``.`` spelled ``__``; float
tensors held as their raw bits so ``model.to(torch.bfloat16)`` cannot round them), and ``Ŵ`` is
rebuilt on every call and dropped afterwards, so RAM holds the plan's size.  No fast kernel exists
for composites: this is correct, not quick.

``IncoherentLinear`` (``+ip`` specs, :mod:`mixq.algorithms.composite.incoherence`)::

    y = Q_outᵀ · inner(Q_in · x) + b

two Kronecker-factored Hadamard transforms around the inner layer, which the inner spec's own family makes
(:func:`mixq.runtime.layers.make_layer`): a :class:`~mixq.runtime.QuantLinear` (with its fast kernels)
when the rest of the spec is a plain grid, a :class:`~mixq.runtime.vq_linear.VQLinear` for a VQ base, a
:class:`~mixq.runtime.tcq_linear.TCQLinear` for a TCQ base, a :class:`CompositeLinear` otherwise.

A layer keeps the type of the stored form it was made from (``packed``), and gives its tensors back as one
(``.packed``).
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from ..algorithms.composite.incoherence import kron_plan, rotate
from ..config.composite_protocol import REFERENCE_KERNEL
from .packed_codes_linear import PackedCodesLinear


def _buffer_name(name: str) -> str:
    return name.replace(".", "__")


class CompositeLinear(nn.Module):
    """Drop-in for ``nn.Linear`` / GPT-2 ``Conv1D`` holding a
    :class:`~mixq.algorithms.composite.storage.PackedComposite`."""

    packed_layer = True

    def __init__(self, packed, bias: torch.Tensor | None = None):
        super().__init__()
        self._form = type(packed)
        self.spec = packed.spec
        self.out_features, self.in_features = packed.shape
        self._dtypes = {name: t.dtype for name, t in packed.tensors().items()}
        for name, t in packed.tensors().items():
            self.register_buffer(_buffer_name(name), _raw_bits(t.contiguous()))
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias must be [{self.out_features}], got {tuple(bias.shape)}")
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.last_kernel: str | None = None

    @property
    def packed(self):
        parts = {n: getattr(self, _buffer_name(n)).view(dt).cpu() for n, dt in self._dtypes.items()}
        return self._form(parts, self.spec, (self.out_features, self.in_features))

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, _buffer_name(n)).numel() * getattr(self, _buffer_name(n)).element_size()
                   for n in self._dtypes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"CompositeLinear expects inputs [..., {self.in_features}], got {tuple(x.shape)}")
        W = self.packed.dequantize().to(device=x.device, dtype=x.dtype)
        self.__dict__["last_kernel"] = REFERENCE_KERNEL
        return F.linear(x, W, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, spec={self.spec.name}, "
                f"bias={self.bias is not None}, kernel={REFERENCE_KERNEL}")


class IncoherentLinear(nn.Module):
    """Drop-in for ``nn.Linear`` holding an ``+ip`` weight: the seeds of ``packed``, and ``inner``, the layer of the
    transformed weight (``packed``'s ``in.*`` tensors)."""

    packed_layer = True

    def __init__(self, packed, inner: nn.Module, bias: torch.Tensor | None = None):
        super().__init__()
        self._form = type(packed)
        self.spec = packed.spec
        self.out_features, self.in_features = packed.shape
        self.register_buffer("seeds", packed.tensors()["ip.seeds"].to(torch.int32).clone())
        self._seeds = tuple(int(v) for v in self.seeds.tolist())
        self.inner = inner
        self.inner.packed_layer = False  # counted as this layer
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias must be [{self.out_features}], got {tuple(bias.shape)}")
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def packed(self):
        parts = {"ip.seeds": self.seeds.cpu(), **{f"in.{k}": v for k, v in self.inner.packed.tensors().items()}}
        return self._form(parts, self.spec, (self.out_features, self.in_features))

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes + self.seeds.numel() * 4

    @property
    def last_kernel(self) -> str | None:
        k = self.inner.last_kernel
        return None if k is None else f"ip+{k}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"IncoherentLinear expects inputs [..., {self.in_features}], got {tuple(x.shape)}")
        step = self._cpu_step(x)
        if step is not None:  # a CPU decode step: the transform and the inner layer's kernel in one native call
            y = step(x, x.dtype)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        # a codebook inner layer computes in float32 on CPU: keep the whole chain there, one cast at each end
        dt = torch.float32 if x.device.type == "cpu" and isinstance(self.inner, PackedCodesLinear) else x.dtype
        y = self.inner(_rotate_input(x, self._seeds[0], dt))
        y = (y if len(self._seeds) == 1 else rotate(y, self._seeds[1], transpose=True)).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def decode_step(self, x: torch.Tensor):
        """``f(x, dtype) -> y``, this layer's output for decode inputs like ``x`` through its native step alone (no
        module call, no checks), or None where :meth:`forward` must run (see :mod:`mixq.runtime.lean_decode`)."""
        return self._cpu_step(x) if self.bias is None else None

    def _cpu_step(self, x: torch.Tensor):
        """The inner layer's native step with this layer's input transform (``TCQLinear.cpu_step``), when the
        transform is one-sided and native; else None."""
        inner = self._modules["inner"]
        find = getattr(inner, "cpu_step", None)
        if find is None or len(self._seeds) != 1 or inner.bias is not None:
            return None
        rot = kron_plan(self.in_features, self._seeds[0], False)  # made once (cached); None without a compiler
        return None if rot is None else find(x, rot)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, spec={self.spec.name}, "
                f"bias={self.bias is not None}")


_LAST_INPUT: list = [None]  # (x, seed, dtype, its contents, Q x): q/k/v (and gate/up) read one input: rotate it once


def _contents(x: torch.Tensor):
    """What tells whether ``x``'s values changed: its bytes where they are few and on the CPU (a decode step's
    activations; a copy of a few kB, cheaper than a reduction), else its sum."""
    n = x.numel() * x.element_size()
    if x.device.type == "cpu" and n <= 1 << 16 and x.is_contiguous():
        return ctypes.string_at(x.data_ptr(), n)
    return float(x.sum())


def _rotate_input(x: torch.Tensor, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """``Q x`` in ``dtype``, reused when the previous ``+ip`` layer rotated this same tensor with this seed into
    this dtype and its values have not changed since (the same object, the same :func:`_contents`: inference tensors
    carry no version counter)."""
    if torch.is_grad_enabled():
        _LAST_INPUT[0] = None
        return rotate(x.to(dtype), seed)
    last = _LAST_INPUT[0]
    seen = _contents(x)
    if last is not None and last[0] is x and last[1] == seed and last[2] == dtype and last[3] == seen:
        return last[4]
    xr = rotate(x.to(dtype), seed)
    _LAST_INPUT[0] = (x, seed, dtype, seen, xr)
    return xr


def _raw_bits(t: torch.Tensor) -> torch.Tensor:
    if not t.is_floating_point():
        return t
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])
