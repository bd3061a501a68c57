"""QuantLinear: packed layer == fake-quant reference; every fast kernel == the reference kernel."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mixq.arch import LayerPolicy, get_weight, iter_layers, set_weight
from mixq.config import parse_spec
from mixq.formats import dequantize, quantize
from mixq.runtime import KERNELS, KernelUnsupported, PackedWeight, QuantLinear, fast_kernel_for, quantize_to_qlinear
from mixq.runtime.kernels import cpu
from tiny import make_tiny

HAS_INT4_OP = cpu._ops() is not None
needs_int4 = pytest.mark.skipif(not HAS_INT4_OP, reason="torch build without _weight_int4pack_mm_for_cpu")
CPU_SPECS = ["W4-g32", "W4-g64", "W4-g64-sbf16", "W4-g32-sfp32", "W4-g64-se8m0", "W3-g64-asym", "W4-g64-asymf",
             "W2-channel", "W1-g64", "W4-tensor", "W4-g128", "W5-g64", "W6-g32-asym", "W8-channel", "W8-g64-asymf",
             "W7-g128", "W5-tensor", "W6-g64-asym"]


def _layer(name, shape, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    q = quantize(w, parse_spec(name))
    b = torch.randn(shape[0], generator=g) if bias else None
    return q, b


@pytest.mark.parametrize("name", ["W4-g32", "W3-g64-asym", "NF4-g64", "MXFP4", "NVFP4", "FP8", "KM3", "W8-channel",
                                  "FP16"])
@pytest.mark.parametrize("shape", [(32, 64), (48, 128)])
@pytest.mark.parametrize("bias", [False, True])
def test_reference_equals_fake_quant(name, shape, bias):
    q, b = _layer(name, shape, bias)
    layer = QuantLinear.from_qtensor(q, b, kernel="reference")
    x = torch.randn(2, 3, shape[1])
    assert torch.equal(layer(x), F.linear(x, dequantize(q), b))
    assert layer(x).shape == (2, 3, shape[0])


def _fast_bound(layer, x, q, b):
    """|y - reference| allowed for the cpu kernels: one bf16 rounding of the result, plus (cpu-int4) one bf16
    rounding of each effective scale s' and zero z' (bounded in float64 from the exact params)."""
    w = dequantize(q)
    mag = x.float().abs() @ w.abs().t() + (0 if b is None else b.abs())
    bound = 2.0**-8 * mag if layer.kernel == "cpu-int4-exact" else 2.0**-9 * mag
    if layer.kernel == "cpu-int4":
        pw = layer.packed
        kg, planes = cpu._effective_params(pw, exact=True)
        codes = pw.codes_unpacked()
        for i, (shift, sp, zp) in enumerate(planes):
            s, z = sum(p.double() for p in sp), sum(p.double() for p in zp)  # [out, in / kg], exact
            qk = (cpu.plane_codes(codes, pw.spec.bits, i).double() + cpu._expand_shift(shift, pw.shape) - 8).abs()
            per_w = qk * s.abs().repeat_interleave(kg, 1) + z.abs().repeat_interleave(kg, 1)
            bound = bound + 2.0**-9 * (x.double().abs() @ per_w.t()).float()
        bound = bound + 2.0**-9 * mag
    return 1.001 * bound + 1e-6


@needs_int4
@pytest.mark.parametrize("kernel", ["cpu-int4", "cpu-int4-exact"])
@pytest.mark.parametrize("name", CPU_SPECS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m", [1, 5])
def test_cpu_kernel_equals_reference(kernel, name, bias, m):
    """bf16 in/out: |cpu - reference(fp32 on the same input)| <= one bf16 rounding of the result's magnitude
    (cpu-int4-exact), plus one bf16 rounding of each scale / zero term (cpu-int4)."""
    q, b = _layer(name, (64, 128), bias, seed=m)
    layer = QuantLinear.from_qtensor(q, b, kernel=kernel, release_codes=False)
    x = torch.randn(m, 128).bfloat16()
    y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.kernel_for(x).name == kernel == layer.last_kernel
    ref = KERNELS["reference"].linear(x.float(), layer.packed, None, layer.bias)
    assert torch.all((y.float() - ref).abs() <= _fast_bound(layer, x, q, b))


@needs_int4
@pytest.mark.parametrize("name", ["W4-g32", "W4-g64-asymf", "W3-g64-asym", "W4-g128", "W4-g64-asym", "W2-g32-asym",
                                  "W3-g32-asymf", "W4-g32-sfp32", "W1-g64", "W5-g64", "W6-g64-asym", "W8-g128",
                                  "W8-g64-asymf", "W8-channel"])
def test_cpu_int4_is_as_close_as_a_bf16_fake_quant_layer(name):
    """The rounded-params kernel against exact fp32: no worse than the bf16 fake-quant layer (F.linear on bf16 Ŵ);
    two planes (5-8 bits) round two partial results to bf16, so they may be up to 2x as far."""
    q, _ = _layer(name, (128, 256), False, seed=3)
    x = torch.randn(4, 256).bfloat16()
    ref = F.linear(x.double(), dequantize(q).double())
    fast = QuantLinear.from_qtensor(q, kernel="cpu-int4")(x).double()
    bf16 = F.linear(x, dequantize(q).bfloat16()).double()
    factor = 1.3 if cpu.n_planes(q.spec.bits) == 1 else 2.0
    assert (fast - ref).abs().mean() <= factor * (bf16 - ref).abs().mean() + 1e-6


@needs_int4
@pytest.mark.parametrize("name,pieces", [("W4-g64-sbf16", 1), ("W4-g64-se8m0", 1), ("W4-g32", 2), ("W4-g32-sfp32", 3)])
def test_cpu_kernel_splits_scales_exactly(name, pieces):
    q, _ = _layer(name, (32, 64), False)
    pw = PackedWeight.from_qtensor(q)
    state = cpu.prepare(pw, exact=True)
    sz = state["planes"][0]["sz"]
    assert len(state["planes"]) == 1 and sz.shape[0] <= pieces and state["group"] in cpu.KERNEL_GROUPS
    total = sz.double().sum(0)[..., 0].t()  # [out, in / G]
    s = q.params.scale.double().reshape(32, -1).repeat_interleave(total.shape[1] // (64 // q.spec.granularity.size), 1)
    assert torch.equal(total, s)
    fast = cpu.prepare(pw)  # cpu-int4: one GEMM, scales rounded to the nearest bf16
    assert fast["planes"][0]["sz"].shape[0] == 1
    assert torch.equal(fast["planes"][0]["sz"][0, ..., 0].t().float(), s.float().bfloat16().float())


@needs_int4
def test_auto_selection_and_explicit_errors():
    q, _ = _layer("W4-g32", (32, 64), False)
    layer = QuantLinear.from_qtensor(q)
    assert layer.kernel_for(torch.zeros(1, 64)).name == "reference"  # fp32: the int4 op is slower than dense
    assert layer.kernel_for(torch.zeros(1, 64, dtype=torch.bfloat16)).name == "cpu-int4"
    long = torch.zeros(cpu.MAX_TOKENS + 1, 64, dtype=torch.bfloat16)
    assert layer.kernel_for(long).name == "reference"
    assert QuantLinear.from_qtensor(q, kernel="cpu").kernel_for(long).name == "cpu-int4"  # alias, explicit
    with pytest.raises(KernelUnsupported, match="bfloat16"):
        QuantLinear.from_qtensor(q, kernel="cpu-int4")(torch.zeros(1, 64))
    nf, _ = _layer("NF4-g64", (32, 64), False)
    with pytest.raises(KernelUnsupported, match="integer grids"):
        QuantLinear.from_qtensor(nf, kernel="cpu-int4-exact")(torch.zeros(1, 64, dtype=torch.bfloat16))
    assert fast_kernel_for(parse_spec("W8-g64"), (64, 128)) == "cpu-int4"  # two int4 planes
    odd, _ = _layer("W4-g32", (24, 64), False)
    assert QuantLinear.from_qtensor(odd).kernel_for(torch.zeros(1, 64, dtype=torch.bfloat16)).name == "reference"
    with pytest.raises(ValueError, match="unknown kernel"):
        QuantLinear.from_qtensor(q, kernel="triton-typo")
    assert fast_kernel_for(parse_spec("W3-g128"), (64, 128)) == "cpu-int4"
    assert fast_kernel_for(parse_spec("NF4-g64"), (64, 128)) == "reference"
    assert fast_kernel_for(parse_spec("W4-g96"), (64, 576)) == "cpu-int4"  # kernel group 32 inside g96


@needs_int4
def test_kernel_choice_is_cached_per_dtype(monkeypatch):
    import mixq.runtime.qlinear as qmod

    calls = []
    real = qmod.usable_kernels
    monkeypatch.setattr(qmod, "usable_kernels", lambda *a: calls.append(a[2].dtype) or real(*a))
    layer = QuantLinear.from_qtensor(_layer("W4-g32", (64, 64), False)[0])
    for _ in range(20):
        layer(torch.randn(1, 64, dtype=torch.bfloat16))
        layer(torch.randn(3, 64))
    assert calls == [torch.bfloat16, torch.float32]
    assert set(layer._state) == {"cpu-int4", "reference"}


@needs_int4
@pytest.mark.parametrize("shape", [(16, 64), (48, 128), (64, 64), (128, 96), (192, 576)])
@pytest.mark.parametrize("name", ["W4-g32", "W3-g32-asym", "W1-g32", "W2-channel", "W4-g32-asymf", "W2-g32-asym",
                                  "W5-g32", "W8-g32-asym", "W6-channel", "W7-g32-asymf"])
def test_codes_from_state_inverts_the_kernel_layout(shape, name):
    q = quantize(torch.randn(shape), parse_spec(name))
    state = cpu.prepare(PackedWeight.from_qtensor(q))
    # the cheap inverse needs torch's 64-row blocked int4pack layout (the AVX-512 one; AVX2-only CPUs pack otherwise)
    assert state["holds_codes"] == (shape[0] % 64 == 0 and cpu._layout_is_blocked())
    assert torch.equal(cpu.codes_from_state(state), q.codes)


@needs_int4
def test_released_codes_live_once_and_come_back():
    q, b = _layer("W4-g32-asymf", (64, 128), True)
    pw = PackedWeight.from_qtensor(q)
    layer = QuantLinear(pw, b)
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    y = layer(x)
    if not cpu._layout_is_blocked():  # this CPU's int4pack layout has no cheap inverse: the code stream stays
        assert not layer.codes_released and torch.equal(layer.codes, pw.codes)
        pytest.skip("torch packs int4 without the 64-row blocks here (no AVX-512): codes are never released")
    assert layer.codes_released and layer.codes.numel() == 0
    assert layer.nbytes == pw.nbytes  # the accounted size does not change
    st = layer._state["cpu-int4"]
    assert layer.state_nbytes == sum(t.untyped_storage().nbytes() for pl in st["planes"] for t in (pl["w"], pl["sz"]))
    wide = QuantLinear(PackedWeight.from_qtensor(_layer("W6-g32", (64, 128), False)[0]))
    wide(x)
    assert wide.codes_released and wide.state_nbytes >= 64 * 128  # two int4 planes: a byte per weight
    assert layer.resident_nbytes == pw.nbytes - pw.codes.numel() + b.numel() * 4 + layer.state_nbytes
    assert torch.equal(layer.packed.codes, pw.codes)  # rebuilt from the kernel layout
    assert torch.equal(layer.state_dict()["codes"], pw.codes)
    long = torch.randn(cpu.MAX_TOKENS + 3, 128, dtype=torch.bfloat16)  # auto: the reference runs on rebuilt codes
    ref = QuantLinear(pw, b, release_codes=False)
    assert torch.equal(layer(long), ref(long)) and layer.last_kernel == "reference"
    other = QuantLinear(PackedWeight.from_qtensor(_layer("W4-g32-asymf", (64, 128), True, seed=1)[0]), b)
    other(x)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other(x), y)
    layer.to(torch.float32)  # moving / casting restores the stream first
    assert not layer.codes_released and torch.equal(layer.codes, pw.codes)
    small = QuantLinear(PackedWeight.from_qtensor(_layer("W4-g32", (32, 64), False)[0]))
    small(torch.randn(1, 64, dtype=torch.bfloat16))
    assert not small.codes_released  # 32 rows: the layout is not cheaply invertible, the stream stays


def test_buffers_state_dict_and_cache():
    q, b = _layer("W3-g64-asym", (16, 64), True)
    layer = QuantLinear.from_qtensor(q, b)
    sd = layer.state_dict()
    assert set(sd) == {"codes", "scale", "zero", "bias"} and sd["codes"].numel() == 16 * 64 * 3 // 8
    assert layer.nbytes == PackedWeight.from_qtensor(q).nbytes
    x = torch.randn(1, 64)
    layer(x)
    assert layer._state
    other = QuantLinear.from_qtensor(_layer("W3-g64-asym", (16, 64), True, seed=1)[0], b)
    other(x)
    other.load_state_dict(sd)
    assert not other._state and torch.equal(other(x), layer(x))
    layer.to(torch.device("cpu"))
    assert not layer._state
    w = layer.packed.dequantize()
    layer.to(torch.bfloat16)  # casts the bias, never the packed params
    assert torch.equal(layer.packed.dequantize(), w) and layer.bias.dtype == torch.bfloat16
    assert "W3-g64-asym" in repr(layer)


def _fake_quant(model, qtensors):
    fq = copy.deepcopy(model)
    for fqn, q in qtensors.items():
        set_weight(fq.get_submodule(fqn), dequantize(q))
    return fq


@pytest.mark.parametrize("family,lm_head", [("llama", "keep"), ("gpt2", "keep"), ("gpt2", "quantize")])
def test_quantize_to_qlinear_matches_fake_quant_model(family, lm_head):
    model = make_tiny(family)
    specs = ["W4-g32", "W3-g64-asym", "NF4-g64", "MXFP4", "KM3", "W8-channel", "NVFP4"]
    refs = [r for r in iter_layers(model, LayerPolicy(lm_head=lm_head, embeddings=lm_head))
            if r.kind != "embedding"]
    qtensors = {r.fqn: quantize(get_weight(model, r).contiguous(), parse_spec(specs[i % len(specs)]))
                for i, r in enumerate(refs)}
    fake = _fake_quant(model, qtensors)
    packed = quantize_to_qlinear(copy.deepcopy(model), qtensors)
    assert all(isinstance(packed.get_submodule(f), QuantLinear) for f in qtensors)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert torch.allclose(packed(ids).logits, fake(ids).logits, atol=1e-5, rtol=1e-5)


@needs_int4
def test_bf16_llama_uses_cpu_kernel_and_tracks_fake_quant():
    model = make_tiny("llama")
    qtensors = {r.fqn: quantize(get_weight(model, r), parse_spec("W4-g32")) for r in iter_layers(model)}
    fake = _fake_quant(model, qtensors)
    packed = quantize_to_qlinear(copy.deepcopy(model), qtensors).to(torch.bfloat16)
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        y, ref = packed(ids).logits.float(), fake(ids).logits
        y_bf16_fake = copy.deepcopy(fake).to(torch.bfloat16)(ids).logits.float()
    err, err_bf16 = (y - ref).abs().max(), (y_bf16_fake - ref).abs().max()
    assert err <= max(2 * err_bf16, 1e-3 * ref.abs().max())  # no worse than running the fake-quant model in bf16
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    assert packed.get_submodule(next(iter(qtensors))).kernel_for(x).name == "cpu-int4"


def test_quantize_to_qlinear_rejects_bad_input():
    model = make_tiny("llama")
    w = get_weight(model.get_submodule("model.layers.0.mlp.up_proj"))
    emb = quantize(model.model.embed_tokens.weight, parse_spec("W4-g32"))
    with pytest.raises(TypeError, match="not nn.Linear"):
        quantize_to_qlinear(model, {"model.embed_tokens": emb})
    with pytest.raises(ValueError, match="quantized shape"):
        quantize_to_qlinear(model, {"model.layers.0.mlp.down_proj": quantize(w, parse_spec("W4-g32"))})
    with pytest.raises(ValueError, match="not a module"):
        quantize_to_qlinear(model, {"model.nope": quantize(w, parse_spec("W4-g32"))})
