"""Mixture-of-experts: tiny random Qwen3-MoE and Mixtral models through the whole pipeline (mixq.moe).

Stacked 3-D experts become one linear per expert projection (the same function), each a layer of the
plan; calibration statistics of expert ``e`` are exactly its routed rows; routing counts land in the
measurement; rare experts are padded with their block's pooled statistics; the ``hessian`` metric is
weighted by routing frequency; the HF exports hold the experts by module name (GGUF: ``test_gguf_moe.py``).
"""
from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers as tf

import mixq
from mixq.arch import get_blocks, iter_layers
from mixq.calib.capture import walk_blocks
from mixq.calib.stats import LayerStats
from mixq.moe import (MIN_EXPERT_TOKENS, ExpertList, ExpertStats, RoutingRecord, expose_experts, pad_rare_experts,
                      split_expert_name)
from tiny import HEADS, HIDDEN, KV_HEADS, LAYERS, MAX_POS, VOCAB, make_tiny_tokenizer

MOE_FAMILIES = ["qwen3_moe", "mixtral"]
TEXT = "the quick brown fox jumps over the lazy dog. " * 40


def make_moe(family: str, *, experts: int = 4, top_k: int = 2, seed: int = 0, **config):
    """A random tiny MoE causal LM: hidden 64, 2 blocks, ``experts`` experts of width 32, top-``top_k``; ``config``:
    more config fields or other values (e.g. ``norm_topk_prob=True``, ``vocab_size=300``)."""
    common = {**dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                     num_key_value_heads=KV_HEADS, max_position_embeddings=MAX_POS, num_experts_per_tok=top_k),
              **config}
    if family == "qwen3_moe":
        cfg, cls = tf.Qwen3MoeConfig(**common, intermediate_size=128, moe_intermediate_size=32, num_experts=experts,
                                     head_dim=HIDDEN // HEADS), tf.Qwen3MoeForCausalLM
    else:
        cfg, cls = tf.MixtralConfig(**common, intermediate_size=32, num_local_experts=experts), tf.MixtralForCausalLM
    torch.manual_seed(seed)
    model = cls(cfg).to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.normal_(0.0, 0.1).add_(1.0)
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)  # a router that routes (HF may initialise it to zero)
    return model.eval()


def _ids(n: int, L: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 99, (n, L), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=MOE_FAMILIES)
def family(request) -> str:
    return request.param


# ---------------------------------------------------------------------------- experts as layers
def test_exposed_experts_compute_the_same_function(family):
    model = make_moe(family)
    ids = _ids(2, 24)
    ref = model(ids).logits
    stacked = model.model.layers[0].mlp.experts
    gu, dn = stacked.gate_up_proj.detach().clone(), stacked.down_proj.detach().clone()
    assert expose_experts(model) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert expose_experts(model) == []  # idempotent
    ex = model.model.layers[0].mlp.experts
    assert isinstance(ex, ExpertList) and len(ex) == 4
    assert torch.equal(ex[3].gate_proj.weight, gu[3, :32]) and torch.equal(ex[3].up_proj.weight, gu[3, 32:])
    assert torch.equal(ex[3].down_proj.weight, dn[3])
    torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=1e-5)


def test_every_expert_projection_is_a_plan_layer_and_routers_are_not(family):
    model = make_moe(family)
    names = [r.fqn for r in iter_layers(model)]  # exposes the experts on the way
    experts = [n for n in names if split_expert_name(n)]
    assert len(experts) == LAYERS * 4 * 3
    assert "model.layers.0.mlp.experts.3.down_proj" in names
    assert dict(r and (r.fqn, r.shape) for r in iter_layers(model))["model.layers.1.mlp.experts.2.gate_proj"] == (32, 64)
    assert not any(n.endswith("mlp.gate") for n in names)  # routers stay in high precision, out of the plan
    assert len(names) == LAYERS * (4 + 12)


