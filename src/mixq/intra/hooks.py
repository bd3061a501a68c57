"""The calls the rest of mixq makes for composite specs (kept here so the hooks there are one line).

:func:`composite_weight`  the measurement driver: ``Ŵ`` of one candidate of one layer
:func:`quantize_layer`    ``quantize_model``: stored parts and ``Ŵ`` of one layer

``+ip`` specs (:mod:`mixq.intra.incoherence`) transform the weight and come back here for what is left of the
spec: a plain grid (RTN / GPTQ) or another composite.
"""
from __future__ import annotations

import torch

from ..algorithms.gptq import gptq_quantize
from ..algorithms.rtn import rtn_quantize
from ..config import CompositeSpec, QuantSpec, is_composite
from .incoherence import quantize_incoherent
from .quant import quantize_composite


def composite_weight(W: torch.Tensor, spec: CompositeSpec, sens, algorithm: str,
                     hinv_chol: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """``Ŵ`` for measuring: GPTQ for ``algorithm`` ``gptq``/``gptq-exact`` (composites are always run
    exactly, never scaled by a per-bits GPTQ/RTN ratio), else RTN; ``sens`` is a
    :class:`~mixq.measure.metrics.LayerSensitivity` (its ``H`` and, when present, Fisher ``F`` steer the choices)."""
    method = "gptq" if algorithm.startswith("gptq") and sens.H is not None else "rtn"
    return _quantize(W, spec, sens.H, method, fisher=getattr(sens, "F", None), hinv_chol=hinv_chol,
                     row_weight=getattr(sens, "G", None))[1]


def quantize_layer(W: torch.Tensor, spec: CompositeSpec, H: torch.Tensor | None = None, method: str = "rtn",
                   **kw) -> tuple[object, torch.Tensor]:
    """``(stored parts, Ŵ in W's dtype)`` of one layer (``quantize_model``'s dispatch)."""
    qt, W_hat = _quantize(W, spec, H, method, **kw)
    return qt, W_hat.to(W.dtype)


def _quantize(W: torch.Tensor, spec: QuantSpec, H: torch.Tensor | None, method: str, **kw):
    if not is_composite(spec):  # the plain inner spec of +ip
        if method == "gptq":
            res = gptq_quantize(W, H, spec, damp=kw.get("damp", 0.01), block_size=kw.get("block_size", 128))
            return res.qtensor, res.weight
        return rtn_quantize(W, spec)
    if spec.incoherent:
        return quantize_incoherent(W, spec, H, method, quantize_inner=_quantize, **kw)
    return quantize_composite(W, spec, H, method, **kw)
