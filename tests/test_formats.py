"""Formats: exact code round trips, bit-exact minifloats, MX/NVFP4 scales, SQNR floors, clip/kmeans relations."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixq.config import PRESETS, QuantSpec, parse_spec
from mixq.formats import (
    FLOAT_FORMATS,
    NF4,
    QParams,
    decode,
    dequantize,
    e4m3_round,
    e8m0_exponent,
    encode,
    fake_quantize,
    fit,
    float_to_bits,
    levels,
    nf_levels,
    normal_float_levels,
    quantize,
    round_to_grid,
    value_table,
)
from mixq.formats.base import _row_error
from mixq.granularity import PerChannel, PerGroup

ROUND_TRIP_SPECS = [
    *[f"W{b}-g64" for b in range(1, 9)], *[f"W{b}-g64-asym" for b in range(1, 9)], "W4-g64-asymf", "W3-g64-asymf",
    "W4-g64-sbf16", "W4-g64-sfp32", "W4-g64-se8m0", "W3-g64-asym-se8m0", "W4-g16-se4m3-ts",
    "NF2-g64", "NF3-g64", "NF4-g64", "NF4-g64-se8m0", "KM1", "KM2", "KM3", "KM4",
    "FP8", "FP8-e5m2", "FP6-e3m2", "FP6-e2m3", "FP4", "FP4-g32-sbf16",
    "MXFP8", "MXFP8-e5m2", "MXFP6", "MXFP6-e3m2", "MXFP4", "MXINT8", "NVFP4", "W4-g64-mse", "NVFP4-mse",
]


def sqnr_db(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """``10 log10(||w||² / ||w - ŵ||²)``."""
    return 10 * math.log10(w.pow(2).sum().item() / (w - w_hat).pow(2).sum().item())


def valid_codes(spec: QuantSpec) -> torch.Tensor:
    """Every code the format can produce (finite minifloat patterns), ascending, uint8."""
    if spec.dtype in FLOAT_FORMATS:
        return torch.nonzero(torch.isfinite(value_table(FLOAT_FORMATS[spec.dtype]))).flatten().to(torch.uint8)
    return torch.arange(2**spec.bits).to(torch.uint8)


# ---------------------------------------------------------------------- exact round trips
@pytest.mark.parametrize("name", ROUND_TRIP_SPECS)
def test_every_code_round_trips(name):
    spec = parse_spec(name)
    rows = torch.randn(6, 64, generator=torch.Generator().manual_seed(0)) * 3
    p = fit(rows, spec)
    codes = encode(rows, p, spec)
    assert codes.dtype == torch.uint8 and codes.shape == rows.shape
    assert set(codes.unique().tolist()) <= set(valid_codes(spec).tolist())
    all_codes = valid_codes(spec).expand(rows.shape[0], -1).contiguous()
    values = decode(all_codes, p, spec)
    assert values.dtype == torch.float32 and torch.isfinite(values).all()
    assert torch.equal(encode(values, p, spec), all_codes)  # encode(decode(c)) == c
    assert torch.equal(round_to_grid(values, p, spec), values)  # grid points are fixed points
    x_hat = round_to_grid(rows, p, spec)
    assert torch.equal(round_to_grid(x_hat, p, spec), x_hat)  # idempotent


@settings(max_examples=25, deadline=None)
@given(r=st.integers(1, 6), n=st.integers(1, 40), bits=st.integers(1, 8), sym=st.booleans(),
       zf=st.sampled_from(["int", "fp16"]), seed=st.integers(0, 2**16), mag=st.floats(1e-3, 1e3))
def test_int_round_trip_random_shapes(r, n, bits, sym, zf, seed, mag):
    spec = QuantSpec(dtype="int", bits=bits, granularity=PerChannel(), symmetric=sym, zero_dtype="int" if sym else zf)
    rows = torch.randn(r, n, generator=torch.Generator().manual_seed(seed)) * mag
    p = fit(rows, spec)
    codes = encode(rows, p, spec)
    assert int(codes.max()) <= 2**bits - 1
    assert torch.equal(encode(decode(codes, p, spec), p, spec), codes)
    all_codes = torch.arange(2**bits).to(torch.uint8).expand(r, -1).contiguous()
    assert torch.equal(encode(decode(all_codes, p, spec), p, spec), all_codes)


def test_column_by_column_equals_whole_and_select():
    """GPTQ encodes one column at a time with params fitted on the group; select() picks rows."""
    for name in ("W4-g32", "W3-g32-asymf", "NF4-g32", "KM3-g32", "MXFP4", "NVFP4"):
        spec = parse_spec(name)
        rows = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
        p = fit(rows, spec)
        whole = encode(rows, p, spec)
        cols = torch.cat([encode(rows[:, j:j + 1], p, spec) for j in range(rows.shape[1])], 1)
        assert torch.equal(whole, cols), name
        idx = torch.tensor([5, 2])
        assert torch.equal(encode(rows[idx], p.select(idx), spec), whole[idx]), name
        assert torch.equal(encode(rows[3:4], p.select(3), spec), whole[3:4]), name
        assert p.select(slice(0, 4)).n_rows == 4


# ---------------------------------------------------------------------- integer grids
@pytest.mark.parametrize("name", ["W2-g64", "W4-g64", "W8-g64", "W3-g64-asym", "W4-g64-asymf", "W1-g64", "W4-g64-se8m0"])
def test_int_grid_error_bounded_and_zero(name):
    spec = parse_spec(name)
    rows = torch.randn(32, 64, generator=torch.Generator().manual_seed(2)) + (0.7 if "asym" in name else 0.0)
    p = fit(rows, spec)
    grid = decode(torch.arange(2**spec.bits).to(torch.uint8).expand(32, -1).contiguous(), p, spec)
    lo, hi = grid.amin(1, keepdim=True), grid.amax(1, keepdim=True)
    err = (round_to_grid(rows, p, spec) - rows).abs()
    inside = (rows >= lo) & (rows <= hi)
    half = p.scale.expand_as(rows) * (1.0 if spec.bits == 1 else 0.5) * (1 + 1e-5)
    assert (err[inside] <= half[inside]).all()
    if spec.zero_dtype == "int" and spec.bits > 1:  # zero is exactly representable
        assert torch.equal(round_to_grid(torch.zeros(32, 1), p, spec), torch.zeros(32, 1))
    if p.zero is not None:
        assert torch.equal(p.zero, p.zero.round()) and p.zero.min() >= 0 and p.zero.max() <= 2**spec.bits - 1


def test_int_symmetric_minmax_scale_and_conventions():
    rows = torch.tensor([[-1.5, 0.0, 0.75, 1.0]])
    spec = QuantSpec(dtype="int", bits=4, granularity=PerChannel(), scale_dtype="fp32")
    p = fit(rows, spec)
    assert torch.allclose(p.scale, torch.tensor([[2 * 1.5 / 15]]))
    assert encode(rows, p, spec)[0, 1] == 8  # value = scale * (q - 8)
    b = QuantSpec(dtype="int", bits=1, granularity=PerChannel(), scale_dtype="fp32")
    pb = fit(rows, b)
    assert pb.scale.item() == 1.5 and decode(encode(rows, pb, b), pb, b).tolist() == [[-1.5, 1.5, 1.5, 1.5]]
    bm = QuantSpec(dtype="int", bits=1, granularity=PerChannel(), scale_dtype="fp32", clip="mse")
    assert fit(rows, bm).scale.item() == pytest.approx(rows.abs().mean().item())  # L2-optimal binary scale


@pytest.mark.parametrize("name", ["W4-g64", "W3-g64-asym", "W4-g64-asymf", "W1-g64", "NF4-g64", "KM3-g64", "FP8",
                                  "FP4-g64", "MXFP4", "MXINT8", "NVFP4", "W4-g64-se8m0", "NF3-g64-se8m0", "W4-g64-mse"])
def test_degenerate_rows_no_nan(name):
    spec = parse_spec(name)
    rows = torch.zeros(4, 64)
    rows[1] = 0.37
    rows[2] = -2.5
    rows[3, 5] = 1e-30
    p = fit(rows, spec)
    x_hat = round_to_grid(rows, p, spec)
    assert torch.isfinite(x_hat).all()
    if spec.bits > 1:  # a binary grid has no 0: a zero row decodes to ±(smallest scale)
        assert torch.equal(x_hat[0], torch.zeros(64))
    if name == "W3-g64-asym":  # the range holds 0, so a constant row is a grid end: exact up to fp16 scale
        assert torch.allclose(x_hat[1:3], rows[1:3], rtol=1e-3)


# ---------------------------------------------------------------------- minifloats
@pytest.mark.parametrize("name,tdt", [("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
def test_fp8_bit_exact_vs_torch(name, tdt):
    fmt = FLOAT_FORMATS[name]
    ref = torch.arange(256, dtype=torch.uint8).view(tdt).float()
    tab = value_table(fmt)
    assert torch.equal(torch.isnan(tab), torch.isnan(ref))
    fin = ~torch.isnan(ref)
    assert torch.equal(tab[fin], ref[fin]) and torch.equal(torch.signbit(tab[fin]), torch.signbit(ref[fin]))
    g = torch.Generator().manual_seed(3)
    grid = tab[torch.isfinite(tab)].unique()
    mids = (grid[1:] + grid[:-1]) / 2  # exact ties (float32 holds them)
    x = torch.cat([
        torch.sign(torch.randn(20000, generator=g)) * torch.exp2(torch.rand(20000, generator=g) * 2 * (fmt.emax + 12) - fmt.emax - 12),
        torch.randn(20000, generator=g) * fmt.max / 4,
        torch.rand(5000, generator=g) * 2.0 ** fmt.min_exp * 1.1,  # subnormals
        grid, mids, torch.nextafter(mids, torch.tensor(math.inf)), torch.nextafter(mids, torch.tensor(-math.inf)),
        torch.tensor([0.0, -0.0, fmt.max, -fmt.max]),
    ]).clamp(-fmt.max, fmt.max)
    assert torch.equal(float_to_bits(x, fmt), x.to(tdt).view(torch.uint8))
    top = float_to_bits(torch.tensor([fmt.max]), fmt)
    sat = float_to_bits(torch.tensor([fmt.max * 1.5, math.inf, 1e30]), fmt)
    assert torch.equal(sat, top.expand(3)) and torch.isfinite(value_table(fmt)[sat.long()]).all()
    assert value_table(fmt)[float_to_bits(torch.tensor([-math.inf]), fmt).long()].item() == -fmt.max


def test_minifloat_level_tables():
    assert levels(FLOAT_FORMATS["fp4_e2m1"]).tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    e2m3 = levels(FLOAT_FORMATS["fp6_e2m3"]).tolist()
    assert e2m3[:9] == [i / 8 for i in range(9)] and e2m3[-4:] == [6.0, 6.5, 7.0, 7.5] and len(e2m3) == 32
    e3m2 = levels(FLOAT_FORMATS["fp6_e3m2"]).tolist()
    assert e3m2[:5] == [0, 0.0625, 0.125, 0.1875, 0.25] and e3m2[-4:] == [16, 20, 24, 28] and len(e3m2) == 32
    expect = {"fp8_e4m3": (448, 8), "fp8_e5m2": (57344, 15), "fp6_e3m2": (28, 4), "fp6_e2m3": (7.5, 2), "fp4_e2m1": (6, 2)}
    for name, (mx, emax) in expect.items():
        assert (FLOAT_FORMATS[name].max, FLOAT_FORMATS[name].emax) == (mx, emax)


def test_fp4_round_to_nearest_even_and_saturation():
    f = FLOAT_FORMATS["fp4_e2m1"]
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -2.5, -0.25, 7.0, 100.0, 0.26, 4.99])
    got = value_table(f)[float_to_bits(x, f).long()]
    assert got.tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -2.0, -0.0, 6.0, 6.0, 0.5, 4.0]
    assert float_to_bits(torch.tensor([-6.0, 6.0]), f).tolist() == [0b1111, 0b0111]
    with pytest.raises(ValueError, match="NaN"):
        float_to_bits(torch.tensor([math.nan]), f)


# ---------------------------------------------------------------------- MX and NVFP4
def test_mx_scales_are_powers_of_two_and_match_spec():
    rows = torch.zeros(6, 32)
    rows[0, 0], rows[1, 3], rows[2, 7], rows[3, 1] = 5.0, -7.0, 0.3, 1e-45
    rows[5, 0] = 3e38
    cases = {"MXFP4": 2, "MXFP6": 2, "MXFP6-e3m2": 4, "MXFP8": 8, "MXFP8-e5m2": 15, "MXINT8": 6}
    for name, emax in cases.items():
        spec = parse_spec(name)
        p = fit(rows, spec)
        s = p.scale.flatten()
        assert torch.equal(torch.exp2(torch.log2(s).round()), s), name
        expect = [2.0 ** (2 - emax), 2.0 ** (2 - emax), 2.0 ** (-2 - emax), 2.0**-127, 2.0**-127, 2.0 ** (127 - emax)]
        assert s.tolist() == expect, name
        assert torch.equal(round_to_grid(rows[4:5], p.select(4), spec), torch.zeros(1, 32))
    p = fit(rows[:2], parse_spec("MXFP4"))
    assert round_to_grid(rows[:2], p, parse_spec("MXFP4"))[:, :4].tolist() == [[4.0, 0, 0, 0], [0, 0, 0, -6.0]]
    assert e8m0_exponent(torch.tensor([1.0, 2.0**-127, 0.25])).tolist() == [127, 0, 125]
    mxint = parse_spec("MXINT8")
    x = torch.full((1, 32), 0.5)
    x[0, 0] = 1.0
    pm = fit(x, mxint)
    assert pm.scale.item() == 2.0**-6 and encode(x, pm, mxint)[0, :2].tolist() == [128 + 64, 128 + 32]


def test_nvfp4_hand_case():
    spec = parse_spec("NVFP4")
    w = torch.zeros(2, 16)
    w[0, :4] = torch.tensor([12.0, 5.0, -1.0, 0.4])
    w[1, :3] = torch.tensor([3.0, -0.7, 1.3])
    q = quantize(w, spec)
    ts = q.params.tensor_scale
    assert ts.dim() == 0 and ts.item() == pytest.approx(12 / 2688)
    assert torch.allclose(q.params.scale.flatten(), torch.tensor([448.0, 112.0]) * ts)  # e4m3(amax/6/ts) * ts
    wh = dequantize(q)
    assert torch.allclose(wh[0, :4], torch.tensor([12.0, 4.0, -1.0, 0.0]))  # 5/2=2.5 -> 2 (RNE); 0.4/2=0.2 -> 0
    assert torch.allclose(wh[1, :3], torch.tensor([3.0, -0.75, 1.5]))  # scale 0.5: 1.3/0.5=2.6 -> 3
    tiny = fit(torch.tensor([[1e-9] * 16]), spec, tensor_scale=ts)
    assert tiny.scale.item() > 0 and tiny.scale.item() == pytest.approx(2.0**-9 * ts.item())
    x = torch.tensor([1e-3, 0.017, 0.3, 3.0, 447.0, 500.0, 1e6])
    assert torch.equal(e4m3_round(x), x.clamp(max=448).to(torch.float8_e4m3fn).float())


# ---------------------------------------------------------------------- NormalFloat
def test_nf_tables():
    assert torch.equal(normal_float_levels(4), torch.tensor(NF4)) and torch.equal(nf_levels(4), torch.tensor(NF4))
    for bits in (2, 3, 4):
        t = nf_levels(bits)
        assert len(t) == 2**bits and torch.equal(t, t.sort().values) and t[0] == -1 and t[-1] == 1
        assert (t == 0).sum() == 1 and (t > 0).sum() == (t < 0).sum() + 1
    spec = parse_spec("NF4-g64")
    rows = torch.tensor([[-2.0, 0.0, 2.0 * NF4[9], 1.0] + [0.0] * 60])
    p = fit(rows, spec)
    assert p.scale.item() == 2.0 and encode(rows, p, spec)[0, :4].tolist() == [0, 7, 9, 12]


# ---------------------------------------------------------------------- SQNR floors (Gaussian [256, 512])
SQNR_FLOORS = {
    "W8-channel": 40, "W4-g128": 18, "W4-g32": 19.5, "W3-g128": 11.5, "W3-g64": 12.5, "W3-g64-asym": 13.5,
    "W2-g64": 5, "NF4-g64": 19.5, "NF3-g64": 13.5, "KM3": 14, "FP8": 30, "FP8-e5m2": 24.5, "MXFP8": 29.5,
    "MXFP6": 29.5, "MXFP4": 17.5, "MXINT8": 40, "NVFP4": 19.5, "FP16": 70,
    "Q4_K": 22.5, "Q3_K": 16.3, "IQ4_NL": 22.2,
}


@pytest.fixture(scope="module")
def gauss():
    return torch.randn(256, 512, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_sqnr_floor(name, gauss):
    assert name in SQNR_FLOORS, f"add an SQNR floor for preset {name}"
    assert sqnr_db(gauss, fake_quantize(gauss, parse_spec(name))) > SQNR_FLOORS[name]


def test_sqnr_relations(gauss):
    s = {n: sqnr_db(gauss, fake_quantize(gauss, parse_spec(n)))
         for n in ("W3-channel", "KM3", "W4-g32", "W4-g128", "W4-g64", "NF4-g64", "MXFP4", "NVFP4", "W3-g64", "W3-g64-asym")}
    assert s["KM3"] >= s["W3-channel"]  # k-means <= uniform error at equal bits
    assert s["W4-g32"] > s["W4-g128"] and s["NF4-g64"] > s["W4-g64"] and s["NVFP4"] > s["MXFP4"]
    assert s["W3-g64-asym"] > s["W3-g64"]


def test_fake_quantize_dtypes_and_keep(gauss):
    w = gauss[:8, :128].to(torch.bfloat16)
    assert fake_quantize(w, parse_spec("W4-g128")).dtype == torch.bfloat16
    assert torch.equal(fake_quantize(gauss, parse_spec("FP16")), gauss.half().float())
    assert torch.equal(fake_quantize(gauss, parse_spec("BF16")), gauss.bfloat16().float())
    for name, idt in (("FP16", torch.int16), ("BF16", torch.int16), ("FP32", torch.int32)):
        q = quantize(gauss, parse_spec(name))
        assert q.codes.dtype == idt and torch.equal(dequantize(q), fake_quantize(gauss, parse_spec(name)))
    with pytest.raises(ValueError, match="floating point"):
        fit(gauss, parse_spec("FP16"))
    with pytest.raises(ValueError, match="2-D"):
        quantize(gauss[0], parse_spec("W4-g128"))


# ---------------------------------------------------------------------- clip search and weighted k-means
@pytest.mark.parametrize("name", ["W4-g64", "W3-g64-asym", "W3-g64-asymf", "W1-g64", "W1-g64-asym", "W1-g64-asymf", "NF4-g64", "FP4-g64", "MXFP4", "NVFP4", "FP8"])
def test_mse_clip_not_worse_than_minmax(name, gauss):
    rows = gauss[:64, :256].reshape(-1, 64)  # fit() sees rows = groups, whatever the spec's granularity
    mm = parse_spec(name)
    mse = QuantSpec(**{**mm.__dict__, "clip": "mse"})
    weight = torch.rand(1, rows.shape[1], generator=torch.Generator().manual_seed(4)) + 0.1
    for w in (None, weight):
        e_mm = _row_error(rows, fit(rows, mm, weight=w), mm, w)
        e_mse = _row_error(rows, fit(rows, mse, weight=w), mse, w)
        assert (e_mse <= e_mm).all(), name
    if name in ("W4-g64", "NF4-g64", "NVFP4", "W1-g64"):
        assert e_mse.sum() < 0.97 * e_mm.sum(), name


def test_weighted_kmeans_lowers_weighted_error():
    g = torch.Generator().manual_seed(5)
    rows = torch.randn(64, 256, generator=g)
    w = torch.exp(2 * torch.randn(64, 256, generator=g))
    spec = parse_spec("KM3")
    e_weighted = _row_error(rows, fit(rows, spec, weight=w), spec, w).sum()
    e_plain = _row_error(rows, fit(rows, spec), spec, w).sum()
    assert e_weighted < 0.95 * e_plain
    p = fit(rows, spec)
    assert p.scale is None and p.codebook.shape == (64, 8)
    assert torch.equal(p.codebook, p.codebook.half().float()) and torch.equal(p.codebook, p.codebook.sort(-1).values)


def test_quantize_layout_and_weight_broadcast(gauss):
    spec = parse_spec("W4-g128")
    q = quantize(gauss, spec)
    assert q.codes.shape == (256, 512) and q.params.scale.shape == (256 * 4, 1)
    o, j = 7, 2  # row r = o * (cols // g) + j holds W[o, j*g:(j+1)*g]
    ref = fit(gauss[o:o + 1, 256:384], spec)
    assert torch.equal(q.params.scale[o * 4 + j], ref.scale[0])
    qw = quantize(gauss, parse_spec("W4-g128-mse"), weight=torch.rand(1, 512))
    assert qw.codes.shape == (256, 512)
    with pytest.raises(ValueError, match="broadcast"):
        quantize(gauss, spec, weight=torch.rand(3, 512))
    assert isinstance(QParams().select(0), QParams)
    assert PerGroup(128) == spec.granularity
