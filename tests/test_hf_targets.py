"""The ``gptq`` and ``compressed-tensors`` runtime targets (issue 15 item 1; mixq.export.hf_exact / runtime_targets):
a plan under either only takes specs the export writes exactly for each layer's shape, records the target, and
its directory exports with every layer exact (the exporters re-read what they wrote)."""
from __future__ import annotations

import importlib.util

import pytest
from tiny import make_tiny, make_tiny_tokenizer

from mixq import api
from mixq.allocate import Budget, Constraints, Plan, allocate, build_problem, candidates_for
from mixq.allocate.table import LayerEntry, SensitivityTable
from mixq.config import parse_spec
from mixq.export.hf import export_compressed_tensors, export_gptq
from mixq.export.native_write import save_quantized
from mixq.export.runtime_targets import TARGETS, get, holds_exactly, target_candidates

SMOLLM2_SHAPES = {"q": (576, 576), "k": (192, 576), "up": (1536, 576), "down": (576, 1536)}


def _table(shapes, names) -> SensitivityTable:
    """Errors like a real table's: 4^-bits, larger for later layers."""
    rows = []
    for i, (f, shape) in enumerate(shapes.items()):
        specs = candidates_for(shape, [parse_spec(n) for n in names])
        rows.append(LayerEntry(f, shape, tuple(specs), tuple((i + 1) * 4.0 ** -min(c.bits, 12) for c in specs)))
    return SensitivityTable(tuple(rows), metric="test")


@pytest.mark.parametrize("name,shape,gptq,ct", [
    ("W4-g64", (576, 576), True, True),
    ("W4-g128", (576, 576), False, False),      # 128 does not divide the 576-wide row
    ("W4-g128", (576, 1536), True, True),
    ("W3-channel", (576, 576), True, True),
    ("W4-g64-asym", (576, 576), False, False),  # symmetric only (module doc of mixq.export.hf_exact)
    ("W4-g64-asymf", (576, 576), False, False),
    ("W5-g64", (576, 576), False, True),        # GPTQ loaders take 2, 3, 4, 8 bits
    ("W3-g32", (20, 64), False, True),          # 20 rows x 3 bits is not whole 32-bit words
    ("NF4-g64", (576, 576), False, False),
    ("MXFP4", (576, 576), False, False),
    ("Q4_K", (576, 1536), False, False),
    ("TCQ3-channel+ip1", (576, 576), False, False),
    ("FP16", (576, 576), True, True),
])
def test_what_each_target_holds(name, shape, gptq, ct):
    spec = parse_spec(name)
    assert holds_exactly("gptq", spec, shape) is gptq
    assert holds_exactly("compressed-tensors", spec, shape) is ct


def test_registry_and_default_candidates():
    assert set(TARGETS) == {"gguf", "gptq", "compressed-tensors"}
    for t in TARGETS:
        cands = target_candidates(t)
        assert cands and any(s.is_float_keep for s in cands)
        assert get(t).summary
        # every default candidate is held on some SmolLM2 shape
        assert all(any(holds_exactly(t, s, sh) for sh in SMOLLM2_SHAPES.values()) for s in cands), t
    with pytest.raises(ValueError, match="unknown runtime target 'onnx'"):
        holds_exactly("onnx", parse_spec("W4-g64"), (8, 64))


@pytest.mark.parametrize("target", ["gptq", "compressed-tensors"])
def test_plan_under_target_keeps_only_exact_specs(target):
    names = ["W4-g64", "W4-g64-asym", "NF4-g64", "W5-g64", "W3-g64", "W8-channel", "TCQ3-channel+ip1", "FP16"]
    problem = build_problem(_table(SMOLLM2_SHAPES, names), Constraints(target=target))
    for fqn, labels in zip(problem.layers, problem.labels):
        assert set(labels) == {n for n in names if holds_exactly(target, parse_spec(n), SMOLLM2_SHAPES[fqn])}
    with pytest.raises(ValueError, match=f"held exactly by the {target} runtime"):
        build_problem(_table(SMOLLM2_SHAPES, ["NF4-g64", "W4-g64-asym"]), Constraints(target=target))


@pytest.mark.parametrize("target,export", [("gptq", export_gptq), ("compressed-tensors", export_compressed_tensors)])
def test_target_plan_exports_exactly(target, export, tmp_path):
    if target == "compressed-tensors" and importlib.util.find_spec("compressed_tensors") is None:
        pytest.skip("compressed-tensors not installed")
    model = make_tiny("llama", seed=7)
    shapes = {r.fqn: tuple(r.shape) for r in api.iter_layers(model)}
    names = [n for n in target_candidates(target) if not parse_spec(n).is_float_keep] + ["W4-g64-asym", "NF4-g64"]
    table = _table(shapes, names)
    plan = allocate(table, Budget(bpw=3.5), constraints=Constraints(target=target))
    assert plan.constraints.target == target
    assert all(holds_exactly(target, s, shapes[f]) for f, s in plan.layers.items())
    assert len({s.name for s in plan.layers.values()}) > 1  # a mixed plan
    plan.save(tmp_path / "p.json")
    assert Plan.load(tmp_path / "p.json").constraints.target == target
    res = api.quantize_model(model, dict(plan.layers), method="rtn", progress=False)
    src = save_quantized(tmp_path / "q", model, make_tiny_tokenizer(), res.qtensors,
                         {"base_model": "tiny", "method": "rtn", "target": target})
    rep = export(src, tmp_path / "out")
    assert rep["layers"] and all(v["max_abs_diff"] == 0 for v in rep["layers"].values()), rep["layers"]
