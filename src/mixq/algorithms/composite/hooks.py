"""The one dispatch from a spec to its quantizer, and the calls the rest of mixq makes through it.

:func:`quantize_layer`    stored parts, ``Ŵ`` and proxy loss of one weight under any spec: plain grids (RTN /
                          GPTQ, :mod:`mixq.algorithms`) and composites (their family's ``quantize``,
                          :mod:`mixq.algorithms.composite.families`; ``+ip`` comes back here for what is left of the
                          spec: a plain grid or another composite); ``quantize_model`` calls it for every layer
:func:`composite_weight`  the measurement driver: ``Ŵ`` of one composite candidate of one layer
:func:`stored_tensors`    the names, dtypes and shapes a weight of a shape stores under any spec (what a plain
                          format's ``stored(spec, shape)`` answers in :mod:`mixq.config`, for composites too)
"""
from __future__ import annotations

import torch

from ...config import QuantSpec
from ...config.registry import composite_of
from ..gptq import gptq_quantize
from ..rtn import rtn_quantize
from .families import impl, pack_parts


def composite_weight(W: torch.Tensor, spec: QuantSpec, sens, algorithm: str,
                     hinv_chol: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """``Ŵ`` for measuring: GPTQ for ``algorithm`` ``gptq``/``gptq-exact`` (composites are always run
    exactly, never scaled by a per-bits GPTQ/RTN ratio), else RTN; ``sens`` is a
    :class:`~mixq.measure.metrics.LayerSensitivity` (its ``H`` and, when present, Fisher ``F`` steer the choices)."""
    method = "gptq" if algorithm.startswith("gptq") and sens.H is not None else "rtn"
    return quantize_layer(W, spec, sens.H, method, fisher=getattr(sens, "F", None), hinv_chol=hinv_chol,
                          row_weight=getattr(sens, "G", None))[1]


def quantize_layer(W: torch.Tensor, spec: QuantSpec, H: torch.Tensor | None = None,
                   method: str = "rtn", *, act_order: bool = False, damp: float = 0.01, block_size: int = 128,
                   **kw) -> tuple[object, torch.Tensor, float | None]:
    """``(stored parts, Ŵ float32, proxy loss)`` of ``W [out, in]`` under ``spec`` by ``method`` (``rtn`` or ``gptq``).

    Plain specs: :func:`~mixq.algorithms.rtn.rtn_quantize` (proxy loss ``None``) or
    :func:`~mixq.algorithms.gptq.gptq_quantize` with ``act_order`` (its proxy loss); other keywords are
    ignored.  Composites: their family's ``quantize`` (:func:`mixq.algorithms.composite.families.impl`), given this
    dispatch for what it quantizes with another spec (``+ip``: the transformed weight with the rest of the spec, without
    ``act_order``); the built-in ones take ``H`` as statistics for RTN too and the keywords ``fisher``,
    ``hinv_chol``, ``row_weight``.  Their proxy loss is the stored parts' ``proxy_loss`` (``None`` without ``H``).
    """
    if composite_of(spec) is None:
        if method == "gptq":
            res = gptq_quantize(W, H, spec, damp=damp, act_order=act_order, block_size=block_size)
            return res.qtensor, res.weight, res.proxy_loss
        qt, W_hat = rtn_quantize(W, spec)
        return qt, W_hat, None
    qt, W_hat = impl(spec).quantize(W, spec, H, method, quantize_layer=_inner, damp=damp, block_size=block_size, **kw)
    return qt, W_hat, getattr(qt, "proxy_loss", None)


def _inner(W: torch.Tensor, spec, H: torch.Tensor | None, method: str, **kw) -> tuple[object, torch.Tensor]:
    """A piece of a composite quantized with another spec by the same dispatch (``+ip``: what is left of the spec)."""
    return quantize_layer(W, spec, H, method, **kw)[:2]


def stored_tensors(spec, shape: tuple[int, int]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """``name -> (dtype, shape)`` of what a ``shape`` weight stores under ``spec`` (plain or composite), found by
    packing the RTN of a seeded N(0, 1) weight of that shape: a composite's layout is set by its spec and the shape
    alone (outlier counts, row splits, code streams), so any weight of the shape stores the same tensors.  Their
    bits sum to ``spec.cost(shape)`` up to each tensor's byte padding (``tests/test_intra_storage.py``)."""
    R, C = int(shape[0]), int(shape[1])
    W = torch.randn(R, C, generator=torch.Generator().manual_seed(0))
    parts, _, _ = quantize_layer(W, spec, None, "rtn")
    return {k: (v.dtype, tuple(v.shape)) for k, v in pack_parts(parts).items()}
