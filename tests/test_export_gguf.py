"""GGUF export (mixq.export.gguf), on tiny random models only.

* every block layout written here decodes, through ``gguf.quants.dequantize``, to the format's formula;
* specs whose grid is a ggml grid read back bit-exactly (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, MXFP4, and
  per-channel int specs in Q6_K / Q3_K / Q2_K / Q4_K / Q5_K); others within stated tolerances;
* fallbacks (rows not a multiple of 256, or of 32) are reported tensor by tensor;
* the q/k rope permutation: transformers' GGUF loader gives the logits of the model whose weights
  are the file's dequantized tensors (and does not without the permutation);
* Gemma 3's text decoder as llama.cpp's ``gemma3`` (norm names, norms plus one, sliding-window metadata);
* tokenizer (SentencePiece-style: ``add_space_prefix``), native-directory export, atomic writing, refusal to
  overwrite, unsupported architectures.
"""
from __future__ import annotations

import copy
import json

import gguf
import numpy as np
import pytest
import torch
import transformers as tf
from gguf import GGMLQuantizationType as QT

from mixq import api
from mixq.export import ggml as B
from mixq.export import ggml_pack as P
from mixq.export import gguf_arch as GA
from mixq.export.gguf import export_gguf, write_gguf
from mixq.export.gguf_arch import UnsupportedArchitectureError, gguf_tensor_name, rope_row_order
from mixq.export.gguf_verify import verify_gguf
from mixq.export.native_write import save_quantized
from mixq.formats import dequantize


# ---------------------------------------------------------------------------- helpers
def bpe_tokenizer():
    """A byte-level BPE (GPT-2 style, like SmolLM2's) with 102 tokens, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    b2u = bytes_to_unicode()
    vocab = {t: i for i, t in enumerate(["<|endoftext|>", "<s>", "</s>"] + [b2u[b] for b in range(32, 127)])}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("a", "t")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    backend = Tokenizer(models.BPE(vocab, merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   unk_token="<|endoftext|>")


def k_llama(seed: int = 0, hidden: int = 256, inter: int = 512, heads: int = 4, kv: int = 2):
    """A one-block llama whose rows (256, 512) fit the K-quants' 256-element blocks."""
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.normal_(1.0, 0.1)
    return model


