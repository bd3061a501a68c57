"""MoE experts in GGUF (issue 16): tied expert specs in the allocator, stacked expert tensors in the file.

* ``Constraints(tie_experts=True)`` (implied by ``target="gguf"``) gives each MoE block's experts of one projection
  one spec, solved as one knapsack item whose cost and error are its members' sums (the same optimum as a problem
  with one merged layer per group);
* a tiny Qwen3-MoE and Mixtral, measured, planned with ``--target gguf``, GPTQ-quantized, saved and exported:
  gguf-py reads ``blk.N.ffn_{gate,up,down}_exps`` of shape ``[n_expert, ...]`` in the plan's ggml type, each
  expert's matrix bit-exact to mixq's dequantized weight, the router ``ffn_gate_inp`` in F32, and the MoE
  metadata llama.cpp reads; transformers' GGUF loader gives the Qwen3-MoE logits of the file's weights (it cannot
  load a Mixtral GGUF, which llama.cpp writes as ``llama`` with experts: that one is checked against a model built
  from the file's tensors);
* the approximate export writes one ggml type per stack; per-expert specs and a Qwen3-MoE llama.cpp would compute
  differently are refused by name.
"""
from __future__ import annotations

import copy
import json

import gguf
import numpy as np
import pytest
import torch
import transformers as tf
from test_moe import _ids, make_moe
from tiny import make_tiny_tokenizer

import mixq
from mixq import api
from mixq.allocate import Budget, Constraints, Problem, allocate, build_problem, solve
from mixq.allocate.table import LayerEntry, SensitivityTable
from mixq.config import parse_spec
from mixq.export.ggml import decode_blocks, encode_blocks
from mixq.export.ggml_exact import ggml_exact_type
from mixq.export.gguf import export_gguf, write_gguf
from mixq.export.gguf_arch import gguf_tensor_name, rope_row_order
from mixq.export.gguf_moe import expert_slot
from mixq.formats import dequantize
from mixq.pipeline import layer_specs

PROJ = ("gate_proj", "up_proj", "down_proj")
EXACT = ["W4-g32", "W5-g32", "W8-g32", "MXFP4"]


# ---------------------------------------------------------------------------- the allocator
def synthetic_table(blocks: int = 2, experts: int = 4, seed: int = 0) -> SensitivityTable:
    rng = np.random.default_rng(seed)
    specs = tuple(parse_spec(n) for n in ("W2-g32", "W4-g32", "W5-g32", "W8-g32"))
    rows = []
    for b in range(blocks):
        rows.append(LayerEntry(f"model.layers.{b}.self_attn.o_proj", (64, 64), specs, (8.0, 2.0, 1.0, 0.1)))
        for e in range(experts):
            for p in PROJ:
                errs = np.sort(rng.uniform(0, 10, len(specs)))[::-1] * (1 + 3 * (e == 0))
                rows.append(LayerEntry(f"model.layers.{b}.mlp.experts.{e}.{p}", (64, 32) if p == "down_proj"
                                       else (32, 64), specs, tuple(float(x) for x in errs)))
    return SensitivityTable(tuple(rows), metric="test")


def test_tie_experts_is_one_item_per_block_and_projection():
    table = synthetic_table()
    assert Constraints(target="gguf").ties_experts and not Constraints().ties_experts
    problem = build_problem(table, Constraints(tie_experts=True))
    groups = sorted(tuple(problem.layers[i] for i in g) for g in problem.groups)
    assert len(groups) == 2 * 3 and all(len(g) == 4 for g in groups)
    assert groups[0] == tuple(f"model.layers.0.mlp.experts.{e}.down_proj" for e in range(4))
    budget = Budget(bpw=4.6).to_bits(table.numel)
    free, tied = (allocate(table, Budget(bpw=4.6), constraints=c)
                  for c in (Constraints(), Constraints(tie_experts=True)))
    for b in range(2):
        for p in PROJ:
            assert len({tied.layers[f"model.layers.{b}.mlp.experts.{e}.{p}"].name for e in range(4)}) == 1
    assert len({s.name for s in free.layers.values()}) > 1 and tied.total_bits <= budget
    assert free.predicted_error <= tied.predicted_error  # a tie only restricts
    assert any(len({free.layers[f"model.layers.{b}.mlp.experts.{e}.{p}"].name for e in range(4)}) > 1
               for b in range(2) for p in PROJ)  # the free plan does use per-expert specs here
    # the tied optimum is that of a problem with one layer per group, costs and errors summed
    items = problem.items()
    merged = Problem(tuple(f"item{k}" for k in range(len(items))),
                     tuple(tuple(sum(problem.costs[i][c] for i in it) for c in range(4)) for it in items),
                     tuple(tuple(sum(problem.errors[i][c] for i in it) for c in range(4)) for it in items))
    assert solve(merged, budget, method="dp").total_error == pytest.approx(tied.predicted_error, rel=1e-9)


