"""The calls the rest of mixq makes for composite specs (kept here so the hooks there are one line).

:func:`composite_weight`  the measurement driver: ``Ŵ`` of one candidate of one layer
:func:`quantize_layer`    ``quantize_model``: stored parts and ``Ŵ`` of one layer
"""
from __future__ import annotations

import torch

from .quant import CompositeQTensor, quantize_composite
from ..config import CompositeSpec


def composite_weight(W: torch.Tensor, spec: CompositeSpec, sens, algorithm: str,
                     hinv_chol: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """``Ŵ`` for measuring: GPTQ for ``algorithm`` ``gptq``/``gptq-exact`` (composites are always run
    exactly, never scaled by a per-bits GPTQ/RTN ratio), else RTN; ``sens`` is a
    :class:`~mixq.measure.metrics.LayerSensitivity` (its ``H`` and, when present, Fisher ``F`` steer the choices)."""
    method = "gptq" if algorithm.startswith("gptq") and sens.H is not None else "rtn"
    return quantize_composite(W, spec, sens.H, method, fisher=getattr(sens, "F", None), hinv_chol=hinv_chol,
                              row_weight=getattr(sens, "G", None))[1]


def quantize_layer(W: torch.Tensor, spec: CompositeSpec, H: torch.Tensor | None = None, method: str = "rtn",
                   **kw) -> tuple[CompositeQTensor, torch.Tensor]:
    """``(stored parts, Ŵ in W's dtype)`` of one layer (``quantize_model``'s dispatch)."""
    qt, W_hat = quantize_composite(W, spec, H, method, **kw)
    return qt, W_hat.to(W.dtype)
