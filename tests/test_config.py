"""QuantSpec: name <-> spec round trips, JSON round trips, validation errors with helpful text."""
from __future__ import annotations

import itertools
import json

import pytest

from mixq.config import FLOAT_DTYPES, KEEP_DTYPES, PRESETS, SCALE_BITS, QuantSpec, parse_spec
from mixq.config.registry import dtypes
from mixq.granularity import PerChannel, PerGroup, PerTensor, PerToken, parse_granularity


def all_valid_specs():
    """Every valid combination over a small grid of field values."""
    grans = (PerTensor(), PerChannel(), PerGroup(16), PerGroup(32), PerGroup(128))
    out = []
    for dtype, bits, gran, sym, sd, zd, ts, clip in itertools.product(
        dtypes(), (1, 2, 3, 4, 6, 8, 16, 32), grans, (True, False), tuple(SCALE_BITS), ("int", "fp16"),
        (False, True), ("minmax", "mse"),
    ):
        try:
            out.append(QuantSpec(dtype, bits, gran, sym, sd, zd, ts, clip))
        except ValueError:
            pass
    # llama.cpp's K-quants: one granularity each (g256), which the grid above does not hold
    return out + [parse_spec(n) for n in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")]


VALID = all_valid_specs()


def test_grid_covers_every_dtype():
    assert {s.dtype for s in VALID} == set(dtypes()) and len(VALID) > 1000


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_parse_and_round_trip(name):
    spec = parse_spec(name)
    assert parse_spec(spec.name) == spec
    assert parse_spec(name.lower()) == spec


def test_preset_names_are_canonical():
    assert parse_spec("W4-g128").name == "W4-g128"
    assert parse_spec("W3-g64-asym").name == "W3-g64-asym"
    assert parse_spec("KM3").name == "KM3-channel"
    assert parse_spec("FP8").name == "FP8-channel-sfp32"
    for mx in ("MXFP4", "MXFP6", "MXFP8", "MXINT8", "NVFP4", "FP16", "MXFP4-mse", "NVFP4-mse"):
        assert parse_spec(mx).name == mx


def test_every_valid_spec_name_round_trips():
    bad = [(s, s.name) for s in VALID if parse_spec(s.name) != s]
    assert not bad, bad[:5]


def test_every_valid_spec_dict_round_trips():
    for s in VALID:
        d = json.loads(json.dumps(s.to_dict()))
        assert QuantSpec.from_dict(d) == s


def test_parse_examples():
    s = parse_spec("w3-G64-asymf-mse-sbf16")
    assert (s.dtype, s.bits, s.granularity, s.symmetric, s.zero_dtype, s.clip, s.scale_dtype) == (
        "int", 3, PerGroup(64), False, "fp16", "mse", "bf16")
    assert parse_spec("FP8-e5m2").dtype == "fp8_e5m2" and parse_spec("MXFP6-e3m2").dtype == "fp6_e3m2"
    assert parse_spec("FP4-g16-se4m3-ts").tensor_scale
    assert parse_spec("NF4").granularity == PerGroup(64) and parse_spec("W4").granularity == PerGroup(128)
    spec = parse_spec("W4-g128")
    assert parse_spec(spec) is spec
    assert parse_granularity("token") == PerToken() and parse_granularity(64) == PerGroup(64)


@pytest.mark.parametrize("text,match", [
    ("W0", "bits must be in 1..8"),
    ("W9", "bits must be in 1..8"),
    ("KM9", "bits must be in 1..8"),
    ("NF5", "NormalFloat supports 2, 3 or 4 bits"),
    ("W4-g100x", "unknown granularity"),
    ("W4-g0", "unknown granularity"),
    ("NF4-g64-asym", "asymmetric grids are only defined for dtype='int'"),
    ("MXFP4-asym", "fixed block format"),
    ("MXFP4-e3m2", "no e3m2 variant"),
    ("W4-e4m3", "no element variants"),
    ("FP16-asym", "asymmetric"),
    ("KM3-sfp16", "carry their own magnitude"),
    ("W4-snone", "needs a scale"),
    ("W4-ts", "tensor_scale"),
    ("XYZ4", "unknown spec"),
    ("", "empty spec"),
])
def test_bad_spec_names(text, match):
    with pytest.raises(ValueError, match=match):
        parse_spec(text)


@pytest.mark.parametrize("kw,match", [
    (dict(dtype="int5"), "unknown element dtype 'int5'"),
    (dict(dtype="int", bits=True), "bits must be an integer"),
    (dict(dtype="fp8_e4m3", bits=4), "fp8_e4m3 has 8 bits"),
    (dict(dtype="fp16", bits=16), "scale_dtype='none'"),
    (dict(scale_dtype="fp8"), "unknown scale dtype"),
    (dict(zero_dtype="bf16", symmetric=False), "zero_dtype must be"),
    (dict(zero_dtype="fp16"), "only applies to asymmetric"),
    (dict(clip="percentile"), "clip must be"),
    (dict(granularity=-1), "granularity must be"),
])
def test_bad_spec_fields(kw, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec(**kw)


def test_from_dict_errors():
    d = parse_spec("W4-g128").to_dict()
    with pytest.raises(ValueError, match="not a QuantSpec"):
        QuantSpec.from_dict({"dtype": "int"})
    with pytest.raises(ValueError, match="version"):
        QuantSpec.from_dict({**d, "_version": 99})
    with pytest.raises(ValueError, match="unknown QuantSpec fields"):
        QuantSpec.from_dict({**d, "group": 64})


def test_minifloat_and_keep_bits_consistent():
    for d, b in {**FLOAT_DTYPES, **KEEP_DTYPES}.items():
        with pytest.raises(ValueError, match=f"{b} bits"):
            QuantSpec(dtype=d, bits=b + 1, scale_dtype="none" if d in KEEP_DTYPES else "fp16")
