"""CLI: bad input gets one line, exit code 2, nothing written; save → load round trip."""
import json

import pytest
import torch

from mixq import api
from mixq.cli import main
from mixq.export.native import CheckpointError, load_quantized
from mixq.export.native_write import save_quantized


@pytest.mark.parametrize("argv, needle", [
    (["quantize", "--spec", "W9-g128", "--out", "OUT"], "bits must be in 1..8"),
    (["quantize", "--spec", "W0", "--out", "OUT"], "bits must be in 1..8"),
    (["quantize", "--spec", "ZZ4", "--out", "OUT"], "unknown spec"),
    (["quantize", "--spec", "W4-g128", "--lm-head", "W4-g7x", "--out", "OUT"], "granularity"),
    (["quantize", "--method", "gptq", "--calib", "c4", "--out", "OUT"], "ptb"),
    (["quantize", "--method", "gptq", "--calib", "missing.txt", "--out", "OUT"], "missing.txt"),
    (["quantize", "--nsamples", "0", "--method", "gptq", "--out", "OUT"], "--nsamples must be positive"),
    (["eval", "NOWHERE_DIR_XYZ", "--tokens", "0"], "--tokens must be positive"),
    (["specs", "--shape", "12"], "OUTxIN"),
])
def test_bad_input_one_line_exit_2(argv, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("mixq: error:") and err.count("\n") == 1 and needle in err
    assert "Traceback" not in err
    assert not (tmp_path / "OUT").exists()


def test_existing_output_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = main(["quantize", "--spec", "W4-g64", "--out", str(out)])
    assert rc == 2 and "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_specs_lists_presets(capsys):
    assert main(["specs"]) == 0
    out = capsys.readouterr().out
    assert "W4-g128" in out and "NVFP4" in out and "MXFP4" in out


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma"])
def test_save_load_round_trip(tiny_model, tiny_tokenizer, family, tmp_path):
    model = tiny_model(family)
    specs = api.resolve_specs(model, "W3-g32-asym")
    res = api.quantize_model(model, specs, method="rtn")
    d = save_quantized(tmp_path / "q", model, tiny_tokenizer, res.qtensors, {"base_model": "tiny", "method": "rtn"})
    loaded, tok, info = load_quantized(d)
    ids = torch.randint(0, 90, (1, 12))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded(ids).logits, atol=1e-5)
    assert set(info["layers"]) == set(specs)
    with pytest.raises(FileExistsError):
        save_quantized(d, model, tiny_tokenizer, res.qtensors, {})


def test_damaged_checkpoint_is_rejected(tiny_model, tiny_tokenizer, tmp_path):
    model = tiny_model("llama")
    specs = api.resolve_specs(model, "W4-g32")
    res = api.quantize_model(model, specs)
    d = save_quantized(tmp_path / "q", model, tiny_tokenizer, res.qtensors, {})
    f = d / "quantized.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        load_quantized(d)
    (d / "mixq.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_quantized(d)


def test_group_fallback(tiny_model):
    model = tiny_model("llama")  # hidden 64, intermediate 128
    with pytest.raises(ValueError, match="does not divide"):
        api.resolve_specs(model, "W4-g48")
    specs = api.resolve_specs(model, "W4-g48", group_fallback="shrink")
    assert {s.granularity.size for s in specs.values()} == {32}
    assert api.fallbacks(specs, api.parse_spec("W4-g48"))


def test_lm_head_policy_is_explicit(tiny_model):
    model = tiny_model("llama")
    specs = api.resolve_specs(model, "W4-g32")
    assert not any("lm_head" in f for f in specs)
    from mixq.arch import TiedWeightsError, untie_lm_head
    if model.config.tie_word_embeddings:
        with pytest.raises(TiedWeightsError):
            api.resolve_specs(model, "W4-g32", lm_head="W8-channel")
        untie_lm_head(model)
    specs = api.resolve_specs(model, "W4-g32", lm_head="W8-channel")
    assert specs["lm_head"].bits == 8


def test_size_report_counts_everything(tiny_model):
    model = tiny_model("llama")
    specs = api.resolve_specs(model, "W4-g32")
    rep = api.size_report(model, specs)
    expect = sum(s.cost(tuple(dict(model.named_modules())[f].weight.shape)).total for f, s in specs.items())
    assert rep["bits_quantized"] == expect
    assert rep["bpw_quantized"] == pytest.approx(4 + 16 / 32)
    assert rep["total_params"] == sum(p.numel() for p in set(model.parameters()))


def test_python_dash_m_mixq_runs_the_command():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "mixq", "specs", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("usage: mixq specs"), r.stderr[-500:]


def test_specs_explains_one_spec_with_its_stored_tensors(capsys):
    from mixq.cli import main

    assert main(["specs", "W3-g64+o0.5", "--shape", "64x128"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("W3-g64+o0.5: ") and "stores:" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("  ")]
    assert [r[0] for r in rows] == ["codes.b3", "scale", "csr.values", "csr.cols", "csr.row_ptr"]
    total = int(out.split("(")[1].split(" bits")[0])
    assert total <= sum(int(r[-2]) for r in rows) <= total + 8 * len(rows)
    assert "export gguf: refused" in out
