"""The element-format seam: a format registered from outside mixq (one object, one ``register`` call) goes through
measure -> plan -> quantize -> save -> load -> eval, and every exporter maps it exactly or refuses it in one line
naming the layers and the format.  Also: the built-in families answer the protocol consistently."""
import json
import re

import pytest
import torch

import mixq
from mixq.cli import main
from mixq.config import ElementFormat, Export, QuantSpec, family_of, parse_spec, register
from mixq.config.families import BUILTIN
from mixq.config.registry import unregister
from mixq.export.registry import EXPORTERS
from mixq.formats import QParams
from mixq.granularity import PerGroup
from export_checks import native_exact_others_refuse


class Ternary(ElementFormat):
    """{-1, 0, +1} x an fp16 absmax scale per group of 32, codes 0..2 in 2 bits (the toy format)."""

    family, dtypes, heads = "ternary", ("tern",), ("TERN",)
    exports = {"native": Export("exact")}  # every other target refuses it (ElementFormat.export)

    def parse(self, head, variant):
        return dict(dtype="tern", bits=2, granularity=PerGroup(32)) if head == "TERN" else None

    def check_bits(self, spec):
        if spec.bits != 2:
            raise ValueError(f"ternary codes take 2 bits, got {spec.bits}")

    def head(self, spec):
        return "TERN"

    def fit(self, rows, spec, shrink=1.0, tensor_scale=None):
        scale = (rows.abs().amax(-1, keepdim=True) * shrink).clamp_min(2.0**-14)
        return QParams(scale=scale.to(torch.float16).float())

    def encode(self, x, p, spec):
        return (torch.round(x / p.scale).clamp(-1, 1) + 1).to(torch.uint8)

    def decode(self, codes, p, spec):
        return p.scale * (codes.float() - 1)


@pytest.fixture
def ternary():
    fmt = register(Ternary())
    yield fmt
    unregister(fmt)


TEXT = "".join(f"the {w} sat on the mat number {i} .\n" for i, w in enumerate(["cat", "dog", "fox"] * 20))


def test_registered_format_parses_costs_and_validates(ternary, capsys):
    s = parse_spec("TERN-g16")
    assert s == QuantSpec(dtype="tern", bits=2, granularity=PerGroup(16)) and s.name == "TERN-g16"
    assert parse_spec(s.name) == s and QuantSpec.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert family_of(s) is ternary and s.cost((8, 64)).total == 8 * 64 * 2 + 8 * 4 * 16
    assert ternary.stored(s, (8, 64)) == {"codes": (2, (8, 64)), "scale": (16, (32,))}
    with pytest.raises(ValueError, match="ternary codes take 2 bits"):
        QuantSpec(dtype="tern", bits=3)
    with pytest.raises(ValueError, match="already belong"):
        register(Ternary())
    assert parse_spec("TERN-g16+o1").base == s  # composites take it as a base too
    assert main(["specs"]) == 0
    assert re.search(r"ternary +TERN +reference +refused / refused / refused", capsys.readouterr().out)
    unregister(ternary)
    with pytest.raises(ValueError, match="unknown spec"):
        parse_spec("TERN")
    register(ternary)


def test_registered_format_end_to_end(ternary, tiny_dir, tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    model, tok = mixq.load_model(str(tiny_dir))
    ids = torch.randint(4, 99, (2, 16), generator=torch.Generator().manual_seed(0))
    table = mixq.measure(model, ids, metric="hessian", candidates=["W4-g32", "TERN-g32"], progress=False)
    plan = mixq.plan(table, bpw=3.5)
    used = {s.name for s in plan.layers.values()}
    assert used == {"W4-g32", "TERN-g32"}, used
    result = mixq.quantize(model, plan=plan, progress=False)
    expect = model(ids).logits
    d = tmp_path / "q"
    mixq.save_quantized(d, model, tok, result)
    info = json.loads((d / "mixq.json").read_text())
    assert info["storage"]["bits_quantized_spec"] == plan.total_bits
    loaded, qtok, _ = mixq.load_quantized(d)
    assert torch.equal(loaded(ids).logits, expect)
    gptq, _ = mixq.load_model(str(tiny_dir))
    res = mixq.quantize(gptq, "TERN-g32", method="gptq", calib=ids, progress=False)  # GPTQ calls fit/encode too
    assert {q.spec.name for q in res.qtensors.values()} == {"TERN-g32"} and res.proxy_loss
    r = mixq.evaluate(loaded, qtok, corpus=str(corpus), tokens=96, seqlen=32, progress=False)
    assert r["perplexity"] > 1
    assert main(["eval", str(d), "--corpus", str(corpus), "--tokens", "96", "--seqlen", "32"]) == 0

    tern = sorted(f for f, s in plan.layers.items() if s.name == "TERN-g32")
    native_exact_others_refuse(d, ids, expect, "TERN-g32", "ternary", tern[0], tmp_path, capsys)


@pytest.mark.parametrize("fam", BUILTIN, ids=lambda f: f.family)
def test_builtin_families_answer_the_protocol(fam):
    """Every preset a family claims parses back to it, costs what it stores, and maps to every export target."""
    shape = (64, 256)
    specs = [parse_spec(n) for n in mixq.config.PRESETS] + [parse_spec(n) for n in ("W3-g64-asym", "W4-g32-asymf")]
    mine = [s for s in specs if family_of(s) is fam]
    assert mine, fam.family
    for s in mine:
        bits = sum(b * torch.Size(dims).numel() for b, dims in fam.stored(s, shape).values())
        assert bits == s.cost(shape).total, s.name
        for target in EXPORTERS:
            m = s.export_to(target)
            assert m.kind in ("exact", "approximate", "refused") and (m.kind == "exact" or m.note), (s.name, target)
        assert s.export_to("native").kind == "exact"