def test_shared_expert_is_a_layer_its_gate_is_kept_and_other_layouts_are_refused():
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=HEADS,
                  num_key_value_heads=KV_HEADS, max_position_embeddings=MAX_POS, num_experts_per_tok=2)
    torch.manual_seed(0)
    q2 = tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(**common, intermediate_size=64, moe_intermediate_size=32,
                                                  shared_expert_intermediate_size=64, num_experts=4))
    names = [r.fqn for r in iter_layers(q2)]
    assert "model.layers.0.mlp.shared_expert.down_proj" in names and "model.layers.0.mlp.experts.3.up_proj" in names
    assert not any(n.endswith(("mlp.gate", "shared_expert_gate")) for n in names)
    oss = tf.GptOssForCausalLM(tf.GptOssConfig(**common, intermediate_size=32, num_local_experts=4, head_dim=16))
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.experts \(GptOssExperts\).*is_transposed=True.*"
                                         r"has_bias=True"):
        iter_layers(oss)


def test_experts_offloaded_by_accelerate_are_refused():
    from mixq.calib.lazy import skeleton_from_config
    from mixq.moe import UnsupportedExpertsError

    skel = skeleton_from_config(make_moe("mixtral").config)  # meta weights, no hook: --lazy fills them later
    skel.model.layers[1]._hf_hook = object()  # what accelerate's offloading dispatch leaves
    with pytest.raises(UnsupportedExpertsError, match="model.layers.0.mlp.experts: .*offloaded by accelerate"):
        iter_layers(skel)


