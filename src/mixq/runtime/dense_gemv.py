"""One-token products of the full-precision bfloat16 linears that a packed model keeps (the head, kept layers)
through ``torch.mv`` on CPU.

For a single row, torch's bfloat16 ``F.linear`` goes through a matrix-product path that is about twice as slow as
its matrix-vector one and gives the same bits (torch 2.13, one and two threads of a Sapphire Rapids core: a
49152 x 576 head 5.3 -> 2.6 ms, 576 x 576 62 -> 30 us, 4096 x 4096 2.2 -> 1.3 ms, every output equal).  float32
gains nothing (both paths run at the same speed), and a bias would be added after rounding instead of inside the
product, so those keep ``F.linear``.  :func:`use_gemv` turns a model's plain ``nn.Linear`` modules into
:class:`GemvLinear` (the same parameters and ``state_dict``: only the class changes).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GemvLinear(nn.Linear):
    """``nn.Linear`` whose one-row bfloat16 CPU product is ``torch.mv`` (the same result, faster)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (self.bias is None and x.numel() == self.in_features and x.dtype == torch.bfloat16
                and w.dtype == torch.bfloat16 and x.device.type == "cpu" and w.device.type == "cpu"):
            return torch.mv(w, x.reshape(-1)).reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, w, self.bias)


def use_gemv(model: nn.Module) -> int:
    """Every plain ``nn.Linear`` of ``model`` becomes a :class:`GemvLinear`, in place; returns how many."""
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = GemvLinear
            n += 1
    return n
