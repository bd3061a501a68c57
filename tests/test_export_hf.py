"""Hugging Face / vLLM exports (mixq.export.hf) on tiny random models.

Exactness: every exported layer must re-read (independent reader, float32) to *exactly* the
weights of mixq's fake-quant model: the scales are written in a float dtype that holds them
exactly and ``(q - zero) * scale`` of an fp16 scale is exact in float32.  compressed-tensors'
own decompressor computes in the scale dtype (fp16 here), so there the comparison is with
mixq's weights rounded to fp16 (one rounding of an exact product, hence also bit-identical).
"""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from mixq import api
from mixq.arch import get_weight
from mixq.export.hf import (
    ExportError,
    export_compressed_tensors,
    export_gptq,
    read_back_compressed,
    read_back_gptq,
)
from mixq.export.hf_readback import check_with_transformers
from mixq.export.native import load_quantized, read_qtensors
from mixq.export.native_write import save_quantized
from tiny import make_tiny, make_tiny_tokenizer

HAS_CT = importlib.util.find_spec("compressed_tensors") is not None
needs_ct = pytest.mark.skipif(not HAS_CT, reason="compressed-tensors not installed (pip install compressed-tensors==0.20.0)")

# 3-bit g32 symmetric for q/k, 8-bit per-channel for v, 4-bit g64 asymmetric for the MLP, o_proj kept in float
MIXED = {"re:q_proj|k_proj": "W3-g32", "re:v_proj": "W8-channel", "re:mlp": "W4-g64-asym"}
# the same without asymmetric layers (transformers 5.23 + compressed-tensors 0.20 cannot load those, see hf.py),
# with E8M0 (MXINT8) scales on down_proj and o_proj explicitly kept as FP16
MIXED_SYM = {"re:q_proj|k_proj": "W3-g32", "re:v_proj": "W8-channel", "re:gate_proj|up_proj": "W4-g64",
             "re:down_proj": "MXINT8", "re:o_proj": "FP16"}


def _native(root, name, plan, family="llama", tamper=None):
    model = make_tiny(family)
    specs = api.resolve_specs(model, plan)
    res = api.quantize_model(model, specs, method="rtn", progress=False)
    if tamper is not None:
        tamper(res.qtensors)
    return save_quantized(root / name, model, make_tiny_tokenizer(), res.qtensors,
                          {"base_model": f"tiny-{family}", "method": "rtn"})


def _mixq_weights(d) -> dict[str, torch.Tensor]:
    """mixq's dequantized weights ([out, in], float32) of every layer in the native directory."""
    model, _, info = load_quantized(d)
    mods = dict(model.named_modules())
    return {f: get_weight(mods[f]).clone() for f in info["layers"]}


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory):
    return _native(tmp_path_factory.mktemp("native"), "mixed", MIXED)


