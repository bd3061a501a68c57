"""Issue 16's families: tiny random Qwen3, Gemma 2, Phi-3, OLMo 2, Granite and Falcon (new decoder architecture)
through measure -> plan -> GPTQ -> save -> load -> eval -> every exporter, and the features that cannot hold one
of them refusing it by name (the table tests of every family are in test_arch.py; Qwen3-MoE and Mixtral in
test_moe.py).

What each exporter and feature does per family (README "Supported models"):

* compressed-tensors and GPTQ: every family, exact (module names are the checkpoint's).
* GGUF: qwen3 (llama.cpp's ``qwen3``: q/k norms as ``attn_q_norm`` / ``attn_k_norm``), gemma2 (its norms plus one,
  soft-capping and window as metadata), phi3 (the fused ``attn_qkv`` and ``ffn_up``), granite and olmo2, exact (the
  first three read back by transformers too; all of them run in llama.cpp by bench/gguf_arch_check.py); Falcon is
  refused naming the model_type before anything is written.
* QuaRot rotation: the RMSNorm families (Gemma 2's sandwich norms rotated online like Gemma 3's); OLMo 2 (no norm
  before attention or MLP: nothing to fuse, and its post-norms sit on every residual writer) and Falcon
  (LayerNorm) are refused, untouched.
* AWQ and SmoothQuant: every family, through the groups of its ``ARCH_TABLE`` entry (OLMo 2: only the
  ``linear`` groups, v -> o and up -> down).
"""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import transformers as tf

import mixq
from mixq.arch import arch_for, get_weight
from mixq.export.gguf_arch import UnsupportedArchitectureError
from tiny import MORE_FAMILIES, make_tiny, make_tiny_tokenizer

HAS_CT = importlib.util.find_spec("compressed_tensors") is not None
TEXT = "the quick brown fox jumps over the lazy dog. " * 40
CANDIDATES = ["W2-g32", "W4-g32", "W8-g32"]
GGUF = {"qwen3", "gemma2", "phi3", "granite", "olmo2"}  # families the GGUF exporter holds; others refused by model_type
GGUF_HF = {"qwen3", "gemma2", "phi3"}  # of those, the ones transformers' GGUF loader reads
ROTATE_REFUSED = {"olmo2": "no norm before", "falcon": "LayerNorm"}


def _ids(n: int, L: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 99, (n, L), generator=torch.Generator().manual_seed(seed))


def _weights(model, layers) -> dict[str, torch.Tensor]:
    mods = dict(model.named_modules())
    return {f: get_weight(mods[f]).float() for f in layers}


