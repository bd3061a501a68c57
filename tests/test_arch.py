"""The architecture table and layer walking, checked on a tiny random model of every family."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from mixq.arch import (
    LayerPolicy, TiedWeightsError, arch_for, block_linears, count_params, get_blocks, get_weight, iter_layers,
    set_weight, untie_lm_head,
)
from mixq.arch_table import ARCH_TABLE, InputGroup
from tiny import HIDDEN, LAYERS, VOCAB

LINEARS_PER_BLOCK = {"llama": 7, "qwen2": 7, "mistral": 7, "gemma": 7, "gemma3": 7,
                     "phi": 6, "gpt2": 4, "opt": 6, "gpt_neox": 4,
                     "qwen3": 7, "gemma2": 7, "phi3": 4, "olmo2": 7, "granite": 7, "falcon": 4}
TIED = {"gemma", "gemma2", "gemma3", "gpt2", "opt", "falcon"}


def test_every_family_is_in_the_table(tiny_model, tiny_family):
    model = tiny_model(tiny_family)
    assert model.config.model_type in ARCH_TABLE
    assert not arch_for(model).discovered


def test_iter_layers_counts_and_shapes(tiny_model, tiny_family):
    model = tiny_model(tiny_family)
    refs = iter_layers(model)
    assert len(refs) == LINEARS_PER_BLOCK[tiny_family] * LAYERS
    assert [r.block for r in refs] == sorted(r.block for r in refs)
    for ref in refs:
        module = model.get_submodule(ref.fqn)
        assert ref.kind == ("conv1d" if type(module).__name__ == "Conv1D" else "linear")
        assert ref.fqn.endswith(ref.name) and ref.fqn == f"{arch_for(model).blocks}.{ref.block}.{ref.name}"
        assert tuple(get_weight(model, ref).shape) == ref.shape
        assert HIDDEN in ref.shape


def test_get_weight_matches_module_and_set_weight_round_trips(tiny_model, tiny_family):
    model = tiny_model(tiny_family)
    for ref in iter_layers(model):
        module = model.get_submodule(ref.fqn)
        x = torch.randn(5, ref.shape[1])
        bias = module.bias if module.bias is not None else 0.0
        W = get_weight(model, ref)
        torch.testing.assert_close(x @ W.T + bias, module(x), rtol=1e-5, atol=1e-5)
        before = module.weight.detach().clone()
        set_weight(module, W.clone() * 1.0)
        assert torch.equal(module.weight, before)
        new = W.clone() + 0.5 * torch.randn(ref.shape)  # a real write lands in the module's own layout
        set_weight(module, new)
        assert torch.equal(get_weight(module), new)
        torch.testing.assert_close(x @ new.T + bias, module(x), rtol=1e-5, atol=1e-5)


def test_set_weight_checks_shape_and_keeps_dtype(tiny_model):
    model = tiny_model("gpt2").to(torch.bfloat16)
    ref = iter_layers(model)[0]  # c_attn, stored [in, out]
    module = model.get_submodule(ref.fqn)
    with pytest.raises(ValueError, match="expects"):
        set_weight(module, torch.zeros(ref.shape[::-1]))
    set_weight(module, torch.ones(ref.shape, dtype=torch.float64))
    assert module.weight.dtype == torch.bfloat16 and bool((module.weight == 1).all())


def test_input_groups_cover_every_linear_once(tiny_model, tiny_family):
    model = tiny_model(tiny_family)
    arch = arch_for(model)
    block = get_blocks(model)[0]
    names = [n for g in arch.input_groups for n in g.linears]
    assert sorted(names) == sorted(block_linears(block, arch)) and len(names) == len(set(names))
    for group in arch.input_groups:
        if group.prev is None:
            continue
        prev = block.get_submodule(group.prev)
        if group.prev_kind == "linear":
            assert isinstance(prev, nn.Linear)
        elif group.prev_kind == "norm":
            assert prev.weight.shape == (HIDDEN,)
        in_features = {get_weight(block.get_submodule(n)).shape[1] for n in group.linears}
        assert len(in_features) == 1


def test_norm_groups_read_the_norm_output(tiny_model, tiny_family):
    """Hooks confirm each "norm" group's linears receive exactly that norm's output."""
    model = tiny_model(tiny_family)
    arch, block = arch_for(model), get_blocks(model)[0]
    seen: dict[str, torch.Tensor] = {}
    hooks = [block.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o))
             for g in arch.input_groups if g.prev_kind == "norm" for n in [g.prev]]
    hooks += [m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, i[0]))
              for n, m in block_linears(block, arch).items()]
    with torch.no_grad():
        model(torch.arange(8)[None])
    for h in hooks:
        h.remove()
    for group in arch.input_groups:
        for name in group.linears:
            if group.prev_kind == "norm":
                torch.testing.assert_close(seen[name], seen[group.prev])


def test_policy_and_tied_weights(tiny_model, tiny_family):
    model = tiny_model(tiny_family)
    n_block = len(iter_layers(model))
    embeddings = arch_for(model).embeddings
    if tiny_family in TIED:
        with pytest.raises(TiedWeightsError, match="untie_lm_head"):
            iter_layers(model, LayerPolicy(lm_head="quantize"))
        refs = iter_layers(model, LayerPolicy(lm_head="quantize", embeddings="quantize"))
        head = refs[-1]
        assert head.kind == "lm_head" and head.shares_weight_with == (embeddings[0],)
        assert len(refs) == n_block + len(embeddings)  # shared tensor appears once
        untie_lm_head(model)
        assert model.config.tie_word_embeddings is False
        assert model.lm_head.weight is not model.get_input_embeddings().weight
    refs = iter_layers(model, LayerPolicy(lm_head="quantize"))
    assert len(refs) == n_block + 1 and refs[-1].shape == (VOCAB, HIDDEN) and refs[-1].block is None
    refs = iter_layers(model, LayerPolicy(embeddings="quantize"))
    assert [r.fqn for r in refs[:len(embeddings)]] == list(embeddings)
    assert refs[0].kind == "embedding" and refs[0].shape == (VOCAB, HIDDEN)
    with pytest.raises(ValueError, match="keep"):
        LayerPolicy(lm_head="yes")


def test_untie_survives_save_and_reload(tiny_model, tmp_path):
    model = tiny_model("gemma")
    untie_lm_head(model)
    set_weight(model.lm_head, torch.zeros(VOCAB, HIDDEN))
    assert model.get_input_embeddings().weight.abs().sum() > 0
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    assert reloaded.lm_head.weight.abs().sum() == 0
    assert torch.equal(reloaded.get_input_embeddings().weight, model.get_input_embeddings().weight)


def test_count_params(tiny_model, tiny_family):
    model = tiny_model(tiny_family)
    counts = count_params(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["linear"] == counts["quantizable"] == sum(r.shape[0] * r.shape[1] for r in iter_layers(model))
    assert counts["linear"] + counts["embedding"] + counts["lm_head"] + counts["other"] == counts["total"]
    assert counts["lm_head"] == (0 if tiny_family in TIED else VOCAB * HIDDEN)
    both = count_params(model, LayerPolicy(lm_head="quantize", embeddings="quantize"))
    assert both["quantizable"] == counts["linear"] + counts["embedding"] + counts["lm_head"]
    assert both["kept"] == counts["other"]


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.norm(x))))


class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.stack = nn.ModuleList(_Block() for _ in range(3))
        self.head = nn.Linear(16, 50, bias=False)


class _NoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 4)


def test_default_discovery_on_custom_module(caplog):
    model = _Custom()
    with caplog.at_level(logging.WARNING, logger="mixq.arch"):
        arch = arch_for(model)
    assert caplog.text.count("not in mixq.arch_table.ARCH_TABLE") == 1
    with caplog.at_level(logging.WARNING, logger="mixq.arch"):
        assert arch_for(model) is arch  # discovered once per model, warned once
    assert caplog.text.count("not in mixq.arch_table.ARCH_TABLE") == 1
    assert arch.discovered and arch.blocks == "stack" and arch.lm_head == "head" and arch.embeddings == ("emb",)
    assert arch.input_groups == ()
    refs = iter_layers(model, LayerPolicy(lm_head="quantize"))
    assert [r.fqn for r in refs] == [f"stack.{i}.{n}" for i in range(3) for n in ("up", "down")] + ["head"]


def test_discovery_failure_names_the_fix():
    with pytest.raises(ValueError, match="ARCH_TABLE"):
        arch_for(_NoBlocks())


def test_default_discovery_on_unknown_model_type(tiny_model):
    model = tiny_model("llama")
    model.config.model_type = "brand_new_llm"
    arch = arch_for(model)
    assert arch.discovered and arch.blocks == "model.layers" and arch.lm_head == "lm_head"
    assert arch.embeddings == ("model.embed_tokens",)
    assert len(iter_layers(model)) == 7 * LAYERS


def test_config_check_drops_invalid_groups(tiny_model, caplog):
    model = tiny_model("opt")
    model.config.do_layer_norm_before = False
    with caplog.at_level(logging.WARNING, logger="mixq.arch"):
        assert arch_for(model).input_groups == ()
    assert "do_layer_norm_before" in caplog.text


def test_input_group_validation():
    with pytest.raises(ValueError, match="prev_kind"):
        InputGroup("norm", ("a",), "rmsnorm")
    with pytest.raises(ValueError, match="both"):
        InputGroup(None, ("a",), "norm")


def test_wrong_model_gives_context(tiny_model):
    base = tiny_model("llama").model  # LlamaModel: no lm_head, blocks at "layers"
    with pytest.raises(ValueError, match="ForCausalLM"):
        get_blocks(base)
