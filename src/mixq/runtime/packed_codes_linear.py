"""The part every codebook layer (:class:`~mixq.runtime.vq_linear.VQLinear`, :class:`~mixq.runtime.tcq_linear.TCQLinear`)
shares: the packed code stream and the scales held as raw bits (so that ``model.to(torch.bfloat16)`` cannot
round an fp16 scale), the bias, the byte count, and the stored form back (the type it was made from, a
:class:`~mixq.algorithms.composite.storage.PackedComposite`)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..config import CompositeSpec

_RAW = {2: torch.int16, 4: torch.int32}


class PackedCodesLinear(nn.Module):
    """Base of the codebook layers: subclasses name their packed stream (``CODES``), their kernels (``KERNELS``)
    and which specs they hold (``holds``)."""

    packed_layer = True
    CODES = ""
    KERNELS: tuple[str, ...] = ()

    @staticmethod
    def holds(spec: CompositeSpec) -> bool:
        raise NotImplementedError

    def __init__(self, packed, bias: torch.Tensor | None = None, kernel: str = "auto"):
        super().__init__()
        name = type(self).__name__
        if kernel not in self.KERNELS:
            raise ValueError(f"unknown {name} kernel {kernel!r}: one of {self.KERNELS}")
        self._form = type(packed)
        self.spec: CompositeSpec = packed.spec
        if not self.holds(self.spec) or self.spec.incoherent:
            raise ValueError(f"{name} cannot hold {self.spec.name} (IncoherentLinear holds +ip around it)")
        self.out_features, self.in_features = packed.shape
        parts = packed.tensors()
        self.register_buffer("codes_packed", parts[self.CODES].contiguous())
        s = parts["scale"].contiguous()
        self._scale_dtype = s.dtype
        self.register_buffer("scale_bits", s.view(_RAW[s.element_size()]))
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias must be [{self.out_features}], got {tuple(bias.shape)}")
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.kernel = kernel
        self.last_kernel: str | None = None
        self._cache: dict = {}

    def __deepcopy__(self, memo):
        """A deep copy without the kernels' state (``_cache``, made again on first use: it holds addresses of this
        layer's tensors and ctypes structures, which cannot be copied)."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = {} if k == "_cache" else copy.deepcopy(v, memo)
        return new

    @property
    def scale(self) -> torch.Tensor:
        """float32 ``[R, G]``."""
        return self.scale_bits.view(self._scale_dtype).float()

    @property
    def packed(self):
        parts = {self.CODES: self.codes_packed.cpu(), "scale": self.scale_bits.view(self._scale_dtype).cpu()}
        return self._form(parts, self.spec, (self.out_features, self.in_features))

    @property
    def nbytes(self) -> int:
        return self.codes_packed.numel() + self.scale_bits.numel() * self.scale_bits.element_size()

    @property
    def state_nbytes(self) -> int:
        """Bytes of what the kernels made on first use (``_cache``: decoded or padded copies, tables, a native
        kernel's own layouts), each storage once."""
        held: dict[int, int] = {}
        for v in self._cache.values():
            for t in [v] if isinstance(v, torch.Tensor) else getattr(v, "tensors", list)():
                held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(held.values())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, spec={self.spec.name}, "
                f"bias={self.bias is not None}, kernel={self.kernel}")
