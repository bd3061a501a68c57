"""Native format v2: packed tensors on disk, checksums, v1 compatibility, packed loading, export/generate CLI."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mixq import api
from mixq.cli import main
from mixq.export.native import (
    FORMAT_VERSION,
    CheckpointError,
    load_quantized,
    read_info,
    read_qtensors,
)
from mixq.export.native_write import rewrite_native, save_quantized
from mixq.formats import dequantize
from mixq.runtime import QuantLinear, greedy_generate, memory_report
from mixq.runtime.kernels import cpu

MIXED = ["W4-g32", "W3-g64-asym", "NF4-g64", "MXFP4", "KM3", "W8-channel", "NVFP4", "W4-g64-asymf", "FP16",
         "W2-g32-asym", "W4-channel"]
needs_int4 = pytest.mark.skipif(cpu._ops() is None, reason="torch build without _weight_int4pack_mm_for_cpu")
IDS = torch.randint(4, 99, (2, 12), generator=torch.Generator().manual_seed(0))


def _quantized(tiny_model, family, spec=None, lm_head=None):
    """A fake-quant tiny model, its qtensors and specs (``spec`` None: every layer a different format)."""
    model = tiny_model(family)
    if lm_head is not None:
        from mixq.arch import untie_lm_head

        untie_lm_head(model)
    base = api.resolve_specs(model, "W4-g32", lm_head=lm_head)
    specs = base if spec is not None and spec == "W4-g32" else (
        api.resolve_specs(model, spec, lm_head=lm_head) if spec is not None
        else {f: api.parse_spec(MIXED[i % len(MIXED)]) for i, f in enumerate(base)})
    res = api.quantize_model(model, specs, method="rtn", progress=False)
    return model, res.qtensors, specs


def _save(tmp_path, tiny_tokenizer, model, qtensors, name="q", **kw):
    return save_quantized(tmp_path / name, model, tiny_tokenizer, qtensors, {"base_model": "tiny", "method": "rtn"}, **kw)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits.float()


# ---------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma", "opt", "qwen2", "phi", "gpt_neox", "gemma3", "mistral"])
def test_save_load_packed_and_unpacked_match_fake_quant(tiny_model, tiny_tokenizer, family, tmp_path):
    model, qtensors, specs = _quantized(tiny_model, family)
    ref = _logits(model)
    d = _save(tmp_path, tiny_tokenizer, model, qtensors)
    info = read_info(d)
    assert info["format_version"] == FORMAT_VERSION == 2 and set(info["layers"]) == set(specs)

    fake, tok, _ = load_quantized(d)
    assert torch.equal(_logits(fake), ref) and tok is not None

    packed, _, _ = load_quantized(d, packed=True, kernel="reference")
    mods = dict(packed.named_modules())
    assert all(isinstance(mods[f], QuantLinear) for f in specs)
    names = {n for n, _ in packed.named_parameters()}
    assert not any(f"{f}.weight" in names for f in specs)  # no float copy of a quantized weight
    assert torch.allclose(_logits(packed), ref, atol=1e-5, rtol=1e-5)
    for f, q in qtensors.items():  # the buffers hold exactly what was quantized
        assert torch.equal(mods[f].packed.dequantize(), dequantize(q))


@needs_int4
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_bf16_uses_the_int4_kernel_and_tracks_fake_quant(tiny_model, tiny_tokenizer, family, tmp_path):
    model, qtensors, specs = _quantized(tiny_model, family, spec="W4-g32")
    ref = _logits(model)
    d = _save(tmp_path, tiny_tokenizer, model, qtensors)
    packed, _, _ = load_quantized(d, dtype=torch.bfloat16, packed=True)
    fake_bf16, _, _ = load_quantized(d, dtype=torch.bfloat16)
    ids = IDS[:1, :5]  # decode-sized: every layer under auto takes cpu-int4
    y, y_fake = _logits(packed, ids), _logits(fake_bf16, ids)
    err, err_fake = (y - ref[:1, :5]).abs().max(), (y_fake - ref[:1, :5]).abs().max()
    assert err <= max(2 * err_fake, 1e-3 * ref.abs().max())
    used = {m.last_kernel for m in packed.modules() if isinstance(m, QuantLinear)}
    assert used == {"cpu-int4"}
    from mixq.runtime.dense_gemv import GemvLinear  # the full-precision head decodes through torch.mv
    assert type(packed.get_submodule("lm_head")) is GemvLinear
    exact, _, _ = load_quantized(d, dtype=torch.bfloat16, packed=True, kernel="cpu-int4-exact")
    assert (_logits(exact, ids) - ref[:1, :5]).abs().max() <= max(2 * err_fake, 1e-3 * ref.abs().max())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_quantized_lm_head_round_trip(tiny_model, tiny_tokenizer, family, tmp_path):
    model, qtensors, specs = _quantized(tiny_model, family, spec="W4-g32", lm_head="W8-channel")
    assert any("lm_head" in f for f in specs)
    d = _save(tmp_path, tiny_tokenizer, model, qtensors)
    packed, _, _ = load_quantized(d, packed=True)
    assert isinstance(packed.get_submodule("lm_head"), QuantLinear)
    assert torch.allclose(_logits(packed), _logits(model), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- sizes
def test_bytes_on_disk_equal_the_accounting(tiny_model, tiny_tokenizer, tmp_path):
    model, qtensors, specs = _quantized(tiny_model, "llama")
    d = _save(tmp_path, tiny_tokenizer, model, qtensors)
    info = read_info(d)
    st = info["storage"]
    stored = load_file(d / "quantized.safetensors")
    on_disk = sum(t.numel() * t.element_size() for t in stored.values())
    spec_bits = sum(s.cost(q.shape).total for s, q in ((specs[f], qtensors[f]) for f in specs))
    assert st["bytes_quantized_on_disk"] == on_disk
    assert st["bits_quantized_spec"] == spec_bits == api.size_report(model, specs)["bits_quantized"]
    assert st["quantized_tensors"] == len(stored)
    assert 0 <= on_disk * 8 - spec_bits == st["padding_bits"] < 8 * len(stored)  # only last-byte padding
    for f, layer in info["layers"].items():
        assert 0 <= layer["bytes"] * 8 - layer["bits_spec"] < 8 * len(layer["tensors"])
        for name, meta in layer["tensors"].items():
            assert list(stored[f"{f}.{name}"].shape) == meta["shape"]
    codes = stored["model.layers.0.self_attn.q_proj.codes"]  # W4-g32: two codes per byte
    assert codes.dtype == torch.uint8 and codes.numel() == 64 * 64 // 2
    # RAM of the packed model: the packed tensors + the rest, no float weight of a quantized layer
    packed, _, _ = load_quantized(d, packed=True, kernel="reference")
    mem = memory_report(packed)
    rest = sum(t.numel() * t.element_size() for t in load_file(d / "rest.safetensors").values())
    assert mem["packed_weights"] == on_disk and mem["kernel_state"] == 0
    tied = packed.model.embed_tokens.weight.numel() * 4 if packed.config.tie_word_embeddings else 0
    assert mem["params_buffers"] <= on_disk + rest + tied + 4096  # + rotary inv_freq buffers
    assert mem["params_buffers"] < sum(p.numel() * 4 for p in model.parameters())


def test_rest_dtype_bf16_halves_the_rest(tiny_model, tiny_tokenizer, tmp_path):
    model, qtensors, _ = _quantized(tiny_model, "llama", spec="W4-g32")
    d = _save(tmp_path, tiny_tokenizer, model, qtensors)
    d16 = _save(tmp_path, tiny_tokenizer, model, qtensors, name="q16", rest_dtype=torch.bfloat16)
    a, b = read_info(d)["storage"], read_info(d16)["storage"]
    assert b["bytes_rest"] * 2 == a["bytes_rest"] and b["rest_dtype"] == "bfloat16"
    loaded, _, _ = load_quantized(d16)
    assert (_logits(loaded) - _logits(model)).abs().max() < 0.05 * _logits(model).abs().max()


# ---------------------------------------------------------------------------- integrity
def test_tampered_or_truncated_files_are_rejected(tiny_model, tiny_tokenizer, tmp_path, capsys):
    model, qtensors, _ = _quantized(tiny_model, "llama", spec="W4-g32")
    d = _save(tmp_path, tiny_tokenizer, model, qtensors)
    f = d / "quantized.safetensors"
    good = f.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x01  # one bit inside the code stream: safetensors alone would not notice
    f.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=r"quantized\.safetensors is damaged or was modified.*re-run `mixq quantize`"):
        load_quantized(d)
    rc = main(["generate", str(d), "--prompt", "hi", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("mixq: error:") and err.count("\n") == 1 and "quantized.safetensors" in err
    f.write_bytes(good[: len(good) - 100])
    with pytest.raises(CheckpointError, match=r"truncated or damaged.*re-run `mixq quantize`"):
        load_quantized(d, packed=True)
    f.write_bytes(good)
    (d / "rest.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"rest\.safetensors is missing"):
        load_quantized(d)
    with pytest.raises(CheckpointError, match="rest.safetensors"):
        rewrite_native(d, tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_config_edit_is_caught_and_verify_false_skips(tiny_model, tiny_tokenizer, tmp_path):
    model, qtensors, _ = _quantized(tiny_model, "llama", spec="W4-g32")
    d = _save(tmp_path, tiny_tokenizer, model, qtensors)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rms_norm_eps"] = 0.5
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json"):
        load_quantized(d)
    load_quantized(d, verify=False)


# ---------------------------------------------------------------------------- v1 directories
def _write_v1(d, model, tok, qtensors):
    """A directory as mixq format v1 wrote it: one code per byte, every param as float32, no checksums."""
    from mixq.export.native_write import _rest_state

    d.mkdir()
    qt = {}
    for fqn, q in qtensors.items():
        qt[f"{fqn}.codes"] = q.codes.contiguous()
        for f in ("scale", "zero", "offset", "codebook", "tensor_scale"):
            t = getattr(q.params, f)
            if t is not None:
                qt[f"{fqn}.{f}"] = t.detach().float().reshape(-1 if f == "tensor_scale" else t.shape).contiguous()
    save_file(qt, d / "quantized.safetensors")
    save_file(_rest_state(model, qtensors), d / "rest.safetensors")
    model.config.save_pretrained(d)
    tok.save_pretrained(d)
    doc = {"format": "mixq-native", "format_version": 1, "base_model": "tiny", "method": "rtn",
           "layers": {f: {"spec": q.spec.to_dict(), "shape": list(q.shape)} for f, q in qtensors.items()}}
    (d / "mixq.json").write_text(json.dumps(doc))
    return d


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_v1_directory_still_loads_and_upgrades(tiny_model, tiny_tokenizer, family, tmp_path, capsys):
    model, qtensors, specs = _quantized(tiny_model, family)
    ref = _logits(model)
    v1 = _write_v1(tmp_path / "v1", model, tiny_tokenizer, qtensors)
    fake, _, info = load_quantized(v1)
    assert info["format_version"] == 1 and torch.equal(_logits(fake), ref)
    packed, _, _ = load_quantized(v1, packed=True, kernel="reference")
    assert torch.allclose(_logits(packed), ref, atol=1e-5, rtol=1e-5)
    _, q1, _ = read_qtensors(v1)
    assert all(torch.equal(q1[f].codes, qtensors[f].codes) for f in qtensors)

    v2 = tmp_path / "v2"
    assert main(["export", str(v1), "--format", "native", "--out", str(v2)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"exported {v1} -> {v2} (native): {len(specs)} quantized layers") and "report" in out
    info2 = read_info(v2)
    assert info2["format_version"] == 2 and info2["rewritten_from"]["format_version"] == 1
    assert info2["base_model"] == "tiny" and set(info2["layers"]) == set(specs)
    report = json.loads((v2 / "export_report.json").read_text())
    assert report["source_format_version"] == 1 and report["layers"] == len(specs)
    assert (v2 / "quantized.safetensors").stat().st_size < (v1 / "quantized.safetensors").stat().st_size
    again, _, _ = load_quantized(v2)
    assert torch.equal(_logits(again), ref)
    _, q2, _ = read_qtensors(v2)
    for f, q in qtensors.items():
        assert torch.equal(q2[f].codes, q.codes) and torch.equal(dequantize(q2[f]), dequantize(q))
    # in place, with --force: v2 -> v2 keeps every tensor
    assert main(["export", str(v1), "--format", "native", "--out", str(v2)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["export", str(v2), "--format", "native", "--out", str(v2), "--force"]) == 0
    assert torch.equal(_logits(load_quantized(v2)[0]), ref)


# ---------------------------------------------------------------------------- CLI: export, generate
def test_export_offers_every_registered_target_and_each_exporter_exists():
    """``--format`` choices are the names of :data:`mixq.export.registry.EXPORTERS`; each entry's function exists."""
    import argparse

    from mixq.cli import build_parser
    from mixq.export.registry import EXPORTERS

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    fmt = next(a for a in sub.choices["export"]._actions if a.dest == "format")
    assert tuple(fmt.choices) == tuple(EXPORTERS) == ("native", "gguf", "compressed-tensors", "gptq")
    for e in EXPORTERS.values():
        assert callable(e.load())


