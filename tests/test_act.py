"""Activation quantization: exact scales by hand, static calibration, outliers, SmoothQuant, rotation."""
from __future__ import annotations

import pytest
import torch

from mixq.hadamard import dense, random_orthogonal_factors
from mixq.config import parse_spec
from mixq.formats import fake_quantize
from mixq.formats.act import fake_quant_act, parse_act_spec, parse_wa_preset
from mixq.runtime.act_outliers import (FPOutliers, HiChannels, act_bits_per_feature, prepare_for_act_quant,
                                       top_k_channels)
from mixq.runtime.act_quant import apply_act_quant, calibrate_act_absmax
from tiny import layer_input, make_tiny

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
CALIB = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
Q_PROJ = "model.layers.0.self_attn.q_proj"


def _seen(model, fqn, **kw):
    """(raw input, input the linear computes with, output) of ``fqn`` on IDS with act quant ``kw`` installed.

    "raw" is seen before every pre-hook (online rotation included)."""
    lin = model.get_submodule(fqn)
    raw, used = [], []
    handle = apply_act_quant(model, **kw)  # may run a calibration pass first
    h0 = lin.register_forward_pre_hook(lambda m, a: raw.append(a[0].detach().clone()), prepend=True)
    h1 = lin.register_forward_hook(lambda m, a, o: used.append((a[0].detach().clone(), o.detach().clone())))
    try:
        model(IDS)
    finally:
        handle.remove()
        h0.remove()
        h1.remove()
    return raw[0].reshape(-1, raw[0].shape[-1]), used[0][0].reshape(-1, raw[0].shape[-1]), used[0][1]


def _int_sym(x, scale, bits):
    mid = 2 ** (bits - 1)
    return scale * (torch.clamp(torch.round(x / scale) + mid, 0, 2**bits - 1) - mid)


@pytest.mark.parametrize("bits", [8, 4])
@torch.no_grad()
def test_per_token_int_scales_by_hand(bits):
    model = make_tiny("llama")
    x, xq, y = _seen(model, Q_PROJ, spec_or_name=f"INT{bits}", layers=Q_PROJ)
    scale = (2 * x.abs().amax(1, keepdim=True) / (2**bits - 1)).half().float()  # one fp16 scale per token
    assert torch.equal(xq, _int_sym(x, scale, bits))
    lin = model.get_submodule(Q_PROJ)
    assert torch.equal(y.reshape(-1, y.shape[-1]), torch.nn.functional.linear(xq, lin.weight, lin.bias))


@torch.no_grad()
def test_per_token_fp8_matches_torch_float8():
    model = make_tiny("llama")
    x, xq, _ = _seen(model, Q_PROJ, spec_or_name="FP8", layers=Q_PROJ)
    scale = x.abs().amax(1, keepdim=True) / 448.0  # fp32 scale per token
    assert torch.equal(xq, (x / scale).to(torch.float8_e4m3fn).float() * scale)


def test_mxfp4_block_by_hand():
    x = torch.zeros(2, 32)
    x[0, :4] = torch.tensor([5.0, 2.6, -0.74, 0.25])  # amax 5: X = 2^(floor(log2 5) - 2) = 1
    x[1, 0] = 0.1                                      # X = 2^(-4 - 2)
    out = fake_quant_act(x, parse_act_spec("MXFP4"))
    assert out[0, :4].tolist() == [4.0, 3.0, -0.5, 0.0]  # E2M1 grid, ties to even mantissa
    assert out[1, 0].item() == 6 * 2.0**-6                # 0.1 / 2^-6 = 6.4 saturates at 6
    assert torch.equal(out[:, 4:].abs().sum(0)[3:], torch.zeros(25))


@torch.no_grad()
def test_static_per_tensor_from_absmax_saturates():
    model = make_tiny("llama")
    x = layer_input(model, model.get_submodule(Q_PROJ), IDS)
    a = x.abs().amax(0) * 0.5  # calibrated range smaller than what we feed: the top saturates
    _, xq, _ = _seen(model, Q_PROJ, spec_or_name="INT8", mode="static", layers=Q_PROJ, absmax={Q_PROJ: a})
    scale = (2 * a.max() / 255).half().float()
    assert torch.equal(xq, _int_sym(x, scale, 8))
    assert xq.max() == 127 * scale and xq.min() == -128 * scale


