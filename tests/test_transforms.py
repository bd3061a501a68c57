"""Equivalence transforms: folding a positive per-channel scale leaves the fp model unchanged."""
from __future__ import annotations

import pytest
import torch

from mixq.hadamard import random_orthogonal_factors
from mixq.algorithms.transforms import (
    OnlineRotation,
    ScaledActivation,
    attach_input_rotation,
    fold_scale,
    head_dim_of,
    kv_expand,
    kv_reduce,
    kv_repeat,
    scale_norm_,
)
from mixq.arch import arch_for, get_blocks, get_weight
from mixq.arch_table import InputGroup
from tiny import FAMILIES, make_tiny


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


def _random_scale(block, group, hd, gen) -> torch.Tensor:
    n = get_weight(block.get_submodule(group.linears[0])).shape[1]
    n_rep = kv_repeat(block, group)
    s = torch.exp(torch.randn(n // n_rep, generator=gen))  # positive, spread over ~e^±2
    return kv_expand(s, n_rep, hd) if n_rep > 1 else s


@pytest.mark.parametrize("family", FAMILIES)
def test_random_scales_leave_logits_unchanged(family):
    model = make_tiny(family)
    ids = _ids()
    ref = model(ids).logits
    arch, hd, gen = arch_for(model), head_dim_of(model), torch.Generator().manual_seed(1)
    folded = set()
    for block in get_blocks(model):
        for g in arch.input_groups:
            if g.prev_kind is None:
                continue
            fold_scale(block, g, _random_scale(block, g, hd, gen), norm_offset=arch.norm_offset, head_dim=hd)
            folded.add(g.prev_kind)
    assert folded, "every tiny family has at least one foldable group"
    assert _rel(model(ids).logits, ref) < 1e-5


def test_gqa_v_to_o_layout_and_rejection():
    model = make_tiny("llama")  # 4 heads, 2 kv heads, head_dim 16
    block, hd = get_blocks(model)[0], head_dim_of(model)
    group = InputGroup("self_attn.v_proj", ("self_attn.o_proj",), "linear")
    assert kv_repeat(block, group) == 2 and hd == 16
    s_v = torch.arange(1.0, 33.0)
    s_o = kv_expand(s_v, 2, hd)
    # o column (k*n_rep + r)*hd + d reads v channel k*hd + d
    assert s_o[16 + 3] == s_v[3] and s_o[2 * 16 + 5] == s_v[16 + 5]
    assert torch.equal(kv_reduce(s_o, 2, hd, how="shared"), s_v)
    with pytest.raises(ValueError, match="kv_expand"):
        fold_scale(block, group, torch.rand(64) + 0.5, head_dim=hd)
    with pytest.raises(ValueError, match="head_dim"):
        fold_scale(block, group, s_o)


def test_gemma_norm_offset():
    norm = make_tiny("gemma").model.layers[0].input_layernorm
    w0 = norm.weight.detach().clone()
    s = torch.rand(w0.numel()) + 0.5
    scale_norm_(norm, s, offset=1.0)
    assert torch.allclose(1.0 + norm.weight, (1.0 + w0) * s, atol=1e-6)


def test_act_group_is_wrapped_and_rescaled():
    model = make_tiny("gpt2")
    block = get_blocks(model)[0]
    group = InputGroup("mlp.act", ("mlp.c_proj",), "act")
    fold_scale(block, group, torch.full((128,), 2.0))
    fold_scale(block, group, torch.full((128,), 4.0))
    act = block.get_submodule("mlp.act")
    assert isinstance(act, ScaledActivation) and torch.allclose(act.inv_scale, torch.full((128,), 1 / 8))


def test_bad_scales_and_prev_none_rejected():
    model = make_tiny("gpt_neox")
    block = get_blocks(model)[0]
    with pytest.raises(ValueError, match="positive"):
        fold_scale(block, InputGroup("input_layernorm", ("attention.query_key_value",), "norm"), -torch.ones(64))
    with pytest.raises(ValueError, match="skip it"):
        fold_scale(block, InputGroup(None, ("attention.dense",), None), torch.ones(64))


def test_online_rotation_matches_dense_and_takes_the_scale():
    factors, signs, kind = random_orthogonal_factors(48, seed=3)  # 48 = Paley(12) ⊗ Sylvester(4)
    assert kind == "hadamard" and len(factors) == 2
    rot = OnlineRotation(factors, signs)
    Q = rot.matrix()
    assert torch.allclose(Q @ Q.T, torch.eye(48, dtype=torch.float64), atol=1e-12)
    x = torch.randn(3, 5, 48)
    assert torch.allclose(rot(x), (x.double() @ Q).float(), atol=1e-5)

    model = make_tiny("llama")  # fold a scale into the rotated input of down_proj: still exact
    ids = _ids()
    ref = model(ids).logits
    block = get_blocks(model)[0]
    down = block.get_submodule("mlp.down_proj")
    f, sg, _ = random_orthogonal_factors(128, seed=0)
    rot = OnlineRotation(f, sg)
    with torch.no_grad():
        down.weight.copy_((down.weight.double() @ rot.matrix()).float())
    attach_input_rotation(down, rot)
    assert _rel(model(ids).logits, ref) < 1e-5
    fold_scale(block, InputGroup("mlp.up_proj", ("mlp.down_proj",), "linear"), torch.rand(128) + 0.3)
    assert not torch.equal(rot.out_scale, torch.ones(128))
    assert _rel(model(ids).logits, ref) < 1e-5
    with pytest.raises(ValueError, match="already"):
        attach_input_rotation(down, rot)
