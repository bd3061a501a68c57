"""The GPTQ block walk resumed per block (:mod:`mixq.calib.checkpoint`) and its buffers on disk
(:mod:`mixq.calib.offload`): an interrupted then resumed walk, an offloaded walk and a lazily streamed
one all give bit-identical codes, params, proxy losses and model weights to one uninterrupted walk;
a checkpoint of another run, or a damaged one, is reported and the walk starts over.

Models are tiny random ones of ``tests/tiny.py`` with 4 decoder blocks (so that there is a middle to
interrupt), interrupted by a ``WalkCheckpoint.commit`` that raises ``KeyboardInterrupt`` once block k
is saved — what Ctrl-C between two blocks does.
"""
from __future__ import annotations

import json
import logging
from contextlib import contextmanager

import pytest
import torch
from safetensors import safe_open

import tiny
from mixq import api
from mixq.arch import arch_for
from mixq.calib import checkpoint as ckmod
from mixq.calib.checkpoint import WalkCheckpoint
from mixq.calib.lazy import LazySafetensorsBlocks, load_outside_blocks, skeleton_from_config
from mixq.cli import main

LAYERS = 4
IDS = torch.randint(0, tiny.VOCAB, (6, 16), generator=torch.Generator().manual_seed(0))


def _deep(family: str, seed: int = 0):
    """tests/tiny.py's model of ``family`` with LAYERS blocks."""
    return tiny.make_tiny(family, seed, layers=LAYERS)


def _gptq(model, spec="W4-g32", **kw):
    specs = api.resolve_specs(model, spec)
    return api.quantize_model(model, specs, method="gptq", calib_ids=IDS, progress=False, **kw)


@contextmanager
def _interrupt_after(k: int):
    """Ctrl-C right after block k's checkpoint is written."""
    orig = WalkCheckpoint.commit

    def commit(self, i, block, next_inputs, *fp_inputs):
        orig(self, i, block, next_inputs, *fp_inputs)
        if i == k:
            raise KeyboardInterrupt

    WalkCheckpoint.commit = commit
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        WalkCheckpoint.commit = orig


def _same_result(a, b) -> None:
    assert list(a.qtensors) == list(b.qtensors) and a.specs == b.specs
    for fqn, x in a.qtensors.items():
        y = b.qtensors[fqn]
        assert x.spec == y.spec and tuple(x.shape) == tuple(y.shape), fqn
        assert x.codes.dtype == y.codes.dtype and torch.equal(x.codes, y.codes), fqn
        for f in ("scale", "zero", "offset", "codebook", "tensor_scale"):
            p, q = getattr(x.params, f), getattr(y.params, f)
            assert (p is None) == (q is None), (fqn, f)
            if p is not None:
                assert p.dtype == q.dtype and p.shape == q.shape and torch.equal(p, q), (fqn, f)
    assert list(a.proxy_loss.items()) == list(b.proxy_loss.items())


def _same_weights(m1, m2) -> None:
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k


@pytest.mark.parametrize("family,spec,opts", [("llama", "W4-g32", {}), ("gpt2", "W3-g32-asym", {"act_order": True}),
                                              ("qwen2", "NVFP4", {"block_size": 16}),
                                              ("llama", "W3-g32", {"gptq_target": "fp"})])
def test_interrupted_walk_resumes_bit_exact(family, spec, opts, tmp_path):
    ref_model = _deep(family)
    ref = _gptq(ref_model, spec, **opts)
    d = tmp_path / "walk"
    with _interrupt_after(0):
        _gptq(_deep(family), spec, checkpoint=d, **opts)
    with _interrupt_after(2):  # resumes at 1, interrupted again after 2
        _gptq(_deep(family), spec, checkpoint=d, **opts)
    doc = json.loads((d / "progress.json").read_text())
    assert doc["last_block"] == 2
    # one block-input file (the latest), one pair of files per block done
    assert sorted(p.name for p in d.iterdir()) == ["block-00000.json", "block-00000.safetensors", "block-00001.json",
                                                   "block-00001.safetensors", "block-00002.json",
                                                   "block-00002.safetensors", "inputs-00003.safetensors",
                                                   "progress.json"]
    said = []
    ck = WalkCheckpoint(d, announce=said.append)
    model = _deep(family)
    res = _gptq(model, spec, checkpoint=ck, **opts)
    assert ck.resumed_from == 3 and said and "block 3 of 4" in said[0]
    _same_result(ref, res)
    _same_weights(ref_model, model)
    ck.clear()
    assert not d.exists()


