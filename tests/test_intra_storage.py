"""Intra-tensor composites in the native directory: exact bytes, round trips, packed layers, refusals."""
from __future__ import annotations

import copy
import math
import json

import pytest
import torch
from safetensors.torch import load_file

from mixq import api
from mixq.cli import main
from mixq.config import is_composite, parse_spec
from mixq.export.native import (
    CheckpointError,
    composite_layers,
    load_quantized,
    read_info,
    read_packed,
    read_qtensors,
)
from mixq.export.native_write import rewrite_native, save_quantized
from mixq.algorithms.composite.storage import PackedComposite
from mixq.runtime.composite_linear import CompositeLinear
from mixq.runtime import QuantLinear, kernel_usage, memory_report

# one spec per layer of the tiny llama (2 blocks x 7 linears): every composite family, a few plain specs
SPECS = ["W3-g32+o0.5", "W3-g16+sq3", "SLIM3-g32", "KM3+o0.45", "W3-g32+c4", "W3-g32+h10", "NF3-g32+d4",
         "BIN-g32+r8+o1w8", "BIN-g64+o2", "W3-g16-asym+sq3+o0.25", "W4-g32", "BIN-g32", "W2-g32-asym+h10w4",
         "NF4-g32"]
IDS = torch.randint(4, 99, (2, 12), generator=torch.Generator().manual_seed(0))


def _quantized(tiny_model, method="rtn"):
    model = tiny_model("llama")
    fqns = list(api.resolve_specs(model, "W4-g32"))
    specs = {f: parse_spec(SPECS[i % len(SPECS)]) for i, f in enumerate(fqns)}
    res = api.quantize_model(model, specs, method=method, calib_ids=IDS if method == "gptq" else None, progress=False)
    return model, res.qtensors, specs


def _save(tmp_path, tok, model, qtensors, name="q"):
    return save_quantized(tmp_path / name, model, tok, qtensors, {"base_model": "tiny", "method": "rtn"})


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_composites_save_and_load_exactly(tiny_model, tiny_tokenizer, tmp_path, method):
    model, qtensors, specs = _quantized(tiny_model, method)
    ref = _logits(model)
    d = _save(tmp_path, tiny_tokenizer, model, qtensors)
    info = read_info(d)
    comp = sorted(f for f, s in specs.items() if is_composite(s))
    assert composite_layers(info) == comp and len(comp) == 12
    for f in comp:
        assert info["layers"][f]["kind"] == "composite" and parse_spec(info["layers"][f]["spec"]) == specs[f]
    fake, _, _ = load_quantized(d)
    assert torch.equal(_logits(fake), ref)
    _, parts, _ = read_qtensors(d)
    for f, q in qtensors.items():
        if is_composite(specs[f]):
            assert type(parts[f]) is type(q) and torch.equal(parts[f].dequantize(), q.dequantize()), f

    packed, _, _ = load_quantized(d, packed=True)
    mods = dict(packed.named_modules())
    for f, s in specs.items():
        assert isinstance(mods[f], CompositeLinear if is_composite(s) else QuantLinear), f
    names = {n for n, _ in packed.named_parameters()}
    assert not any(f"{f}.weight" in names for f in specs)  # no float copy of a quantized weight
    assert torch.allclose(_logits(packed), ref, atol=1e-5, rtol=1e-5)
    assert all(mods[f].last_kernel == "composite-reference" for f in comp)
    # bf16 activations: the buffers keep their bits, the output tracks the fp32 model
    pb, _, _ = load_quantized(d, packed=True, dtype=torch.bfloat16)
    for f in comp:
        assert torch.equal(pb.get_submodule(f).packed.dequantize(), qtensors[f].dequantize())
    y = _logits(pb)
    assert (y - ref).abs().max() < 0.05 * ref.abs().max() + 0.05
    assert torch.equal(_logits(copy.deepcopy(pb)), y)


