"""A quantized linear whose codes are fixed and whose continuous parts train (the fine-tuning stages' layer).

:func:`tunable` says which stored weights qualify: plain int / NF grids with a float group scale (``-asymf``
offsets train too), VQ codebook and TCQ trellis layers (their per-row / per-group scale), each also under ``+ip``.
:class:`TunableLinear` holds one in place of an ``nn.Linear`` (the scale as ``s₀ · exp(θ)``); :func:`_swap_in`
puts them into a block.  Used by :mod:`mixq.distill` (block-wise) and :mod:`mixq.distill_e2e` (end to end).
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from . import formats
from .algorithms.composite.incoherence import IncoherentQTensor, rotate, unrotate_weight
from .formats import QParams, QTensor
from .formats.composite.scales import group_len
from .formats.composite.tcq_storage import TCQQTensor, apply_scale
from .formats.composite.vq_storage import VQQTensor, decode as vq_decode, spec_codebook
from .granularity import rows_view

FLOAT_SCALES = ("fp16", "bf16", "fp32")


def tunable(qt) -> bool:
    """Whether ``qt``'s continuous parameters can be trained here (see the module docstring)."""
    if isinstance(qt, IncoherentQTensor):
        qt = qt.inner
    if isinstance(qt, (VQQTensor, TCQQTensor)):
        return qt.spec.scale_dtype in FLOAT_SCALES
    if not isinstance(qt, QTensor) or qt.spec.is_float_keep:  # other composites' parts are no QTensor
        return False
    s = qt.spec
    return s.scale_dtype in FLOAT_SCALES and s.dtype in ("int", "nf") and not s.tensor_scale \
        and qt.params.scale is not None


class TunableLinear(nn.Module):
    """A quantized linear whose codes are buffers and whose scale (``s₀ · exp(θ)``) and offsets train."""

    def __init__(self, qt, bias: torch.Tensor | None):
        super().__init__()
        self.ip = qt.seeds if isinstance(qt, IncoherentQTensor) else None
        self.outer = qt
        inner = qt.inner if self.ip else qt
        self.spec, self.shape = inner.spec, tuple(inner.shape)
        self.vq = isinstance(inner, VQQTensor)  # codebook indices times a float scale per row and group
        self.tcq = isinstance(inner, TCQQTensor)  # trellis values (fixed with the bits) times a float scale
        # +ip with one scale per row: Ŵ = Q_outᵀ diag(s) V with V = U Q_in fixed, so the forward pass is
        # ((x Vᵀ) · s) Q_out (+ip1: no Q_out) -- an output-side transform of the activations instead of two of the weight per step.
        # V is kept in fp16 (half the memory; 2^-11 relative rounding of the training forward); the weights
        # written at the end come from the exact parts (weight_hat)
        self.basis = self.ip is not None and (self.vq or self.tcq) and group_len(self.spec, self.shape[1]) == self.shape[1]
        if self.basis:
            self.register_buffer("vbasis", rotate(self._unit(), self.ip[0], transpose=True).half().contiguous())
            self.register_buffer("scale0", inner.scale.float().clone())
            self.register_buffer("zero", None)
            self.offset = None
        elif self.vq or self.tcq:
            if self.vq:
                self.register_buffer("codes", inner.codes.clone())
                self.register_buffer("book", spec_codebook(self.spec))
            else:
                self.register_buffer("unit", inner.unit())
            self.register_buffer("scale0", inner.scale.float().clone())
            self.register_buffer("zero", None)
            self.offset = None
        else:
            p = inner.params
            self.register_buffer("codes", rows_view(inner.codes, self.spec.granularity).clone())
            self.register_buffer("scale0", p.scale.float().clone())
            self.register_buffer("zero", None if p.zero is None else p.zero.float().clone())
            self.offset = None if p.offset is None else nn.Parameter(p.offset.float().clone())
        self.theta = nn.Parameter(torch.zeros_like(self.scale0))
        self.bias = bias

    def _params(self, rounded: bool = False) -> QParams:
        scale = self.scale0 * torch.exp(self.theta)
        offset = self.offset
        if rounded:
            dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[self.spec.scale_dtype]
            scale = scale.detach().to(dt).float()
            offset = None if offset is None else offset.detach().half().float()
        return QParams(scale=scale, zero=self.zero, offset=offset)

    def weight_hat(self, rounded: bool = False) -> torch.Tensor:
        if self.basis:
            return unrotate_weight(self._unit() * self._params(rounded).scale.reshape(-1, 1), self.ip)
        if self.vq:
            W = vq_decode(self.codes, self._params(rounded).scale, self.book, group_len(self.spec, self.shape[1]))
        elif self.tcq:
            W = apply_scale(self.unit, self._params(rounded).scale, group_len(self.spec, self.shape[1]))
        else:
            W = formats.decode(self.codes, self._params(rounded), self.spec).reshape(self.shape)
        return W if self.ip is None else unrotate_weight(W, self.ip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.basis:
            z = F.linear(x, self.vbasis.to(x.dtype)) * self._params().scale.reshape(-1).to(x.dtype)
            y = z if len(self.ip) == 1 else rotate(z, self.ip[1], transpose=True)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight_hat().to(x.dtype), self.bias)

    def _unit(self) -> torch.Tensor:
        """float32 ``U [R, C]`` of a row-scaled ``+ip`` codebook layer: its transformed weight before the scales."""
        inner = self.outer.inner
        if self.tcq:
            return inner.unit().float()
        return vq_decode(inner.codes, torch.ones_like(inner.scale, dtype=torch.float32), spec_codebook(self.spec),
                         self.shape[1])

    def release(self) -> None:
        """Drop the fixed tensors the forward pass decodes from (after :meth:`stored` and the last
        :meth:`weight_hat`): the layer is of no further use."""
        for name in ("vbasis", "unit", "codes", "book"):
            if name in self._buffers:
                self._buffers[name] = None

    def stored(self):
        """The stored parts with the trained parameters rounded to their stored dtypes."""
        inner = self.outer.inner if self.ip else self.outer
        p = self._params(rounded=True)
        if self.vq or self.tcq:
            new = replace(inner, scale=p.scale)
            return replace(self.outer, inner=new) if self.ip else new
        params = replace(inner.params, scale=p.scale, offset=inner.params.offset if p.offset is None else p.offset)
        new = QTensor(codes=inner.codes, params=params, spec=inner.spec, shape=inner.shape)
        return replace(self.outer, inner=new) if self.ip else new


@torch.no_grad()
def _swap_in(block: nn.Module, prefix: str, qtensors: dict) -> dict[str, tuple[nn.Module, TunableLinear]]:
    """Replace the block's tunable linears by TunableLinears; returns ``{name: (original, tunable)}``."""
    out = {}
    for name, mod in list(block.named_modules()):
        fqn = f"{prefix}.{name}"
        if fqn in qtensors and tunable(qtensors[fqn]):
            t = TunableLinear(qtensors[fqn], getattr(mod, "bias", None))
            _set_child(block, name, t)
            out[name] = (mod, t)
    return out


def _set_child(root: nn.Module, name: str, mod: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, mod)
