"""The composite families' implementations: how each quantizes a weight and packs / unpacks its stored parts.

A composite family (:class:`~mixq.config.composite_protocol.CompositeFormat`) is found by
:func:`~mixq.config.registry.composite_of`; :func:`impl` gives what implements it: the built-in families' entry of
:data:`_IMPL` below (their quantizers are in this package, their stored tensors and bit-packing in
:mod:`mixq.formats.composite`), or the registered family object itself, which brings its own ``quantize`` / ``pack``
/ ``unpack`` (and ``layer``: :mod:`mixq.runtime.layers` builds the built-ins').  Everything here dispatches through
:func:`impl`, so a registered family is quantized, stored and loaded like the built-in ones:

``pack_composite(parts)``               the named tensors of a composite's stored parts
``unpack_composite(t, spec, shape)``    the stored parts back (``.dequantize()``)
``pack_parts`` / ``unpack_parts``       the same for any spec (a plain one as its
                                        :class:`~mixq.formats.bitpack.PackedWeight` tensors): what ``+ip`` stores for
                                        what it wraps

The ``+ip`` family's stored parts (:class:`~mixq.algorithms.composite.incoherence.IncoherentQTensor`) stay with its
transforms in :mod:`mixq.algorithms.composite.incoherence` (decoding them runs the transforms, whose native kernel is
in :mod:`mixq.runtime.kernels`), so this dispatch, and :mod:`mixq.algorithms.composite.storage` on it, are here rather
than in :mod:`mixq.formats.composite`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ...config.composite_families import TCQ, VQ, Binary, Grid, Incoherent, RowSplit
from ...config.registry import composite_of
from ...formats.bitpack import PackedWeight
from ...formats.composite.binary_storage import pack_binary, unpack_binary
from ...formats.composite.grid_storage import pack_grid, pack_rows, unpack_grid, unpack_rows
from ...formats.composite.tcq_storage import pack_tcq, unpack_tcq
from ...formats.composite.vq_storage import pack_vq, unpack_vq
from .incoherence import IncoherentQTensor, quantize_incoherent
from .quant import quantize_composite


@dataclass(frozen=True)
class _Impl:
    """A built-in family's implementation (the protocol's ``quantize`` / ``pack`` / ``unpack``)."""

    quantize: Callable
    pack: Callable
    unpack: Callable


def _quantize(W, spec, H, method, *, quantize_layer, **kw):
    """The built-ins but ``+ip``: :func:`mixq.algorithms.composite.quant.quantize_composite` (which needs no other
    spec's quantizer)."""
    return quantize_composite(W, spec, H, method, **kw)


# ---------------------------------------------------------------------------- +ip: wraps any other spec
def _ip_quantize(W, spec, H, method, *, quantize_layer, **kw):
    return quantize_incoherent(W, spec, H, method, quantize_inner=quantize_layer, **kw)


def _ip_pack(qt) -> dict[str, torch.Tensor]:
    return {"ip.seeds": torch.tensor(qt.seeds, dtype=torch.int32), **{f"in.{k}": v for k, v in pack_parts(qt.inner).items()}}


def _ip_unpack(t: dict[str, torch.Tensor], spec, shape) -> IncoherentQTensor:
    seeds = tuple(int(v) for v in t["ip.seeds"].tolist())
    if len(seeds) != spec.ip_sides:
        raise ValueError(f"ip.seeds holds {len(seeds)} values, {spec.name} stores {spec.ip_sides}")
    shape = (int(shape[0]), int(shape[1]))
    return IncoherentQTensor(spec, shape, unpack_parts(inner_tensors(t), spec.inner, shape), seeds)


def inner_tensors(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors an ``+ip`` weight stores for its inner spec (those under ``in.``, without the prefix)."""
    return {k[3:]: v for k, v in t.items() if k.startswith("in.")}


_IMPL = {
    Incoherent: _Impl(_ip_quantize, _ip_pack, _ip_unpack),
    RowSplit: _Impl(_quantize, pack_rows, unpack_rows),
    Binary: _Impl(_quantize, pack_binary, unpack_binary),
    VQ: _Impl(_quantize, pack_vq, unpack_vq),
    TCQ: _Impl(_quantize, pack_tcq, unpack_tcq),
    Grid: _Impl(_quantize, pack_grid, unpack_grid),
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
    (:mod:`mixq.algorithms.composite.storage`)."""
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