def test_bytes_on_disk_are_the_composite_cost(tiny_model, tiny_tokenizer, tmp_path):
    model, qtensors, specs = _quantized(tiny_model)
    d = _save(tmp_path, tiny_tokenizer, model, qtensors)
    info = read_info(d)
    stored = load_file(d / "quantized.safetensors")
    st = info["storage"]
    spec_bits = sum(s.cost(tuple(qtensors[f].shape)).total for f, s in specs.items())
    assert st["bits_quantized_spec"] == spec_bits == api.size_report(model, specs)["bits_quantized"]
    assert st["bytes_quantized_on_disk"] == sum(t.numel() * t.element_size() for t in stored.values())
    assert st["quantized_tensors"] == len(stored)
    for f, layer in info["layers"].items():
        parts = {n: stored[f"{f}.{n}"] for n in layer["tensors"]}
        nbytes = sum(t.numel() * t.element_size() for t in parts.values())
        assert layer["bytes"] == nbytes and layer["bits_spec"] == specs[f].cost(tuple(layer["shape"])).total
        assert 0 <= nbytes * 8 - layer["bits_spec"] < 8 * len(parts), f  # only each part's last-byte padding
    # e.g. the SpQR layer: 3-bit codes, 3-bit second-level scales, fp16 stats per 16 rows
    f = next(f for f, s in specs.items() if s.name == "W3-g16+sq3")
    R, C = qtensors[f].shape
    assert stored[f"{f}.codes.b3"].numel() == -(-R * C * 3 // 8)
    assert stored[f"{f}.l2.scale.codes"].numel() == R * C // 16 * 3 // 8
    f = next(f for f, s in specs.items() if s.name == "BIN-g32+r8+o1w8")
    R, C = qtensors[f].shape
    assert stored[f"{f}.codes"].numel() == R * (C - 8) // 8 and stored[f"{f}.res_codes"].numel() == 2 * R * 8 // 8
    assert stored[f"{f}.csr.codes"].dtype == torch.uint8 and stored[f"{f}.csr.codes"].numel() == R * C // 100
    # the packed model holds the packed parts, not float weights
    packed, _, _ = load_quantized(d, packed=True)
    held = sum(m.nbytes for m in packed.modules() if isinstance(m, (CompositeLinear, QuantLinear)))
    mem = memory_report(packed)
    assert held == st["bytes_quantized_on_disk"] == mem["packed_weights"] and mem["quant_linears"] == len(specs)
    _logits(packed)
    assert kernel_usage(packed)["composite-reference"] == 12


def test_tampering_and_mismatched_entries_are_caught(tiny_model, tiny_tokenizer, tmp_path, capsys):
    model, qtensors, specs = _quantized(tiny_model)
    d = _save(tmp_path, tiny_tokenizer, model, qtensors)
    f = d / "quantized.safetensors"
    good = f.read_bytes()
    bad = bytearray(good)
    bad[-7] ^= 0x10
    f.write_bytes(bytes(bad))
    with pytest.raises(CheckpointError, match=r"quantized\.safetensors is damaged or was modified"):
        load_quantized(d)
    f.write_bytes(good)
    doc = json.loads((d / "mixq.json").read_text())
    fqn = next(k for k, v in doc["layers"].items() if v.get("kind") == "composite" and v["spec"]["outliers"])
    edited = copy.deepcopy(doc)
    edited["layers"][fqn]["spec"]["outliers"] *= 2  # the spec no longer matches the stored parts
    (d / "mixq.json").write_text(json.dumps(edited))
    with pytest.raises(CheckpointError, match=f"{fqn} does not match its spec"):
        read_packed(d)
    rc = main(["eval", str(d), "--tokens", "8"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("mixq: error:") and err.count("\n") == 1 and fqn in err
    edited = copy.deepcopy(doc)
    edited["layers"][fqn].pop("kind")
    (d / "mixq.json").write_text(json.dumps(edited))
    with pytest.raises(CheckpointError, match=f"{fqn} has a bad entry.*kind and spec disagree"):
        read_packed(d)
    edited = copy.deepcopy(doc)
    name = next(iter(edited["layers"][fqn]["tensors"]))
    edited["layers"][fqn]["tensors"][f"{name}.x"] = edited["layers"][fqn]["tensors"].pop(name)
    (d / "mixq.json").write_text(json.dumps(edited))
    with pytest.raises(CheckpointError, match="missing tensors"):
        read_packed(d)
    (d / "mixq.json").write_text(json.dumps(doc))
    assert set(read_packed(d)[1]) == set(specs)


def test_rewrite_native_keeps_composites(tiny_model, tiny_tokenizer, tmp_path):
    model, qtensors, _ = _quantized(tiny_model)
    d = _save(tmp_path, tiny_tokenizer, model, qtensors)
    rep = rewrite_native(d, tmp_path / "again")
    assert rep["padding_bits"] == read_info(d)["storage"]["padding_bits"]
    a, b = read_packed(d)[1], read_packed(tmp_path / "again")[1]
    for f, pw in a.items():
        assert type(pw) is type(b[f])
        for n, t in pw.tensors().items():
            assert torch.equal(t, b[f].tensors()[n]), (f, n)
    assert isinstance(next(iter(v for v in b.values() if isinstance(v, PackedComposite))), PackedComposite)


def test_exporters_refuse_composites_in_one_line(tiny_model, tiny_tokenizer, tmp_path, capsys):
    from mixq.export.gguf import export_gguf, write_gguf
    from mixq.export.hf import ExportError, export_compressed_tensors, export_gptq

    model, qtensors, specs = _quantized(tiny_model)
    d = _save(tmp_path, tiny_tokenizer, model, qtensors)
    first = sorted(f for f, s in specs.items() if is_composite(s))[0]
    with pytest.raises(ValueError, match=r"cannot export to GGUF: 12 layer\(s\) use intra-tensor composite specs"):
        export_gguf(d, tmp_path / "m.gguf")
    with pytest.raises(ValueError, match="GGUF.*composite"):
        write_gguf(model, tiny_tokenizer, specs, tmp_path / "m2.gguf")
    for fn, fmt in ((export_compressed_tensors, "compressed-tensors"), (export_gptq, "gptq")):
        with pytest.raises(ExportError, match=f"cannot export to {fmt}.*{first}"):
            fn(d, tmp_path / fmt)
    for fmt in ("gguf", "gptq", "compressed-tensors"):
        out = tmp_path / f"cli-{fmt}"
        rc = main(["export", str(d), "--format", fmt, "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and "intra-tensor composite" in err and first in err, err
        assert not out.exists()
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "m2.gguf").exists()
    # a plain directory still exports (the refusal is about composites only)
    plain = api.quantize_model(tiny_model("llama"), api.resolve_specs(model, "W4-g32"), progress=False)
    assert not composite_layers({"layers": {f: {"spec": q.spec.to_dict()} for f, q in plain.qtensors.items()}})


def test_quantize_cli_writes_a_plan_with_composites(tmp_path, tiny_model, tiny_tokenizer, capsys):
    from mixq.allocate import Budget, allocate
    from mixq.measure import measure

    model = tiny_model("llama")
    src = tmp_path / "m"
    model.save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    cands = [parse_spec("W4-g32"), parse_spec("W3-g32+o0.5"), parse_spec("BIN-g32+r8+o1w8")]
    table = measure(model, IDS, cands, metric="hessian", progress=False)
    plan = allocate(table, Budget(bpw=3.2))
    assert {s.name for s in plan.layers.values()} & {"W3-g32+o0.5", "BIN-g32+r8+o1w8"}
    plan.save(tmp_path / "p.json")
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(src), "--plan", str(tmp_path / "p.json"), "--method", "rtn",
                 "--out", str(out)]) == 0
    info = read_info(out)
    assert info["storage"]["bits_quantized_spec"] == plan.total_bits
    assert composite_layers(info) == sorted(f for f, s in plan.layers.items() if is_composite(s))
    ref = copy.deepcopy(model)
    api.quantize_model(ref, dict(plan.layers), progress=False)
    fake, _, _ = load_quantized(out)
    assert torch.equal(_logits(fake), _logits(ref))


@pytest.mark.parametrize("name", ["W3-g64+o0.5", "SLIM3-g64", "NF3-g64+d4", "W3-g16+sq3", "W3-g64+c8", "KM3+o0.45",
                                  "W3-g64+h5", "W2-g64-asym+h10", "VQ3-channel+ip", "TCQ3-channel+ip",
                                  "W3-g64+ip", "W4-g64"])
def test_stored_tensors_are_set_by_the_spec_and_shape_and_sum_to_the_cost(name):
    """What a weight stores (names, dtypes, shapes) under a spec, for a shape, independent of the weight's values; the
    bits are the spec's cost up to one byte of padding per tensor."""
    from mixq.algorithms.composite.hooks import quantize_layer, stored_tensors
    from mixq.algorithms.composite.families import pack_parts

    spec, shape = parse_spec(name), (128, 256)
    layout = stored_tensors(spec, shape)
    bits = sum(torch.tensor([], dtype=d).element_size() * 8 * math.prod(s) for d, s in layout.values())
    cost = spec.cost(shape).total
    assert cost <= bits <= cost + 8 * len(layout), (bits, cost, layout)
    W = 3 * torch.randn(shape, generator=torch.Generator().manual_seed(7)) ** 3  # heavy tails: other outliers
    other = pack_parts(quantize_layer(W, spec, None, "rtn")[0])
    assert {k: (v.dtype, tuple(v.shape)) for k, v in other.items()} == layout
