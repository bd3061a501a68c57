"""The lean decoder (mixq.runtime.lean_decode): transformers' logits, its refusals, and greedy_generate's engines."""
from __future__ import annotations

import pytest
import torch
from tiny import make_tiny

from mixq.runtime.generate import greedy_generate, resolve_engine
from mixq.runtime.lean_decode import GROW, LeanDecoder, unsupported

LEAN = ["llama", "qwen2", "mistral", "qwen3", "gemma3", "olmo2", "phi3", "granite", "gemma2"]


@pytest.mark.parametrize("family", LEAN)
@torch.no_grad()
def test_logits_are_transformers_in_prefill_chunks_and_steps(family):
    model = make_tiny(family)
    n = GROW + 40  # past one growth of the cache
    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(1))
    ref = model(ids).logits[0]
    lean = LeanDecoder(model)
    got = [lean.forward(ids[:, :100]), lean.forward(ids[:, 100:107])]   # prefill, then a chunk after a cache
    got += [lean.forward(ids[:, i:i + 1]) for i in range(107, n)]       # one token a step
    got = torch.cat(got)
    assert got.shape == ref.shape and lean.pos == n
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)
    assert lean.forward(ids[:, :3], last=True).shape == (1, model.config.vocab_size) and lean.pos == n + 3


@pytest.mark.parametrize("family", LEAN)
def test_bf16_greedy_ids_are_the_transformers_ones(family):
    model = make_tiny(family).to(torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    a = greedy_generate(model, ids, 24, stop_at_eos=False, engine="transformers")
    b = greedy_generate(model, ids, 24, stop_at_eos=False)
    assert b.engine == "lean" and a.engine == "transformers"
    assert a.new_ids == b.new_ids and b.to_dict()["engine"] == "lean"


def test_refusals_name_the_reason_and_auto_falls_back():
    gemma = make_tiny("gemma")  # Gemma 1: not in the table
    assert "not in lean_decode.FAMILIES" in unsupported(gemma)
    assert resolve_engine(gemma) == "transformers"
    with pytest.raises(ValueError, match="engine 'transformers'"):
        resolve_engine(gemma, "lean")
    with pytest.raises(ValueError, match="engine must be one of"):
        resolve_engine(gemma, "fast")
    model = make_tiny("llama")
    assert unsupported(model) is None
    h = model.model.layers[1].self_attn.register_forward_hook(lambda *a: None)  # e.g. activation quantization
    assert "hook on LlamaAttention" in unsupported(model) and resolve_engine(model) == "transformers"
    with pytest.raises(ValueError, match="hook"):
        LeanDecoder(model)
    h.remove()
    model.model.layers[0].mlp = torch.nn.Identity()
    assert "layer 0: Identity where LlamaMLP" in unsupported(model)


def _packed(tiny_model, tiny_tokenizer, tmp_path, spec: str, family: str = "llama"):
    """A tiny ``family`` model with every block linear ``spec`` (RTN), saved and loaded back packed in bf16."""
    from mixq import api
    from mixq.config import parse_spec
    from mixq.export.native import load_quantized
    from mixq.export.native_write import save_quantized

    model = tiny_model(family)
    specs = {f: parse_spec(spec) for f in api.resolve_specs(model, "W4-g32")}
    res = api.quantize_model(model, specs, method="rtn", progress=False)
    d = save_quantized(tmp_path / "q", model, tiny_tokenizer, res.qtensors, {"base_model": "tiny", "method": "rtn"})
    return load_quantized(d, dtype=torch.bfloat16, packed=True)[0], d


@pytest.mark.parametrize("family", ["llama", "phi3"])  # phi3: the fused qkv_proj / gate_up_proj as trellis layers
def test_packed_trellis_model_decodes_the_same_ids(family, tiny_model, tiny_tokenizer, tmp_path):
    """A packed model of trellis ``+ip1`` layers (the default candidates' kind) gives the transformers ids."""
    q, _ = _packed(tiny_model, tiny_tokenizer, tmp_path, "TCQ3-channel+ip1", family)
    ids = torch.randint(0, q.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(3))
    a = greedy_generate(q, ids, 16, stop_at_eos=False, engine="transformers")
    b = greedy_generate(q, ids, 16, stop_at_eos=False)
    assert b.engine == "lean" and a.new_ids == b.new_ids


@torch.no_grad()
def test_steps_without_the_native_glue_are_the_same(monkeypatch):
    """No compiler: the one-token steps run the ATen path (the prefill's), with the same logits."""
    from mixq.runtime.kernels import glue_cpu

    model = make_tiny("llama")
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(4))
    native = LeanDecoder(model)
    assert native.glue is not None  # this machine compiles the kernels; CI does too
    monkeypatch.setattr(glue_cpu, "lib", lambda: None)
    aten = LeanDecoder(model)
    assert aten.glue is None
    for lean in (native, aten):
        lean.forward(ids[:, :30])
    for i in range(30, 40):
        torch.testing.assert_close(native.forward(ids[:, i:i + 1]), aten.forward(ids[:, i:i + 1]),
                                   atol=2e-6, rtol=1e-5)