def test_tie_experts_merges_with_tied_patterns_and_round_trips():
    table = synthetic_table()
    c = Constraints(tied=(r"experts\.\d+\.down_proj", r"mlp\.experts\.(0|1)\.up_proj"), tie_experts=True)
    groups = build_problem(table, c).groups  # the patterns' groups are inside the experts' ones: merged, no error
    assert sorted(map(len, groups)) == [4] * 6
    assert Constraints.from_dict(c.to_dict()) == c and "tie_experts" not in Constraints().to_dict()
    assert Constraints.from_dict(Constraints(target="gguf").to_dict()).ties_experts
    with pytest.raises(ValueError, match="tie_experts must be True or False"):
        Constraints(tie_experts="yes")
    with pytest.raises(ValueError, match="no candidate spec in common"):  # a forced expert conflicts with its group
        build_problem(table, Constraints(force=((r"experts\.0\.up", "W8-g32"), (r"experts\.1\.up", "W2-g32")),
                                         tie_experts=True))


def test_cli_plan_tie_experts(tmp_path, capsys):
    from mixq.cli import main

    synthetic_table().save(tmp_path / "m.json")
    assert main(["plan", str(tmp_path / "m.json"), "--bpw", "4.6", "--tie-experts", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "plan-4.6bpw.json").read_text())
    assert len({doc["layers"][f"model.layers.1.mlp.experts.{e}.up_proj"]["spec"] for e in range(4)}) == 1
    assert doc["constraints"]["tie_experts"] is True


@pytest.fixture(scope="module")
def measured():
    """A hessian measurement of each tiny MoE over 32-block exact specs (norm_topk_prob: as llama.cpp computes)."""
    out = {}
    for family in ("qwen3_moe", "mixtral"):
        model = make_moe(family, norm_topk_prob=True)
        out[family] = mixq.measure(model, _ids(8, 32), metric="hessian", candidates=EXACT, progress=False)
    return out


def test_target_gguf_plan_of_a_moe_measurement_ties_each_projection(measured):
    table = measured["mixtral"]
    plan = mixq.plan(table, bpw=5.5, constraints=Constraints(target="gguf"))
    free = mixq.plan(table, bpw=5.5)
    for b in range(2):
        for p in PROJ:
            assert len({plan.layers[f"model.layers.{b}.mlp.experts.{e}.{p}"].name for e in range(4)}) == 1
    assert len({s.name for s in plan.layers.values()}) > 1 and plan.achieved_bpw <= 5.5
    assert free.predicted_error <= plan.predicted_error and plan.constraints.target == "gguf"


