"""The module that runs a stored weight, plain or composite, and every such module installed into a model.

``make_layer(packed, bias, kernel)``    a :class:`~mixq.runtime.QuantLinear` for a
                                        :class:`~mixq.formats.bitpack.PackedWeight`, its family's layer for a
                                        :class:`~mixq.algorithms.composite.storage.PackedComposite`: the built-in
                                        families' from :data:`_LAYERS` below, a registered family's own ``layer``
``install_layers(model, weights, k)``   every such layer into a model (``load_quantized(DIR, packed=True)``)
"""
from __future__ import annotations

import torch

from ..algorithms.composite.families import inner_tensors
from ..config.composite_families import TCQ, VQ, Binary, Grid, Incoherent, RowSplit
from ..config.registry import composite_of
from ..formats.bitpack import PackedWeight
from .composite_linear import CompositeLinear, IncoherentLinear
from .qlinear import QuantLinear, install_qlinear
from .tcq_linear import TCQLinear
from .vq_linear import VQLinear


def _codebook_layer(cls, packed, bias, kernel):
    return cls(packed, bias, kernel if kernel in cls.KERNELS else "auto")


def _vq_layer(packed, bias, kernel):
    return _codebook_layer(VQLinear, packed, bias, kernel)


def _tcq_layer(packed, bias, kernel):
    return _codebook_layer(TCQLinear, packed, bias, kernel)


def _reference_layer(packed, bias, kernel):
    return CompositeLinear(packed, bias)


def _ip_layer(packed, bias, kernel):
    """Two transforms around the inner spec's own layer (its stored form: a PackedComposite like ``packed``, or a
    PackedWeight)."""
    spec, sub = packed.spec.inner, inner_tensors(packed.tensors())
    inner = type(packed)(sub, spec, packed.shape) if composite_of(spec) else \
        PackedWeight.from_tensors(sub, spec, packed.shape)
    return IncoherentLinear(packed, make_layer(inner, None, kernel), bias)


_LAYERS = {
    Incoherent: _ip_layer,
    RowSplit: _reference_layer,
    Binary: _reference_layer,
    VQ: _vq_layer,
    TCQ: _tcq_layer,
    Grid: _reference_layer,
}


def make_layer(packed, bias: torch.Tensor | None = None, kernel: str = "auto"):
    """The module that runs ``packed``: a :class:`QuantLinear` (plain, through ``kernel``) or its composite family's
    layer (``kernel`` when the layer has it, else ``"auto"``)."""
    fam = composite_of(packed.spec)
    if fam is None:
        return QuantLinear(packed, bias, kernel)
    layer = _LAYERS.get(type(fam)) or fam.layer
    return layer(packed, bias, kernel)


def install_layers(model, weights: dict, kernel: str = "auto"):
    """Replace every ``fqn`` of ``weights`` (an ``nn.Linear`` or ``Conv1D``; a :class:`PackedWeight` or a
    :class:`~mixq.algorithms.composite.storage.PackedComposite`) by :func:`make_layer`'s module, in place; returns
    ``model``."""
    return install_qlinear(model, weights, kernel, layer=lambda pw, bias: make_layer(pw, bias, kernel))
