"""mixq inspect and mixq.report.plots on a plan made from a tiny measurement."""
from __future__ import annotations

import json

import pytest
import torch
from tiny import make_tiny, make_tiny_tokenizer

from mixq.allocate import Budget, allocate
from mixq.cli import main
from mixq.config import parse_spec
from mixq.measure import measure
from mixq.report.inspect import format_allocation, load_allocation
from mixq.report.plots import (abbreviate_spec, allocation_heatmap, layer_key, pareto_front, pareto_plot,
                               reference_candidate, sensitivity_profile, tradeoff_scatter)

PNG = b"\x89PNG\r\n\x1a\n"
CANDIDATES = ["W2-g32-asym", "W3-g32-asym", "W4-g32", "W4-g64", "W8-channel", "FP16"]


def is_png(path) -> bool:
    data = path.read_bytes()
    return data[:8] == PNG and len(data) > 5000


@pytest.fixture(scope="module")
def table():
    model = make_tiny("llama")
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    return measure(model, calib, [parse_spec(c) for c in CANDIDATES], metric="hessian", progress=False)


@pytest.fixture(scope="module")
def plan(table):
    return allocate(table, Budget(bpw=3.6))


def test_layer_keys_and_abbreviations():
    assert layer_key("model.layers.3.self_attn.q_proj") == (3, "q")
    assert layer_key("model.layers.11.mlp.down_proj") == (11, "down")
    assert layer_key("transformer.h.0.attn.c_proj") == (0, "o")
    assert layer_key("transformer.h.0.mlp.c_proj") == (0, "down")
    assert layer_key("gpt_neox.layers.1.attention.query_key_value") == (1, "qkv")
    assert layer_key("model.decoder.layers.2.self_attn.out_proj") == (2, "o")
    assert layer_key("lm_head") == (None, "lm_head")
    assert [abbreviate_spec(s) for s in ("W4-g64-asym", "W4-channel", "FP16", "NF4-g64", "W3-g128-asymf", "MXFP4")] == \
        ["4g64a", "4ch", "16", "NF4g64", "3g128af", "MXFP4"]


def test_inspect_cli_on_a_plan(plan, tmp_path, capsys):
    p = plan.save(tmp_path / "plan.json")
    out = tmp_path / "figs" / "heatmap.png"
    assert main(["inspect", str(p), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in text and "total: 14 layers" in text
    assert f"{plan.achieved_bpw:.4f} bpw" in text and "error (hessian)" in text and "by layer type: q " in text
    assert is_png(out)
    assert main(["inspect", str(p), "--out", str(out)]) == 2  # exists, no --force
    assert "already exists" in capsys.readouterr().err
    assert main(["inspect", str(p), "--out", str(out), "--force"]) == 0
    assert main(["inspect", str(p), "--out", str(tmp_path / "heatmap.jpg")]) == 2
    assert ".png" in capsys.readouterr().err
    assert main(["inspect", str(p)]) == 0  # print only


def test_inspect_directory_and_errors(plan, table, tmp_path, capsys):
    d = tmp_path / "tiny"
    make_tiny("llama").save_pretrained(d)
    make_tiny_tokenizer().save_pretrained(d)
    p = plan.save(tmp_path / "plan.json")
    q = tmp_path / "q"
    assert main(["quantize", "--model", str(d), "--plan", str(p), "--out", str(q)]) == 0
    a = load_allocation(q)
    assert a.plan is not None and a.achieved_bpw == pytest.approx(plan.achieved_bpw)
    capsys.readouterr()
    assert main(["inspect", str(q), "--out", str(tmp_path / "dir.png")]) == 0
    assert "predicted error (hessian)" in capsys.readouterr().out and is_png(tmp_path / "dir.png")
    # a directory quantized with one spec: only its layers table, no predicted errors
    info = json.loads((q / "mixq.json").read_text())
    info.update(plan=None, spec="W4-g32")
    for layer in info["layers"].values():
        layer["spec"] = parse_spec("W4-g32").to_dict()
    uniform = tmp_path / "mixq.json"
    uniform.write_text(json.dumps(info))
    a = load_allocation(uniform)
    assert a.predicted_error is None and a.budget == "uniform W4-g32"
    assert "W4-g32 x" in format_allocation(a) and "not recorded" in format_allocation(a)
    capsys.readouterr()
    m = table.save(tmp_path / "m.json")
    assert main(["inspect", str(m)]) == 2
    assert "is a measurement" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "nope.json")]) == 2
    assert main(["inspect", str(d)]) == 2  # a plain model directory
    assert "not a mixq directory" in capsys.readouterr().err


def test_plots_write_files(plan, table, tmp_path):
    assert is_png(allocation_heatmap(plan, tmp_path / "h.png"))
    named = {"transformer.h.0.attn.c_attn": {"spec": "W4-g64", "bpw": 4.25},
             "transformer.h.0.mlp.c_fc": {"spec": "W3-g64-asym", "bpw": 3.5}, "lm_head": {"spec": "FP16", "bpw": 16}}
    assert is_png(allocation_heatmap(named, tmp_path / "h2.png"))
    assert reference_candidate(table) in ("W4-g32", "W4-g64")
    assert is_png(sensitivity_profile(table, tmp_path / "s.png"))
    with pytest.raises(ValueError, match="not measured"):
        sensitivity_profile(table, tmp_path / "s2.png", candidate="NF4-g64")
    pts = [{"method": "rtn", "bpw": b, "kl": k, "uniform": True} for b, k in ((3.25, 0.3), (4.25, 0.05), (8.0, 0.001))]
    pts += [{"method": "mixed rtn", "bpw": b, "kl": k, "ci": [k * 0.9, k * 1.1]} for b, k in ((3.0, 0.2), (4.0, 0.03))]
    assert is_png(pareto_plot(pts, tmp_path / "p.png"))
    ppl = [dict(p, perplexity=20 + 10 * p["kl"]) for p in pts]
    assert is_png(pareto_plot(ppl, tmp_path / "p2.png", y="perplexity", reference=20.0))
    assert pareto_front([(3.25, 0.3), (4.25, 0.05), (8, 0.001), (3.0, 0.2), (4.0, 0.03)]) == [3, 4, 2]
    trade = [{"label": "W4-g64", "size_mib": 80.0, "kl": 0.05, "tokens_per_s": 40.0},
             {"label": "mixed 3.5", "size_mib": 70.0, "kl": 0.06, "tokens_per_s": 35.0},
             {"label": "NVFP4", "size_mib": 75.0, "kl": 0.04, "tokens_per_s": None}]
    assert is_png(tradeoff_scatter(trade, tmp_path / "t.png"))
    with pytest.raises(ValueError, match=".png"):
        pareto_plot(pts, tmp_path / "p.bmp")
    with pytest.raises(ValueError, match="no points"):
        pareto_plot([], tmp_path / "e.png")