def test_generate_cli_engine(tiny_model, tiny_tokenizer, tmp_path, capsys):
    from mixq.cli import main

    _, d = _packed(tiny_model, tiny_tokenizer, tmp_path, "W4-g32")
    argv = ["generate", str(d), "--prompt", "The cat sat", "--max-new-tokens", "8", "--no-stop"]
    outs = []
    for engine in ("lean", "transformers"):
        assert main(argv + ["--engine", engine]) == 0
        cap = capsys.readouterr()
        outs.append(cap.out)
        assert f"engine {engine})" in cap.err
    assert outs[0] == outs[1]
    assert main(argv) == 0 and "engine lean)" in capsys.readouterr().err  # auto


def test_a_hooked_linear_runs_through_its_module(tiny_model, tiny_tokenizer, tmp_path):
    """A layer with its own fast step but a hook on it (e.g. an activation observer) is called as a module."""
    q, _ = _packed(tiny_model, tiny_tokenizer, tmp_path, "TCQ3-channel+ip1")
    seen = []
    q.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    ids = torch.randint(0, q.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(5))
    r = greedy_generate(q, ids, 4, stop_at_eos=False, engine="lean")
    assert len(seen) == 4 and r.engine == "lean"  # the prefill and three steps


@torch.no_grad()
def test_gemma3_full_and_sliding_layers_with_their_own_rope():
    """A Gemma 3 whose layers alternate full and sliding-window attention, each type with its own RoPE base."""
    from tiny import _config

    cfg, cls = _config("gemma3")
    cfg.layer_types = ["sliding_attention", "full_attention"]
    torch.manual_seed(0)
    model = cls(cfg).eval()
    lean = LeanDecoder(model)
    assert lean.windows == [16, None] and lean.rope_of == ["sliding_attention", "full_attention"]
    assert not torch.equal(lean.cos["sliding_attention"], lean.cos["full_attention"])
    ids = torch.randint(0, cfg.vocab_size, (1, 60), generator=torch.Generator().manual_seed(6))
    ref = model(ids).logits[0]
    got = torch.cat([lean.forward(ids[:, :20]), lean.forward(ids[:, 20:40])]
                    + [lean.forward(ids[:, i:i + 1]) for i in range(40, 60)])
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("family", ["mistral", "phi3"])
@torch.no_grad()
def test_a_window_from_the_config(family):
    """Mistral's and Phi-3's sliding window is the config's, for every layer (``kv > q - W``, as transformers)."""
    from tiny import _config

    cfg, cls = _config(family)
    cfg.sliding_window = 16
    torch.manual_seed(0)
    model = cls(cfg).eval()
    lean = LeanDecoder(model)
    assert lean.windows == [16] * cfg.num_hidden_layers
    ids = torch.randint(0, cfg.vocab_size, (1, 60), generator=torch.Generator().manual_seed(7))
    ref = model(ids).logits[0]
    got = torch.cat([lean.forward(ids[:, :20]), lean.forward(ids[:, 20:40])]
                    + [lean.forward(ids[:, i:i + 1]) for i in range(40, 60)])
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)


def _like_transformers(model, lean, ids, dtype) -> None:
    """float32: the lean logits of a 20-token prefill then one-token steps are transformers'; bf16: greedy ids."""
    if dtype == torch.float32:
        ref = model(ids).logits[0]
        got = torch.cat([lean.forward(ids[:, :20])] + [lean.forward(ids[:, i:i + 1]) for i in range(20, ids.shape[1])])
        torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)
    else:
        a = greedy_generate(model, ids[:, :12], 24, stop_at_eos=False, engine="transformers")
        b = greedy_generate(model, ids[:, :12], 24, stop_at_eos=False, engine="lean")
        assert a.new_ids == b.new_ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_rope_on_part_of_each_head(dtype):
    """Phi-4-mini's kind of Phi-3: RoPE on the first half of each head's channels, the rest untouched."""
    from tiny import _config

    cfg, cls = _config("phi3")
    cfg.partial_rotary_factor = 0.5
    if isinstance(getattr(cfg, "rope_parameters", None), dict):
        cfg.rope_parameters["partial_rotary_factor"] = 0.5
    torch.manual_seed(0)
    model = cls(cfg).eval().to(dtype)
    lean = LeanDecoder(model)
    assert lean.rot == lean.head_dim // 2
    ids = torch.randint(0, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(8))
    _like_transformers(model, lean, ids, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_smollm3_layers_without_rope_and_a_window(dtype):
    """SmolLM3: layers whose attention has no RoPE (``no_rope_layers``), one with a sliding window."""
    import transformers as tf

    cfg = tf.SmolLM3Config(vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                           no_rope_layers=[1, 0, 1, 0], use_sliding_window=True, sliding_window=16,
                           layer_types=["full_attention", "sliding_attention", "full_attention", "full_attention"],
                           pad_token_id=1, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(0)
    model = tf.SmolLM3ForCausalLM(cfg).eval().to(dtype)
    lean = LeanDecoder(model)
    assert lean.nope == [False, True, False, True] and lean.windows == [None, 16, None, None]
    ids = torch.randint(0, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(9))
    _like_transformers(model, lean, ids, dtype)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
@torch.no_grad()
def test_mixtures_of_experts_run_their_expert_blocks(family):
    """Qwen3-MoE (one dense layer among sparse ones) and Mixtral: the attention lean, the expert block as a module."""
    from test_moe import make_moe

    model = make_moe(family, **({"mlp_only_layers": [0]} if family == "qwen3_moe" else {}))
    lean = LeanDecoder(model)
    assert lean.moe == ([False, True] if family == "qwen3_moe" else [True, True])
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(10))
    _like_transformers(model, lean, ids, torch.float32)
