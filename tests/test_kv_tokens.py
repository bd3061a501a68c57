"""KV-cache options on top of KIVI: important tokens at high precision (MiKV/ZipCache), pre-RoPE keys
(KVQuant), Hadamard rotation (QuaRot) — exact at 16 bits, simulation = real cache, hand references,
causal importance, exact bit counts, CLI parsing."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from mixq.formats import fake_quantize
from mixq.runtime.kv_cache import KIVICache, KIVILayer
from mixq.runtime.kv_codec import kv_spec
from mixq.runtime.kv_codec import important_count, kv_rotation, rerope, select_important, unrope
from mixq.runtime.kv_cost import kv_cache_bits
from mixq.runtime.kv_feed import kv_cache_feed
from mixq.runtime.kv_feed import decode_logits
from mixq.runtime.kv_settings import KVSettings
from mixq.runtime.kv_settings import parse_kv_preset
from mixq.runtime.kv_sim import simulate_kivi
from tiny import make_tiny

IDS = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))
MIKV = KVSettings(k_group=4, residual=8, important=0.25)
OPTIONS = {
    "mikv": MIKV,
    "mikv-hi16": KVSettings(k_group=8, residual=8, important=0.25, important_bits=16),
    "prerope": KVSettings(k_group=4, residual=8, pre_rope=True),
    "rot": KVSettings(k_group=4, residual=8, rotate=True),
    "all": KVSettings(k_group=4, residual=4, important=0.5, pre_rope=True, rotate="kv"),
}


def _cache_logits(model, bits, settings, chunk, prefill=None, ids=IDS):
    cache = KIVICache(model.config, bits, **settings.kw())
    with torch.no_grad():
        return torch.cat([lg for _, _, lg in decode_logits(model, ids, cache, chunk=chunk, prefill=prefill)], 1), cache


def _sim_logits(model, bits, settings, chunk, prefill=None, ids=IDS):
    with torch.no_grad(), simulate_kivi(model, bits, settings=settings, chunk=chunk, prefill=prefill):
        return model(ids, use_cache=False).logits


# ---------------------------------------------------------------------------- exactness, sim = cache
@pytest.mark.parametrize("name", list(OPTIONS))
@torch.no_grad()
def test_16_bits_is_exact_with_every_option(name):
    st = OPTIONS[name]
    model = make_tiny("llama")
    plain = model(IDS, use_cache=False).logits
    assert torch.equal(_sim_logits(model, 16, st, 1), plain)
    ref = torch.cat([model(IDS[:, s:e], past_key_values=cache, use_cache=True).logits
                     for cache in [DynamicCache(config=model.config)] for s, e in [(0, 9), (9, 10), (10, 23), (23, 40)]], 1)
    cache = KIVICache(model.config, 16, **st.kw())
    with kv_cache_feed(model, cache):
        got = torch.cat([model(IDS[:, s:e], past_key_values=cache, use_cache=True).logits
                         for s, e in [(0, 9), (9, 10), (10, 23), (23, 40)]], 1)
    assert torch.equal(got, ref) and not cache.needs_feed


def test_transforms_invert():
    g = torch.Generator().manual_seed(2)
    k = torch.randn(2, 3, 10, 16, generator=g)
    ang = torch.rand(2, 10, 4, generator=g) * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)  # 8 rotary dims of 16 (partial)
    assert torch.allclose(rerope(unrope(k, cos, sin), cos, sin), k, atol=1e-6)
    assert torch.equal(unrope(k, cos, sin)[..., 8:], k[..., 8:])
    R = kv_rotation(16).float()
    assert torch.allclose(R @ R.T, torch.eye(16), atol=1e-6) and torch.allclose(R.abs(), torch.full((16, 16), 0.25))


@pytest.mark.parametrize("family, name", [(f, n) for f in ["llama", "qwen2", "phi", "gpt2"] for n in OPTIONS
                                          if not (f == "gpt2" and OPTIONS[n].pre_rope)])  # gpt2: no RoPE
@pytest.mark.parametrize("bits, chunk, prefill", [(2, 1, None), ((3, 2), 5, 7), ({0: (2, 16), 1: (16, 3)}, 1, None)])
def test_simulation_equals_the_real_cache(family, name, bits, chunk, prefill):
    st = OPTIONS[name]
    model = make_tiny(family)
    real, _ = _cache_logits(model, bits, st, chunk, prefill)
    sim = _sim_logits(model, bits, st, chunk, prefill)
    assert torch.allclose(sim, real, atol=5e-5, rtol=0), (sim - real).abs().max()
    plain = _sim_logits(model, 16, st, 1)
    kivi = _sim_logits(model, bits, KVSettings(k_group=st.k_group, residual=st.residual), chunk, prefill)
    assert (plain - real).abs().max() > 1e-4 and (kivi - real).abs().max() > 1e-6  # the option does something
    assert model.config._attn_implementation == "sdpa"  # restored (MiKV runs the cache with eager attention)


@pytest.mark.parametrize("engine", ["simulate", "cache"])
@torch.no_grad()
def test_importance_is_causal(engine):
    """A token changed at position 25 changes nothing before it (importance uses earlier queries only),
    although the selection depends on the data (MiKV differs from plain 2-bit KIVI)."""
    model = make_tiny("llama")
    ids2 = IDS.clone()
    ids2[:, 25] = (ids2[:, 25] + 7) % 128
    run = _sim_logits if engine == "simulate" else (lambda *a, **k: _cache_logits(*a, **k)[0])
    for chunk, prefill in [(1, None), (3, 10)]:
        a = run(model, 2, MIKV, chunk, prefill)
        b = run(model, 2, MIKV, chunk, prefill, ids=ids2)
        assert torch.equal(a[:, :25], b[:, :25]) and not torch.equal(a[:, 25:], b[:, 25:])
        kivi = run(model, 2, KVSettings(k_group=4, residual=8), chunk, prefill)
        assert torch.allclose(a[:, :9], kivi[:, :9], atol=1e-5) and (a - kivi).abs().max() > 1e-4  # t < R + 1: all fp


# ---------------------------------------------------------------------------- hand references
def _channel_groups(K, spec, group):
    """``K [B, H, m, D]`` quantized per channel over consecutive token groups, with ``fake_quantize``."""
    out = K.clone()
    for j in range(0, K.shape[2], group):
        for d in range(K.shape[3]):
            rows = K[:, :, j: j + group, d].reshape(-1, group)
            out[:, :, j: j + group, d] = fake_quantize(rows, spec).reshape(K.shape[0], K.shape[1], group)
    return out


def _token_groups(V, spec, group):
    B, H, m, D = V.shape
    return fake_quantize(V.reshape(-1, group), spec).reshape(B, H, m, D)


@pytest.mark.parametrize("family", ["llama", "phi"])
@torch.no_grad()
def test_pre_rope_cache_matches_hand_reference(family):
    """The cache holds RoPE(Q(k₀)) for k₀ = k_proj output (before the family's rotary embedding),
    which differs from KIVI's Q(RoPE(k₀))."""
    import importlib

    model = make_tiny(family)
    hf = importlib.import_module(type(model).__module__)
    attn = model.model.layers[0].self_attn
    seen = []
    hook = attn.k_proj.register_forward_hook(lambda m, a, o: seen.append(o))
    G, R, T = 4, 8, 40
    st = KVSettings(k_group=G, residual=R, pre_rope=True)
    _, cache = _cache_logits(model, 3, st, 3, 8)
    hook.remove()
    B, D = IDS.shape[0], attn.head_dim
    k0 = torch.cat(seen, 1).view(B, T, -1, D).transpose(1, 2)
    cos, sin = model.model.rotary_emb(k0, torch.arange(T)[None])
    r = cos.shape[-1]

    def rope(x):
        rot = hf.apply_rotary_pos_emb(x[..., :r], x[..., :r], cos, sin)[1]
        return torch.cat([rot, x[..., r:]], -1)

    tq = G * ((T - R) // G)
    q0 = k0.clone()
    q0[:, :, :tq] = _channel_groups(k0[:, :, :tq], kv_spec(3), G)
    want = rope(q0)
    got = cache.layers[0].dequantized()[0]
    assert got.shape == want.shape == (B, 2, T, D)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    post = KIVICache(model.config, 3, k_group=G, residual=R)
    with torch.no_grad():
        for s, e in [(0, 8), *[(i, min(i + 3, T)) for i in range(8, T, 3)]]:
            model(IDS[:, s:e], past_key_values=post, use_cache=True)
    assert (post.layers[0].dequantized()[0] - got)[:, :, :tq].abs().max() > 1e-3
    assert torch.allclose(post.layers[0].dequantized()[0][:, :, tq:], got[:, :, tq:])  # the fp window is the same


def test_rotated_layer_matches_hand_reference():
    g = torch.Generator().manual_seed(1)
    K, V = torch.randn(2, 3, 45, 16, generator=g), torch.randn(2, 3, 45, 16, generator=g)
    K[..., 5] *= 20
    layer = KIVILayer(2, 3, k_group=4, v_group=8, residual=6, rotate="kv")
    for s, e in [(0, 9), (9, 10), (10, 23), (23, 45)]:
        layer.update(K[:, :, s:e], V[:, :, s:e])
    R = kv_rotation(16)
    tk, tv = 4 * ((45 - 6) // 4), 45 - 6
    rk = ((_channel_groups((K[:, :, :tk].double() @ R).float(), kv_spec(2), 4).double()) @ R.T).float()
    rv = ((_token_groups((V[:, :, :tv].double() @ R).float(), kv_spec(3), 8).double()) @ R.T).float()
    got_k, got_v = layer.dequantized()
    assert torch.allclose(got_k[:, :, :tk], rk, atol=1e-6) and torch.equal(got_k[:, :, tk:], K[:, :, tk:])
    assert torch.allclose(got_v[:, :, :tv], rv, atol=1e-6) and torch.equal(got_v[:, :, tv:], V[:, :, tv:])
    plain = KIVILayer(2, 3, k_group=4, v_group=8, residual=6)
    plain.update(K, V)
    assert (plain.dequantized()[0] - got_k).abs().max() > 1e-2


def _mikv_reference(K, V, scores, k_bits, v_bits, hi_bits, G, c, gv, tq):
    """Per (b, h) and group: top-c tokens by score (earlier first on ties) at hi_bits per token,
    the rest at k_bits per channel over the group's other tokens / v_bits per token."""
    Kr, Vr = K.clone(), V.clone()
    B, H, _, D = K.shape
    for b in range(B):
        for h in range(H):
            for j in range(0, tq, G):
                s = scores[b, h, j: j + G].tolist()
                hi = sorted(sorted(range(G), key=lambda i: (-s[i], i))[:c])
                lo = [i for i in range(G) if i not in hi]
                for idx, spec_bits in ((hi, hi_bits), (lo, None)):
                    t = [j + i for i in idx]
                    if spec_bits is not None:
                        if spec_bits != 16:
                            Kr[b, h, t] = fake_quantize(K[b, h, t].reshape(-1, gv), kv_spec(spec_bits)).reshape(len(t), D)
                            Vr[b, h, t] = fake_quantize(V[b, h, t].reshape(-1, gv), kv_spec(spec_bits)).reshape(len(t), D)
                    else:
                        Kr[b, h, t] = fake_quantize(K[b, h, t].T.contiguous(), kv_spec(k_bits)).T
                        Vr[b, h, t] = fake_quantize(V[b, h, t].reshape(-1, gv), kv_spec(v_bits)).reshape(len(t), D)
    return Kr, Vr


@pytest.mark.parametrize("hi_bits", [8, 16])
def test_important_tokens_layer_matches_hand_reference(hi_bits):
    g = torch.Generator().manual_seed(4)
    B, H, Hq, T, D, G, R = 2, 2, 4, 43, 16, 8, 5
    K, V = torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)
    K[..., 3] *= 15
    layer = KIVILayer(2, 3, k_group=G, v_group=8, residual=R, important=0.25, important_bits=hi_bits)
    scores = torch.zeros(B, H, T)
    decided = []
    for s, e in [(0, 11), (11, 12), (12, 20), (20, 21), (21, 33), (33, 43)]:
        layer.update(K[:, :, s:e], V[:, :, s:e])
        with pytest.raises(RuntimeError, match="kv_cache_feed"):
            layer.update(K[:, :, e:e], V[:, :, e:e])
        p = torch.softmax(torch.randn(B, Hq, e - s, e, generator=g) * 3, -1)
        layer.observe(p)
        scores[..., :e] += p.reshape(B, H, 2, e - s, e).sum((2, 3))
        decided.append((layer._decided, scores.clone()))
    # each group was decided with the scores of the moment it left the window
    final = torch.zeros(B, H, T)
    for j in range(0, layer._decided, G):
        first = next(sc for n, sc in decided if n >= j + G)
        final[..., j: j + G] = first[..., j: j + G]
    tq = G * ((T - R) // G)
    assert layer._decided == tq == 32
    ref_k, ref_v = _mikv_reference(K, V, final, 2, 3, hi_bits, G, 2, 8, tq)
    got_k, got_v = layer.dequantized()
    assert torch.allclose(got_k, ref_k, atol=1e-6) and torch.allclose(got_v, ref_v, atol=1e-6)
    mask = layer._quantized_keys.store["map"]
    assert mask.shape == (B, H, tq) and mask.sum() == B * H * (tq // G) * 2
    n = B * H
    # bits by hand: keys lo 6 tokens/channel grid, hi per token (16 ch = 2 groups of 8), values per token, maps
    hi = n * 4 * 2 * D * 8 + n * 4 * 2 * 2 * 32 if hi_bits == 8 else n * 4 * 2 * D * 32
    k_bits = n * 4 * 6 * D * 2 + n * 4 * D * 32 + hi + n * tq
    v_bits = n * 4 * 6 * D * 3 + n * 4 * 6 * 2 * 32 + hi + n * tq
    assert layer.stored_bits() == k_bits + v_bits + 2 * n * (T - tq) * D * 32


def test_important_tokens_help_where_attention_is_concentrated():
    """Attention on a few tokens per group (heavy hitters, 99 % of the mass): 2-bit + 1/8 of the tokens at
    8 bits stores fewer bits than uniform 4-bit KIVI and has a smaller attention-weighted error (a fixed
    seed; with 95 % of the mass it would not: 2-bit MSE is ~25× 4-bit MSE)."""
    g = torch.Generator().manual_seed(0)
    B, H, T, D, G, R = 1, 2, 160, 64, 32, 32
    K, V = torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)
    heavy = torch.zeros(B, H, T, dtype=torch.bool)
    for j in range(0, T, G):
        heavy[..., j + torch.randperm(G, generator=g)[:4]] = True
    p = torch.where(heavy, 0.99 / heavy.sum(-1, keepdim=True), 0.01 / (~heavy).sum(-1, keepdim=True))
    errs, bits = {}, {}
    for name, layer in [("mikv", KIVILayer(2, 2, important=0.125, residual=R)), ("kivi4", KIVILayer(4, 4, residual=R))]:
        layer.update(K, V)
        if layer.mixed:
            layer.observe(p[:, :, None].float())
        k, v = layer.dequantized()
        errs[name] = float((p[..., None] * ((k - K) ** 2 + (v - V) ** 2)).sum())
        bits[name] = layer.stored_bits()
    assert bits["mikv"] < bits["kivi4"] and errs["mikv"] < 0.5 * errs["kivi4"], (bits, errs)


# ---------------------------------------------------------------------------- costs
def test_kv_cache_bits_with_important_tokens_by_hand():
    model = make_tiny("llama")  # 2 layers, 2 kv heads, head_dim 16
    bits = {0: 2, 1: (3, 16)}
    kw = dict(k_group=8, v_group=8, residual=8, fp_bits=32, important=0.25)  # c = 2 of 8 tokens at 8 bits
    got = kv_cache_bits(model.config, bits, context=50, batch=3, **kw)
    n, J, D = 6, 5, 16  # B·H; Tq = 8·⌊42/8⌋ = 40 tokens = 5 groups (keys and values)
    hi = n * J * 2 * D * 8 + n * J * 2 * (D // 8) * 32      # important tokens: per token, 2 groups of 8 channels
    fp_rest = n * 10 * D * 32
    k0 = n * J * 6 * D * 2 + n * J * D * 32 + hi + n * 40 + fp_rest   # lo: one channel grid per group
    v0 = n * J * 6 * D * 2 + n * J * 6 * 2 * 32 + hi + n * 40 + fp_rest
    k1 = n * J * 6 * D * 3 + n * J * D * 32 + hi + n * 40 + fp_rest
    v1 = n * 50 * D * 32
    assert got["layers"] == [k0 + v0, k1 + v1] and got["index"] == 3 * n * 40
    fp16 = kv_cache_bits(model.config, bits, context=50, batch=3, **{**kw, "important_bits": 16})
    hi16 = n * J * 2 * D * 32
    assert fp16["total"] == got["total"] - 3 * hi + 3 * hi16
    for opt in ({"pre_rope": True}, {"rotate": "kv"}):  # free
        assert kv_cache_bits(model.config, bits, 50, 3, **{**kw, **opt})["total"] == got["total"]
    cache = KIVICache(model.config, bits, k_group=8, v_group=8, residual=8, important=0.25)
    ids = torch.randint(0, 128, (3, 50), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for _ in decode_logits(model, ids, cache, chunk=7, prefill=20):
            pass
    assert cache.stored_bits() == got["total"]


def test_settings_validation_and_round_trip():
    assert important_count(0.2, 32) == 6 and important_count(0.25, 4) == 1 and important_count(0, 4) == 0
    assert KVSettings().to_dict() == {"k_group": 32, "v_group": None, "residual": 32, "zero": "fp16"}
    st = KVSettings(important=0.25, important_bits=16, pre_rope=True, rotate=True)
    assert st.rotate == "kv" and KVSettings.from_dict(st.to_dict()) == st
    assert "25%" in st.describe() and "pre-RoPE" in st.describe()
    for bad in [dict(important=1.0), dict(important=0.01), dict(important=-0.1), dict(important_bits=9),
                dict(rotate="q"), dict(pre_rope="yes"), dict(important=0.5, k_group=1)]:
        with pytest.raises(ValueError):
            KVSettings(**bad)
    s = torch.tensor([[[0.1, 0.5, 0.5, 0.2, 0.0, 0.0, 0.0, 0.3]]])
    assert select_important(s, 4, 1).tolist() == [[[False, True, False, False, False, False, False, True]]]


def test_refusals():
    gpt2 = make_tiny("gpt2")
    with pytest.raises(NotImplementedError, match="rotate_half"):
        with simulate_kivi(gpt2, 2, settings=OPTIONS["prerope"]):
            pass
    with pytest.raises(NotImplementedError, match="rotate_half"):
        with kv_cache_feed(gpt2, KIVICache(gpt2.config, 2, pre_rope=True)):
            pass
    model = make_tiny("llama")
    cache = KIVICache(model.config, 2, k_group=4, residual=4, pre_rope=True)
    with pytest.raises(RuntimeError, match="kv_cache_feed"), torch.no_grad():
        model(IDS[:, :5], past_key_values=cache, use_cache=True)


# ---------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("text, bits, want", [
    ("KV2-mikv", 2, dict(important=0.2, important_bits=8)),
    ("KV2-mikv10-hi16", 2, dict(important=0.1, important_bits=16)),
    ("kv4-prerope", 4, dict(pre_rope=True)),
    ("KV2-rot", 2, dict(rotate="kv")),
    ("K4V2-rotv-g64", (4, 2), dict(rotate="v", k_group=64)),
    ("kivi:2:important=0.25:hi=6:pre_rope=1:rotate=k:group=8", 2,
     dict(important=0.25, important_bits=6, pre_rope=True, rotate="k", k_group=8)),
])
def test_kv_presets(text, bits, want):
    b, st = parse_kv_preset(text)
    assert b == bits and all(getattr(st, k) == v for k, v in want.items()), st


@pytest.mark.parametrize("text, needle", [
    ("KV2-hi8", "-mikv"), ("KV4-mikv-hi4", "wider than"), ("KV2-mikv0", "1..99"), ("KV2-mikv1", "is 0 tokens"),
    ("K16V2-prerope", "16 bits"), ("K16V2-rotk", "nothing rotated"), ("KV16-mikv", "below 16"),
    ("kivi:2:important=x", "a number"), ("kivi:2:pre_rope=maybe", "1 or 0"), ("kivi:2:rotate=q", "rotate"),
    ("KV2-mikvx", "unknown option"), ("kivi:2:hi=8", "-mikv"),
])
def test_kv_preset_errors(text, needle):
    from mixq.cli import UserError
    from mixq.cli.common import parse_kv_arg

    with pytest.raises(UserError) as e:
        parse_kv_arg(text)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_cli_eval_with_kv_options(tiny_dir, tmp_path, capsys):
    import json

    from mixq.cli import main

    (tmp_path / "corpus.txt").write_text("".join(f"the cat {i} sat on the mat and ran away .\n" for i in range(40)))
    c = str(tmp_path / "corpus.txt")
    out = tmp_path / "r.json"
    for extra in (["--kv", "KV2-mikv-g8-r8", "--kv-engine", "simulate", "--kv-chunk", "1"],
                  ["--kv", "KV3-prerope-rot-g8-r8", "--kv-chunk", "4"]):
        assert main(["eval", str(tiny_dir), "--corpus", c, "--tokens", "128", "--seqlen", "64", *extra,
                     "--out", str(out), "--force"]) == 0, extra
        r = json.loads(out.read_text())
        assert r["kl"] > 0 and r["kv"]["k_group"] == 8
    assert r["kv"]["pre_rope"] is True and r["kv"]["rotate"] == "kv"
    text = capsys.readouterr().out
    assert "important 20% of tokens (2/8) at 8 bits" in text and "pre-RoPE keys, Hadamard-rotated K/V" in text
    assert main(["eval", str(tiny_dir), "--corpus", c, "--kv", "KV2-hi8", "--out", str(out), "--force"]) == 2


def test_measure_kv_rejects_bad_options(tmp_path, capsys):
    from mixq.cli import main

    rc = main(["measure-kv", "--model", "unused", "--important", "0.01", "--out", str(tmp_path / "kv.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "is 0 tokens" in err and err.count("\n") == 1, err
