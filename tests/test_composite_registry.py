"""The composite-format seam: an intra-tensor composite family registered from outside mixq (one object, one spec
class, one ``register`` call) goes through measure -> plan -> quantize (RTN and GPTQ) -> save -> load (fake-quant and
packed) -> eval, and every exporter maps it exactly (native) or refuses it in one line naming the layers and the spec.
Also: the built-in families answer the protocol consistently."""
import json
import math
import re
from dataclasses import dataclass, fields

import pytest
import torch

import mixq
from mixq import formats
from mixq.algorithms.composite.hooks import quantize_layer
from mixq.cli import main
from mixq.config import BUILTIN_COMPOSITES, BitCost, CompositeFormat, Export, QuantSpec, composite_of, parse_spec, \
    register
from mixq.config.registry import unregister
from mixq.export.registry import EXPORTERS
from mixq.algorithms.composite.storage import PackedComposite
from mixq.runtime.composite_linear import CompositeLinear
from mixq.runtime import PackedWeight
from mixq.runtime.layers import make_layer
from export_checks import native_exact_others_refuse

BASE_FIELDS = tuple(f.name for f in fields(QuantSpec))


@dataclass(frozen=True)
class LowRankSpec(QuantSpec):
    """The toy composite: ``W ≈ Q(W - U Vᵀ) + U Vᵀ``, a plain grid (the inherited fields) for the residual plus a
    rank-``rank`` correction ``U [R, k]``, ``V [k, C]`` kept in fp16.  Written ``<base>+lr<k>``."""

    rank: int = 1

    @property
    def base(self) -> QuantSpec:
        return QuantSpec(**{k: getattr(self, k) for k in BASE_FIELDS})

    @property
    def name(self) -> str:
        return f"{self.base.name}+lr{self.rank}"

    def cost(self, shape) -> BitCost:
        r, c = int(shape[0]), int(shape[1])
        return self.base.cost((r, c)) + BitCost(0, 0, extra=16 * self.rank * (r + c))

    def to_dict(self) -> dict:
        return {"_type": "LowRankSpec", "base": self.base.to_dict(), "rank": self.rank}


@dataclass
class LowRankParts:
    """The stored parts: the residual's QTensor and the fp16 factors."""

    spec: LowRankSpec
    shape: tuple[int, int]
    base: formats.QTensor
    u: torch.Tensor
    v: torch.Tensor
    proxy_loss: float | None = None

    def dequantize(self) -> torch.Tensor:
        return formats.dequantize(self.base).float() + self.u.float() @ self.v.float()

    def stored_bits(self) -> int:
        return self.base.cost().total + 16 * (self.u.numel() + self.v.numel())


class LowRank(CompositeFormat):
    family, spec_type = "low-rank", "LowRankSpec"
    exports = {"native": Export("exact")}  # every other target refuses it (CompositeFormat.export)

    def claims(self, spec) -> bool:
        return isinstance(spec, LowRankSpec)

    def parse(self, name):
        m = re.fullmatch(r"(.+)\+lr(\d+)", name)
        return LowRankSpec(**{k: getattr(parse_spec(m[1]), k) for k in BASE_FIELDS}, rank=int(m[2])) if m else None

    def from_dict(self, d):
        return LowRankSpec(**{k: getattr(QuantSpec.from_dict(d["base"]), k) for k in BASE_FIELDS}, rank=d["rank"])

    def quantize(self, W, spec, H, method, *, quantize_layer, **kw):
        W = W.detach().float().cpu()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        u, v = (U[:, :spec.rank] * S[:spec.rank]).half(), Vh[:spec.rank].contiguous().half()
        low = u.float() @ v.float()
        base, R_hat = quantize_layer(W - low, spec.base, H, method, **kw)  # the residual on the plain grid
        W_hat = R_hat.float() + low
        proxy = None if H is None else float(((W - W_hat) @ H.float() * (W - W_hat)).sum())
        return LowRankParts(spec, tuple(W.shape), base, u, v, proxy), W_hat

    def pack(self, parts):
        return {"lr.u": parts.u, "lr.v": parts.v,
                **{f"base.{k}": t for k, t in PackedWeight.from_qtensor(parts.base).tensors().items()}}

    def unpack(self, t, spec, shape):
        sub = {k[5:]: v for k, v in t.items() if k.startswith("base.")}
        base = PackedWeight.from_tensors(sub, spec.base, shape).to_qtensor()
        return LowRankParts(spec, tuple(shape), base, t["lr.u"], t["lr.v"])

    def layer(self, packed, bias, kernel):
        return CompositeLinear(packed, bias)  # the reference layer: dequantized on every call


@pytest.fixture
def low_rank():
    fam = register(LowRank())
    yield fam
    unregister(fam)


TEXT = "".join(f"the {w} sat on the mat number {i} .\n" for i, w in enumerate(["cat", "dog", "fox"] * 20))