def test_other_run_starts_over_and_says_so(tmp_path, caplog):
    d = tmp_path / "walk"
    with _interrupt_after(1):
        _gptq(_deep("llama"), checkpoint=d)
    ref_model = _deep("llama")
    ref = _gptq(ref_model, damp=0.05)
    model = _deep("llama")
    ck = WalkCheckpoint(d)
    with caplog.at_level(logging.WARNING, logger="mixq.calib.checkpoint"):
        res = _gptq(model, damp=0.05, checkpoint=ck)
    assert ck.resumed_from == 0
    assert "another run" in caplog.text and "damp" in caplog.text and "starting the walk over" in caplog.text
    _same_result(ref, res)
    _same_weights(ref_model, model)
    # the old checkpoint was overwritten: it now resumes as the damp=0.05 run, at the end
    assert json.loads((d / "progress.json").read_text())["key"]["damp"] == 0.05
    # other model weights: another run too
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mixq.calib.checkpoint"):
        _gptq(_deep("llama", seed=1), damp=0.05, checkpoint=d)
    assert "differs in: model" in caplog.text


@pytest.mark.parametrize("damage,says", [("truncate-inputs", "inputs-00002.safetensors is missing or truncated"),
                                         ("truncate-inputs-and-record", "SafetensorError"),
                                         ("truncate-block", "block-00001.safetensors is missing, truncated"),
                                         ("alter-block-json", "block-00000.json is missing, truncated or altered"),
                                         ("garbage-progress", "unreadable (JSONDecodeError")])
def test_damaged_checkpoint_starts_over(damage, says, tmp_path, caplog):
    ref_model = _deep("llama")
    ref = _gptq(ref_model)
    d = tmp_path / "walk"
    with _interrupt_after(1):
        _gptq(_deep("llama"), checkpoint=d)
    if damage.startswith("truncate-inputs"):
        f = d / "inputs-00002.safetensors"
        f.write_bytes(f.read_bytes()[:-100])
        if damage.endswith("record"):  # progress.json agrees with the cut file: safetensors itself must notice
            doc = json.loads((d / "progress.json").read_text())
            doc["inputs"]["size"] = f.stat().st_size
            (d / "progress.json").write_text(json.dumps(doc))
    elif damage == "truncate-block":
        f = d / "block-00001.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "alter-block-json":
        f = d / "block-00000.json"
        f.write_text(f.read_text().replace('"W4-g32"', '"W4-g64"'))
    else:
        (d / "progress.json").write_text("{not json")
    model = _deep("llama")
    ck = WalkCheckpoint(d)
    with caplog.at_level(logging.WARNING, logger="mixq.calib.checkpoint"):
        res = _gptq(model, checkpoint=ck)
    assert ck.resumed_from == 0 and "starting the walk over" in caplog.text and says in caplog.text
    _same_result(ref, res)
    _same_weights(ref_model, model)


