"""Bit-packing: b-bit codes and their parameters stored at exactly the accounted size.

Code stream (:func:`pack` / :func:`unpack`), ``b`` in 1..8, little-endian bit order::

    code i occupies stream bits [i*b, (i+1)*b), least significant bit first;
    stream bit k is bit (k mod 8) of byte k // 8.

So 4-bit codes ``[c0, c1, ...]`` pack as ``byte0 = c0 | c1 << 4`` and 3-bit codes cross byte
borders (``byte0 = c0 | c1 << 3 | (c2 & 3) << 6``).  ``n`` codes take ``ceil(n*b/8)`` bytes;
the unused high bits of the last byte are zero.  ``b`` = 16 / 32 ("keep" dtypes: the raw
int16 / int32 bits of an fp16 / bf16 / fp32 tensor) pass through as their little-endian bytes.

Parameters (:func:`pack_params` / :func:`unpack_params`), one entry per group (``R`` groups,
``rows_view`` order), each in the precision :meth:`mixq.config.QuantSpec.cost` counts::

    scale         fp16 | bf16 | fp32 [R];  e8m0: uint8 exponents E [R] (scale = 2^(E-127));
                  e4m3: float8_e4m3fn [R] holding scale / tensor_scale (NVFP4 block scales)
    zero          asym int: the zero points bit-packed at ``bits`` (uint8 [ceil(R*bits/8)])
    offset        asym fp16 zero: fp16 [R]
    codebook      kmeans: fp16 [R, 2^bits]
    tensor_scale  fp32 [1]

Two-level scales (llama.cpp's K-quants: the family has a ``layout``): ``scale`` (and ``offset``) hold per
super-block ``(d, k_0 .. k_{n-1})``, stored as uint8 bytes: the fp16 ``d`` of every row, then the integers
``k - sc_lo`` bit-packed at ``sc_bits`` -- the size :meth:`~mixq.config.ElementFormat.stored` counts.

The params of :mod:`mixq.formats` are exactly representable in these dtypes by construction;
:func:`pack_params` checks that the round trip is bit-exact and raises otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import QuantSpec, family_of
from ..config.protocol import PARAMS as PARAM_FIELDS
from ..granularity import n_groups
from .base import QTensor, dequantize
from .mx import block_scales_e4m3, e8m0_exponent
from .params import QParams

_FLOAT_SCALE = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_KEEP_INT = {16: torch.int16, 32: torch.int32}


def packed_len(n: int, bits: int) -> int:
    """Bytes holding ``n`` codes of ``bits`` bits: ``ceil(n * bits / 8)``."""
    return -(-n * bits // 8)


def _check_bits(bits: int) -> None:
    if bits not in range(1, 9) and bits not in _KEEP_INT:
        raise ValueError(f"cannot pack {bits}-bit codes: bits must be in 1..8 (or 16/32 for kept floats)")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``n`` codes (uint8, any shape, flattened row-major) into uint8 ``[ceil(n*bits/8)]``.

    ``bits`` in 1..8: every code must be ``< 2^bits``.  ``bits`` 16/32: int16/int32 codes, stored
    as their little-endian bytes.  Vectorized: 8 codes (``bits`` bytes) per int64 word.
    """
    _check_bits(bits)
    flat = codes.reshape(-1)
    if bits in _KEEP_INT:
        if flat.dtype != _KEEP_INT[bits]:
            raise ValueError(f"{bits}-bit kept codes must be {_KEEP_INT[bits]}, got {flat.dtype}")
        return flat.contiguous().view(torch.uint8).clone()
    if flat.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {flat.dtype}: cast with codes.to(torch.uint8)")
    n = flat.numel()
    if n and int(flat.max()) >= 2**bits:
        raise ValueError(f"code {int(flat.max())} does not fit in {bits} bits: codes must be < {2**bits}")
    if bits == 8:
        return flat.clone()
    dev = flat.device
    m = -(-n // 8)
    words = torch.zeros(m * 8, dtype=torch.int64, device=dev)
    words[:n] = flat
    shifts = torch.arange(8, device=dev, dtype=torch.int64) * bits
    word = (words.view(m, 8) << shifts).sum(1)  # disjoint bit fields: sum == or; < 2^56 for bits <= 7
    byte_shifts = torch.arange(bits, device=dev, dtype=torch.int64) * 8
    out = ((word[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return out[: packed_len(n, bits)].clone()


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``n`` codes, uint8 ``[n]`` (int16/int32 for ``bits`` 16/32)."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed codes must be a 1-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.numel() != packed_len(n, bits):
        raise ValueError(f"{n} codes of {bits} bits take {packed_len(n, bits)} bytes, got {packed.numel()}: "
                         "the stream was packed with another size or width")
    if bits in _KEEP_INT:
        return packed.contiguous().view(_KEEP_INT[bits])
    if bits == 8:
        return packed
    dev = packed.device
    mask = 2**bits - 1
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte, stay in uint8
        shifts = torch.arange(0, 8, bits, device=dev, dtype=torch.uint8)
        return ((packed[:, None] >> shifts) & mask).reshape(-1)[:n]
    m = -(-n // 8)
    buf = torch.zeros(m * bits, dtype=torch.int64, device=dev)
    buf[: packed.numel()] = packed
    byte_shifts = torch.arange(bits, device=dev, dtype=torch.int64) * 8
    word = (buf.view(m, bits) << byte_shifts).sum(1)
    shifts = torch.arange(8, device=dev, dtype=torch.int64) * bits
    return ((word[:, None] >> shifts) & mask).to(torch.uint8).reshape(-1)[:n]


# ---------------------------------------------------------------------- parameters
def param_fields(spec: QuantSpec) -> tuple[str, ...]:
    """The :class:`QParams` fields a tensor quantized with ``spec`` stores (in :data:`PARAM_FIELDS` order): what its
    element-format family says it stores (:meth:`mixq.config.ElementFormat.params`)."""
    return family_of(spec).params(spec)


def _two_level(spec):
    return getattr(family_of(spec), "layout", lambda s: None)(spec)


def _pack_two_level(t: torch.Tensor, lay) -> torch.Tensor:
    d = t[:, 0].to(torch.float16).contiguous().view(torch.uint8)
    k = (t[:, 1:].reshape(-1) - lay.sc_lo).to(torch.int16)
    if k.numel() and (int(k.min()) < 0 or int(k.max()) >= 2**lay.sc_bits):
        raise ValueError(f"sub-block integers outside {lay.sc_lo}..{lay.sc_hi}")
    return torch.cat([d, pack(k.to(torch.uint8), lay.sc_bits)])


def _unpack_two_level(b: torch.Tensor, lay, n_rows: int) -> torch.Tensor:
    d = b[: 2 * n_rows].contiguous().view(torch.float16).float().reshape(n_rows, 1)
    k = unpack(b[2 * n_rows:].contiguous(), lay.sc_bits, n_rows * lay.nsub).float() + lay.sc_lo
    return torch.cat([d, k.reshape(n_rows, lay.nsub)], 1)


def _pack_plain(params: QParams, spec: QuantSpec, want: tuple[str, ...]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    ts = params.tensor_scale
    if "scale" in want:
        s = params.scale.reshape(-1)
        if spec.scale_dtype in _FLOAT_SCALE:
            out["scale"] = s.to(_FLOAT_SCALE[spec.scale_dtype])
        elif spec.scale_dtype == "e8m0":
            out["scale"] = e8m0_exponent(s)
        else:  # e4m3 block scales, relative to the tensor scale
            out["scale"] = block_scales_e4m3(s, ts).to(torch.float8_e4m3fn)
    if "zero" in want:
        out["zero"] = pack(params.zero.reshape(-1).to(torch.uint8), spec.bits)
    if "offset" in want:
        out["offset"] = params.offset.reshape(-1).to(torch.float16)
    if "codebook" in want:
        out["codebook"] = params.codebook.to(torch.float16)
    if "tensor_scale" in want:
        out["tensor_scale"] = ts.reshape(1).to(torch.float32)
    return out


def pack_params(params: QParams, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """Stored form of ``params`` (dtypes in the module docstring); raises if the round trip is not exact."""
    want = param_fields(spec)
    present = tuple(f for f in PARAM_FIELDS if getattr(params, f) is not None)
    if present != want:
        raise ValueError(f"{spec.name} stores params {want}, but the QParams hold {present}: "
                         "quantize the tensor with this spec (mixq.formats.quantize)")
    lay = _two_level(spec)
    out = {f: _pack_two_level(getattr(params, f), lay) for f in want} if lay is not None else \
        _pack_plain(params, spec, want)
    out = {k: v.contiguous() for k, v in out.items()}
    back = unpack_params(out, spec, params.n_rows)
    for f in want:
        a, b = getattr(params, f).float(), getattr(back, f)
        if a.shape != b.shape or not torch.equal(a.view(torch.int32), b.view(torch.int32)):
            raise ValueError(f"{spec.name}: {f} is not exactly representable in its stored dtype; "
                             "params must come from mixq.formats.fit for this spec")
    return out


def unpack_params(packed: dict[str, torch.Tensor], spec: QuantSpec, n_rows: int) -> QParams:
    """float32 :class:`QParams` (row fields ``[R, 1]``, codebook ``[R, 2^bits]``, tensor_scale ``[]``)."""
    want = param_fields(spec)
    missing = [f for f in want if f not in packed]
    if missing:
        raise ValueError(f"{spec.name} needs stored params {list(missing)}: the packed weight is incomplete")
    p = QParams()
    lay = _two_level(spec)
    if lay is not None:
        return QParams(**{f: _unpack_two_level(packed[f], lay, n_rows) for f in want})
    ts = packed["tensor_scale"].float().reshape(()) if "tensor_scale" in want else None
    p.tensor_scale = ts
    if "scale" in want:
        s = packed["scale"]
        if spec.scale_dtype == "e8m0":
            e = s.to(torch.int32) - 127
            s = torch.ldexp(torch.ones_like(e, dtype=torch.float32), e.float())
        elif spec.scale_dtype == "e4m3":
            s = s.float() * (ts if ts is not None else torch.ones((), device=s.device))
        p.scale = s.float().reshape(n_rows, 1)
    if "zero" in want:
        p.zero = unpack(packed["zero"], spec.bits, n_rows).float().reshape(n_rows, 1)
    if "offset" in want:
        p.offset = packed["offset"].float().reshape(n_rows, 1)
    if "codebook" in want:
        p.codebook = packed["codebook"].float().reshape(n_rows, spec.n_levels)
    return p


# ---------------------------------------------------------------------- packed weight
@dataclass
class PackedWeight:
    """A quantized ``[rows, cols]`` weight at its stored size.

    codes   uint8 ``[ceil(rows*cols*bits/8)]``, row-major codes (see :func:`pack`)
    params  :func:`pack_params` output
    Memory is ``nbytes``; ``nbytes*8 - spec.cost(shape).total < 8`` per stored tensor.
    """

    codes: torch.Tensor
    params: dict[str, torch.Tensor]
    spec: QuantSpec
    shape: tuple[int, int]

    @classmethod
    def from_qtensor(cls, q: QTensor) -> "PackedWeight":
        return cls(pack(q.codes, q.spec.bits), pack_params(q.params, q.spec), q.spec, tuple(q.shape))

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], spec: QuantSpec, shape) -> "PackedWeight":
        """Rebuild from :meth:`tensors` (e.g. a module's buffers or a checkpoint)."""
        if "codes" not in tensors:
            raise ValueError("packed tensors have no 'codes' entry")
        extra = set(tensors) - {"codes", *param_fields(spec)}
        if extra:
            raise ValueError(f"{spec.name} stores no params {sorted(extra)}: wrong spec for these tensors")
        params = {k: v for k, v in tensors.items() if k != "codes"}
        return cls(tensors["codes"], params, spec, (int(shape[0]), int(shape[1])))

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every stored tensor: ``codes`` then the params (keys as in :data:`PARAM_FIELDS`)."""
        return {"codes": self.codes, **self.params}

    @classmethod
    def from_stored(cls, tensors: dict[str, torch.Tensor], spec: QuantSpec, shape) -> "PackedWeight":
        """:meth:`from_tensors` of tensors read from a file, checked to be exactly what ``spec`` stores (names, the
        code stream's dtype and length, the params' shapes); raises ``ValueError`` otherwise."""
        want = ("codes", *param_fields(spec))
        if set(tensors) != set(want):
            raise ValueError(f"stored tensors {list(tensors)}, {spec.name} stores {list(want)}")
        pw = cls.from_tensors(tensors, spec, shape)
        n = packed_len(pw.numel, spec.bits)
        if pw.codes.dtype != torch.uint8 or tuple(pw.codes.shape) != (n,):
            raise ValueError(f"codes are {pw.codes.dtype} {tuple(pw.codes.shape)}, expected uint8 ({n},)")
        pw.qparams()  # checks the params' shapes
        return pw

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def n_rows(self) -> int:
        """Parameter rows (groups) in ``rows_view`` order."""
        return 0 if self.spec.is_float_keep else n_groups(self.spec.granularity, self.shape)

    def codes_unpacked(self) -> torch.Tensor:
        """Codes ``[rows, cols]`` (uint8; int16/int32 for keep dtypes)."""
        return unpack(self.codes, self.spec.bits, self.numel).reshape(self.shape)

    def qparams(self) -> QParams:
        return unpack_params(self.params, self.spec, self.n_rows)

    def to_qtensor(self) -> QTensor:
        return QTensor(self.codes_unpacked(), self.qparams(), self.spec, self.shape)

    def dequantize(self) -> torch.Tensor:
        """float32 ``[rows, cols]`` (``[out, in]`` for a linear weight)."""
        return dequantize(self.to_qtensor())

    @property
    def nbytes(self) -> int:
        """Stored bytes: codes + params."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def packed_nbits(q: QTensor | PackedWeight) -> int:
    """Bits actually stored for ``q`` once packed (``spec.cost(shape).total`` plus byte padding)."""
    pw = q if isinstance(q, PackedWeight) else PackedWeight.from_qtensor(q)
    return pw.nbytes * 8