def test_expert_statistics_are_its_routed_rows(family):
    """H of expert e's gate_proj == XᵀX/n over exactly the rows the router sent to e; n is the routing count."""
    model = make_moe(family)
    ids = _ids(4, 32)
    moe_in = []
    get_blocks(model)[0].mlp.register_forward_pre_hook(lambda m, a: moe_in.append(a[0].reshape(-1, HIDDEN).clone()))
    seen = {}
    walk_blocks(model, ids, None, sequential=False, progress=False, min_expert_tokens=0,
                stats_sink=lambda i, st: seen.setdefault(i, st))
    x = torch.cat(moe_in[:4])  # the walk's block-0 pass, sample by sample
    _, _, top = get_blocks(model)[0].mlp.gate(x)
    counts = [int((top == e).any(-1).sum()) for e in range(4)]
    assert sum(counts) == 2 * ids.numel()
    for e in range(4):
        st = seen[0][f"mlp.experts.{e}.gate_proj"]
        assert st.n_tokens == counts[e] == seen[0][f"mlp.experts.{e}.down_proj"].n_tokens
        xe = x[(top == e).any(-1)].double()
        torch.testing.assert_close(st.H, (xe.T @ xe / len(xe)).float(), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- rare experts
def _stats(x: torch.Tensor) -> LayerStats:
    st = LayerStats(x.shape[1])
    if len(x):
        st.update(x)
    return st


def test_rare_experts_are_padded_with_the_pooled_statistics(caplog):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, 8, generator=g) for n in (100, 80, 5, 0)]
    stats = {f"mlp.experts.{e}.up_proj": _stats(x) for e, x in enumerate(xs)}
    stats["self_attn.q_proj"] = _stats(xs[0])
    with caplog.at_level(logging.WARNING):
        out = pad_rare_experts(stats, 20, where="block 0: ")
    assert out["self_attn.q_proj"] is stats["self_attn.q_proj"]
    assert out["mlp.experts.0.up_proj"] is stats["mlp.experts.0.up_proj"]  # saw enough
    allx = torch.cat(xs).double()
    Hbar = allx.T @ allx / len(allx)
    rare, empty = out["mlp.experts.2.up_proj"], out["mlp.experts.3.up_proj"]
    assert isinstance(rare, ExpertStats) and rare.routed_tokens == 5 and rare.n_tokens == 20
    x2 = xs[2].double()
    torch.testing.assert_close(rare.H, ((x2.T @ x2 + 15 * Hbar) / 20).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(empty.H, Hbar.float(), rtol=1e-5, atol=1e-6)
    assert empty.routed_tokens == 0 and torch.isfinite(empty.absmean).all()
    assert "mlp.experts" in caplog.text and "2:5, 3:0" in caplog.text and "fewer than 20" in caplog.text


def test_expert_that_saw_no_token_still_quantizes_with_gptq(caplog):
    """8 experts, top-1, 4 calibration tokens: at least 4 experts see nothing; GPTQ uses the pooled Hessian."""
    model = make_moe("qwen3_moe", experts=8, top_k=1)
    ids = _ids(1, 4)
    with caplog.at_level(logging.WARNING, logger="mixq.moe.routing"):
        res = mixq.quantize(model, "W4-g32", method="gptq", calib=ids, progress=False)
    assert len(res.qtensors) == LAYERS * (4 + 8 * 3) and all(v >= 0 for v in res.proxy_loss.values())
    assert caplog.text.count(":0") >= 4 and f"fewer than {MIN_EXPERT_TOKENS}" in caplog.text


# ---------------------------------------------------------------------------- routing in the measurement
def test_routing_counts_and_frequency_weights_in_the_measurement(tmp_path):
    model = make_moe("mixtral")
    ids = _ids(8, 32)
    out = tmp_path / "m.json"
    table = mixq.measure(model, ids, metric="hessian", candidates=["W2-g32", "W4-g32"], out=out, progress=False)
    moe = json.loads(out.read_text())["meta"]["moe"]
    assert moe == table.meta["moe"] and moe["tokens"] == ids.numel() and moe["min_tokens"] == MIN_EXPERT_TOKENS
    assert set(moe["counts"]) == {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"}
    for counts in moe["counts"].values():
        assert len(counts) == 4 and sum(counts) == 2 * ids.numel()
    rec = RoutingRecord(moe["tokens"], moe["min_tokens"], moe["counts"])
    # the hessian error of an expert layer is f_e * tr(ΔW H_e ΔWᵀ), f_e = max(n_e, τ) / N
    seen = {}
    walk_blocks(model, ids, None, sequential=False, progress=False, stats_sink=lambda i, st: seen.setdefault(i, st))
    from mixq.algorithms.rtn import rtn_quantize
    from mixq.config import parse_spec
    from mixq.measure.metrics import LayerSensitivity, layer_error

    entry = {e.fqn: e for e in table.layers}["model.layers.1.mlp.experts.2.down_proj"]
    k = [c.name for c in entry.candidates].index("W2-g32")
    W = model.get_submodule(entry.fqn).weight.detach()
    raw = layer_error(W - rtn_quantize(W, parse_spec("W2-g32"))[1],
                      LayerSensitivity(H=seen[1]["mlp.experts.2.down_proj"].H), "hessian")
    f = max(moe["counts"]["model.layers.1.mlp.experts"][2], MIN_EXPERT_TOKENS) / ids.numel()
    assert rec.frequency(entry.fqn) == pytest.approx(f) and 0 < f < 1
    assert entry.errors[k] == pytest.approx(f * raw, rel=1e-6)
    dense = {e.fqn: e for e in table.layers}["model.layers.1.self_attn.o_proj"]
    assert rec.frequency(dense.fqn) == 1.0 and dense.errors[0] > 0


def test_rare_experts_get_pooled_gradient_statistics():
    rec = RoutingRecord(tokens=100, min_tokens=10, counts={"b.mlp.experts": [60, 30, 4, 0]})
    grads = {"b.mlp.experts.0.down_proj": {"G": torch.full((3,), 6.0)},
             "b.mlp.experts.1.down_proj": {"G": torch.full((3,), 3.0)},
             "b.mlp.experts.2.down_proj": {"G": torch.full((3,), 100.0)}}  # noisy: 4 tokens
    rec.fill_gradients(grads, "b", [f"mlp.experts.{e}.down_proj" for e in range(4)])
    per_token = 9.0 / 90  # (6 + 3) / (60 + 30)
    assert torch.allclose(grads["b.mlp.experts.0.down_proj"]["G"], torch.full((3,), 6.0))
    assert torch.allclose(grads["b.mlp.experts.2.down_proj"]["G"], torch.full((3,), per_token * 10))
    assert torch.allclose(grads["b.mlp.experts.3.down_proj"]["G"], torch.full((3,), per_token * 10))
    assert rec.weight("b.mlp.experts.3.down_proj", "hessian") == 0.1 and rec.weight("b.mlp.experts.3.down_proj",
                                                                                     "kfac") == 1.0


def test_tied_gives_an_expert_group_one_spec():
    """Per-expert specs by default; ``tied`` makes every expert's down_proj of a block share one spec."""
    table = mixq.measure(make_moe("mixtral"), _ids(4, 32), metric="hessian", candidates=["W2-g32", "W4-g32", "W8-g32"],
                         progress=False)
    free = mixq.plan(table, bpw=4.2)
    tied = mixq.plan(table, bpw=4.2, tied=(r"experts\.\d+\.down_proj",))
    for blk in range(LAYERS):
        downs = [f"model.layers.{blk}.mlp.experts.{e}.down_proj" for e in range(4)]
        assert len({tied.layers[f].name for f in downs}) == 1
    assert tied.achieved_bpw <= 4.2 and free.achieved_bpw <= 4.2


def test_block_metrics_are_refused_on_moe_models():
    with pytest.raises(ValueError, match="mixture-of-experts.*kfac or hessian"):
        mixq.measure(make_moe("qwen3_moe"), _ids(2, 16), metric="block-rel", candidates=["W4-g32"], progress=False)


# ---------------------------------------------------------------------------- the whole pipeline
def test_moe_end_to_end_with_per_expert_specs(family, tmp_path):
    model, tok = make_moe(family), make_tiny_tokenizer()
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    ids = _ids(8, 32)
    table = mixq.measure(model, ids, metric="kfac", candidates=["W2-g32", "W3-g32", "W4-g32", "W8-g32"],
                         grad_samples=4, progress=False)
    assert sum(table.meta["moe"]["counts"]["model.layers.0.mlp.experts"]) == 2 * ids.numel()
    plan = mixq.plan(table, bpw=4.5, force={r"experts\.0\.down_proj": "W8-g32", r"experts\.1\.down_proj": "W2-g32"})
    specs = {f: s.name for f, s in plan.layers.items()}
    assert specs["model.layers.0.mlp.experts.0.down_proj"] == "W8-g32"
    assert specs["model.layers.1.mlp.experts.1.down_proj"] == "W2-g32"
    result = mixq.quantize(model, plan=plan, method="gptq", calib=ids, progress=False)
    assert set(result.qtensors) == set(plan.layers) and result.proxy_loss
    expect = model(ids).logits
    d = tmp_path / "q"
    mixq.save_quantized(d, model, tok, result)
    info = json.loads((d / "mixq.json").read_text())
    assert info["layers"]["model.layers.1.mlp.experts.1.down_proj"]["spec"]["bits"] == 2
    walk = info["moe"]["counts"]  # the GPTQ walk's routing (block 1 sees block 0 quantized)
    assert walk["model.layers.0.mlp.experts"] == table.meta["moe"]["counts"]["model.layers.0.mlp.experts"]
    assert sum(walk["model.layers.1.mlp.experts"]) == 2 * ids.numel()
    loaded, qtok, linfo = mixq.load_quantized(d)
    assert isinstance(loaded.model.layers[0].mlp.experts, ExpertList)
    assert torch.equal(loaded(ids).logits, expect)
    packed, _, _ = mixq.load_quantized(d, packed=True)
    torch.testing.assert_close(packed(ids).logits, expect, rtol=1e-4, atol=1e-4)
    r = mixq.evaluate(loaded, qtok, reference=make_moe(family), corpus=str(corpus), tokens=96, seqlen=32,
                      progress=False)
    assert r["perplexity"] > 1 and r["kl"] > 0


@pytest.mark.parametrize("layout", ["stacked", "mixtral-checkpoint"])
def test_lazy_quantize_reads_experts_stacked_or_per_expert(layout, tmp_path):
    """--lazy: per-expert weights come from stacked [E, 2I, H] tensors or Mixtral's w1/w3/w2, same GPTQ codes."""
    from safetensors.torch import save_file

    from mixq import api
    from mixq.arch import arch_for
    from mixq.calib.lazy import LazySafetensorsBlocks, load_outside_blocks, skeleton_from_config
    from mixq.moe.checkpoint import checkpoint_name

    model = make_moe("mixtral")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    if layout == "mixtral-checkpoint":
        expose_experts(model)
        state = {checkpoint_name("mixtral", k): v.contiguous() for k, v in model.state_dict().items()}
        assert "model.layers.0.block_sparse_moe.experts.1.w3.weight" in state
    save_file(state, tmp_path / "model.safetensors")
    ids = _ids(4, 32)
    specs = api.resolve_specs(model, "W4-g32")
    ref = api.quantize_model(model, specs, method="gptq", calib_ids=ids, progress=False)
    lazy = skeleton_from_config(model.config)
    load_outside_blocks(lazy, tmp_path / "model.safetensors")
    src = LazySafetensorsBlocks(tmp_path / "model.safetensors", arch_for(lazy).blocks)
    got = api.quantize_model(lazy, specs, method="gptq", calib_ids=ids, source=src, progress=False)
    assert set(got.qtensors) == set(ref.qtensors)
    for fqn in specs:
        assert torch.equal(got.qtensors[fqn].codes, ref.qtensors[fqn].codes), fqn


def test_cli_measure_reports_routing_then_quantize_and_eval(tmp_path, capsys):
    from mixq.cli import main

    d = tmp_path / "m"
    make_moe("qwen3_moe").save_pretrained(d)  # transformers 5 writes per-expert tensors
    make_tiny_tokenizer().save_pretrained(d)
    (tmp_path / "c.txt").write_text(TEXT)
    (tmp_path / "cands.txt").write_text("W2-g32\nW4-g32\nW8-g32\n")
    data = ["--calib", str(tmp_path / "c.txt"), "--nsamples", "4", "--seqlen", "32"]
    assert main(["measure", "--model", str(d), *data, "--candidates", str(tmp_path / "cands.txt"),
                 "--out", str(tmp_path / "meas.json")]) == 0
    out = capsys.readouterr().out
    assert "routing: 2 MoE block(s), 8 experts, tokens per expert min" in out and "of 128" in out, out
    counts = json.loads((tmp_path / "meas.json").read_text())["meta"]["moe"]["counts"]
    assert [sum(c) for c in counts.values()] == [2 * 128, 2 * 128]
    assert main(["quantize", "--model", str(d), "--measurement", str(tmp_path / "meas.json"), "--bpw", "4", *data,
                 "--out", str(tmp_path / "q")]) == 0
    info = json.loads((tmp_path / "q" / "mixq.json").read_text())
    layers = info["layers"]
    assert sum(info["moe"]["counts"]["model.layers.0.mlp.experts"]) == 2 * 128
    assert "model.layers.1.mlp.experts.3.gate_proj" in layers and not any(k.endswith("mlp.gate") for k in layers)
    assert main(["eval", str(tmp_path / "q"), "--corpus", str(tmp_path / "c.txt"), "--tokens", "96",
                 "--seqlen", "32"]) == 0


# ---------------------------------------------------------------------------- exports
@pytest.fixture
def quantized_dir(tmp_path):
    def build(family: str, spec: str = "W4-g32"):
        model = make_moe(family)
        res = mixq.quantize(model, spec, progress=False)
        d = tmp_path / f"{family}-q"
        mixq.save_quantized(d, model, make_tiny_tokenizer(), res)
        return d, res
    return build


@pytest.mark.parametrize("family, name", [
    ("qwen3_moe", "model.layers.1.mlp.experts.3.up_proj"),  # Qwen3-MoE checkpoints use the module names
    ("mixtral", "model.layers.1.block_sparse_moe.experts.3.w3")])  # Mixtral's: block_sparse_moe ... w1/w3/w2
def test_compressed_tensors_and_gptq_hold_experts_by_checkpoint_name(family, name, quantized_dir, tmp_path):
    from mixq.export.hf import export_compressed_tensors, export_gptq, read_back_compressed, read_back_gptq
    from mixq.formats import dequantize
    from mixq.moe.checkpoint import checkpoint_name

    d, res = quantized_dir(family)
    export_compressed_tensors(d, tmp_path / "ct")
    export_gptq(d, tmp_path / "gptq")
    mine = "model.layers.1.mlp.experts.3.up_proj"
    assert checkpoint_name(family, mine) == name
    for got in (read_back_compressed(tmp_path / "ct"), read_back_gptq(tmp_path / "gptq")):
        assert set(got) == {checkpoint_name(family, f) for f in res.qtensors}
        assert torch.equal(got[name], dequantize(res.qtensors[mine]).float())
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    targets = [t for g in cfg["config_groups"].values() for t in g["targets"]]
    assert checkpoint_name(family, "model.layers.0.mlp.experts.2.down_proj") in targets
    router = checkpoint_name(family, "model.layers.0.mlp.gate")
    assert router in cfg["ignore"] and router not in targets  # routers stay in float
    from safetensors import safe_open

    with safe_open(tmp_path / "ct" / "model.safetensors", "pt") as f:
        assert f.get_tensor(f"{router}.weight").dtype == torch.float32
    gcfg = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert f"-:^{router.replace('.', chr(92) + '.')}$" in gcfg.get("dynamic", {}), gcfg.get("dynamic")
