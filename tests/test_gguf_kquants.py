"""llama.cpp's K-quants (Q2_K ... Q6_K) and IQ4_NL as exact mixq specs under ``--target gguf``.

* each spec costs exactly its ggml type's size, and is held exactly only on rows its block fits (256 / 32); of the
  composite extensions only +ip applies to them;
* RTN and GPTQ choose codes and two-level scales inside the type: the stored form is exactly the counted bits,
  and the exact GGUF export decodes (``gguf.quants.dequantize``) to mixq's dequantized weight bit for bit, from
  memory and from a native directory;
* GPTQ weighs the super-block scale fit by diag(H) and beats RTN on the layer's proxy loss;
* a ``--target gguf`` plan below MXFP4's 4.25 bpw is feasible (K-quants on the 256-wide rows) and exports.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import transformers as tf
from tiny import make_tiny_tokenizer

from mixq import api
from mixq.algorithms.gptq import gptq_quantize
from mixq.allocate import Budget, Constraints, allocate, budget_range, candidates_for, shape_table
from mixq.allocate.table import LayerEntry, SensitivityTable
from mixq.config import parse_spec
from mixq.export.ggml_exact import GGUF_CANDIDATE_NAMES, ggml_exact_type
from mixq.export.gguf import export_gguf, write_gguf
from mixq.export.gguf_arch import gguf_tensor_name, rope_row_order
from mixq.export.native_write import save_quantized
from mixq.export.runtime_targets import target_candidates
from mixq.formats import dequantize, quantize
from mixq.formats.bitpack import PackedWeight

NEW = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL")
BPW = {"Q2_K": 2.625, "Q3_K": 3.4375, "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625, "IQ4_NL": 4.5}


def _llama(hidden: int, inter: int, seed: int) -> tf.PreTrainedModel:
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=inter, max_position_embeddings=64)
    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(cfg).to(torch.float32).eval()


def _check_bit_exact(path, model, qtensors, specs) -> set[str]:
    """Every quantized layer of the file decodes (gguf-py) to mixq's dequantized weight exactly."""
    by_name = {t.name: t for t in gguf.GGUFReader(path).tensors}
    cfg, seen = model.config, set()
    for fqn, spec in specs.items():
        t = by_name[gguf_tensor_name(fqn + ".weight")]
        assert t.tensor_type.name == ggml_exact_type(spec, qtensors[fqn].shape), (fqn, spec.name)
        want = dequantize(qtensors[fqn]).float().numpy()
        if ".q_proj" in fqn or ".k_proj" in fqn:
            heads = cfg.num_attention_heads if ".q_proj" in fqn else cfg.num_key_value_heads
            want = want[rope_row_order(want.shape[0], heads)]
        got = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(want.shape)
        if spec.name in NEW:  # bit for bit, signed zeros included
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (fqn, spec.name)
        else:  # the 32-block types: equal values (MXFP4's code for -0 decodes to +0 in ggml)
            assert np.array_equal(got, want), (fqn, spec.name)
        seen.add(t.tensor_type.name)
    return seen


# ---------------------------------------------------------------------------- specs and their cost
@pytest.mark.parametrize("name", NEW)
def test_cost_is_the_ggml_size_and_rows_must_fit(name):
    spec = parse_spec(name)
    assert spec.name == name and parse_spec(spec.name) == spec
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]
    assert spec.bpw((8, 1536)) == size * 8 / block == BPW[name]
    assert ggml_exact_type(spec, (8, 1536)) == name
    assert ggml_exact_type(spec, (8, 576)) == (name if block == 32 else None)  # SmolLM2's 576: no K-quant
    assert spec.export_to("gguf").kind == "exact" and spec.export_to("gptq").kind == "refused"
    with pytest.raises(ValueError, match="-mse"):
        parse_spec(name + "-mse")
    assert parse_spec(name + "+ip").name == name + "+ip"  # incoherence processing keeps the block structure
    with pytest.raises(ValueError, match=r"only \+ip"):
        parse_spec(name + "+o0.5")