def test_offloaded_buffers_give_identical_results(tmp_path, monkeypatch):
    from mixq.calib import offload

    ref_model = _deep("gpt2")
    ref = _gptq(ref_model)
    off = tmp_path / "off"
    model = _deep("gpt2")
    made = []
    real = offload.disk_tensor
    monkeypatch.setattr(offload, "disk_tensor", lambda *a: made.append(real(*a)) or made[-1])
    _same_result(ref, _gptq(model, offload_dir=off))
    assert [tuple(t.shape) for t in made] == [(IDS.shape[0], IDS.shape[1], tiny.HIDDEN)] * 2  # inputs, outputs
    monkeypatch.undo()
    _same_weights(ref_model, model)
    assert list(off.iterdir()) == []  # the mapped files were unlinked as soon as they were mapped
    # offloaded and resumed together
    with _interrupt_after(1):
        _gptq(_deep("gpt2"), checkpoint=tmp_path / "walk", offload_dir=off)
    model = _deep("gpt2")
    _same_result(ref, _gptq(model, checkpoint=tmp_path / "walk", offload_dir=off))
    _same_weights(ref_model, model)


def test_fp_stream_offloaded_and_keyed(tmp_path, caplog):
    """The full-precision stream (gptq_target='fp') goes to disk with the walk's own buffers, and a checkpoint of
    a walk without it is not resumed by one with it."""
    ref_model = _deep("llama")
    ref = _gptq(ref_model, gptq_target="fp")
    model = _deep("llama")
    _same_result(ref, _gptq(model, gptq_target="fp", offload_dir=tmp_path / "off"))
    _same_weights(ref_model, model)
    with _interrupt_after(1):
        _gptq(_deep("llama"), checkpoint=tmp_path / "walk")
    with caplog.at_level(logging.WARNING, logger="mixq.calib.checkpoint"):
        _same_result(ref, _gptq(_deep("llama"), gptq_target="fp", checkpoint=tmp_path / "walk"))
    assert "gptq_target" in caplog.text


def test_weight_not_reproduced_by_the_codes_is_stored(tmp_path, monkeypatch):
    """Where dequantizing the stored codes would not give the block's weight back, the weight itself is
    saved and restored (a safety net: GPTQ's weights are its dequantized codes)."""
    ref_model = _deep("llama")
    ref = _gptq(ref_model)
    d = tmp_path / "walk"
    with monkeypatch.context() as m, _interrupt_after(1):
        m.setattr(ckmod, "_reproduces", lambda packed, w: False)
        _gptq(_deep("llama"), checkpoint=d)
    layers = json.loads((d / "block-00000.json").read_text())["layers"]
    assert all("__weight__" in v["parts"] for v in layers.values())
    model = _deep("llama")
    _same_result(ref, _gptq(model, checkpoint=d))
    _same_weights(ref_model, model)


def _shards(tmp_path, family="llama"):
    d = tmp_path / f"{family}-shards"
    _deep(family).save_pretrained(d, max_shard_size="60KB")
    assert len(list(d.glob("*.safetensors"))) > 2
    return d


def _lazy_gptq(path, **kw):
    from transformers import AutoConfig

    model = skeleton_from_config(AutoConfig.from_pretrained(path))
    load_outside_blocks(model, path)
    kept = {}
    src = LazySafetensorsBlocks(path, arch_for(model).blocks, sink=lambda i, sd: kept.update({(i, k): v for k, v in sd.items()}))
    return _gptq(model, source=src, **kw), src, kept


def test_lazy_walk_resumes_bit_exact(tmp_path):
    path = _shards(tmp_path)
    ref = _gptq(_deep("llama"))
    d = tmp_path / "walk"
    with _interrupt_after(1):
        _lazy_gptq(path, checkpoint=d)
    ck = WalkCheckpoint(d)
    res, src, kept = _lazy_gptq(path, checkpoint=ck, offload_dir=tmp_path / "off")
    assert ck.resumed_from == 2
    _same_result(ref, res)
    # restored blocks were loaded and released once more: the sink saw every block, one at a time
    assert src.max_live == 1 and {i for i, _ in kept} == set(range(LAYERS))
    # a streamed model is keyed by its shards (names, sizes, mtimes, headers): re-saved shards are another run
    fp = src.fingerprint()
    assert json.loads((d / "progress.json").read_text())["key"]["model"] == fp
    _deep("llama", seed=1).save_pretrained(path, max_shard_size="60KB")
    assert LazySafetensorsBlocks(path, arch_for(_deep("llama")).blocks).fingerprint() != fp


