"""Bit-packing: exact code streams for 1..8 bits, exact params in their stored dtypes, real sizes."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixq.config import parse_spec
from mixq.formats import QParams, dequantize, quantize
from mixq.runtime import PackedWeight, pack, pack_params, packed_len, packed_nbits, param_fields, unpack, unpack_params

FAMILY_SPECS = ["W4-g32", "W3-g64-asym", "NF4-g64", "MXFP4", "NVFP4", "FP8", "KM3", "W8-channel"]
MORE_SPECS = ["W4-g64-asymf", "W4-g64-sbf16", "W4-g64-se8m0", "W4-g16-se4m3-ts", "W1-g64", "W5-g32-asym",
              "W6-channel", "W7-g64-asym", "MXINT8", "MXFP6", "FP6-e3m2", "NF3-g64", "FP16", "BF16", "FP32"]


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


# ---------------------------------------------------------------------- code streams
def test_bit_order_hand_computed():
    assert pack(torch.tensor([1, 2, 3], dtype=torch.uint8), 4).tolist() == [0x21, 0x03]
    # 3-bit: c0 | c1 << 3 | (c2 & 3) << 6, then c2 >> 2 in bit 0 of the next byte
    assert pack(torch.tensor([5, 3, 7], dtype=torch.uint8), 3).tolist() == [5 | 3 << 3 | 3 << 6, 1]
    assert pack(torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1], dtype=torch.uint8), 1).tolist() == [0b1101, 1]
    assert pack(torch.tensor([0x7F, 0x01], dtype=torch.uint8), 7).tolist() == [0xFF, 0x00]
    assert pack(torch.tensor([3, 1, 2], dtype=torch.uint8), 2).tolist() == [3 | 1 << 2 | 2 << 4]


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(0, 300), seed=st.integers(0, 2**16))
def test_pack_unpack_exact(bits, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n,), dtype=torch.uint8, generator=g)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_len(n, bits) == -(-n * bits // 8)
    assert torch.equal(unpack(packed, bits, n), codes)
    if n * bits % 8:  # padding bits of the last byte are zero
        assert int(packed[-1]) >> (n * bits % 8) == 0


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 13), (2, 64)])
def test_pack_2d_odd_shapes(bits, shape):
    codes = torch.randint(0, 2**bits, shape, dtype=torch.uint8)
    out = unpack(pack(codes, bits), bits, codes.numel()).reshape(shape)
    assert torch.equal(out, codes)
    ones = torch.full(shape, 2**bits - 1, dtype=torch.uint8)  # every bit set: no field overlaps a neighbour
    assert torch.equal(unpack(pack(ones, bits), bits, ones.numel()).reshape(shape), ones)


@pytest.mark.parametrize("dtype,bits", [(torch.float16, 16), (torch.bfloat16, 16), (torch.float32, 32)])
def test_keep_codes_pass_through(dtype, bits):
    raw = torch.randn(3, 5).to(dtype).view(torch.int16 if bits == 16 else torch.int32)
    packed = pack(raw, bits)
    assert packed.numel() == raw.numel() * bits // 8
    assert torch.equal(unpack(packed, bits, raw.numel()).reshape(3, 5), raw)


def test_pack_errors_say_what_to_do():
    with pytest.raises(ValueError, match="does not fit in 3 bits"):
        pack(torch.tensor([8], dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="must be uint8"):
        pack(torch.tensor([1], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="bits must be in 1..8"):
        pack(torch.tensor([1], dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="take 2 bytes"):
        unpack(torch.zeros(3, dtype=torch.uint8), 4, 4)


# ---------------------------------------------------------------------- params
@pytest.mark.parametrize("name", FAMILY_SPECS + MORE_SPECS)
def test_params_round_trip_bit_exact(name):
    spec = parse_spec(name)
    q = quantize(torch.randn(48, 64) * 0.05, spec)
    packed = pack_params(q.params, spec)
    assert tuple(packed) == param_fields(spec)
    back = unpack_params(packed, spec, q.params.n_rows)
    for f in param_fields(spec):
        assert _bits_equal(getattr(back, f), getattr(q.params, f).float()), f


@pytest.mark.parametrize("name,stored", [
    ("W4-g32", {"scale": torch.float16}), ("W4-g64-sbf16", {"scale": torch.bfloat16}),
    ("FP8", {"scale": torch.float32}), ("MXFP4", {"scale": torch.uint8}),
    ("NVFP4", {"scale": torch.float8_e4m3fn, "tensor_scale": torch.float32}),
    ("W3-g64-asym", {"scale": torch.float16, "zero": torch.uint8}),
    ("W4-g64-asymf", {"scale": torch.float16, "offset": torch.float16}), ("KM3", {"codebook": torch.float16}),
])
def test_params_stored_dtypes(name, stored):
    spec = parse_spec(name)
    packed = pack_params(quantize(torch.randn(16, 64), spec).params, spec)
    assert {k: v.dtype for k, v in packed.items()} == stored


def test_e8m0_extreme_exponents_and_e4m3_scales():
    spec = parse_spec("MXFP4")
    scale = torch.tensor([[2.0**-127], [1.0], [2.0**127], [0.25]])
    packed = pack_params(QParams(scale=scale), spec)
    assert packed["scale"].tolist() == [0, 127, 254, 125]
    assert _bits_equal(unpack_params(packed, spec, 4).scale, scale)
    nv = parse_spec("NVFP4")
    ts = torch.tensor(3.0e-5)
    scale = torch.tensor([[448.0], [2.0**-9], [1.5], [0.0390625]]) * ts
    assert _bits_equal(unpack_params(pack_params(QParams(scale=scale, tensor_scale=ts), nv), nv, 4).scale, scale)


def test_pack_params_rejects_inexact_or_foreign_params():
    spec = parse_spec("W4-g32")
    with pytest.raises(ValueError, match="not exactly representable"):
        pack_params(QParams(scale=torch.tensor([[0.1]])), spec)  # 0.1 is not an fp16 value
    with pytest.raises(ValueError, match="stores params"):
        pack_params(QParams(scale=torch.ones(1, 1), zero=torch.ones(1, 1)), spec)


# ---------------------------------------------------------------------- sizes and PackedWeight
@pytest.mark.parametrize("name", FAMILY_SPECS + MORE_SPECS)
@pytest.mark.parametrize("shape", [(5, 64), (9, 128)])
def test_packed_size_is_the_accounted_cost(name, shape):
    spec = parse_spec(name)
    q = quantize(torch.randn(shape), spec)
    pw = PackedWeight.from_qtensor(q)
    cost = spec.cost(shape)
    component = {"codes": cost.codes, "scale": cost.scales, "zero": cost.zeros, "offset": cost.zeros,
                 "codebook": cost.codebook, "tensor_scale": cost.extra}
    for key, t in pw.tensors().items():
        stored = t.numel() * t.element_size() * 8
        assert 0 <= stored - component[key] < 8, (key, stored, component[key])
    assert 0 <= packed_nbits(q) - cost.total < 8 * len(pw.tensors())
    assert packed_nbits(q) == pw.nbytes * 8


@pytest.mark.parametrize("name", FAMILY_SPECS + ["W4-g64-asymf", "W1-g64", "FP16", "FP32"])
def test_packed_weight_round_trip(name):
    spec = parse_spec(name)
    q = quantize(torch.randn(24, 64), spec)
    pw = PackedWeight.from_qtensor(q)
    q2 = pw.to_qtensor()
    assert torch.equal(q2.codes, q.codes) and q2.shape == q.shape and q2.spec == spec
    assert torch.equal(pw.dequantize(), dequantize(q))
    again = PackedWeight.from_tensors(pw.tensors(), spec, q.shape)
    assert torch.equal(again.dequantize(), dequantize(q))
    with pytest.raises(ValueError, match="no 'codes'"):
        PackedWeight.from_tensors({}, spec, q.shape)