@pytest.mark.parametrize("name", NEW)
def test_stored_form_is_exactly_the_counted_bits(name):
    spec = parse_spec(name)
    w = torch.randn(16, 512, generator=torch.Generator().manual_seed(1))
    q = quantize(w, spec)
    pw = PackedWeight.from_qtensor(q)
    cost = spec.cost(q.shape)
    assert pw.codes.numel() * 8 == cost.codes
    stored = sum(t.numel() * t.element_size() * 8 for t in pw.params.values())
    assert stored == cost.scales + cost.zeros  # no padding at these shapes
    assert torch.equal(pw.dequantize(), dequantize(q))
    rel = float((dequantize(q) - w).norm() / w.norm())
    assert rel < {"Q2_K": 0.3, "Q3_K": 0.16, "Q4_K": 0.08, "Q5_K": 0.04, "Q6_K": 0.02, "IQ4_NL": 0.08}[name]


def test_gptq_uses_the_grid_and_beats_rtn():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 512, generator=g)
    x = torch.randn(1024, 512, generator=g) @ (torch.eye(512) + 0.3 * torch.randn(512, 512, generator=g) / 512**0.5)
    x = x * torch.linspace(0.2, 2.0, 512)
    h = x.T @ x / x.shape[0]
    for name in NEW:
        spec = parse_spec(name)
        res = gptq_quantize(w, h, spec)
        assert torch.equal(dequantize(res.qtensor), res.weight)
        d = w - dequantize(quantize(w, spec))
        assert res.proxy_loss < float(((d.double() @ h.double()) * d.double()).sum()), name


# ---------------------------------------------------------------------------- exact export
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_exact_export_is_bit_exact_for_every_new_type(tmp_path, method):
    model = _llama(256, 512, seed=3)  # every row length a multiple of 256
    layers = [r.fqn for r in api.iter_layers(model)]
    specs = {fqn: parse_spec(NEW[i % len(NEW)]) for i, fqn in enumerate(layers)}
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0)) if method == "gptq" else None
    res = api.quantize_model(model, specs, method=method, calib_ids=calib, progress=False)
    rep = write_gguf(model, make_tiny_tokenizer(), specs, tmp_path / "m.gguf", qtensors=res.qtensors, exact=True)
    assert _check_bit_exact(tmp_path / "m.gguf", model, res.qtensors, specs) == set(NEW)
    lin = [r for r in rep["tensors"] if r["spec"]]
    assert all(r["exact"] and r["ggml_bpw"] == r["mixq_bpw"] for r in lin)
    # the same tensors through a native directory (bit-packed two-level scales) export the same bits
    src = save_quantized(tmp_path / "q", model, make_tiny_tokenizer(), res.qtensors,
               {"base_model": "tiny", "method": method, "target": "gguf"})
    rep2 = export_gguf(src, tmp_path / "d.gguf", progress=False)
    assert rep2["exact"] and _check_bit_exact(tmp_path / "d.gguf", model, res.qtensors, specs) == set(NEW)


def test_plan_below_425_bpw_is_feasible_and_exports(tmp_path):
    """SmolLM2's geometry in small: only down_proj's rows (256) take a K-quant, the 64-wide rows 32-blocks."""
    model = _llama(64, 256, seed=5)
    shapes = {r.fqn: tuple(r.shape) for r in api.iter_layers(model)}
    rng = budget_range(shape_table(shapes, target_candidates("gguf")), Constraints(target="gguf"))
    assert rng.min_bpw < 4.25
    rows = []
    for fqn, shape in shapes.items():
        cands = candidates_for(shape, [parse_spec(n) for n in GGUF_CANDIDATE_NAMES])
        rows.append(LayerEntry(fqn, shape, tuple(cands), tuple(2.0 ** -c.bpw(shape) for c in cands)))
    table = SensitivityTable(tuple(rows), metric="test")
    plan = allocate(table, Budget(bpw=4.0), constraints=Constraints(target="gguf"))
    numel = sum(s[0] * s[1] for s in shapes.values())
    bits = sum(spec.cost(shapes[f]).total for f, spec in plan.layers.items())
    assert bits <= 4.0 * numel
    down = [s.name for f, s in plan.layers.items() if f.endswith("down_proj")]
    assert down and down[0] in ("Q2_K", "Q3_K")
    res = api.quantize_model(model, plan.layers, progress=False)
    rep = write_gguf(model, make_tiny_tokenizer(), plan.layers, tmp_path / "p.gguf", qtensors=res.qtensors,
                     exact=True)
    assert _check_bit_exact(tmp_path / "p.gguf", model, res.qtensors, plan.layers) >= {down[0]}
    assert rep["totals"]["block_linear_bpw"] == pytest.approx(bits / numel) and bits / numel < 4.25
