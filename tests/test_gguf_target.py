"""The ``gguf`` runtime target (issue 15 item 1): plans whose every layer a ggml type holds exactly.

* under ``Constraints(target="gguf")`` every layer keeps only specs with an exact ggml type for its row length;
* a ``--target gguf`` plan records the target; a budget it cannot meet names the minimum;
* the exact GGUF export of such a plan decodes (``gguf.quants.dequantize``) to mixq's dequantized weights bit
  for bit, for every ggml type mixq writes (Q8_0, Q5_0, Q4_0, Q5_1, Q4_1, MXFP4, F16 here; the K-quants and
  IQ4_NL in ``test_gguf_kquants.py``), after RTN and GPTQ;
* the exact export refuses a spec no ggml type holds (no re-quantization, no fallback).
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from tiny import make_tiny, make_tiny_tokenizer

from mixq import api
from mixq.allocate import Budget, Constraints, InfeasibleBudget, Plan, allocate, budget_range, build_problem
from mixq.allocate import candidates_for, default_candidates, shape_table
from mixq.allocate.table import LayerEntry, SensitivityTable
from mixq.config import parse_spec
from mixq.export.ggml_exact import GGUF_CANDIDATE_NAMES, ggml_exact_type
from mixq.export.gguf import export_gguf, write_gguf
from mixq.export.gguf_arch import gguf_tensor_name, rope_row_order
from mixq.export.native_write import save_quantized
from mixq.export.runtime_targets import target_candidates
from mixq.formats import dequantize

SMOLLM2_SHAPES = {"q": (576, 576), "k": (192, 576), "up": (1536, 576), "down": (576, 1536)}
TYPE_OF = {"W8-g32": "Q8_0", "W5-g32": "Q5_0", "W4-g32": "Q4_0", "W5-g32-asymf": "Q5_1", "W4-g32-asymf": "Q4_1",
           "MXFP4": "MXFP4", "FP16": "F16"}


def _table(shapes: dict[str, tuple[int, int]], names) -> SensitivityTable:
    rows = []
    for f, shape in shapes.items():
        specs = candidates_for(shape, [parse_spec(n) for n in names])
        rows.append(LayerEntry(f, shape, tuple(specs), tuple(float(i + 1) / c.bits for i, c in enumerate(specs))))
    return SensitivityTable(tuple(rows), metric="test")


# ---------------------------------------------------------------------------- allocation
def test_exact_table_costs_are_the_ggml_sizes():
    for name, tname in TYPE_OF.items():
        spec = parse_spec(name)
        assert ggml_exact_type(spec, (8, 576)) == tname
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[tname]]
        assert spec.bpw((8, 576)) == size * 8 / block  # the plan's size is the file's
    assert ggml_exact_type(parse_spec("W4-g32-mse"), (8, 576)) == "Q4_0"  # another way to pick the same grid
    for name in ("W4-g64", "W4-g32-asym", "NF4-g64", "W3-g64", "W4-g32+ip", "NVFP4", "W8-channel"):
        assert ggml_exact_type(parse_spec(name), (8, 576)) is None, name
    assert ggml_exact_type(parse_spec("W4-g32"), (8, 48)) is None  # 48 is no multiple of the 32-block


def test_target_keeps_only_exact_candidates_per_layer():
    names = [s.name for s in default_candidates()] + ["W4-g32-asymf", "W5-g32-asymf", "W8-g32", "MXFP4"]
    table = _table(SMOLLM2_SHAPES, names)
    problem = build_problem(table, Constraints(target="gguf"))
    for fqn, labels in zip(problem.layers, problem.labels):
        shape = SMOLLM2_SHAPES[fqn]
        assert labels and all(ggml_exact_type(parse_spec(n), shape) for n in labels)
        assert set(labels) == {n for n in names if ggml_exact_type(parse_spec(n), shape)}
    with pytest.raises(ValueError, match="held exactly by the gguf runtime"):
        build_problem(_table(SMOLLM2_SHAPES, ["W4-g64", "NF4-g64"]), Constraints(target="gguf"))
    with pytest.raises(ValueError, match="target"):
        Constraints(target="onnx")


def test_plan_records_the_target_and_round_trips(tmp_path):
    table = _table(SMOLLM2_SHAPES, GGUF_CANDIDATE_NAMES)
    plan = allocate(table, Budget(bpw=5.0), constraints=Constraints(target="gguf"))
    assert plan.constraints.target == "gguf" and plan.to_dict()["constraints"]["target"] == "gguf"
    assert all(ggml_exact_type(s, SMOLLM2_SHAPES[f]) for f, s in plan.layers.items())
    plan.save(tmp_path / "p.json")
    assert Plan.load(tmp_path / "p.json").constraints.target == "gguf"
    assert Constraints.from_dict(Constraints().to_dict()).target is None


def test_infeasible_budget_under_target_names_the_minimum():
    costs = shape_table(SMOLLM2_SHAPES, target_candidates("gguf"))
    rng = budget_range(costs, Constraints(target="gguf"))
    # down (1536-wide rows) takes Q2_K (2.625), the 576-wide layers MXFP4 (4.25), the cheapest 32-block type
    assert rng.min_bpw == 3.6
    with pytest.raises(InfeasibleBudget, match=r"at least bpw=3\.6000") as e:
        rng.check(Budget(bpw=3.5))
    assert e.value.min_bpw == 3.6
    rng.check(Budget(bpw=3.6))


def test_cli_plan_target_gguf(tmp_path, capsys):
    from mixq.cli import main

    table = _table(SMOLLM2_SHAPES, [s.name for s in default_candidates()] + ["MXFP4", "W8-g32"])
    table.save(tmp_path / "m.json")
    assert main(["plan", str(tmp_path / "m.json"), "--bpw", "5", "--target", "gguf", "--out", str(tmp_path / "p")]) == 0
    plan = Plan.load(tmp_path / "p" / "plan-5bpw.json")
    assert plan.constraints.target == "gguf"
    assert all(ggml_exact_type(s, SMOLLM2_SHAPES[f]) for f, s in plan.layers.items())
    rc = main(["plan", str(tmp_path / "m.json"), "--bpw", "3", "--target", "gguf", "--dry-run"])
    assert rc != 0
    assert "bpw=4.2500" in capsys.readouterr().err  # no K-quant measured here: MXFP4 everywhere is the least


# ---------------------------------------------------------------------------- exact export
def _specs_covering_every_type(model) -> dict:
    """Each layer of the tiny llama one exact spec, rotating so every type appears (rows: 64 and 128 wide)."""
    names = list(TYPE_OF)
    layers = [r.fqn for r in api.iter_layers(model)]
    return {fqn: parse_spec(names[i % len(names)]) for i, fqn in enumerate(layers)}


def _check_bit_exact(path, model, qtensors, specs) -> set[str]:
    """Every block linear of the file decodes (gguf-py) to mixq's dequantized weight exactly; returns the types."""
    reader = gguf.GGUFReader(path)
    by_name = {t.name: t for t in reader.tensors}
    cfg = model.config
    seen = set()
    for fqn, spec in specs.items():
        t = by_name[gguf_tensor_name(fqn + ".weight")]
        assert t.tensor_type.name == TYPE_OF[spec.name], (fqn, spec.name, t.tensor_type.name)
        want = dequantize(qtensors[fqn]).float().numpy()
        if ".q_proj" in fqn or ".k_proj" in fqn:
            heads = cfg.num_attention_heads if ".q_proj" in fqn else cfg.num_key_value_heads
            want = want[rope_row_order(want.shape[0], heads)]
        got = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(want.shape)
        assert np.array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32)) or \
            np.array_equal(got, want), (fqn, spec.name, float(np.abs(got - want).max()))
        seen.add(t.tensor_type.name)
    return seen


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_exact_export_is_bit_exact_for_every_type(tmp_path, method):
    model = make_tiny("llama", seed=3)
    specs = _specs_covering_every_type(model)
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0)) if method == "gptq" else None
    res = api.quantize_model(model, specs, method=method, calib_ids=calib, progress=False)
    rep = write_gguf(model, make_tiny_tokenizer(), specs, tmp_path / "m.gguf", qtensors=res.qtensors, exact=True)
    assert _check_bit_exact(tmp_path / "m.gguf", model, res.qtensors, specs) == set(TYPE_OF.values())
    assert rep["totals"]["fallbacks"] == 0
    lin = [r for r in rep["tensors"] if r["spec"]]
    assert all(r["exact"] and r["ggml_bpw"] == r["mixq_bpw"] for r in lin)


def test_native_directory_of_a_target_plan_exports_exactly(tmp_path):
    model = make_tiny("llama", seed=4)
    specs = _specs_covering_every_type(model)
    res = api.quantize_model(model, specs, progress=False)
    src = save_quantized(tmp_path / "q", model, make_tiny_tokenizer(), res.qtensors,
                         {"base_model": "tiny", "method": "rtn", "target": "gguf"})
    rep = export_gguf(src, tmp_path / "m.gguf", progress=False)
    assert rep["exact"] is True
    assert _check_bit_exact(tmp_path / "m.gguf", model, res.qtensors, specs) == set(TYPE_OF.values())


def test_exact_export_refuses_specs_without_an_exact_type(tmp_path):
    model = make_tiny("llama", seed=5)
    specs = api.resolve_specs(model, "W4-g64")
    res = api.quantize_model(model, specs, progress=False)
    with pytest.raises(ValueError, match="no ggml type holds W4-g64 exactly"):
        write_gguf(model, make_tiny_tokenizer(), specs, tmp_path / "m.gguf", qtensors=res.qtensors, exact=True)
    assert not (tmp_path / "m.gguf").exists()
