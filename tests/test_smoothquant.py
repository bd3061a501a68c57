"""SmoothQuant: flatter activation channels, unchanged fp model."""
from __future__ import annotations

import pytest
import torch

from mixq.algorithms.smoothquant import smooth_model, smoothquant_scales
from tiny import make_tiny, layer_input


def _planted(family: str = "llama"):
    """Tiny model whose attention/MLP norms create ×20 outlier channels in q/k/v and gate/up inputs."""
    model = make_tiny(family)
    with torch.no_grad():
        for b in model.model.layers:
            b.input_layernorm.weight[[3, 17, 40]] *= 20
            b.post_attention_layernorm.weight[[5, 22]] *= 20
    return model


def _q_input_absmax(model, ids) -> torch.Tensor:
    return layer_input(model, model.model.layers[1].self_attn.q_proj, ids).abs().amax(0)


def test_scales_formula():
    a = torch.tensor([4.0, 1.0, 0.0])
    W1 = torch.tensor([[1.0, -2.0, 0.5]])
    W2 = torch.tensor([[-4.0, 1.0, 0.25]])
    s = smoothquant_scales(a, [W1, W2], alpha=0.5)
    assert torch.allclose(s, torch.tensor([4.0 ** 0.5 / 4.0 ** 0.5, 1.0 / 2.0 ** 0.5, (1e-5) ** 0.5 / 0.5 ** 0.5]))
    assert torch.allclose(smoothquant_scales(a, [W1], alpha=1.0), torch.tensor([4.0, 1.0, 1e-5]))
    with pytest.raises(ValueError, match="alpha"):
        smoothquant_scales(a, [W1], alpha=1.5)


def test_gqa_scales_are_shared():
    s = smoothquant_scales(torch.rand(64) + 0.1, [torch.randn(8, 64)], kv=(2, 16))
    v = s.reshape(2, 2, 16)
    assert torch.equal(v[:, 0], v[:, 1])


@torch.no_grad()
def test_smoothing_flattens_activations_and_keeps_outputs():
    g = torch.Generator().manual_seed(0)
    calib, ev = torch.randint(0, 128, (4, 32), generator=g), torch.randint(0, 128, (2, 32), generator=g)
    model = _planted()
    ref = model(ev).logits
    before = _q_input_absmax(model, ev)
    scales = smooth_model(model, calib, alpha=0.5, progress=False)
    after = _q_input_absmax(model, ev)
    assert len(scales) == 4  # two norm groups per block
    assert float((model(ev).logits - ref).abs().max() / ref.abs().max()) < 1e-5
    ratio = lambda x: float(x.max() / x.median())  # noqa: E731
    assert ratio(after) < 0.5 * ratio(before)


@pytest.mark.parametrize("family", ["gemma", "gemma3", "qwen2", "opt", "phi", "gpt2"])
@torch.no_grad()
def test_all_group_kinds_keep_outputs(family):
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    model = make_tiny(family)
    ref = model(ids).logits
    smooth_model(model, ids, alpha=0.7, include_linear=True, include_act=True, progress=False)
    assert float((model(ids).logits - ref).abs().max() / ref.abs().max()) < 1e-5


def test_model_without_groups_is_rejected(monkeypatch):
    import mixq.algorithms.smoothquant as sq
    from mixq.arch_table import ArchInfo

    model = make_tiny("llama")
    monkeypatch.setattr(sq, "arch_for", lambda m: ArchInfo("model.layers", (), None, "lm_head", ()))
    with pytest.raises(ValueError, match="ARCH_TABLE"):
        smooth_model(model, torch.zeros(1, 4, dtype=torch.long), progress=False)
