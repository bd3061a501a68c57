"""QuaRot rotation: orthogonal, function preserving, flattens outliers, helps RTN on outlier models."""
from __future__ import annotations

import pytest
import torch

from mixq.hadamard import dense, hadamard, hadamard_orders, random_orthogonal_factors
from mixq.algorithms.rotation import rotate_model
from mixq.algorithms.transforms import input_rotation
from mixq.api import quantize_model, resolve_specs
from tiny import make_tiny, layer_input

RMS_FAMILIES = ["llama", "qwen2", "mistral", "gemma", "gemma3"]


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 28, 36, 48, 576, 1536])
def test_hadamard_orders(n):
    H = hadamard(n)
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64))
    assert set(H.unique().tolist()) <= {-1.0, 1.0}


def test_smollm2_sizes_get_hadamard_and_others_fall_back():
    assert hadamard_orders(576) == (36, 16) and hadamard_orders(1536) == (12, 128)
    assert hadamard(6) is None and hadamard(9) is None
    for n, kind in [(576, "hadamard"), (1536, "hadamard"), (9, "random"), (6, "random")]:
        factors, signs, k = random_orthogonal_factors(n, seed=1)
        Q = dense(factors, signs)
        assert k == kind and torch.allclose(Q @ Q.T, torch.eye(n, dtype=torch.float64), atol=1e-10)
    a, b = (dense(*random_orthogonal_factors(576, seed=s)[:2]) for s in (0, 1))
    assert not torch.equal(a, b) and torch.equal(a, dense(*random_orthogonal_factors(576, seed=0)[:2]))


@pytest.mark.parametrize("family", RMS_FAMILIES)
@pytest.mark.parametrize("online_down", [True, False])
@torch.no_grad()
def test_rotation_keeps_logits(family, online_down):
    model = make_tiny(family)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits
    info = rotate_model(model, seed=0, online_down=online_down)
    out = model(ids).logits
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-4
    assert info.kind == "hadamard" and info.hidden == 64
    downs = [input_rotation(b.mlp.down_proj) for b in model.model.layers]
    assert all((d is not None) == online_down for d in downs)
    # norms fused: the effective weight (offset + w) is 1 everywhere
    offset = 1.0 if family.startswith("gemma") else 0.0
    for b in model.model.layers:
        assert torch.all(b.input_layernorm.weight + offset == 1.0)
    assert torch.all(model.model.norm.weight + offset == 1.0)
    assert model.lm_head.weight is not model.model.embed_tokens.weight


@pytest.mark.parametrize("family", ["gpt2", "opt", "phi", "gpt_neox"])
def test_layernorm_families_are_rejected_untouched(family):
    model = make_tiny(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NotImplementedError, match="llama, qwen2, mistral, gemma"):
        rotate_model(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _planted(seed: int = 0):
    """Tiny llama with ×30 residual-stream outlier channels and 1% ×20 weight outliers in every linear."""
    model = make_tiny("llama", seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, [5, 33, 50]] *= 30
        for b in model.model.layers:
            for lin in [m for m in b.modules() if isinstance(m, torch.nn.Linear)]:
                lin.weight[torch.rand(lin.weight.shape, generator=g) < 0.01] *= 20
    return model


def _q_input(model, ids) -> torch.Tensor:
    return layer_input(model, model.model.layers[1].self_attn.q_proj, ids)


@torch.no_grad()
def test_rotation_flattens_outliers_and_helps_rtn():
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    base = _planted()
    ref = base(ids).logits
    x0 = _q_input(base, ids)
    rotated = _planted()
    rotate_model(rotated)
    x1 = _q_input(rotated, ids)

    def max_to_rms(x):
        return float(x.abs().max() / x.pow(2).mean().sqrt())

    def kurtosis(x):
        return float(((x - x.mean()) ** 4).mean() / x.var() ** 2)

    assert max_to_rms(x1) < 0.5 * max_to_rms(x0) and kurtosis(x1) < 0.2 * kurtosis(x0)

    errs = {}
    for rotate in (False, True):
        model = _planted()
        quantize_model(model, resolve_specs(model, "W4-g32"), method="rtn", rotate=rotate, progress=False)
        errs[rotate] = float(((model(ids).logits - ref) ** 2).mean())
    assert errs[True] < 0.7 * errs[False], errs


@pytest.mark.parametrize("family", ["gemma", "llama"])
@torch.no_grad()
def test_rotated_awq_model_round_trips_through_native_dir(family, tiny_tokenizer, tmp_path):
    from mixq.export.native import CheckpointError, load_quantized
    from mixq.export.native_write import save_quantized

    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    model = make_tiny(family)  # gemma: tied embeddings, untied by the rotation
    res = quantize_model(model, resolve_specs(model, "W4-g32"), method="awq", calib_ids=ids, rotate=True,
                         online_rotation=False, progress=False)
    d = save_quantized(tmp_path / "q", model, tiny_tokenizer, res.qtensors, {"method": "awq"})
    loaded, _, _ = load_quantized(d)
    assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)

    model = make_tiny(family)  # the online rotation is not part of the format: loading must fail loudly
    res = quantize_model(model, resolve_specs(model, "W4-g32"), rotate=True, progress=False)
    d = save_quantized(tmp_path / "q2", model, tiny_tokenizer, res.qtensors, {"method": "rtn"})
    with pytest.raises(CheckpointError):
        load_quantized(d)