def test_registered_composite_parses_costs_and_maps(low_rank):
    s = parse_spec("W3-g32+lr2")
    assert isinstance(s, LowRankSpec) and s.name == "W3-g32+lr2" and s.rank == 2 and composite_of(s) is low_rank
    assert parse_spec(s.name) == s and parse_spec(json.loads(json.dumps(s.to_dict()))) == s
    assert s.cost((8, 64)).total == parse_spec("W3-g32").cost((8, 64)).total + 16 * 2 * (8 + 64)
    assert mixq.config.is_composite(s) and s.export_to("native").kind == "exact"
    from mixq.algorithms.composite.hooks import stored_tensors  # what it stores follows from its own pack

    layout = stored_tensors(s, (8, 64))
    assert sum(torch.tensor([], dtype=d).element_size() * 8 * math.prod(n) for d, n in layout.values()) >= \
        s.cost((8, 64)).total
    ip = parse_spec("W3-g32+o0.5+ip")  # the built-in composites' names and dicts still read
    assert parse_spec(ip.to_dict()) == ip and parse_spec(ip.name) == ip and composite_of(ip) is BUILTIN_COMPOSITES[0]
    assert s.export_to("gguf").kind == "refused" and "gguf" in s.export_to("gguf").note
    with pytest.raises(ValueError, match="already registered"):
        register(low_rank)
    unregister(low_rank)
    with pytest.raises(ValueError):
        parse_spec("W3-g32+lr2")
    register(low_rank)


def test_registered_composite_end_to_end(low_rank, tiny_dir, tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    model, tok = mixq.load_model(str(tiny_dir))
    ids = torch.randint(4, 99, (2, 16), generator=torch.Generator().manual_seed(0))
    for algorithm in ("rtn", "gptq"):
        table = mixq.measure(model, ids, metric="hessian", candidates=["W4-g32", "W2-g32+lr1"], algorithm=algorithm,
                             progress=False)
    plan = mixq.plan(table, bpw=3.5)
    used = {s.name for s in plan.layers.values()}
    assert used == {"W4-g32", "W2-g32+lr1"}, used
    result = mixq.quantize(model, plan=plan, progress=False)
    expect = model(ids).logits
    d = tmp_path / "q"
    mixq.save_quantized(d, model, tok, result)
    info = json.loads((d / "mixq.json").read_text())
    assert info["storage"]["bits_quantized_spec"] == plan.total_bits
    lr = sorted(f for f, s in plan.layers.items() if s.name == "W2-g32+lr1")
    assert info["layers"][lr[0]]["kind"] == "composite" and info["layers"][lr[0]]["spec"]["_type"] == "LowRankSpec"
    loaded, qtok, _ = mixq.load_quantized(d)
    assert torch.equal(loaded(ids).logits, expect)
    packed, _, _ = mixq.load_quantized(d, packed=True)
    assert isinstance(packed.get_submodule(lr[0]), CompositeLinear)
    assert isinstance(packed.get_submodule(lr[0]).packed, PackedComposite)
    assert torch.allclose(packed(ids).logits, expect, atol=1e-5, rtol=1e-5)
    gptq, _ = mixq.load_model(str(tiny_dir))
    res = mixq.quantize(gptq, "W2-g32+lr1", method="gptq", calib=ids, progress=False)  # the residual through GPTQ
    assert {q.spec.name for q in res.qtensors.values()} == {"W2-g32+lr1"} and res.proxy_loss
    r = mixq.evaluate(loaded, qtok, corpus=str(corpus), tokens=96, seqlen=32, progress=False)
    assert r["perplexity"] > 1
    assert main(["eval", str(d), "--corpus", str(corpus), "--tokens", "96", "--seqlen", "32"]) == 0

    native_exact_others_refuse(d, ids, expect, "W2-g32+lr1", "composite", lr[0], tmp_path, capsys)


@pytest.mark.parametrize("fam", BUILTIN_COMPOSITES, ids=lambda f: f.family)
def test_builtin_composite_families_answer_the_protocol(fam):
    """Every README-style composite a family claims round-trips through its dict, costs what its packed parts hold,
    maps to every export target, and names kernels its layer takes."""
    names = ["W3-g32+o0.5", "W3-g16+sq3", "SLIM3-g32", "KM3+o0.45", "W3-g32+c4", "W3-g32+h10", "NF3-g32+d4",
             "BIN-g32+r8+o1w8", "VQ2.5-g32", "TCQ2.5-channel", "W3-g32+ip", "VQ2.5-g32+ip", "W3-g32+o0.5+ip"]
    mine = [s for s in map(parse_spec, names) if composite_of(s) is fam]
    assert mine, fam.family
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    for s in mine:
        assert parse_spec(s.to_dict()) == s and s.export_to("native").kind == "exact"
        for target in EXPORTERS:
            m = s.export_to(target)
            assert m.kind in ("exact", "approximate", "refused") and (m.kind == "exact" or m.note), (s.name, target)
        qt = quantize_layer(W, s)[0]
        pc = PackedComposite.from_qtensor(qt)
        assert 0 <= pc.nbytes * 8 - s.cost(W.shape).total < 8 * len(pc.parts), s.name
        layer = make_layer(pc)
        assert torch.equal(layer.packed.dequantize(), qt.dequantize()), s.name
        if fam.runs_as(s) is None:  # the kernel of its own layer (+ip: of its inner layer)
            own = composite_of(s.inner) if s.incoherent else fam
            assert fam.fast_kernel(s, "cpu") in ("reference", *own.kernels), s.name