def test_calibrated_absmax_is_the_max_input():
    model = make_tiny("gpt2")
    fqn = "transformer.h.1.mlp.c_proj"
    amax = calibrate_act_absmax(model, CALIB, fqn)
    assert list(amax) == [fqn]
    x = layer_input(model, model.get_submodule(fqn), CALIB)
    assert torch.allclose(amax[fqn], x.abs().amax(0), rtol=1e-6, atol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("name,mode,tol", [("INT8", "dynamic", 0.05), ("INT4", "dynamic", 0.5), ("FP8", "dynamic", 0.1),
                                           ("MXFP4", "dynamic", 0.5), ("NVFP4", "dynamic", 0.5),
                                           ("INT8", "static", 0.05), ("FP8", "static", 0.1), ("NVFP4", "static", 0.5)])
@torch.no_grad()
def test_formats_run_close_and_remove_restores(family, name, mode, tol):
    model = make_tiny(family)
    ref = model(IDS).logits
    handle = apply_act_quant(model, name, mode=mode, calib_ids=CALIB if mode == "static" else None)
    out = model(IDS).logits
    assert 0 < float((out - ref).abs().max() / ref.abs().max()) < tol
    assert all(q.calls == 1 for q in handle.quantizers.values())
    handle.remove()
    assert torch.equal(model(IDS).logits, ref)


def test_spec_parsing_and_rejections():
    assert parse_act_spec("INT8").name == "W8-token" and parse_act_spec("INT8", "static").name == "W8-tensor"
    fp8 = parse_act_spec("FP8")
    assert (fp8.dtype, str(fp8.granularity), fp8.scale_dtype) == ("fp8_e4m3", "token", "fp32")
    assert parse_act_spec("A6").name == "W6-token"
    assert parse_act_spec("NVFP4", "static").tensor_scale
    with pytest.raises(ValueError, match="dynamic"):
        parse_act_spec("MXFP4", "static")
    with pytest.raises(ValueError, match="per-token"):
        parse_act_spec("W8-token", "static")
    with pytest.raises(ValueError, match="calib_ids"):
        apply_act_quant(make_tiny("llama"), "INT8", mode="static")
    w, a, rot = parse_wa_preset("W4A8")
    assert (w.name, a.name, rot) == ("W4-g128", "W8-token", False)
    assert parse_wa_preset("W8A8") == (parse_spec("W8-channel"), parse_act_spec("INT8"), False)
    assert parse_wa_preset("W4A4-rot") == (parse_spec("W4-g128"), parse_act_spec("INT4"), True)
    assert parse_wa_preset("W4A16-g64") == (parse_spec("W4-g64"), None, False)
    assert parse_wa_preset("W8A8-fp8", "static").act == parse_spec("FP8-tensor")
    assert parse_wa_preset("NVFP4-rot") == (parse_spec("NVFP4"), parse_spec("NVFP4"), True)
    with pytest.raises(ValueError, match="unknown W/A preset"):
        parse_wa_preset("W4X8")


# ---------------------------------------------------------------------------- outliers
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@torch.no_grad()
def test_llm_int8_threshold_zero_is_exact(family):
    model = make_tiny(family)
    ref = model(IDS).logits
    with apply_act_quant(model, "INT4", fp_outliers=FPOutliers(0.0)):
        assert torch.equal(model(IDS).logits, ref)
    with apply_act_quant(model, "INT4", fp_outliers=FPOutliers(float("inf"))):
        never = model(IDS).logits
    with apply_act_quant(model, "INT4"):
        assert torch.equal(model(IDS).logits, never)


@pytest.mark.parametrize("source", ["batch", "calib"])
@torch.no_grad()
def test_llm_int8_columns_exact_rest_quantized_without_them(source):
    model = make_tiny("llama")
    x0 = layer_input(model, model.get_submodule(Q_PROJ), IDS)
    tau = float(x0.abs().amax(0).quantile(0.8))
    kw = dict(spec_or_name="INT8", layers=Q_PROJ, fp_outliers=FPOutliers(tau, source))
    if source == "calib":
        kw["absmax"] = {Q_PROJ: x0.abs().amax(0)}
    x, xq, _ = _seen(model, Q_PROJ, **kw)
    cols = x.abs().amax(0) >= tau
    assert 0 < int(cols.sum()) < x.shape[1]
    assert torch.equal(xq[:, cols], x[:, cols])
    expect = fake_quant_act(x.masked_fill(cols, 0), parse_act_spec("INT8"))
    assert torch.equal(xq[:, ~cols], expect[:, ~cols])


@torch.no_grad()
def test_atom_hi_channels_split():
    model = make_tiny("llama")
    x0 = layer_input(model, model.get_submodule(Q_PROJ), CALIB)
    absmax = {Q_PROJ: x0.abs().amax(0)}
    x, xq, _ = _seen(model, Q_PROJ, spec_or_name="MXFP4", layers=Q_PROJ, absmax=absmax,
                     hi_channels=HiChannels(32, "W8-token"))
    hi = top_k_channels(absmax[Q_PROJ], 32)
    assert torch.equal(hi, torch.sort(absmax[Q_PROJ], descending=True).indices[:32].sort().values)
    lo = torch.tensor([j for j in range(64) if j not in set(hi.tolist())])
    assert torch.equal(xq[:, hi], fake_quant_act(x[:, hi].contiguous(), parse_spec("W8-token")))
    assert torch.equal(xq[:, lo], fake_quantize(x[:, lo].contiguous(), parse_spec("MXFP4")))
    assert act_bits_per_feature(64, 4, hi=(32, 8)) == 6.0 and act_bits_per_feature(64, 4, n_fp=2) == 4.375


def _outlier_llama():
    """Tiny llama whose norms create two large input channels for q/k/v and gate/up."""
    model = make_tiny("llama")
    with torch.no_grad():
        for b in model.model.layers:
            b.input_layernorm.weight[[3, 17]] *= 40
            b.post_attention_layernorm.weight[[5, 40]] *= 40
    return model


def _q_proj_error(model, ref_out, **kw):
    _, _, y = _seen(model, Q_PROJ, layers=Q_PROJ, **kw)
    return float((y - ref_out).norm() / ref_out.norm())


@torch.no_grad()
def test_outlier_methods_reduce_q_proj_error():
    model = _outlier_llama()
    ref = model.get_submodule(Q_PROJ)
    _, _, y_fp = _seen(model, Q_PROJ, layers=Q_PROJ, spec_or_name="FP32")
    base = _q_proj_error(model, y_fp, spec_or_name="INT4")
    atom = _q_proj_error(model, y_fp, spec_or_name="INT4", calib_ids=CALIB, hi_channels=HiChannels(4, "W8-token"))
    int8 = _q_proj_error(model, y_fp, spec_or_name="INT4", fp_outliers=FPOutliers(6.0))
    static = _q_proj_error(model, y_fp, spec_or_name="INT8", mode="static", calib_ids=IDS)  # no clipping
    prepare_for_act_quant(model, smooth_alpha=0.5, calib_ids=CALIB)
    assert model.get_submodule(Q_PROJ) is ref
    _, _, y_sq = _seen(model, Q_PROJ, layers=Q_PROJ, spec_or_name="FP32")
    assert torch.allclose(y_sq, y_fp, rtol=1e-4, atol=1e-4)  # smoothing keeps the fp function
    smooth = _q_proj_error(model, y_fp, spec_or_name="INT8", mode="static", calib_ids=IDS)
    assert atom < base / 4 and int8 < base / 4 and smooth < static / 2


# ---------------------------------------------------------------------------- rotation
@torch.no_grad()
def test_rotation_keeps_fp_outputs_and_quantizer_sees_rotated_input():
    model = make_tiny("llama")
    ref = model(IDS).logits
    info = prepare_for_act_quant(model, rotate=True)["rotation"]
    rotated = model(IDS).logits
    assert info.kind == "hadamard"
    assert float((rotated - ref).abs().max() / ref.abs().max()) < 1e-5  # act quant off: unchanged
    with apply_act_quant(model, "FP32"):                                # a keep spec is the identity
        assert torch.equal(model(IDS).logits, rotated)
    down = "model.layers.1.mlp.down_proj"
    x, xq, _ = _seen(model, down, spec_or_name="INT4", layers=down)     # x: before the online rotation
    rot = model.get_submodule(down).input_rotation
    assert torch.equal(xq, fake_quant_act(rot(x), parse_act_spec("INT4")))
    assert torch.equal(model(IDS).logits, rotated)


def test_hadamard_rotation_flattens_an_outlier_channel_for_int4():
    g = torch.Generator().manual_seed(0)
    X, W = torch.randn(64, 64, generator=g), torch.randn(32, 64, generator=g)
    X[:, 7] *= 50
    Q = dense(*random_orthogonal_factors(64, 0)[:2]).float()
    spec = parse_act_spec("INT4")
    y = X @ W.T
    err_plain = (fake_quant_act(X, spec) @ W.T - y).norm()
    err_rot = (fake_quant_act(X @ Q, spec) @ (W @ Q).T - y).norm()
    assert err_rot < err_plain / 2


def test_gradient_passes_straight_through():
    model = make_tiny("llama")
    with apply_act_quant(model, "INT4"):
        model(IDS).logits.square().mean().backward()
    g = model.model.embed_tokens.weight.grad
    assert g is not None and float(g.abs().sum()) > 0
