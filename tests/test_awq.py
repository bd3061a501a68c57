"""AWQ: the scale search never loses to RTN, wins on outlier channels, and folds exactly."""
from __future__ import annotations

import pytest
import torch

from mixq import formats
from mixq.algorithms.awq import apply_awq, awq_clip, awq_search_scale
from mixq.api import quantize_model, resolve_specs
from mixq.config import parse_spec
from mixq.formats import dequantize
from mixq.arch import get_weight
from tiny import make_tiny

W3 = parse_spec("W3-g32")


def _outlier_problem(seed: int, n: int = 1024, d: int = 128, out: int = 96):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    X[:, torch.randperm(d, generator=g)[:4]] *= 10.0  # ×10 outlier input channels
    W = torch.randn(out, d, generator=g) * 0.05
    return X, W


def _out_mse(X, W, Wq, s=None):
    Xs = X if s is None else X / s
    return float(((X @ W.T - Xs @ Wq.T) ** 2).sum() / X.shape[0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_search_beats_rtn_on_outlier_channels(seed):
    X, W = _outlier_problem(seed)
    s, alpha, err = awq_search_scale(X, [W], W3)
    rtn = _out_mse(X, W, formats.fake_quantize(W, W3))
    awq = _out_mse(X, W, formats.fake_quantize(W * s, W3), s)
    assert alpha > 0 and awq < 0.8 * rtn
    assert err == pytest.approx(awq, rel=1e-3)  # the H form is the output error


@pytest.mark.parametrize("seed", range(4))
def test_chosen_error_never_above_alpha_zero(seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(256, 64, generator=g) * torch.rand(64, generator=g) * 3
    Ws = [torch.randn(32, 64, generator=g), torch.randn(16, 64, generator=g)]
    specs = [parse_spec("W4-g32"), parse_spec("W2-g64")]
    _, _, err = awq_search_scale(X, Ws, specs, n_grid=5)
    err0 = sum(_out_mse(X, W, formats.fake_quantize(W, sp)) for W, sp in zip(Ws, specs))
    assert err <= err0 * (1 + 1e-5)


def test_uniform_activations_give_alpha_zero_and_unit_scale():
    X = torch.sign(torch.randn(128, 64))  # |x| = 1 in every channel: every α gives s = 1
    s, alpha, _ = awq_search_scale(X, [torch.randn(8, 64)], W3)
    assert alpha == 0.0 and torch.equal(s, torch.ones(64))


def test_gqa_scale_is_shared_by_repeated_heads():
    X, W = _outlier_problem(0, d=64, out=32)
    s, _, _ = awq_search_scale(X, [W], W3, kv=(2, 16))
    v = s.reshape(2, 2, 16)
    assert torch.equal(v[:, 0], v[:, 1])


def test_clip_shrinks_and_lowers_the_group_error():
    X, _ = _outlier_problem(1)
    W = torch.distributions.StudentT(2.0).sample((64, 128)) * 0.02  # heavy tails: clipping pays
    Wc = awq_clip(W, X, W3)
    assert (Wc.abs() <= W.abs() + 1e-7).all() and not torch.equal(Wc, W)
    H = X.T @ X / X.shape[0]

    def group_err(Wq):
        D = (W - Wq).reshape(64, 4, 32)
        Hb = torch.stack([H[j * 32:(j + 1) * 32, j * 32:(j + 1) * 32] for j in range(4)])
        return float(torch.einsum("ojk,jkl,ojl->", D, Hb, D))

    assert group_err(formats.fake_quantize(Wc, W3)) < group_err(formats.fake_quantize(W, W3))


def _planted_llama(seed: int = 0):
    """Tiny llama whose norms make ×10 outlier channels in every q/k/v and gate/up input."""
    model = make_tiny("llama", seed)
    with torch.no_grad():
        for b in model.model.layers:
            for n in (b.input_layernorm, b.post_attention_layernorm):
                n.weight[[3, 17, 40]] *= 10
    return model


@torch.no_grad()
def test_scaling_only_is_exact_on_several_families():
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    for family in ("llama", "gemma", "phi", "opt"):
        model = make_tiny(family)
        ref = model(ids).logits
        r = apply_awq(model, ids, resolve_specs(model, "W3-g32"), then=None, clip=False, n_grid=4, progress=False)
        assert r.alphas and not r.qtensors
        assert float((model(ids).logits - ref).abs().max() / ref.abs().max()) < 1e-5, family


@torch.no_grad()
def test_end_to_end_awq_beats_rtn_on_outlier_model():
    g = torch.Generator().manual_seed(0)
    calib, ev = torch.randint(0, 128, (8, 32), generator=g), torch.randint(0, 128, (4, 32), generator=g)
    ref = _planted_llama()(ev).logits
    errs = {}
    for method in ("rtn", "awq"):
        model = _planted_llama()
        specs = resolve_specs(model, "W3-g32")
        res = quantize_model(model, specs, method=method, calib_ids=calib, progress=False)
        errs[method] = float(((model(ev).logits - ref) ** 2).mean())
        assert set(res.qtensors) == set(specs)
    mod = model.model.layers[1].mlp.down_proj  # the written weight is the stored one
    assert torch.equal(get_weight(mod), dequantize(res.qtensors["model.layers.1.mlp.down_proj"]))
    assert errs["awq"] < 0.8 * errs["rtn"], errs


def test_awq_gptq_and_rotation_run(tiny_model):
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    model = tiny_model("qwen2")
    res = quantize_model(model, resolve_specs(model, "W4-g32"), method="awq+gptq", calib_ids=calib,
                         rotate=True, progress=False)
    assert res.method == "awq+gptq" and all(v >= 0 for v in res.proxy_loss.values())
    with pytest.raises(ValueError, match="calib"):
        quantize_model(tiny_model("llama"), resolve_specs(model, "W4-g32"), method="awq")
    with pytest.raises(ValueError, match="then"):
        apply_awq(model, calib, {}, then="bogus")