def test_quantize_cli_resumes_and_cleans_up(tiny_tokenizer, tmp_path, capsys):
    d = tmp_path / "tiny"
    _deep("llama").save_pretrained(d, max_shard_size="60KB")
    tiny_tokenizer.save_pretrained(d)
    calib = tmp_path / "calib.txt"
    calib.write_text("the market said shares rose in heavy trading as investors bought bank stocks .\n" * 40)
    common = ["quantize", "--model", str(d), "--spec", "W4-g32", "--method", "gptq", "--calib", str(calib),
              "--nsamples", "4", "--seqlen", "32", "--finetune", "none"]  # the walk's resume (--lazy cannot tune)
    assert main([*common, "--out", str(tmp_path / "ref")]) == 0
    for extra in ([], ["--lazy", "--offload-dir", str(tmp_path / "off")]):
        out = tmp_path / f"out{len(extra)}"
        scratch = tmp_path / f".{out.name}.partial-walk"
        with _interrupt_after(1):
            assert main([*common, *extra, "--out", str(out)]) == 130  # main() turns Ctrl-C into status 130 ...
            raise KeyboardInterrupt  # ... so raise it again for the context manager
        assert not out.exists() and (scratch / "progress.json").is_file()
        capsys.readouterr()
        assert main([*common, *extra, "--out", str(out)]) == 0
        assert "resuming the block walk at block 2 of 4" in capsys.readouterr().out
        assert not scratch.exists() and out.is_dir()
        assert json.loads((out / "mixq.json").read_text())["walk_resumed_at_block"] == 2
        for name in ("quantized.safetensors", "rest.safetensors"):
            with safe_open(tmp_path / "ref" / name, "pt") as a, safe_open(out / name, "pt") as b:
                assert sorted(a.keys()) == sorted(b.keys())
                for k in a.keys():
                    assert torch.equal(a.get_tensor(k), b.get_tensor(k)), (extra, name, k)
    assert not list((tmp_path / "off").iterdir())
    assert not list(tmp_path.glob(".*partial-walk"))
    # --offload-dir is for the GPTQ walk: refused before any work otherwise
    assert main(["quantize", "--model", str(d), "--spec", "W4-g32", "--method", "rtn", "--offload-dir",
                 str(tmp_path / "off"), "--out", str(tmp_path / "x")]) == 2
    assert main(["quantize", "--model", str(d), "--spec", "W4-g32", "--method", "rtn", "--gptq-target", "fp",
                 "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
    # the CLI's fp target: the walk checkpoint carries the fp stream, resumed like the plain one
    out = tmp_path / "fp"
    with _interrupt_after(1):
        assert main([*common, "--gptq-target", "fp", "--out", str(out)]) == 130
        raise KeyboardInterrupt
    with safe_open(tmp_path / ".fp.partial-walk" / "inputs-00002.safetensors", "pt") as f:
        assert sorted(f.keys()) == ["fp_inputs", "inputs"]
    assert main([*common, "--gptq-target", "fp", "--out", str(out)]) == 0
    assert json.loads((out / "mixq.json").read_text())["recipe"]["deviations"].get("gptq_target", "fp") == "fp"


def test_walk_interrupted_after_its_last_block_only_restores(tmp_path):
    """Interrupted once every block is saved (e.g. while writing the output): nothing left to walk."""
    ref_model = _deep("llama")
    ref = _gptq(ref_model, "W4-g64")
    with _interrupt_after(LAYERS - 1):
        _gptq(_deep("llama"), "W4-g64", checkpoint=tmp_path / "walk")
    said, model = [], _deep("llama")
    ck = WalkCheckpoint(tmp_path / "walk", announce=said.append)
    res = _gptq(model, "W4-g64", checkpoint=ck)
    assert ck.resumed_from == LAYERS and f"all {LAYERS} blocks of the walk restored" in said[0]
    _same_result(ref, res)
    _same_weights(ref_model, model)
