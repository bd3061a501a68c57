"""``QuantLinear``: a linear layer whose weight stays bit-packed, computed through a kernel.

::

    y = x Ŵᵀ + b        x [..., in], Ŵ [out, in] = dequantize(PackedWeight), y [..., out] in x.dtype

The packed tensors are buffers named like the native checkpoint (``<fqn>.codes``,
``<fqn>.scale`` | ``zero`` | ``offset`` | ``codebook`` | ``tensor_scale``).  Float params (fp16 / bf16
/ fp32 / e4m3 scales, offsets, codebooks) are held as their raw bits (int16 / int32 / uint8 views)
so that ``model.to(torch.bfloat16)`` cannot round them; :attr:`QuantLinear.packed` views them back.

``kernel="auto"`` picks per input dtype/device and number of rows from
:data:`mixq.runtime.kernels.AUTO_ORDER`; a kernel's one-time state (e.g. the CPU kernel's
int4pack copy) is built on first use and dropped when the buffers move or are reloaded.
"""
from __future__ import annotations

import logging

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..arch import get_weight, set_weight
from ..formats import QTensor
from .bitpack import PackedWeight
from .kernels import Kernel, get_kernel, pick_kernel, usable_kernels

log = logging.getLogger(__name__)


class QuantLinear(nn.Module):
    """Drop-in for ``nn.Linear`` / GPT-2 ``Conv1D`` holding a :class:`PackedWeight`.

    packed  the quantized ``[out, in]`` weight
    bias    optional ``[out]`` (kept in its own dtype, as a frozen parameter)
    kernel  ``"auto"`` or a name in :data:`mixq.runtime.kernels.KERNELS`
    """

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None = None, kernel: str = "auto"):
        super().__init__()
        if kernel != "auto":
            get_kernel(kernel)  # fail early on a typo
        self.spec = packed.spec
        self.out_features, self.in_features = packed.shape
        self.kernel = kernel
        self._dtypes = {name: t.dtype for name, t in packed.tensors().items()}
        for name, t in packed.tensors().items():
            self.register_buffer(name, _raw_bits(t))
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias must be [{self.out_features}], got {tuple(bias.shape)}")
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._usable: dict[tuple, list[Kernel]] = {}
        self._state: dict[str, object] = {}

    @classmethod
    def from_qtensor(cls, q: QTensor, bias: torch.Tensor | None = None, kernel: str = "auto") -> "QuantLinear":
        return cls(PackedWeight.from_qtensor(q), bias, kernel)

    @property
    def packed(self) -> PackedWeight:
        tensors = {n: getattr(self, n).view(dt) for n, dt in self._dtypes.items()}
        return PackedWeight.from_tensors(tensors, self.spec, (self.out_features, self.in_features))

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weight (bias and kernel state not included)."""
        return self.packed.nbytes

    def kernel_for(self, x: torch.Tensor) -> Kernel:
        """The kernel for ``x [..., in]``: usable ones cached per dtype and device, then chosen by ``M``."""
        key = (x.dtype, x.device)
        if key not in self._usable:
            self._usable[key] = usable_kernels(self.kernel, self.packed, x)
        return pick_kernel(self._usable[key], x.numel() // max(x.shape[-1], 1), self.kernel == "auto")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantLinear expects inputs [..., {self.in_features}], got {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        kernel = self.kernel_for(x2)
        pw = self.packed
        if kernel.name not in self._state:
            self._state[kernel.name] = kernel.prepare(pw)
        y = kernel.linear(x2, pw, self._state[kernel.name], self.bias)
        return y.reshape(*lead, self.out_features)

    def _drop_cache(self) -> None:
        self._usable.clear()
        self._state.clear()

    def _apply(self, fn, *args, **kwargs):
        self._drop_cache()
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._drop_cache()
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, spec={self.spec.name}, "
                f"bias={self.bias is not None}, kernel={self.kernel}")


def quantize_to_qlinear(model: nn.Module, qtensors: dict[str, QTensor], kernel: str = "auto") -> nn.Module:
    """Replace every ``fqn`` of ``qtensors`` (an ``nn.Linear`` or ``Conv1D``) by a :class:`QuantLinear`, in place.

    ``qtensors[fqn]`` is the ``[out, in]`` weight (:func:`mixq.arch.get_weight` orientation).  A weight
    tied to another module (lm_head and embeddings) is also overwritten with ``Ŵ`` there, so the
    result computes the same logits as the fake-quant model.  Returns ``model``.
    """
    shared = _shared_weights(model)
    for fqn, q in qtensors.items():
        try:
            mod = model.get_submodule(fqn)
        except AttributeError as e:
            raise ValueError(f"{fqn} is not a module of {type(model).__name__}: qtensors keys are module fqns") from e
        if not isinstance(mod, (nn.Linear, Conv1D)):
            raise TypeError(f"{fqn} is a {type(mod).__name__}, not nn.Linear/Conv1D: only linears become "
                            "QuantLinear; fake-quantize it instead (set_weight(module, dequantize(q)))")
        if tuple(get_weight(mod).shape) != tuple(q.shape):
            raise ValueError(f"{fqn}: quantized shape {tuple(q.shape)} != module weight [out, in] "
                             f"{tuple(get_weight(mod).shape)}")
        qlin = QuantLinear.from_qtensor(q, mod.bias, kernel).to(mod.weight.device)
        if len(shared.get(mod.weight.data_ptr(), ())) > 1:
            log.info("%s shares its weight with %s: writing the dequantized weight there too",
                     fqn, [n for n in shared[mod.weight.data_ptr()] if n != fqn])
            set_weight(mod, qlin.packed.dequantize().to(mod.weight.dtype))
        parent, _, name = fqn.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, qlin)
    return model


def _raw_bits(t: torch.Tensor) -> torch.Tensor:
    """A float tensor's bits as an integer tensor of the same width (dtype casts skip integer buffers)."""
    if not t.is_floating_point():
        return t
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _shared_weights(model: nn.Module) -> dict[int, list[str]]:
    """``data_ptr -> module names`` of every module ``weight`` (ties show up as lists of 2+)."""
    out: dict[int, list[str]] = {}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and w.data_ptr():
            out.setdefault(w.data_ptr(), []).append(name)
    return out