def sharpen(model):
    """Scale q/k projections up so attention is far from uniform: the rope row order then matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(25.0)
    return model


def quantized(model, spec: str):
    specs = api.resolve_specs(model, spec)
    return specs, api.quantize_model(model, specs, progress=False).qtensors


def block_linears(report: dict) -> list[dict]:
    return [r for r in report["tensors"] if r["is_block_linear"]]


def model_from_gguf(path, like: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``like`` whose weights are the file's tensors, dequantized by gguf (rope rows un-permuted)."""
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    arch = str(gguf.GGUFReader(path).fields["general.architecture"].contents())
    ref = copy.deepcopy(like)
    cfg = like.config
    with torch.no_grad():
        for hf_name, p in ref.state_dict().items():
            name = gguf_tensor_name(hf_name)
            if name == "output.weight" and name not in tensors:
                continue  # tied
            t = tensors[name]
            w = np.array(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(p.shape)
            if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
                heads = cfg.num_attention_heads if ".attn_q." in name else cfg.num_key_value_heads
                w = w[np.argsort(rope_row_order(p.shape[0], heads))]
            p.copy_(torch.from_numpy(w))
    return ref


# ---------------------------------------------------------------------------- block layouts
def _random_blocks(qt: QT, n: int, rng: np.random.Generator):
    """Random parameters and codes for ``n`` blocks, the packed bytes, and the values the format defines."""
    f16 = lambda *s: (rng.standard_normal(s) * 0.05).astype(np.float16).astype(np.float32)  # noqa: E731
    f = B._FMTS[qt]
    codes = lambda k: rng.integers(0, 2**f.bits, (n, k))  # noqa: E731
    if qt in (QT.Q8_0, QT.Q4_0, QT.Q5_0):
        d, c = f16(n), codes(32)
        data = {QT.Q8_0: P.pack_q8_0, QT.Q4_0: P.pack_q4_0, QT.Q5_0: P.pack_q5_0}[qt](d, c)
        want = d[:, None] * (c - 2 ** (f.bits - 1)).astype(np.float32)
    elif qt in (QT.Q4_1, QT.Q5_1):
        d, m, c = f16(n), f16(n), codes(32)
        data = (P.pack_q4_1 if qt == QT.Q4_1 else P.pack_q5_1)(d, m, c)
        want = d[:, None] * c.astype(np.float32) + m[:, None]
    elif qt == QT.IQ4_NL:
        d, c = f16(n), codes(32)
        data, want = P.pack_iq4_nl(d, c), d[:, None] * B.IQ4_NL_LEVELS[c]
    elif qt == QT.MXFP4:
        e, c = rng.integers(100, 140, n), codes(32)
        data = P.pack_mxfp4(e, c)
        want = np.exp2(e - 128.0).astype(np.float32)[:, None] * B.MXFP4_LEVELS[c]
    elif qt in (QT.Q6_K, QT.Q3_K):
        lo, hi = f.sc_range
        d, sc, c = f16(n), rng.integers(lo, hi + 1, (n, 16)), codes(256)
        data = (P.pack_q6_k if qt == QT.Q6_K else P.pack_q3_k)(d, sc, c)
        eff = np.repeat(d[:, None] * sc.astype(np.float32), 16, axis=1)
        want = eff * (c - 2 ** (f.bits - 1)).astype(np.float32)
    else:  # Q4_K, Q5_K, Q2_K
        nsub = 256 // f.sub
        lo, hi = f.sc_range
        d, dmin = f16(n), np.abs(f16(n))
        sc, m, c = rng.integers(lo, hi + 1, (n, nsub)), rng.integers(lo, hi + 1, (n, nsub)), codes(256)
        data = {QT.Q4_K: P.pack_q4_k, QT.Q5_K: P.pack_q5_k, QT.Q2_K: P.pack_q2_k}[qt](d, dmin, sc, m, c)
        eff = np.repeat(d[:, None] * sc.astype(np.float32), f.sub, axis=1)
        off = np.repeat(dmin[:, None] * m.astype(np.float32), f.sub, axis=1)
        want = eff * c.astype(np.float32) - off
    return data, want.astype(np.float32)


@pytest.mark.parametrize("qt", list(B._FMTS), ids=lambda q: q.name)
def test_block_layout_decodes_to_the_format_formula(qt):
    data, want = _random_blocks(qt, 64, np.random.default_rng(int(qt)))
    assert data.dtype == np.uint8 and data.shape == (64, B._FMTS[qt].type_size)
    got = gguf.quants.dequantize(data, qt)
    np.testing.assert_array_equal(got.reshape(want.shape), want)  # bit-exact, every field and bit position


@pytest.mark.parametrize("qt", [QT.Q8_0, QT.Q4_0, QT.Q5_0, QT.Q4_1, QT.Q5_1, QT.MXFP4], ids=lambda q: q.name)
def test_values_on_a_gguf_grid_are_re_encoded_exactly(qt):
    """gguf's own quantizer picks a grid; encoding its dequantized values (no mixq grid given) recovers it."""
    x = np.random.default_rng(1).standard_normal((16, 256)).astype(np.float32)
    v = gguf.quants.dequantize(gguf.quants.quantize(x, qt), qt)
    np.testing.assert_array_equal(B.decode_blocks(qt, B.encode_blocks(qt, v)), v)


def test_gguf_package_cannot_quantize_k_quants():
    support = B.gguf_quantize_support()
    assert {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "MXFP4"} <= set(support["quantize"])
    assert {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL"} <= set(support["dequantize_only"])


# ---------------------------------------------------------------------------- spec -> ggml type
EXACT = [
    ("small", "W8-g32", "Q8_0"), ("small", "MXINT8", "Q8_0"), ("small", "W4-g32", "Q4_0"),
    ("small", "W4-g32-asymf", "Q4_1"), ("small", "W5-g32", "Q5_0"), ("small", "W5-g32-asymf", "Q5_1"),
    ("small", "MXFP4", "MXFP4"), ("small", "FP16", "F16"), ("small", "BF16", "BF16"),
    ("k", "W6-channel", "Q6_K"), ("k", "W3-channel", "Q3_K"), ("k", "W2-channel", "Q2_K"),
    ("k", "W4-channel-asym", "Q4_K"), ("k", "W5-channel-asym", "Q5_K"),
]


@pytest.mark.parametrize("size,spec,qtype", EXACT, ids=[e[1] for e in EXACT])
def test_grid_matching_specs_read_back_bit_exact(size, spec, qtype, tiny_model, tmp_path):
    model = tiny_model("llama") if size == "small" else k_llama()
    specs, qts = quantized(model, spec)
    rep = write_gguf(model, None, specs, tmp_path / "m.gguf", qtensors=qts)
    lin = block_linears(rep)
    assert len(lin) == 7 * model.config.num_hidden_layers
    assert {r["ggml_type"] for r in lin} == {qtype}
    assert all(r["exact"] and r["max_abs_err"] == 0.0 for r in lin)
    # independently: read back against the mixq dequantized weights (q/k in llama.cpp's row order)
    cfg = model.config
    expected = {}
    for fqn, q in qts.items():
        w = dequantize(q)
        name = gguf_tensor_name(fqn + ".weight")
        if ".attn_q." in name or ".attn_k." in name:
            heads = cfg.num_attention_heads if ".attn_q." in name else cfg.num_key_value_heads
            w = w[rope_row_order(w.shape[0], heads)]
        expected[name] = w
    ver = verify_gguf(tmp_path / "m.gguf", expected)
    assert ver["ok"] and ver["n_exact"] == len(expected) and ver["max_abs_err"] == 0.0


# (spec, ggml type, max relative L2 error against mixq's weight, max share of mixq's own quantization error)
APPROX = [("W3-g64", "Q3_K", 0.02, 0.1), ("W6-g32", "Q6_K", 0.005, 0.2), ("W2-g64", "Q2_K", 0.03, 0.1),
          ("W4-g128-asym", "Q4_K", 0.01, 0.1), ("W5-g128-asymf", "Q5_K", 0.01, 0.2), ("FP8", "Q8_0", 0.01, 0.3),
          ("NF4-g64", "IQ4_NL", 0.08, 0.8)]


@pytest.mark.parametrize("spec,qtype,tol,share", APPROX, ids=[a[0] for a in APPROX])
def test_other_specs_are_close(spec, qtype, tol, share, tmp_path):
    model = k_llama()
    orig = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    specs, qts = quantized(model, spec)
    rep = write_gguf(model, None, specs, tmp_path / "m.gguf", qtensors=qts)
    for r in block_linears(rep):
        assert r["ggml_type"] == qtype and r["fallback"] is None
        assert r["rel_err"] <= tol, r
        fqn = r["source"].rsplit(".", 1)[0]
        mixq_err = (orig[fqn] - dequantize(qts[fqn])).norm() / dequantize(qts[fqn]).norm()
        assert r["rel_err"] <= share * mixq_err.item(), (r["name"], r["rel_err"], mixq_err.item())


def test_without_qtensors_blocks_are_fit_to_the_weights(tiny_model, tmp_path):
    model = tiny_model("llama")
    specs, _ = quantized(model, "W4-g32-asymf")
    rep = write_gguf(model, None, specs, tmp_path / "m.gguf")
    assert all(r["ggml_type"] == "Q4_1" and r["exact"] and r["grid"] == "fit to the values"
               for r in block_linears(rep))


# ---------------------------------------------------------------------------- fallbacks
def test_k_quant_fallback_is_reported_per_tensor(tiny_model, tmp_path):
    model = tiny_model("llama")  # rows of 64 and 128: no K-quant fits
    specs, qts = quantized(model, "W3-g32")
    rep = write_gguf(model, None, specs, tmp_path / "m.gguf", qtensors=qts)
    lin = block_linears(rep)
    assert {r["ggml_type"] for r in lin} == {"Q4_0"} and all(r["exact"] for r in lin)  # W3 sym fits Q4_0's grid
    assert len(rep["fallbacks"]) == len(lin) == rep["totals"]["fallbacks"]
    for fb in rep["fallbacks"]:
        assert fb["nominal_type"] == "Q3_K" and fb["ggml_type"] == "Q4_0"
        assert "256" in fb["reason"] and ("64" in fb["reason"] or "128" in fb["reason"])
        assert "Q4_0 (exact)" in fb["reason"]
    # a nominal type that fits is not a fallback, even when another type of the class is chosen
    model = k_llama()
    specs, qts = quantized(model, "W4-g32")
    rep = write_gguf(model, None, specs, tmp_path / "k.gguf", qtensors=qts)
    assert rep["fallbacks"] == [] and {r["ggml_type"] for r in block_linears(rep)} == {"Q4_0"}


def test_rows_without_any_block_fall_back_to_f16(tmp_path):
    model = k_llama(hidden=48, inter=80, heads=4, kv=2)  # 48 and 80 are not multiples of 32
    specs, qts = quantized(model, "W4-g16")
    rep = write_gguf(model, None, specs, tmp_path / "m.gguf", qtensors=qts)
    lin = block_linears(rep)
    assert {r["ggml_type"] for r in lin} == {"F16"}
    assert len(rep["fallbacks"]) == len(lin) and all("F16" in f["reason"] for f in rep["fallbacks"])


# ---------------------------------------------------------------------------- rope permutation
def test_rope_row_order_is_llama_cpps_and_transformers_undoes_it():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    heads, d, cols = 3, 8, 5
    w = np.arange(heads * d * cols, dtype=np.float32).reshape(heads * d, cols)
    # llama.cpp convert_hf_to_gguf: reshape(heads, 2, d/2, ...) and swap the two middle axes
    llama_cpp = w.reshape(heads, 2, d // 2, cols).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(w[rope_row_order(heads * d, heads)], llama_cpp)
    back = LlamaTensorProcessor()._reverse_permute_weights(llama_cpp, heads, heads)
    np.testing.assert_array_equal(back, w)


ROUND_TRIP = [("llama", "small", "W4-g32"), ("mistral", "small", "W4-g32-asymf"),
              ("qwen2", "small", "W5-g32"), ("llama", "k", "W3-g64")]


@pytest.mark.parametrize("family,size,spec", ROUND_TRIP, ids=[f"{f}-{s}" for f, _, s in ROUND_TRIP])
def test_transformers_gguf_loader_matches_the_dequantized_model(family, size, spec, tiny_model, tmp_path):
    model = sharpen(tiny_model(family) if size == "small" else k_llama())
    specs, qts = quantized(model, spec)
    tok = bpe_tokenizer()
    rep = write_gguf(model, tok, specs, tmp_path / "m.gguf", qtensors=qts)
    assert rep["architecture"] == ("qwen2" if family == "qwen2" else "llama")
    ref = model_from_gguf(tmp_path / "m.gguf", model)
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want, mixq = hf(ids).logits, ref(ids).logits, model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # against mixq's own fake-quant model only the F16 embeddings (and any approximation) differ
    assert (want - mixq).abs().max() < 0.05
    text = "the cat at the hat"
    hf_tok = tf.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert hf_tok(text)["input_ids"] == tok(text)["input_ids"]


def test_without_the_permutation_transformers_disagrees(tiny_model, tmp_path, monkeypatch):
    """Negative control: the round trip above is sensitive to the q/k row order."""
    model = sharpen(tiny_model("llama"))
    specs, qts = quantized(model, "W4-g32")
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    diffs = {}
    for permute in (True, False):
        monkeypatch.setitem(GA._ARCHS, "llama", GA._Arch("llama", permute_qk=permute))
        write_gguf(model, bpe_tokenizer(), specs, tmp_path / f"{permute}.gguf", qtensors=qts)
        hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f"{permute}.gguf", dtype=torch.float32)
        with torch.no_grad():
            diffs[permute] = (hf.eval()(ids).logits - model(ids).logits).abs().max().item()
    assert diffs[True] < 1e-2 < 1e-1 < diffs[False], diffs  # permuted: only the F16 embeddings differ


# ---------------------------------------------------------------------------- files, tokenizer, errors
def test_export_native_directory(tiny_model, tmp_path):
    model = tiny_model("llama")
    specs, qts = quantized(model, "W4-g32-asymf")
    src = save_quantized(tmp_path / "q", model, bpe_tokenizer(), qts, {"base_model": "tiny", "method": "rtn"})
    out = tmp_path / "out" / "model.gguf"
    rep = export_gguf(src, out, progress=False)
    json.dumps(rep)  # JSON-serializable
    assert rep["source"] == str(src) and rep["verification"]["ok"]
    assert {r["ggml_type"] for r in block_linears(rep)} == {"Q4_1"} and all(r["exact"] for r in block_linears(rep))
    assert rep["totals"]["file_bytes"] == out.stat().st_size
    assert rep["totals"]["block_linear_bpw"] == pytest.approx(5.0)
    assert rep["totals"]["mixq_block_linear_bpw"] == pytest.approx(5.0)
    emb = next(r for r in rep["tensors"] if r["name"] == "token_embd.weight")
    assert emb["ggml_type"] == "F16" and rep["float_type"] == "F16"
    assert {r["ggml_type"] for r in rep["tensors"] if len(r["shape"]) == 1} == {"F32"}
    assert rep["tokenizer"]["model"] == "gpt2" and rep["tokenizer"]["tokens"] == 128
    fields = gguf.GGUFReader(out).fields
    assert fields["llama.block_count"].contents() == 2 and fields["llama.attention.head_count_kv"].contents() == 2
    assert fields["llama.embedding_length"].contents() == 64 and fields["llama.vocab_size"].contents() == 128
    assert fields["tokenizer.ggml.bos_token_id"].contents() == 1
    # refuses to overwrite, leaves nothing behind; overwrite=True replaces
    with pytest.raises(FileExistsError, match="--force"):
        export_gguf(src, out, progress=False)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.gguf"]
    export_gguf(src, out, overwrite=True, progress=False, float_type="f32")
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "llama"


def test_unexportable_tokenizer_writes_no_vocab_with_a_warning(tiny_model, tiny_tokenizer, tmp_path):
    model = tiny_model("llama")
    specs, qts = quantized(model, "W8-g32")
    rep = write_gguf(model, tiny_tokenizer, specs, tmp_path / "m.gguf", qtensors=qts)  # WordLevel
    assert rep["tokenizer"] == {"model": "no_vocab"} and any("no_vocab" in w for w in rep["warnings"])
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["tokenizer.ggml.model"].contents() == "no_vocab"


def test_unsupported_architecture_is_named(tiny_model, tiny_tokenizer, tmp_path):
    model = tiny_model("gpt2")
    specs, qts = quantized(model, "W4-g32")
    with pytest.raises(UnsupportedArchitectureError, match="llama, mistral, qwen2"):
        write_gguf(model, None, specs, tmp_path / "m.gguf", qtensors=qts)
    src = save_quantized(tmp_path / "q", model, tiny_tokenizer, qts, {})
    with pytest.raises(UnsupportedArchitectureError, match="gpt2"):
        export_gguf(src, tmp_path / "g.gguf", progress=False)
    assert not (tmp_path / "g.gguf").exists() and not list(tmp_path.glob(".g.gguf.tmp-*"))


def spm_tokenizer(prepend: bool):
    """A SentencePiece-style BPE (byte fallback, ``▁`` for spaces) of 64 tokens, with a ``Prepend("▁")`` normaliser
    (Llama 2's kind) or without one (Gemma's), built offline."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(40)])}
    for t in ["▁", "t", "h", "e", "a", "▁t", "he", "▁the"]:
        vocab[t] = len(vocab)
    backend = Tokenizer(models.BPE(vocab, [("▁", "t"), ("h", "e"), ("▁t", "he")], byte_fallback=True,
                                   unk_token="<unk>"))
    steps = [normalizers.Prepend("▁")] if prepend else []
    backend.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback()])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", pad_token="<pad>")


@pytest.mark.parametrize("prepend", [True, False])
def test_sentencepiece_style_vocab_says_whether_a_space_is_prepended(tiny_model, tmp_path, prepend):
    """llama.cpp prepends a space to SentencePiece text unless ``add_space_prefix`` says not (Gemma's tokenizer)."""
    model = tiny_model("llama")
    specs, qts = quantized(model, "W8-g32")
    rep = write_gguf(model, spm_tokenizer(prepend), specs, tmp_path / "m.gguf", qtensors=qts)
    f = gguf.GGUFReader(tmp_path / "m.gguf").fields
    assert f["tokenizer.ggml.model"].contents() == "llama" and rep["tokenizer"]["add_space_prefix"] is prepend
    assert f["tokenizer.ggml.add_space_prefix"].contents() is prepend
    types = f["tokenizer.ggml.token_type"].contents()
    assert types[4] == types[43] == int(gguf.TokenType.BYTE) and types[44] == int(gguf.TokenType.NORMAL)


@torch.no_grad()
def test_gemma3_text_is_written_as_llama_cpp_gemma3(tiny_model, tiny_tokenizer, tmp_path):
    """Gemma 3's decoder as llama.cpp's ``gemma3``: the four norms of a block by their GGUF names and each stored
    plus one (llama.cpp multiplies by the stored weight, transformers' Gemma norm by ``1 + w``), the sliding window
    with each layer's kind and the local RoPE base; transformers' GGUF loader reads it back to the same logits.  An
    attention scale llama.cpp would not compute is refused before anything is written."""
    from tiny import _config

    cfg, cls = _config("gemma3")
    cfg.layer_types = ["sliding_attention", "full_attention"]
    cfg.rope_parameters["sliding_attention"]["rope_theta"] = 500.0
    cfg.query_pre_attn_scalar = cfg.head_dim  # what the real models have (gemma3-270m: 256 = head_dim)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.normal_(0.0, 0.1)
    specs, qts = quantized(model, "W4-g32")
    model.config.query_pre_attn_scalar = 256  # the config class's default; llama.cpp would scale by 1/sqrt(16)
    with pytest.raises(ValueError, match="query_pre_attn_scalar=256"):
        write_gguf(model, None, specs, tmp_path / "m.gguf", qtensors=qts)
    assert not (tmp_path / "m.gguf").exists()
    model.config.query_pre_attn_scalar = cfg.head_dim
    rep = write_gguf(model, None, specs, tmp_path / "m.gguf", qtensors=qts)
    assert rep["architecture"] == "gemma3" and rep["verification"]["ok"]
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    f = {k: v.contents() for k, v in r.fields.items() if k.startswith("gemma3.")}
    assert f["gemma3.attention.sliding_window"] == 16 and f["gemma3.attention.sliding_window_pattern"] == [True, False]
    assert f["gemma3.rope.freq_base_swa"] == 500.0
    assert f["gemma3.rope.freq_base"] == cfg.rope_parameters["full_attention"]["rope_theta"] != 500.0
    tensors = {t.name: np.asarray(t.data) for t in r.tensors}
    blk = model.model.layers[1]
    for attr, name in [("input_layernorm", "attn_norm"), ("post_attention_layernorm", "post_attention_norm"),
                       ("pre_feedforward_layernorm", "ffn_norm"), ("post_feedforward_layernorm", "post_ffw_norm")]:
        np.testing.assert_array_equal(tensors[f"blk.1.{name}.weight"], getattr(blk, attr).weight.numpy() + 1)
    np.testing.assert_array_equal(tensors["blk.1.attn_q_norm.weight"], blk.self_attn.q_norm.weight.numpy() + 1)
    np.testing.assert_array_equal(tensors["output_norm.weight"], model.model.norm.weight.numpy() + 1)
    ids = torch.randint(4, 99, (2, 40), generator=torch.Generator().manual_seed(0))
    expect = model(ids).logits
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", config=model.config,
                                                 dtype=torch.float32).eval()  # its gemma3 reader assumes 256-wide heads
    assert (hf(ids).logits - expect).abs().max() < 0.05  # the F16 embeddings differ


@pytest.mark.parametrize("partial", [1.0, 0.5])
@torch.no_grad()
def test_phi3_is_written_with_its_fused_projections(tiny_model, tmp_path, partial):
    """Phi-3 (and Phi-4-mini's partial RoPE) as llama.cpp's ``phi3``: ``qkv_proj`` as ``attn_qkv``,
    ``gate_up_proj`` as ``ffn_up`` (gate first), RoPE over ``rope.dimension_count`` channels of each head; the
    fused layers keep their int grids exactly and transformers' GGUF loader gives the same logits."""
    from tiny import _config

    cfg, cls = _config("phi3")
    cfg.partial_rotary_factor = partial
    cfg.rope_parameters["partial_rotary_factor"] = partial
    torch.manual_seed(0)
    model = cls(cfg).eval()
    specs, qts = quantized(model, "W4-g32")
    rep = write_gguf(model, bpe_tokenizer(), specs, tmp_path / "m.gguf", qtensors=qts)
    assert rep["architecture"] == "phi3" and rep["verification"]["ok"]
    by_name = {t["name"]: t for t in rep["tensors"]}
    assert by_name["blk.0.attn_qkv.weight"]["exact"] and by_name["blk.0.ffn_up.weight"]["shape"] == [2 * 128, 64]
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    assert r.fields["phi3.rope.dimension_count"].contents() == int(16 * partial)
    ids = torch.randint(4, 99, (2, 24), generator=torch.Generator().manual_seed(0))
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", config=model.config,
                                                 dtype=torch.float32).eval()
    assert (hf(ids).logits - model(ids).logits).abs().max() < 0.05  # the F16 embeddings and head differ


def test_gemma3_without_a_sliding_layer_writes_no_window():
    """A Gemma 3 config whose layers are all full attention: no sliding-window keys (llama.cpp then runs none; given
    a pattern without a sliding layer, the llama.cpp built here crashed)."""
    from tiny import _config

    cfg, _ = _config("gemma3")
    cfg.query_pre_attn_scalar = cfg.head_dim
    cfg.layer_types = ["full_attention", "full_attention"]
    assert "sliding_window" not in GA._hparams(cfg, GA._ARCHS["gemma3_text"])
    cfg.layer_types = ["sliding_attention", "full_attention"]
    assert GA._hparams(cfg, GA._ARCHS["gemma3_text"])["swa_pattern"] == [True, False]


@pytest.mark.parametrize("family", ["granite", "olmo2", "smollm3"])
def test_families_only_llama_cpp_reads_are_written_by_its_names(family, tmp_path):
    """Granite (its multipliers as metadata), OLMo 2 (norms after attention and MLP only, q/k norms over all heads)
    and SmolLM3 (RoPE left out of every fourth layer): llama.cpp's names and keys, read back exactly by gguf-py
    (transformers has no GGUF reader for them; bench/gguf_arch_check.py runs them in llama.cpp).  A SmolLM3 whose
    layers without RoPE are not llama.cpp's every fourth is refused."""
    if family == "smollm3":
        cfg = tf.SmolLM3Config(vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                               pad_token_id=1, bos_token_id=2, eos_token_id=3)
        torch.manual_seed(0)
        model = tf.SmolLM3ForCausalLM(cfg).eval()
    else:
        from tiny import make_tiny

        model = make_tiny(family)
    specs, qts = quantized(model, "W8-g32")
    rep = write_gguf(model, None, specs, tmp_path / "m.gguf", qtensors=qts)
    assert rep["architecture"] == family and rep["verification"]["ok"]
    assert all(t["exact"] for t in rep["tensors"] if t.get("spec"))
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    names = {t.name for t in r.tensors}
    fields = {k: v.contents() for k, v in r.fields.items() if k.startswith(family + ".")}
    if family == "granite":
        c = model.config
        assert fields["granite.attention.scale"] == pytest.approx(c.attention_multiplier)
        assert (fields["granite.embedding_scale"], fields["granite.residual_scale"], fields["granite.logit_scale"]) \
            == pytest.approx((c.embedding_multiplier, c.residual_multiplier, c.logits_scaling))
    if family == "olmo2":
        assert {"blk.0.post_attention_norm.weight", "blk.0.post_ffw_norm.weight", "blk.0.attn_q_norm.weight"} <= names
        assert "blk.0.attn_norm.weight" not in names and "blk.0.ffn_norm.weight" not in names
    if family == "smollm3":
        model.config.no_rope_layers = [1, 1, 1, 1]
        with pytest.raises(ValueError, match="every fourth layer"):
            write_gguf(model, None, specs, tmp_path / "n.gguf", qtensors=qts)