# ---------------------------------------------------------------------------- the file
def from_gguf(path, like: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``like`` (experts exposed) whose weights are the file's tensors dequantized by gguf-py: expert ``e``
    from row block ``e`` of its stack, the router from ``ffn_gate_inp``, q/k rows back from llama's rope order."""
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    llama = reader.fields["general.architecture"].contents() == "llama"
    ref = copy.deepcopy(like)
    with torch.no_grad():
        for hf, p in ref.state_dict().items():
            slot = expert_slot(hf)
            t = tensors[slot[0] if slot else gguf_tensor_name(hf)]
            w = np.array(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
            w = w[slot[1]] if slot else w.reshape(p.shape)
            if llama and (".q_proj" in hf or ".k_proj" in hf):
                heads = like.config.num_attention_heads if ".q_proj" in hf else like.config.num_key_value_heads
                w = w[np.argsort(rope_row_order(p.shape[0], heads))]
            p.copy_(torch.from_numpy(w))
    return ref


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_target_gguf_moe_exports_stacked_experts_exactly(family, measured, tmp_path):
    model, ids = make_moe(family, norm_topk_prob=True), _ids(8, 32)
    plan = mixq.plan(measured[family], bpw=5.5, constraints=Constraints(target="gguf"))
    res = mixq.quantize(model, plan=plan, method="gptq", calib=ids, target="gguf", progress=False)
    d = tmp_path / "q"
    mixq.save_quantized(d, model, make_tiny_tokenizer(), res)
    rep = export_gguf(d, tmp_path / "m.gguf", progress=False)
    arch = "qwen3moe" if family == "qwen3_moe" else "llama"
    assert rep["exact"] and rep["architecture"] == arch and rep["verification"]["ok"]
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    tensors, fields = {t.name: t for t in reader.tensors}, reader.fields
    assert fields[f"{arch}.expert_count"].contents() == 4 and fields[f"{arch}.expert_used_count"].contents() == 2
    ff = 32  # the experts' width: qwen3moe's expert_feed_forward_length, llama's feed_forward_length (Mixtral)
    assert fields[f"{arch}.expert_feed_forward_length" if arch == "qwen3moe" else f"{arch}.feed_forward_length"
                  ].contents() == ff
    assert not any(".experts." in n or "ffn_gate." in n or "ffn_up." in n or "ffn_down." in n for n in tensors)
    for b in range(2):
        router = tensors[f"blk.{b}.ffn_gate_inp.weight"]
        assert router.tensor_type.name == "F32" and [int(x) for x in router.shape] == [64, 4]  # ggml ne {embd, exp}
        assert np.array_equal(np.asarray(router.data).reshape(4, 64),
                              model.get_submodule(f"model.layers.{b}.mlp.gate").weight.detach().numpy())
        for p, stack in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"), ("down_proj", "ffn_down_exps")):
            t = tensors[f"blk.{b}.{stack}.weight"]
            fqns = [f"model.layers.{b}.mlp.experts.{e}.{p}" for e in range(4)]
            shape = (4, 64, ff) if p == "down_proj" else (4, ff, 64)
            assert [int(x) for x in t.shape] == list(reversed(shape))  # ggml ne {n_embd, n_ff, n_expert} for gate/up
            assert t.tensor_type.name == ggml_exact_type(plan.layers[fqns[0]], shape[1:])
            got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
            for e, f in enumerate(fqns):
                assert np.array_equal(got[e], dequantize(res.qtensors[f]).float().numpy()), f
    row = next(r for r in rep["tensors"] if r["name"] == "blk.1.ffn_down_exps.weight")
    assert row["experts"] == 4 and row["exact"] and row["spec"] == plan.layers[fqns[0]].name
    ref = from_gguf(tmp_path / "m.gguf", model)
    with torch.no_grad():
        want, mine = ref(ids).logits, model(ids).logits
    assert (want - mine).abs().max() < 0.05  # only the F16 embeddings differ from mixq's model
    if family == "qwen3_moe":  # transformers 5.23 does not read expert_feed_forward_length: passed from the file
        hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32,
                                                     moe_intermediate_size=ff).eval()
        assert hf.config.norm_topk_prob and hf.config.num_experts == 4
        with torch.no_grad():
            torch.testing.assert_close(hf(ids).logits, want, atol=1e-5, rtol=1e-5)


def test_approximate_export_writes_one_type_per_stack(tmp_path):
    model = make_moe("mixtral", norm_topk_prob=True)
    res = mixq.quantize(model, "NF4-g32", progress=False)  # no ggml grid: fit, one type for all experts' rows
    specs = {f: q.spec for f, q in res.qtensors.items()}
    rep = write_gguf(model, None, specs, tmp_path / "m.gguf", qtensors=res.qtensors)
    stacks = [r for r in rep["tensors"] if r.get("experts")]
    assert len(stacks) == 6 and all("one type for the rows of all 4 experts" in r["choice"] for r in stacks)
    t = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}["blk.0.ffn_up_exps.weight"]
    xs = [dequantize(res.qtensors[f"model.layers.0.mlp.experts.{e}.up_proj"]).float().numpy() for e in range(4)]
    for e, x in enumerate(xs):  # the stack is each expert's own fit in that type
        data = np.asarray(t.data).reshape(4, 32, -1)[e]
        assert np.array_equal(data, encode_blocks(t.tensor_type, x))
        assert np.abs(decode_blocks(t.tensor_type, data) - x).max() < 0.1 * np.abs(x).max()
    plain = make_moe("qwen3_moe", norm_topk_prob=True)  # stacked experts, nothing quantized: F16 stacks
    rep = write_gguf(plain, None, {}, tmp_path / "f.gguf")
    assert {r["ggml_type"] for r in rep["tensors"] if r.get("experts")} == {"F16"}


def test_per_expert_specs_and_unfaithful_configs_are_refused(tmp_path, capsys):
    model = make_moe("mixtral", norm_topk_prob=True)
    specs = {r.fqn: parse_spec("W8-g32" if ".experts.1.down" in r.fqn else "W4-g32") for r in api.iter_layers(model)}
    res = mixq.quantize(model, specs, progress=False)
    d = tmp_path / "q"
    mixq.save_quantized(d, model, make_tiny_tokenizer(), res)
    with pytest.raises(ValueError, match=r"GGUF: the experts of 2 MoE projection\(s\) carry different specs "
                                         r"\(model\.layers\.0\.mlp\.experts\.\*\.down_proj: 0=W4-g32, 1=W8-g32.*"
                                         r"re-plan with --target gguf"):
        export_gguf(d, tmp_path / "m.gguf", progress=False)
    from mixq.cli import main

    assert main(["export", str(d), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixq: error: cannot export to GGUF: the experts of 2") and err.count("\n") == 1, err
    assert not (tmp_path / "m.gguf").exists()
    with pytest.raises(ValueError, match="--target gguf: the experts of 2"):
        layer_specs(make_moe("mixtral"), specs, target="gguf")
    loose = make_moe("qwen3_moe")  # transformers' default norm_topk_prob=False: llama.cpp would renormalise
    with pytest.raises(ValueError, match="norm_topk_prob is false"):
        write_gguf(loose, None, {}, tmp_path / "n.gguf")
    assert not (tmp_path / "n.gguf").exists()
