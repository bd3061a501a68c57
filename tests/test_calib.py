"""The block walk: statistics equal a whole-model pass; lazy blocks are never all materialized."""
import pytest
import torch
from safetensors.torch import save_file

from mixq import api
from mixq.arch import arch_for, block_linears, get_blocks
from mixq.calib.capture import walk_blocks
from mixq.calib.lazy import LazySafetensorsBlocks, load_outside_blocks, skeleton_from_config
from mixq.calib.stats import LayerStats


def _ids(n=4, L=16, seed=0):
    return torch.randint(0, 100, (n, L), generator=torch.Generator().manual_seed(seed))


def _hooked_stats(model, ids) -> dict[str, LayerStats]:
    """``{"i.name": LayerStats}`` of every block linear's inputs, from forward hooks on the whole model run row by
    row (what a block walk must reproduce)."""
    ref: dict[str, LayerStats] = {}
    hooks = []
    for i, block in enumerate(get_blocks(model)):
        for name, m in block_linears(block, arch_for(model)).items():
            st = ref[f"{i}.{name}"] = LayerStats(m.weight.shape[1] if hasattr(m, "in_features") else m.weight.shape[0])
            hooks.append(m.register_forward_hook(lambda mod, a, o, st=st: st.update(a[0])))
    with torch.no_grad():
        for s in range(ids.shape[0]):
            model(ids[s : s + 1], use_cache=False)
    for h in hooks:
        h.remove()
    return ref


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma3"])
def test_walk_statistics_equal_whole_model_hooks(tiny_model, family):
    model = tiny_model(family)
    ids = _ids()
    ref = _hooked_stats(model, ids)
    got = {}
    walk_blocks(model, ids, None, stats_sink=lambda i, stats: got.update({f"{i}.{n}": s for n, s in stats.items()}),
                progress=False)
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k].n_tokens == ref[k].n_tokens
        torch.testing.assert_close(got[k].H, ref[k].H, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[k].absmax, ref[k].absmax)


def test_sequential_walk_sees_quantized_outputs(tiny_model):
    model = tiny_model("llama")
    ids = _ids()
    seen = {}

    def zero_block(i, block, stats):
        seen[i] = stats["self_attn.q_proj"].absmax.clone()
        if i == 0:
            for p in block.parameters():
                p.data.mul_(0.5)

    walk_blocks(model, ids, zero_block, sequential=True, progress=False)
    seq = seen[1]
    model2 = tiny_model("llama")
    walk_blocks(model2, ids, zero_block, sequential=False, progress=False)
    assert not torch.allclose(seq, seen[1])


def test_lazy_blocks_quantize_without_materializing_the_model(tiny_model, tmp_path):
    model = tiny_model("llama")
    ids = _ids(n=8, L=32)
    path = tmp_path / "model.safetensors"
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, path)

    # reference: the in-memory GPTQ result
    specs = api.resolve_specs(model, "W4-g32")
    ref = api.quantize_model(model, specs, method="gptq", calib_ids=ids, progress=False)

    lazy = skeleton_from_config(model.config)
    assert all(p.is_meta for p in get_blocks(lazy).parameters())
    load_outside_blocks(lazy, path)
    live_during = []
    src = LazySafetensorsBlocks(path, arch_for(lazy).blocks)
    orig_load = src.load

    def spy(i, block, device):
        out = orig_load(i, block, device)
        live_during.append(sum(not p.is_meta for p in get_blocks(lazy).parameters()))
        return out

    src.load = spy
    got = api.quantize_model(lazy, specs, method="gptq", calib_ids=ids, source=src, progress=False)
    assert src.max_live == 1
    n_block_params = sum(1 for _ in get_blocks(lazy)[0].parameters())
    assert max(live_during) == n_block_params  # only one block's parameters were ever real
    assert all(p.is_meta for p in get_blocks(lazy).parameters())
    for fqn in specs:
        assert torch.equal(got.qtensors[fqn].codes, ref.qtensors[fqn].codes), fqn


def test_layers_sharing_an_input_share_its_moments_but_not_after_an_inplace_change():
    from mixq.calib.stats import LayerStats

    x = torch.randn(3, 700, 8, generator=torch.Generator().manual_seed(0))
    a, b = LayerStats(8), LayerStats(8)
    a.update(x)
    b.update(x)  # same tensor: moments reused
    assert torch.equal(a.H, b.H) and torch.equal(a.absmax, b.absmax)
    x.mul_(2)  # the tensor's version changes: computed afresh
    b.update(x)
    X = x.reshape(-1, 8).double()
    expect = (X.T @ X / 4 + X.T @ X) / 4200  # first update saw x/2
    assert torch.allclose(b.H.double(), expect, rtol=1e-5)
    assert b.absmax.max() == X.abs().max().float()


def test_walk_replays_each_blocks_own_arguments():
    """Gemma 3 mixes sliding-window and global attention layers, each kind with its own mask and RoPE table; the
    walk must replay every block with the arguments the model gives *that* block (it used block 0's for all, so
    every block after the first global one saw inputs the model never computes).  Rows longer than the window."""
    from tiny import _config

    cfg, cls = _config("gemma3")
    cfg.num_hidden_layers = 3
    cfg.layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    torch.manual_seed(0)
    model = cls(cfg).eval()
    ids = _ids(n=2, L=3 * cfg.sliding_window)
    ref = _hooked_stats(model, ids)
    got = {}
    walk_blocks(model, ids, None, sequential=False, progress=False,
                stats_sink=lambda i, stats: got.update({f"{i}.{n}": s for n, s in stats.items()}))
    for k in ref:
        torch.testing.assert_close(got[k].H, ref[k].H, rtol=1e-5, atol=1e-6, msg=k)