def _field(words: torch.Tensor, k: int, bits: int) -> int:
    """Field ``k`` of a little-endian bit stream held in a 1-D int32 tensor, decoded one bit at a time."""
    v = 0
    for b in range(bits):
        pos = k * bits + b
        v |= ((int(words[pos // 32]) & 0xFFFFFFFF) >> (pos % 32) & 1) << b
    return v


def test_compressed_tensors_mixed_plan_is_exact(mixed_dir, tmp_path):
    out = tmp_path / "ct"
    rep = export_compressed_tensors(mixed_dir, out)
    ref = _mixq_weights(mixed_dir)
    got = read_back_compressed(out)
    assert set(got) == {f for f in ref if not f.endswith("o_proj")}
    for f, w in got.items():
        assert torch.equal(w, ref[f]), f
    assert rep["exact"] and rep["max_abs_diff"] == 0.0
    assert all(e["max_abs_diff"] == 0.0 for e in rep["layers"].values())
    json.dumps(rep)

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    groups = {(g["weights"]["num_bits"], g["weights"]["group_size"], g["weights"]["symmetric"]): g
              for g in qc["config_groups"].values()}
    assert set(groups) == {(3, 32, True), (8, None, True), (4, 64, False)}
    assert groups[(8, None, True)]["weights"]["strategy"] == "channel"
    assert set(groups[(3, 32, True)]["targets"]) == {f for f in ref if f.endswith(("q_proj", "k_proj"))}
    assert set(groups[(4, 64, False)]["targets"]) == {f for f in ref if ".mlp." in f}
    assert set(qc["ignore"]) == {"model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj", "lm_head"}

    t = load_file(out / "model.safetensors")
    _, qts, rest = read_qtensors(mixed_dir)
    for k, v in rest.items():  # norms, embeddings, kept linears: unchanged, same dtype
        assert t[k].dtype == v.dtype and torch.equal(t[k], v), k
    q = "model.layers.0.self_attn.q_proj"
    codes = qts[q].codes  # uint8 [out, in]
    assert t[f"{q}.weight_packed"].dtype == torch.int32 and tuple(t[f"{q}.weight_packed"].shape) == (64, 6)
    assert tuple(t[f"{q}.weight_scale"].shape) == (64, 2) and t[f"{q}.weight_scale"].dtype == torch.float16
    assert t[f"{q}.weight_shape"].tolist() == [64, 64] and f"{q}.weight_zero_point" not in t
    for k in (0, 10, 21, 63):  # fields 10 and 21 straddle 32-bit words; stored field = q_signed + 4 = mixq code
        assert _field(t[f"{q}.weight_packed"][5], k, 3) == int(codes[5, k])
    up = "model.layers.1.mlp.up_proj"  # 4-bit asym, in 64 = one group: zero points packed along the 128 outputs
    assert tuple(t[f"{up}.weight_zero_point"].shape) == (16, 1)
    assert (out / "tokenizer.json").is_file() and (out / "export_report.json").is_file()
    assert any("vLLM fuses" in w for w in rep["warnings"])  # q/k (3-bit) and v (8-bit) differ


@needs_ct
def test_compressed_tensors_package_reads_the_export(mixed_dir, tmp_path):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationConfig

    out = tmp_path / "ct"
    export_compressed_tensors(mixed_dir, out)
    ref = _mixq_weights(mixed_dir)
    _, qts, _ = read_qtensors(mixed_dir)
    t = load_file(out / "model.safetensors")
    qc = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    seen = 0
    for scheme in qc.config_groups.values():
        bits = scheme.weights.num_bits
        for f in scheme.targets:
            mid = 2 ** (bits - 1)
            signed = (qts[f].codes.to(torch.int32) - mid).to(torch.int8)
            assert torch.equal(pack_to_int32(signed, bits), t[f"{f}.weight_packed"]), f
            if not scheme.weights.symmetric:
                zp = (qts[f].params.zero.reshape(signed.shape[0], -1).to(torch.int32) - mid).to(torch.int8)
                assert torch.equal(pack_to_int32(zp, bits, packed_dim=0), t[f"{f}.weight_zero_point"]), f
            sd = {k[len(f) + 1:]: v for k, v in t.items() if k.startswith(f + ".")}
            dense = PackedQuantizationCompressor.decompress(sd, scheme)["weight"]
            assert dense.dtype == torch.float16 and torch.equal(dense, ref[f].half()), f
            seen += 1
    assert seen == 12


@needs_ct
def test_transformers_loads_compressed_tensors(tmp_path):
    src = _native(tmp_path, "sym", MIXED_SYM)
    rep = export_compressed_tensors(src, tmp_path / "ct")
    assert rep["exact"]
    assert rep["layers"]["model.layers.0.mlp.down_proj"]["spec"] == "MXINT8"
    res = check_with_transformers(tmp_path / "ct", src)
    assert res["layers_compared"] == 14 and res["max_weight_diff"] == 0.0 and res["max_logit_diff"] == 0.0
    # an fp16 model: transformers dequantizes in fp16, mixq's weights rounded to fp16 once: identical
    rep16 = export_compressed_tensors(src, tmp_path / "ct16", dtype="fp16")
    assert rep16["dtype"] == "float16"
    res16 = check_with_transformers(tmp_path / "ct16", src, dtype=torch.float16)
    assert res16["max_weight_diff"] == 0.0 and res16["max_logit_diff"] <= 1e-2


def test_gptq_mixed_plan_is_exact(mixed_dir, tmp_path):
    out = tmp_path / "gptq"
    rep = export_gptq(mixed_dir, out)
    ref = _mixq_weights(mixed_dir)
    got = read_back_gptq(out)
    assert set(got) == {f for f in ref if not f.endswith("o_proj")}
    for f, w in got.items():
        assert torch.equal(w, ref[f]), f
    assert rep["exact"] and rep["max_abs_diff"] == 0.0

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert json.loads((out / "quantize_config.json").read_text()) == qc
    assert (qc["quant_method"], qc["checkpoint_format"], qc["desc_act"], qc["lm_head"]) == ("gptq", "gptq", False, False)
    assert (qc["bits"], qc["group_size"], qc["sym"]) == (4, 64, False)  # the most common scheme is the base
    dyn = qc["dynamic"]
    assert dyn[r"+:^model\.layers\.1\.self_attn\.q_proj$"] == {"bits": 3, "group_size": 32, "sym": True}
    assert dyn[r"+:^model\.layers\.0\.self_attn\.v_proj$"] == {"bits": 8, "group_size": -1, "sym": True}
    assert dyn[r"-:^model\.layers\.0\.self_attn\.o_proj$"] == {}
    assert not any("mlp" in k for k in dyn)

    t = load_file(out / "model.safetensors")
    _, qts, _ = read_qtensors(mixed_dir)
    q = "model.layers.0.self_attn.q_proj"  # 3-bit g32, 64 x 64
    assert tuple(t[f"{q}.qweight"].shape) == (6, 64) and tuple(t[f"{q}.qzeros"].shape) == (2, 6)
    assert tuple(t[f"{q}.scales"].shape) == (2, 64) and t[f"{q}.scales"].dtype == torch.float16
    assert t[f"{q}.g_idx"].tolist() == [i // 32 for i in range(64)]
    for i in (0, 10, 21, 40):  # input index i of output column 7, along the column's stream
        assert _field(t[f"{q}.qweight"][:, 7], i, 3) == int(qts[q].codes[7, i])
    assert all(_field(t[f"{q}.qzeros"][1], o, 3) == 3 for o in range(64))  # symmetric: mid - 1 = 3
    d = "model.layers.0.mlp.down_proj"  # 4-bit asym g64: zeros stored minus one (v1)
    zero = qts[d].params.zero.reshape(64, 2)
    assert all(_field(t[f"{d}.qzeros"][g], o, 4) == int(zero[o, g]) - 1 for g in range(2) for o in range(0, 64, 9))
    v = "model.layers.1.self_attn.v_proj"  # 8-bit per channel: one group
    assert tuple(t[f"{v}.scales"].shape) == (1, 32) and t[f"{v}.g_idx"].tolist() == [0] * 64
    assert any("dynamic" in w for w in rep["warnings"])


def test_gptq_conv1d_family_and_dtype(tmp_path):
    src = _native(tmp_path, "gpt2", "W4-g32", family="gpt2")
    rep = export_gptq(src, tmp_path / "gptq", dtype="fp16")
    ref = _mixq_weights(src)
    got = read_back_gptq(tmp_path / "gptq")
    assert set(got) == set(ref) and all(torch.equal(got[f], ref[f]) for f in ref)
    qc = json.loads((tmp_path / "gptq" / "config.json").read_text())
    assert qc["dtype"] == "float16" and "dynamic" not in qc["quantization_config"]
    t = load_file(tmp_path / "gptq" / "model.safetensors")
    assert tuple(t["transformer.h.0.attn.c_attn.qweight"].shape) == (8, 192)  # Conv1D [64 -> 192]: in 64 * 4 / 32
    assert t["transformer.h.0.attn.c_attn.bias"].dtype == torch.float16
    assert all(v.dtype in (torch.float16, torch.int32, torch.int64, torch.bool) for v in t.values())
    assert rep["dtype"] == "float16" and not any("float16: export" in w for w in rep["warnings"])
    with pytest.raises(ExportError, match="Conv1D"):
        export_compressed_tensors(src, tmp_path / "ct")


def test_unsupported_specs_are_rejected(tmp_path):
    src = _native(tmp_path, "bad", {"re:0.self_attn.q_proj": "NF4-g64", "re:0.self_attn.k_proj": "W4-g64-asymf",
                                    "re:0.self_attn.v_proj": "FP8", "re:0.mlp.gate_proj": "KM3",
                                    "re:0.mlp.up_proj": "MXFP4", "re:1.": "W2-g32"})
    with pytest.raises(ExportError) as e:
        export_compressed_tensors(src, tmp_path / "ct")
    msg = str(e.value)
    assert "\n" not in msg and "5 layer(s)" in msg
    assert "NF4-g64 on model.layers.0.self_attn.q_proj" in msg and "use W4-g64" in msg
    assert "use W4-g64-asym" in msg and "k-means" in msg and "floating-point" in msg
    assert set(e.value.problems) == {f"model.layers.0.{n}" for n in
                                     ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")}
    with pytest.raises(ExportError, match="cannot export to gptq"):
        export_gptq(src, tmp_path / "gptq")

    src2 = _native(tmp_path, "bits", {"re:q_proj": "W5-g32", "re:k_proj": "W1-g32", "re:v_proj": "W4-g32"})
    with pytest.raises(ExportError, match="binary grid") as e:
        export_compressed_tensors(src2, tmp_path / "ct")
    assert set(e.value.problems) == {"model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.k_proj"}
    with pytest.raises(ExportError, match="support 2, 3, 4, 8 bits") as e:
        export_gptq(src2, tmp_path / "gptq")
    assert len(e.value.problems) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "bits"]  # nothing written, no temp dirs left


def test_gptq_refuses_zero_point_zero(tmp_path):
    def zero_first_group(qtensors):
        qtensors["model.layers.0.mlp.down_proj"].params.zero[0] = 0

    src = _native(tmp_path, "z", MIXED, tamper=zero_first_group)
    with pytest.raises(ExportError, match="zero point 0") as e:
        export_gptq(src, tmp_path / "gptq")
    assert list(e.value.problems) == ["model.layers.0.mlp.down_proj"]
    rep = export_compressed_tensors(src, tmp_path / "ct")  # compressed-tensors holds a zero point of 0
    assert rep["exact"]


def test_overwrite_refusal(mixed_dir, tmp_path):
    out = tmp_path / "ct"
    export_compressed_tensors(mixed_dir, out)
    with pytest.raises(FileExistsError, match="--force"):
        export_compressed_tensors(mixed_dir, out)
    with pytest.raises(FileExistsError, match="--force"):
        export_gptq(mixed_dir, out)
    (out / "stale.txt").write_text("old")
    rep = export_gptq(mixed_dir, out, overwrite=True)
    assert rep["format"] == "gptq" and not (out / "stale.txt").exists() and (out / "quantize_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]
    with pytest.raises(ValueError, match="source directory"):
        export_gptq(mixed_dir, mixed_dir, overwrite=True)


def test_gptq_base_scheme_and_fused_aliases(tmp_path):
    src = _native(tmp_path, "sym", MIXED_SYM)
    rep = export_gptq(src, tmp_path / "gptq")
    ref = _mixq_weights(src)
    got = read_back_gptq(tmp_path / "gptq")
    assert all(torch.equal(got[f], ref[f]) for f in got) and len(got) == 12  # o_proj is FP16: kept
    qc = rep["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["sym"]) == (3, 32, True)  # 4 layers each for W3-g32 and W4-g64: first wins
    dyn = qc["dynamic"]
    assert dyn[r"+:^model\.layers\.0\.mlp\.down_proj$"] == {"bits": 8, "group_size": 32, "sym": True}  # MXINT8
    # vLLM names the fused gate/up layer gate_up_proj: both shards agree, so it gets the same override
    assert dyn[r"+:^model\.layers\.1\.mlp\.gate_up_proj$"] == {"bits": 4, "group_size": 64, "sym": True}
    assert r"+:^model\.layers\.1\.self_attn\.qkv_proj$" not in dyn  # q/k 3-bit, v 8-bit: no common scheme
    assert dyn[r"-:^model\.layers\.1\.self_attn\.o_proj$"] == {}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "phi", "gpt2", "opt", "gpt_neox"])
def test_families_round_trip(family, tmp_path):
    plan = {r"re:\.(q_proj|k_proj|v_proj|query_key_value|c_attn)$": "W3-g32", "re:mlp|fc1|fc2": "W4-g32",
            r"re:\.dense$|o_proj|out_proj|attn\.c_proj": "W8-channel"}
    src = _native(tmp_path, family, plan, family=family)
    ref = _mixq_weights(src)
    export_gptq(src, tmp_path / "gptq")
    got = read_back_gptq(tmp_path / "gptq")
    assert set(got) == set(ref) and all(torch.equal(got[f], ref[f]) for f in ref)
    if family == "gpt2":
        return  # Conv1D: compressed-tensors refuses it (test_gptq_conv1d_family_and_dtype)
    export_compressed_tensors(src, tmp_path / "ct")
    got = read_back_compressed(tmp_path / "ct")
    assert set(got) == set(ref) and all(torch.equal(got[f], ref[f]) for f in ref)
    if HAS_CT:
        res = check_with_transformers(tmp_path / "ct", src)
        assert res["layers_compared"] == len(ref) and res["max_weight_diff"] == 0.0 and res["max_logit_diff"] == 0.0