def test_export_registry_refuses_a_taken_name():
    from mixq.export.registry import EXPORTERS, Exporter, register

    with pytest.raises(ValueError, match="already registered.*pick another name"):
        register("gguf", Exporter("x", "y", "z"))
    assert EXPORTERS["gguf"].module == "mixq.export.gguf"


def test_export_unknown_or_missing_exporter_is_one_line(tiny_model, tiny_tokenizer, tmp_path, capsys, monkeypatch):
    from mixq.export.registry import EXPORTERS, Exporter

    model, qtensors, _ = _quantized(tiny_model, "llama", spec="W4-g32")
    d = _save(tmp_path, tiny_tokenizer, model, qtensors)
    monkeypatch.setitem(EXPORTERS, "gguf", Exporter("mixq.export.no_such_module", "export_gguf", "test"))
    rc = main(["export", str(d), "--format", "gguf", "--out", str(tmp_path / "m.gguf")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--format gguf is not available" in err
    rc = main(["export", str(tmp_path / "nowhere"), "--format", "native", "--out", str(tmp_path / "x")])
    assert rc == 2 and "not a mixq directory" in capsys.readouterr().err
    rc = main(["export", str(d), "--format", "gptq", "--out", str(tmp_path / "g"), "--rest-dtype", "bf16"])
    assert rc == 2 and "--rest-dtype" in capsys.readouterr().err


def test_export_calls_the_format_module_and_writes_the_report(tiny_model, tiny_tokenizer, tmp_path, capsys,
                                                              monkeypatch):
    import sys
    import types

    from mixq.export.registry import EXPORTERS, Exporter

    model, qtensors, _ = _quantized(tiny_model, "llama", spec="W4-g32")
    d = _save(tmp_path, tiny_tokenizer, model, qtensors)
    calls = []

    def fake_export(src, out, overwrite=False):
        calls.append((src, out, overwrite))
        out.write_bytes(b"GGUF")
        return {"tensors": [1, 2, 3], "fallbacks": [], "totals": {"file_bytes": 4}}

    monkeypatch.setitem(sys.modules, "fake_gguf_mod", types.SimpleNamespace(export_gguf=fake_export))
    monkeypatch.setitem(EXPORTERS, "gguf", Exporter("fake_gguf_mod", "export_gguf", "test"))
    out = tmp_path / "m.gguf"
    assert main(["export", str(d), "--format", "gguf", "--out", str(out)]) == 0
    assert calls == [(d, out, False)]
    assert json.loads((tmp_path / "m.gguf.report.json").read_text())["tensors"] == [1, 2, 3]
    assert "3 tensors, 0 fallbacks" in capsys.readouterr().out


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_greedy_generate_matches_hf_generate(tiny_model, family):
    model = tiny_model(family)
    ids = IDS[:1, :6]
    res = greedy_generate(model, ids, 10, stop_at_eos=False)
    with torch.no_grad():
        hf = model.generate(ids, do_sample=False, max_new_tokens=10, min_new_tokens=10, pad_token_id=0)
    assert res.ids.tolist() == hf.tolist() and len(res.new_ids) == 10
    assert res.decode_tokens_per_s > 0 and res.to_dict()["new_tokens"] == 10


def test_generate_cli_is_deterministic(tiny_model, tiny_tokenizer, tmp_path, capsys):
    model, qtensors, _ = _quantized(tiny_model, "llama", spec="W4-g32")
    d = _save(tmp_path, tiny_tokenizer, model, qtensors)
    argv = ["generate", str(d), "--prompt", "The cat sat", "--max-new-tokens", "8", "--no-stop"]
    outs = []
    for extra in ([], [], ["--dtype", "fp32", "--kernel", "reference"], ["--no-packed"]):
        assert main(argv + extra) == 0
        cap = capsys.readouterr()
        outs.append(cap.out)
        assert "tokens/s" in cap.err and "8 new tokens after 11" in cap.err
    assert outs[0] == outs[1] and outs[0].strip()  # packed bf16, twice: same text
    assert outs[2] == outs[3]  # packed fp32 through the reference kernel == the fake-quant model
    assert main(argv + ["--kernel", "nope"]) == 2 and "unknown kernel" in capsys.readouterr().err
    assert main(argv + ["--no-packed", "--kernel", "reference"]) == 2
    assert "--packed" in capsys.readouterr().err
    assert main(["generate", str(d), "--prompt", "x", "--max-new-tokens", "100"]) == 2
    assert "positions" in capsys.readouterr().err
    assert main(["generate", str(d), "--prompt", "x", "--chat"]) == 2
    assert "chat template" in capsys.readouterr().err


def test_loading_does_not_unpickle(tiny_model, tiny_tokenizer, tmp_path, monkeypatch):
    model, qtensors, _ = _quantized(tiny_model, "llama", spec="W4-g32")
    d = _save(tmp_path, tiny_tokenizer, model, qtensors)

    def no_pickle(*a, **k):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", no_pickle)
    load_quantized(d, packed=True)
    load_quantized(d)
    assert not list(d.glob("*.bin")) and not list(d.glob("*.pt"))


def test_deepcopy_and_state_dict_of_a_packed_model(tiny_model, tiny_tokenizer, tmp_path):
    model, qtensors, _ = _quantized(tiny_model, "llama", spec="W4-g32")
    d = _save(tmp_path, tiny_tokenizer, model, qtensors)
    packed, _, _ = load_quantized(d, dtype=torch.bfloat16, packed=True)
    y = _logits(packed, IDS[:1, :4])
    clone = copy.deepcopy(packed)
    assert torch.equal(_logits(clone, IDS[:1, :4]), y)
    sd = packed.state_dict()
    assert sd["model.layers.0.self_attn.q_proj.codes"].numel() == 64 * 64 // 2  # rebuilt if released
