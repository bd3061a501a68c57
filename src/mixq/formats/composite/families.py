"""The composite families' implementations: how each quantizes, packs, unpacks and runs a weight.

A composite family (:class:`~mixq.config.composite_protocol.CompositeFormat`) is found by
:func:`~mixq.config.registry.composite_of`; :func:`impl` gives what implements it: the built-in families' entry of
:data:`_IMPL` below (their code lives in this package), or the registered family object itself, which brings its
own ``quantize`` / ``pack`` / ``unpack`` / ``layer``.  Everything here dispatches through :func:`impl`, so a
registered family is stored, loaded and run like the built-in ones:

``pack_composite(parts)``               the named tensors of a composite's stored parts
``unpack_composite(t, spec, shape)``    the stored parts back (``.dequantize()``)
``pack_parts`` / ``unpack_parts``       the same for any spec (a plain one as its :class:`~mixq.runtime.PackedWeight`
                                        tensors): what ``+ip`` stores for what it wraps
``make_layer(packed, bias, kernel)``    the module that runs a stored weight: a :class:`~mixq.runtime.QuantLinear` for
                                        a :class:`~mixq.runtime.PackedWeight`, its family's layer for a
                                        :class:`~mixq.formats.composite.storage.PackedComposite`
``install_layers(model, weights, k)``   every such layer into a model (``load_quantized(DIR, packed=True)``)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ...algorithms.composite.incoherence import IncoherentQTensor, quantize_incoherent
from ...algorithms.composite.quant import quantize_composite
from ...config.composite_families import TCQ, VQ, Binary, Grid, Incoherent, RowSplit
from ...config.registry import composite_of
from ...runtime import PackedWeight, QuantLinear, install_qlinear
from .binary_storage import pack_binary, unpack_binary
from .grid_storage import pack_grid, pack_rows, unpack_grid, unpack_rows
from .tcq_storage import pack_tcq, unpack_tcq
from .vq_storage import pack_vq, unpack_vq


@dataclass(frozen=True)
class _Impl:
    """A built-in family's implementation (the protocol's ``quantize`` / ``pack`` / ``unpack`` / ``layer``)."""

    quantize: Callable
    pack: Callable
    unpack: Callable
    layer: Callable


def _quantize(W, spec, H, method, *, quantize_layer, **kw):
    """The built-ins but ``+ip``: :func:`mixq.algorithms.composite.quant.quantize_composite` (which needs no other
    spec's quantizer)."""
    return quantize_composite(W, spec, H, method, **kw)


# The layers (mixq.runtime) are imported where they are made, when a layer is built.  They import the composites'
# quantizers (mixq.algorithms.composite.vq, .tcq, .incoherence); tests/test_house.py counts these function-level
# imports in its cycle check like any other.
def _codebook_layer(cls, packed, bias, kernel):
    return cls(packed, bias, kernel if kernel in cls.KERNELS else "auto")


def _vq_layer(packed, bias, kernel):
    from ...runtime.vq_linear import VQLinear
    return _codebook_layer(VQLinear, packed, bias, kernel)


def _tcq_layer(packed, bias, kernel):
    from ...runtime.tcq_linear import TCQLinear
    return _codebook_layer(TCQLinear, packed, bias, kernel)


def _reference_layer(packed, bias, kernel):
    from ...runtime.composite_linear import CompositeLinear
    return CompositeLinear(packed, bias)


# ---------------------------------------------------------------------------- +ip: wraps any other spec
def _ip_quantize(W, spec, H, method, *, quantize_layer, **kw):
    return quantize_incoherent(W, spec, H, method, quantize_inner=quantize_layer, **kw)


def _ip_pack(qt) -> dict[str, torch.Tensor]:
    return {"ip.seeds": torch.tensor(qt.seeds, dtype=torch.int32), **{f"in.{k}": v for k, v in pack_parts(qt.inner).items()}}


def _ip_unpack(t: dict[str, torch.Tensor], spec, shape) -> IncoherentQTensor:
    seeds = tuple(int(v) for v in t["ip.seeds"].tolist())
    if len(seeds) != 2:
        raise ValueError(f"ip.seeds holds {len(seeds)} values, expected 2")
    shape = (int(shape[0]), int(shape[1]))
    return IncoherentQTensor(spec, shape, unpack_parts(_inner_tensors(t), spec.inner, shape), seeds)


def _ip_layer(packed, bias, kernel):
    """Two transforms around the inner spec's own layer (its stored form: a PackedComposite like ``packed``, or a
    PackedWeight)."""
    from ...runtime.composite_linear import IncoherentLinear
    spec, sub = packed.spec.inner, _inner_tensors(packed.tensors())
    inner = type(packed)(sub, spec, packed.shape) if composite_of(spec) else \
        PackedWeight.from_tensors(sub, spec, packed.shape)
    return IncoherentLinear(packed, make_layer(inner, None, kernel), bias)


def _inner_tensors(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[3:]: v for k, v in t.items() if k.startswith("in.")}


_IMPL = {
    Incoherent: _Impl(_ip_quantize, _ip_pack, _ip_unpack, _ip_layer),
    RowSplit: _Impl(_quantize, pack_rows, unpack_rows, _reference_layer),
    Binary: _Impl(_quantize, pack_binary, unpack_binary, _reference_layer),
    VQ: _Impl(_quantize, pack_vq, unpack_vq, _vq_layer),
    TCQ: _Impl(_quantize, pack_tcq, unpack_tcq, _tcq_layer),
    Grid: _Impl(_quantize, pack_grid, unpack_grid, _reference_layer),
}


def impl(spec):
    """What implements ``spec``'s composite family: a built-in's table entry, or the registered family itself."""
    fam = composite_of(spec)
    if fam is None:
        raise ValueError(f"{spec.name} is not an intra-tensor composite spec")
    return _IMPL.get(type(fam), fam)


# ---------------------------------------------------------------------------- stored parts
def pack_composite(qt) -> dict[str, torch.Tensor]:
    """Named tensors holding a composite's stored parts at their accounted size
    (:mod:`mixq.formats.composite.storage`)."""
    return impl(qt.spec).pack(qt)


def unpack_composite(t: dict[str, torch.Tensor], spec, shape: tuple[int, int]):
    """Inverse of :func:`pack_composite`: the stored parts (``.dequantize()``)."""
    return impl(spec).unpack(t, spec, shape)


def pack_parts(qt) -> dict[str, torch.Tensor]:
    """:func:`pack_composite` for a composite, a plain QTensor's :class:`PackedWeight` tensors otherwise."""
    return pack_composite(qt) if composite_of(qt.spec) else PackedWeight.from_qtensor(qt).tensors()


def unpack_parts(t: dict[str, torch.Tensor], spec, shape: tuple[int, int]):
    """Inverse of :func:`pack_parts`."""
    return unpack_composite(t, spec, shape) if composite_of(spec) else \
        PackedWeight.from_tensors(t, spec, shape).to_qtensor()


# ---------------------------------------------------------------------------- layers
def make_layer(packed, bias: torch.Tensor | None = None, kernel: str = "auto"):
    """The module that runs ``packed``: a :class:`QuantLinear` (plain, through ``kernel``) or its composite family's
    layer (``kernel`` when the layer has it, else ``"auto"``)."""
    if composite_of(packed.spec) is None:
        return QuantLinear(packed, bias, kernel)
    return impl(packed.spec).layer(packed, bias, kernel)


def install_layers(model, weights: dict, kernel: str = "auto"):
    """Replace every ``fqn`` of ``weights`` (an ``nn.Linear`` or ``Conv1D``; a :class:`PackedWeight` or a
    :class:`~mixq.formats.composite.storage.PackedComposite`) by :func:`make_layer`'s module, in place; returns
    ``model``."""
    return install_qlinear(model, weights, kernel, layer=lambda pw, bias: make_layer(pw, bias, kernel))