@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_family_end_to_end(family, tmp_path):
    from mixq.export.gguf import export_gguf
    from mixq.export.hf import export_compressed_tensors, export_gptq, read_back_compressed, read_back_gptq
    from mixq.export.hf_readback import check_with_transformers
    from mixq.export.native_write import rewrite_native

    model, tok = make_tiny(family), make_tiny_tokenizer()
    assert not arch_for(model).discovered
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    ids = _ids(8, 32)
    table = mixq.measure(model, ids, metric="kfac", candidates=CANDIDATES, grad_samples=4, progress=False)
    plan = mixq.plan(table, bpw=5.0)
    assert len({s.name for s in plan.layers.values()}) > 1, "a mixed plan"
    result = mixq.quantize(model, plan=plan, method="gptq", calib=ids, progress=False)
    assert set(result.qtensors) == set(plan.layers) and result.proxy_loss
    expect = model(ids).logits
    d = tmp_path / "q"
    mixq.save_quantized(d, model, tok, result)
    loaded, qtok, info = mixq.load_quantized(d)
    assert set(info["layers"]) == set(plan.layers)
    assert torch.equal(loaded(ids).logits, expect)
    packed, _, _ = mixq.load_quantized(d, packed=True)
    torch.testing.assert_close(packed(ids).logits, expect, rtol=1e-4, atol=1e-4)
    r = mixq.evaluate(loaded, qtok, reference=make_tiny(family), corpus=str(corpus), tokens=96, seqlen=32,
                      progress=False)
    assert r["perplexity"] > 1 and r["kl"] > 0
    ref = _weights(loaded, plan.layers)

    rewrite_native(d, tmp_path / "v2")  # native: a re-write loads to the same model
    assert torch.equal(mixq.load_quantized(tmp_path / "v2")[0](ids).logits, expect)
    export_gptq(d, tmp_path / "gptq")
    export_compressed_tensors(d, tmp_path / "ct")
    for got in (read_back_gptq(tmp_path / "gptq"), read_back_compressed(tmp_path / "ct")):
        assert set(got) == set(ref) and all(torch.equal(got[f], ref[f]) for f in ref)
    if HAS_CT and family == "falcon":  # transformers 5.23's FalconPreTrainedModel._init_weights reads .weight of
        with pytest.raises(AttributeError, match="FalconLinear"):  # every FalconLinear, which compressed-tensors
            check_with_transformers(tmp_path / "ct", d)  # replaced by weight_packed (the tensors read back above)
    elif HAS_CT:
        res = check_with_transformers(tmp_path / "ct", d)
        assert res["layers_compared"] == len(ref) and res["max_weight_diff"] == 0.0 and res["max_logit_diff"] == 0.0
    if family in GGUF:
        rep = export_gguf(d, tmp_path / "m.gguf", progress=False)
        assert rep["verification"]["ok"] and rep["architecture"] == family
        linears = [t for t in rep["tensors"] if t.get("spec")]
        assert len(linears) == len(plan.layers) and all(t["exact"] for t in linears)  # W4-g32 Q4_0, W8-g32 Q8_0
        names = {t["name"] for t in rep["tensors"]}
        if family in ("qwen3", "olmo2"):
            assert {"blk.1.attn_q_norm.weight", "blk.1.attn_k_norm.weight"} <= names
        if family == "phi3":
            assert {"blk.1.attn_qkv.weight", "blk.1.ffn_up.weight"} <= names
        if family in GGUF_HF:
            hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", config=model.config,
                                                      dtype=torch.float32).eval()  # its qwen3 reader: head_dim 128
            with torch.no_grad():  # transformers' GGUF loader reads it back: only the F16 embeddings differ
                assert (hf(ids).logits - expect).abs().max() < 0.05
    else:
        with pytest.raises(UnsupportedArchitectureError, match=f"model_type '{model.config.model_type}'.*compressed"):
            export_gguf(d, tmp_path / "m.gguf", progress=False)
        assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("family", MORE_FAMILIES)
@torch.no_grad()
def test_rotation_keeps_logits_or_refuses_untouched(family):
    from mixq.algorithms.rotation import rotate_model

    model = make_tiny(family)
    ids = _ids(2, 16)
    ref = model(ids).logits
    if family in ROTATE_REFUSED:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(NotImplementedError, match=ROTATE_REFUSED[family]):
            rotate_model(model)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        return
    rotate_model(model, seed=0)
    assert float((model(ids).logits - ref).abs().max() / ref.abs().max()) < 1e-4


@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_awq_and_smoothquant_keep_the_function(family):
    from mixq.algorithms.smoothquant import smooth_model

    ids = _ids(4, 32)
    model = make_tiny(family)
    ref = model(ids).logits.detach()
    assert smooth_model(model, ids, include_linear=True, include_act=True, progress=False)
    assert float((model(ids).logits.detach() - ref).abs().max() / ref.abs().max()) < 1e-4
    model = make_tiny(family)
    res = mixq.quantize(model, "W8-g32", method="awq", calib=ids, progress=False)
    assert set(res.qtensors) and float((model(ids).logits.detach() - ref).abs().max() / ref.abs().max()) < 0.05


def test_cli_refuses_rotating_olmo2_in_one_line(tmp_path, capsys):
    from mixq.cli import main

    d = tmp_path / "olmo2"
    make_tiny("olmo2").save_pretrained(d)
    make_tiny_tokenizer().save_pretrained(d)
    (tmp_path / "c.txt").write_text(TEXT)
    args = ["--calib", str(tmp_path / "c.txt"), "--nsamples", "2", "--seqlen", "16", "--grad-samples", "1"]
    assert main(["quantize", "--model", str(d), "--bpw", "4", "--rotate", *args, "--out", str(tmp_path / "q")]) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after transformers' progress bars: one line, no traceback
    assert last.startswith("mixq: error: Olmo2DecoderLayer has no norm before") and "without --rotate" in last, last
