"""Bit accounting: QuantSpec.cost against hand-computed cases, and against what quantize() stores."""
from __future__ import annotations

import pytest
import torch

from mixq.config import SCALE_BITS, BitCost, QuantSpec, parse_spec
from mixq.formats import quantize
from mixq.granularity import PerChannel, PerGroup, PerTensor


@pytest.mark.parametrize("name,shape,codes,scales,zeros,codebook,extra", [
    ("W4-g128", (4096, 4096), 4096 * 4096 * 4, 4096 * 32 * 16, 0, 0, 0),
    ("W4-g128-asym", (4096, 4096), 4096 * 4096 * 4, 4096 * 32 * 16, 4096 * 32 * 4, 0, 0),
    ("W4-g128-asymf", (4096, 4096), 4096 * 4096 * 4, 4096 * 32 * 16, 4096 * 32 * 16, 0, 0),
    ("W3-g64-asym", (256, 512), 256 * 512 * 3, 256 * 8 * 16, 256 * 8 * 3, 0, 0),
    ("W8-channel", (1000, 300), 1000 * 300 * 8, 1000 * 16, 0, 0, 0),
    ("W4-tensor", (64, 64), 64 * 64 * 4, 16, 0, 0, 0),
    ("W4-g128-sbf16", (8, 256), 8 * 256 * 4, 16 * 16, 0, 0, 0),
    ("NVFP4", (16, 32), 512 * 4, 32 * 8, 0, 0, 32),
    ("MXFP4", (1, 64), 256, 2 * 8, 0, 0, 0),
    ("MXINT8", (4, 64), 4 * 64 * 8, 8 * 8, 0, 0, 0),
    ("MXFP6", (2, 32), 2 * 32 * 6, 2 * 8, 0, 0, 0),
    ("KM3", (10, 100), 3000, 0, 0, 10 * 8 * 16, 0),
    ("NF4-g64", (128, 256), 128 * 256 * 4, 128 * 4 * 16, 0, 0, 0),
    ("FP8", (32, 64), 32 * 64 * 8, 32 * 32, 0, 0, 0),
    ("FP16", (7, 9), 7 * 9 * 16, 0, 0, 0, 0),
    ("BF16", (7, 9), 7 * 9 * 16, 0, 0, 0, 0),
    ("FP32", (7, 9), 7 * 9 * 32, 0, 0, 0, 0),
])
def test_cost_hand_cases(name, shape, codes, scales, zeros, codebook, extra):
    c = parse_spec(name).cost(shape)
    assert (c.codes, c.scales, c.zeros, c.codebook, c.extra) == (codes, scales, zeros, codebook, extra)
    assert c.total == codes + scales + zeros + codebook + extra
    assert c.numel == shape[0] * shape[1] and c.bpw == c.total / c.numel and c.nbytes == c.total / 8


def test_bpw_headline_numbers():
    assert parse_spec("W4-g128").bpw((4096, 4096)) == 4.125
    assert parse_spec("W4-g128-asym").bpw((4096, 4096)) == 4.15625
    assert parse_spec("MXFP4").bpw((4096, 4096)) == 4.25
    assert parse_spec("NVFP4").bpw((4096, 4096)) == pytest.approx(4.5 + 32 / 4096**2)
    assert parse_spec("W8-channel").bpw((4096, 4096)) == 8 + 16 / 4096
    assert parse_spec("FP16").bpw((10, 10)) == 16


def test_bitcost_add_and_dict():
    a = parse_spec("W4-g128").cost((128, 256))
    b = parse_spec("NVFP4").cost((16, 32))
    s = a + b
    assert s.total == a.total + b.total and s.numel == a.numel + b.numel and s.extra == 32
    d = s.to_dict()
    assert d["total"] == s.total and d["bpw"] == s.bpw
    assert BitCost(10, 40).bpw == 4.0


def test_group_must_divide_row_length():
    with pytest.raises(ValueError, match="row length 100"):
        parse_spec("W4-g128").cost((8, 100))
    with pytest.raises(ValueError, match="100"):
        quantize(torch.randn(8, 100), parse_spec("W4-g64"))


def stored_bits(q) -> dict[str, int]:
    """What a QTensor actually holds, in bits, per BitCost field."""
    s, p = q.spec, q.params
    scale_bits = SCALE_BITS[s.scale_dtype]
    zero_bits = s.bits if s.zero_dtype == "int" else 16
    return {
        "codes": q.codes.numel() * s.bits,
        "scales": 0 if p.scale is None else p.scale.numel() * scale_bits,
        "zeros": sum(0 if t is None else t.numel() * zero_bits for t in (p.zero, p.offset)),
        "codebook": 0 if p.codebook is None else p.codebook.numel() * 16,
        "extra": 0 if p.tensor_scale is None else p.tensor_scale.numel() * 32,
    }


@pytest.mark.parametrize("name", [
    "W4-g128", "W4-g32", "W3-g64-asym", "W3-g64-asymf", "W2-g64", "W8-channel", "W4-tensor", "W1-g64",
    "NF4-g64", "NF3-g64", "KM3", "KM2-g64", "FP8", "FP8-e5m2", "FP4-g32", "MXFP8", "MXFP6", "MXFP4", "MXINT8",
    "NVFP4", "NVFP4-mse", "W4-g16-se4m3-ts", "FP16", "BF16", "FP32",
])
def test_qtensor_holds_exactly_what_cost_charges(name):
    spec = parse_spec(name)
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(0))
    q = quantize(w, spec)
    c = spec.cost(tuple(w.shape))
    if spec.is_float_keep:
        assert q.codes.element_size() * 8 == spec.bits and q.codes.numel() == c.numel
        assert (c.scales, c.zeros, c.codebook, c.extra) == (0, 0, 0, 0)
        return
    assert stored_bits(q) == {"codes": c.codes, "scales": c.scales, "zeros": c.zeros, "codebook": c.codebook, "extra": c.extra}
    assert int(q.codes.max()) < 2**spec.bits and q.cost() == c


def test_granularity_group_counts():
    shape = (64, 256)
    for g, ng in ((PerTensor(), 1), (PerChannel(), 64), (PerGroup(32), 64 * 8)):
        spec = QuantSpec(dtype="int", bits=4, granularity=g)
        assert spec.cost(shape).scales == ng * 16
        assert quantize(torch.randn(shape), spec).params.scale.shape == (ng, 1)
