"""Bit-packed storage of composite weights, at their accounted size, and the stored form of any spec.

:func:`~mixq.algorithms.composite.families.pack_composite` turns a composite's stored parts into named tensors whose
bits are exactly the terms of its ``spec.cost(shape)`` (plus < 8 bits of byte padding per packed stream), through its
family (:mod:`mixq.algorithms.composite.families`); :func:`~mixq.algorithms.composite.families.unpack_composite`
rebuilds the stored parts from them, the spec and the shape, so that
``unpack_composite(pack_composite(q), q.spec, q.shape).dequantize()`` equals ``q.dequantize()`` bit for bit.  The
built-in families store (code streams: :func:`mixq.formats.bitpack.pack`, LSB-first, row-major; grids and ``+h``:
:mod:`mixq.formats.composite.grid_storage`):

=====================  ==============================================================================
tensor                 content
=====================  ==============================================================================
``codes.b<k>``         uint8 stream: codes of the group columns with ``k`` bits, ``[R, n_k]`` row-major
                       (one stream unless SLIM, where ``k`` is b-1, b, b+1)
``scale``              ``[R, G]`` in the scale dtype (without ``+sq``/``+d``... see below)
``zero.b<k>``          asym int zero points of the ``k``-bit group columns, packed at ``k`` bits
``offset``             asymf: fp16 ``[R, G]``
``codebook``           kmeans: fp16 ``[R * G, 2^b]``
``l2.scale.codes``     ``+sq``: ``[G, R]`` second-level codes packed at ``sq_bits``; ``l2.scale.s`` /
``l2.scale.o``         ``.o``: fp16 ``[G, ceil(R / m)]`` second-level scale and offset (``l2.offset.*`` alike)
``dialect``            ``+d``: ``[R, G]`` dialect indices packed at ``log2(D)`` bits (with ``scale``)
``slim``               SLIM map: ``bits_j - (b - 1)`` per group column, packed at 2 bits
``tensor_scale``       fp32 ``[1]`` (NVFP4-style bases)
``fp16_cols``          int16 (uint16 bits) or int32 ``[K_c]``; ``fp16_values`` fp16 ``[R, K_c]``
``csr.values``         fp16 ``[K]``; ``csr.cols`` int16 (uint16 bits) / int32 ``[K]``; ``csr.row_ptr`` int32 ``[R+1]``
``hi_rows``, ``lo.*``  ``+h``: row indices (int16 / int32) and the two :class:`PackedWeight` tensor sets
``hi.*``
BIN bases              :func:`mixq.formats.composite.binary_storage.pack_binary` (sign stream, scales, residual
                       planes, CSR)
VQ bases               :func:`mixq.formats.composite.vq_storage.pack_vq`: ``vq.codes`` (k-bit codes of d-vectors),
                       ``scale``
TCQ bases              :func:`mixq.formats.composite.tcq_storage.pack_tcq`: ``tcq.codes`` (column-major trellis
                       symbols), ``scale``
``ip.seeds``, ``in.*`` ``+ip``: int32 ``[2]`` seeds of the input and output transforms (``+ip1``: ``[1]``, the
                       input's), and the transformed weight's tensors under ``in.`` (a :class:`PackedWeight`'s, or
                       the composite's above)
=====================  ==============================================================================

:class:`PackedComposite` is the composite counterpart of :class:`~mixq.formats.bitpack.PackedWeight`: these
named tensors with the spec and shape (``tensors()``, ``nbytes``, ``dequantize()``), what the native
directory stores under ``<fqn>.<name>`` and the family's layer holds.  :func:`stored_form` is the one place that
picks between the two for a spec; :func:`pack_layer` packs any quantized weight with it.  (Here, not in
:mod:`mixq.formats.composite` with the families' own packing, because it unpacks ``+ip`` weights, whose stored parts
live with their transforms: :mod:`mixq.algorithms.composite.families`.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config import QuantSpec
from ...config.registry import composite_of
from ...formats.bitpack import PackedWeight
from .families import pack_composite, unpack_composite


def packed_bits(tensors: dict[str, torch.Tensor]) -> int:
    """Bits the named tensors occupy."""
    return sum(v.numel() * v.element_size() * 8 for v in tensors.values())


@dataclass
class PackedComposite:
    """A composite-quantized ``[rows, cols]`` weight as its stored tensors (:func:`pack_composite`).

    Same surface as :class:`~mixq.formats.bitpack.PackedWeight` where the native format and the loaders
    need it: ``spec``, ``shape``, :meth:`tensors`, :attr:`nbytes`, :meth:`to_qtensor`, :meth:`dequantize`.
    """

    parts: dict[str, torch.Tensor]
    spec: QuantSpec  # a composite family's spec (mixq.config.composite_of)
    shape: tuple[int, int]
    kind = "composite"  # its layer entry's "kind" in the native directory's mixq.json

    @classmethod
    def from_qtensor(cls, qt) -> "PackedComposite":
        return cls(pack_composite(qt), qt.spec, (int(qt.shape[0]), int(qt.shape[1])))

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], spec: QuantSpec, shape) -> "PackedComposite":
        """Rebuild from stored tensors, checking that they decode under ``spec`` and hold exactly its
        accounted bits (plus < 8 bits of padding per tensor); raises ``ValueError`` otherwise."""
        shape = (int(shape[0]), int(shape[1]))
        out = cls(dict(tensors), spec, shape)
        want = spec.cost(shape).total
        have = packed_bits(out.parts)
        if not 0 <= have - want < 8 * max(len(out.parts), 1):
            raise ValueError(f"{spec.name} {shape}: stored tensors hold {have} bits, the spec accounts {want}")
        try:
            qt = out.to_qtensor()
            if qt.stored_bits() != want:
                raise ValueError(f"stored parts count {qt.stored_bits()} bits, the spec accounts {want}")
        except (KeyError, IndexError, RuntimeError, TypeError) as e:
            raise ValueError(f"{spec.name} {shape}: stored tensors do not decode ({type(e).__name__}: {e})") from None
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.parts)

    @classmethod
    def from_stored(cls, tensors: dict[str, torch.Tensor], spec: QuantSpec, shape) -> "PackedComposite":
        """Tensors read from a file: :meth:`from_tensors`, which checks them against the spec."""
        return cls.from_tensors(tensors, spec, shape)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())

    def to_qtensor(self):
        """The stored parts (built in: :class:`CompositeQTensor`, :class:`RowSplitQTensor`, ``BinaryQTensor``,
        ``VQQTensor``, ``TCQQTensor`` or ``IncoherentQTensor``; a registered family's own)."""
        return unpack_composite(self.parts, self.spec, self.shape)

    def dequantize(self) -> torch.Tensor:
        """float32 ``[rows, cols]``."""
        return self.to_qtensor().dequantize()


def stored_form(spec) -> type:
    """What holds a ``spec`` weight at its stored size: :class:`PackedComposite` for a composite family's spec,
    :class:`~mixq.formats.bitpack.PackedWeight` for an element format's (both: ``from_qtensor``, ``from_tensors(tensors,
    spec, shape)``, ``from_stored`` (the same, checked against the spec), ``tensors()``, ``nbytes``, ``to_qtensor()``,
    ``dequantize()``; a composite's also ``kind``, what the native directory's layer entry records)."""
    return PackedComposite if composite_of(spec) else PackedWeight


def pack_layer(qt):
    """The stored form of a quantized weight, plain or composite (:func:`stored_form`)."""
    return stored_form(qt.spec).from_qtensor(qt)
