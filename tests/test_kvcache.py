"""KIVI KV cache: 16 bits is the default cache exactly, quantized states match the reference quantizer,
generation and chunked perplexity run, and the byte count is exact."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from mixq.data import eval_windows
from mixq.eval.kv import eval_with_kv_quant
from mixq.eval.perplexity import perplexity
from mixq.formats import fake_quantize
from mixq.runtime.kv_cache import KIVICache, KIVILayer
from mixq.runtime.kv_codec import kv_spec
from mixq.runtime.kv_cost import kv_cache_bits, kv_cache_bytes, resolve_kv_bits
from tiny import make_tiny

CACHE_FAMILIES = ["llama", "qwen2", "mistral", "gpt2"]
IDS = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))
KW = dict(k_group=4, residual=8)


@torch.no_grad()
def _chunked_logits(model, cache, ids, bounds=(0, 10, 11, 12, 17, 25, 26, 40)):
    return torch.cat([model(ids[:, s:e], past_key_values=cache, use_cache=True).logits
                      for s, e in zip(bounds[:-1], bounds[1:])], 1)


@pytest.mark.parametrize("family", CACHE_FAMILIES)
def test_16_bits_gives_the_default_cache_logits_exactly(family):
    model = make_tiny(family)
    ref = _chunked_logits(model, DynamicCache(config=model.config), IDS)
    out = _chunked_logits(model, KIVICache(model.config, 16, **KW), IDS)
    assert torch.equal(out, ref)
    mixed = _chunked_logits(model, KIVICache(model.config, {0: 16, 1: (16, 2)}, **KW), IDS)
    assert torch.equal(mixed[:, :10], ref[:, :10]) and not torch.equal(mixed, ref)  # prefill is exact


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@torch.no_grad()
def test_generate_with_kivi(family):
    model = make_tiny(family)
    prompt = IDS[:, :6]
    kw = dict(max_new_tokens=14, do_sample=False, output_scores=True, return_dict_in_generate=True)
    ref = model.generate(prompt, past_key_values=DynamicCache(config=model.config), **kw)
    same = model.generate(prompt, past_key_values=KIVICache(model.config, 16, **KW), **kw)
    assert torch.equal(same.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(same.scores, ref.scores))
    cache = KIVICache(model.config, {0: 2, 1: {"k": 4, "v": 3}}, k_group=4, residual=4, v_group=8)
    out = model.generate(prompt, past_key_values=cache, **kw)
    assert out.sequences.shape == (2, 20) and cache.get_seq_length() == 19
    layer = cache.layers[0]
    assert layer._quantized_keys.codes.shape[2] == 12 and layer.keys.shape[2] == 7      # 4·⌊(19-4)/4⌋
    assert layer._quantized_values.codes.shape[2] == 15 and layer.values.shape[2] == 4  # 19 - 4
    beams = model.generate(prompt[:1], past_key_values=KIVICache(model.config, 4, **KW), max_new_tokens=6,
                           num_beams=2, do_sample=False)  # reorder_cache
    assert beams.shape == (1, 12)


# ---------------------------------------------------------------------------- reference
def reference_kivi(K, V, k_bits, v_bits, *, k_group, v_group, residual, zero="fp16"):
    """What a KIVI cache holding ``K, V [B, H, T, D]`` must show, group by group with ``fake_quantize``."""
    T, D = K.shape[2], K.shape[3]
    Kr, Vr = K.clone(), V.clone()
    if k_bits != 16:
        spec = kv_spec(k_bits, zero)
        tq = max(T - residual, 0) // k_group * k_group
        for j in range(0, tq, k_group):
            for d in range(D):  # one group: one channel over k_group tokens, for every (b, h)
                rows = K[:, :, j : j + k_group, d].reshape(-1, k_group)
                Kr[:, :, j : j + k_group, d] = fake_quantize(rows, spec).reshape(K.shape[0], K.shape[1], k_group)
    if v_bits != 16:
        spec = kv_spec(v_bits, zero)
        for t in range(max(T - residual, 0)):
            for c in range(0, D, v_group):  # one group: v_group channels of one token
                rows = V[:, :, t, c : c + v_group].reshape(-1, v_group)
                Vr[:, :, t, c : c + v_group] = fake_quantize(rows, spec).reshape(V.shape[0], V.shape[1], v_group)
    return Kr, Vr


@pytest.mark.parametrize("k_bits,v_bits,zero", [(2, 2, "fp16"), (3, 4, "fp16"), (8, 16, "fp16"), (4, 2, "int"),
                                                (16, 3, "fp16")])
def test_layer_matches_reference_quantizer(k_bits, v_bits, zero):
    g = torch.Generator().manual_seed(1)
    K, V = torch.randn(2, 3, 45, 16, generator=g), torch.randn(2, 3, 45, 16, generator=g)
    K[..., 5] *= 20  # a key outlier channel, as KIVI observes
    cfg = dict(k_group=4, v_group=8, residual=6, zero=zero)
    layer = KIVILayer(k_bits, v_bits, **cfg)
    bounds = [0, 9, 10, 11, 14, 22, 23, 24, 37, 45]
    for s, e in zip(bounds[:-1], bounds[1:]):
        past_k, past_v = layer.dequantized() if s else (K[:, :, :0], V[:, :, :0])
        k, v = layer.update(K[:, :, s:e], V[:, :, s:e])
        assert torch.equal(k, torch.cat([past_k, K[:, :, s:e]], 2)) and torch.equal(v, torch.cat([past_v, V[:, :, s:e]], 2))
        ref_k, ref_v = reference_kivi(K[:, :, :e], V[:, :, :e], k_bits, v_bits, **cfg)
        got_k, got_v = layer.dequantized()
        assert torch.equal(got_k, ref_k) and torch.equal(got_v, ref_v)
        assert torch.equal(got_k[:, :, -6:], K[:, :, e - 6 : e]) and torch.equal(got_v[:, :, -6:], V[:, :, e - 6 : e])
    assert layer.get_seq_length() == 45
    if k_bits < 16:
        assert layer._quantized_keys.codes.max() <= 2**k_bits - 1


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@torch.no_grad()
def test_model_cache_matches_reference(family):
    model = make_tiny(family)
    cache = KIVICache(model.config, {0: (4, 2), 1: 3}, **KW)
    seen = {0: [], 1: []}
    for i, layer in enumerate(cache.layers):
        orig = layer.update
        layer.update = lambda k, v, *a, _o=orig, _i=i, **kw: (seen[_i].append((k, v)), _o(k, v, *a, **kw))[1]
    _chunked_logits(model, cache, IDS)
    for i, (kb, vb) in enumerate(cache.per_layer):
        K = torch.cat([k for k, _ in seen[i]], 2)
        V = torch.cat([v for _, v in seen[i]], 2)
        ref = reference_kivi(K, V, kb, vb, v_group=K.shape[-1], **KW)
        got = cache.layers[i].dequantized()
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


# ---------------------------------------------------------------------------- bytes
def test_kv_cache_bytes_by_hand():
    model = make_tiny("llama")  # 2 layers, 2 kv heads, head_dim 16 (float32: fp window 32 bits)
    bits = {0: 4, 1: (2, 16)}
    kw = dict(k_group=4, v_group=8, residual=8, fp_bits=32)
    got = kv_cache_bits(model.config, bits, context=50, batch=3, **kw)
    # n = B·H = 6 head-rows; keys: Tq = 4·⌊42/4⌋ = 40 -> 10 groups per channel; values: Tv = 42, 2 groups/token
    l0 = (6 * 40 * 16 * 4 + 6 * 10 * 16 * (16 + 16) + 6 * 10 * 16 * 32      # keys: codes, scale+offset, fp window
          + 6 * 42 * 16 * 4 + 6 * 42 * 2 * (16 + 16) + 6 * 8 * 16 * 32)     # values
    l1 = (6 * 40 * 16 * 2 + 6 * 10 * 16 * 32 + 6 * 10 * 16 * 32) + 6 * 50 * 16 * 32
    assert got["layers"] == [l0, l1] and got["total"] == l0 + l1 == 356352
    assert kv_cache_bytes(model.config, bits, 50, 3, **kw) == (l0 + l1) / 8
    assert kv_cache_bits(model.config, 16, 50, 3, fp_bits=16)["total"] == 2 * 2 * 6 * 50 * 16 * 16
    int_zero = kv_cache_bits(model.config, 4, 50, 3, zero="int", **kw)["zeros"]
    assert int_zero == 2 * (6 * 10 * 16 + 6 * 42 * 2) * 4
    cache = KIVICache(model.config, bits, k_group=4, v_group=8, residual=8)
    with torch.no_grad():
        _chunked_logits(model, cache, torch.randint(0, 128, (3, 50)), bounds=(0, 20, 21, 30, 50))
    assert cache.stored_bits() == l0 + l1


def test_bits_resolution_and_rejections():
    assert resolve_kv_bits(4, 3) == [(4, 4)] * 3
    assert resolve_kv_bits({"default": (4, 2), 1: 16, 2: {"k": 8, "v": 3}}, 3) == [(4, 2), (16, 16), (8, 3)]
    for bad in [5.0, 17, (4, 0), {0: 4}, {7: 4, "default": 4}, {0: {"k": 4}, "default": 2}]:
        with pytest.raises(ValueError):
            resolve_kv_bits(bad, 2)
    with pytest.raises(NotImplementedError, match="full-attention"):
        KIVICache(make_tiny("gemma3").config, 4)  # sliding-window layers


# ---------------------------------------------------------------------------- perplexity
def test_eval_with_kv_quant():
    model = make_tiny("llama")
    tokens = torch.randint(0, 128, (96,), generator=torch.Generator().manual_seed(3))
    windows = eval_windows(tokens, 32)
    plain = perplexity(model, windows, progress=False)
    fp = eval_with_kv_quant(model, windows, 16, chunk=4, prefill=8, batch_size=2, **KW)
    assert fp["n_scored"] == plain["n_scored"] == 3 * 31
    assert abs(fp["nll"] - plain["nll"]) < 1e-5
    q2 = eval_with_kv_quant(model, windows, 2, chunk=1, prefill=4, **KW)
    q8 = eval_with_kv_quant(model, windows, 8, chunk=1, prefill=4, **KW)
    assert abs(q8["nll"] - plain["nll"]) < abs(q2["nll"] - plain["nll"])
    assert q2["kv"]["bits"] == [[2, 2], [2, 2]] and q2["kv"]["prefill"] == 4
