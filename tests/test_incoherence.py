"""Incoherence processing (``+ip``): transforms, cost, GPTQ on the transformed weight, storage and the packed layer."""
from __future__ import annotations

import pytest
import torch

from mixq import api
from mixq.algorithms.gptq import gptq_quantize
from mixq.config import parse_spec
from mixq.export.native import load_quantized, read_info, read_packed
from mixq.export.native_write import save_quantized
from mixq.algorithms.composite.incoherence import IncoherentQTensor
from mixq.algorithms.composite.storage import PackedComposite
from mixq.algorithms.composite.hooks import quantize_layer
from mixq.runtime.composite_linear import IncoherentLinear
from mixq.algorithms.composite.incoherence import SEED_IN, rotate, rotate_weight, transform, unrotate_weight
from mixq.runtime import QuantLinear, kernel_usage, memory_report

IDS = torch.randint(4, 99, (4, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("n", [64, 192, 576, 1536])
def test_rotate_is_the_orthogonal_transform(n):
    Q = transform(n, 7)
    assert torch.allclose(Q @ Q.T, torch.eye(n), atol=1e-5)
    for x in (torch.randn(3, 5, n), torch.randn(1, n), torch.randn(4, 50, n)):  # dense (decode) and factored paths
        assert torch.allclose(rotate(x, 7), x @ Q.T, atol=1e-4)
        assert torch.allclose(rotate(x, 7, transpose=True), x @ Q, atol=1e-4)
        assert torch.allclose(rotate(rotate(x, 7), 7, transpose=True), x, atol=1e-4)
    xb = torch.randn(2, n).to(torch.bfloat16)
    assert rotate(xb, 7).dtype == torch.bfloat16
    assert not torch.allclose(transform(n, 8), Q)  # another seed, another transform


NATIVE_ORDERS = [12, 60, 64, 192, 576, 960, 1536, 2048]  # Paley alone, Paley x 2^k, Sylvester alone


@pytest.mark.parametrize("n", NATIVE_ORDERS)
def test_native_kronecker_kernel_is_the_transform(n):
    """The native kernel (butterflies for Sylvester factors, small dense products for Paley ones) gives ``Q x`` and
    ``Qᵀ x`` for one and many rows, out of place."""
    from mixq.algorithms.composite.incoherence import _factors
    from mixq.runtime.kernels import kron_cpu

    if not kron_cpu.available():
        pytest.skip("no C compiler")
    factors, signs = _factors(n, 11)
    Q = transform(n, 11).double()
    for transpose in (False, True):
        plan = kron_cpu.KronPlan(factors, signs, transpose=transpose)
        for shape in ((1, n), (3, n), (2, 20, n)):
            x = torch.randn(*shape, generator=torch.Generator().manual_seed(n))
            x0 = x.clone()
            y = plan.apply(x)
            want = x.double() @ (Q if transpose else Q.T)
            assert y.shape == x.shape and torch.equal(x, x0)
            torch.testing.assert_close(y.double(), want, rtol=0, atol=2e-5)
        xb = torch.randn(3, n, generator=torch.Generator().manual_seed(1)).bfloat16()
        assert torch.equal(plan.apply(xb), plan.apply(xb.float()).bfloat16())  # one rounding, torch's
    with pytest.raises(ValueError, match="float32"):
        plan.apply(torch.randn(2, n).double())


def test_rotate_takes_the_native_kernel_where_it_wins(monkeypatch):
    """float32 and bfloat16 CPU inputs outside autograd go native at any number of rows; autograd stays in torch
    -- and gradients through ``rotate`` stay exact."""
    from mixq.runtime.kernels import kron_cpu

    if not kron_cpu.available():
        pytest.skip("no C compiler")
    calls = []
    real = kron_cpu.KronPlan.apply
    monkeypatch.setattr(kron_cpu.KronPlan, "apply", lambda self, x: calls.append(tuple(x.shape)) or real(self, x))
    rotate(torch.randn(1, 576), 5)
    rotate(torch.randn(2, 3, 2048), 5)
    assert rotate(torch.randn(1, 576).bfloat16(), 5).dtype == torch.bfloat16  # bf16 in, bf16 out, natively
    rotate(torch.randn(64, 576), 5)                       # prefill-sized, with a dense factor
    assert calls == [(1, 576), (2, 3, 2048), (1, 576), (64, 576)]
    x = torch.randn(2, 576, requires_grad=True)
    rotate(x, 5).sum().backward()                         # autograd: torch
    assert len(calls) == 4
    torch.testing.assert_close(x.grad, torch.ones(2, 576) @ transform(576, 5), rtol=1e-5, atol=1e-5)


def test_weight_transform_round_trip():
    W = torch.randn(192, 576)
    Wp = rotate_weight(W, (3, 4))
    assert torch.allclose(Wp, transform(192, 4) @ W @ transform(576, 3).T, atol=1e-4)
    assert torch.allclose(unrotate_weight(Wp, (3, 4)), W, atol=1e-4)


def test_spec_grammar_and_cost():
    s = parse_spec("W3-g64+ip")
    assert s.incoherent and s.inner == parse_spec("W3-g64") and parse_spec(s.name) == s
    assert parse_spec(s.to_dict()) == s
    assert s.cost((576, 1536)).total == parse_spec("W3-g64").cost((576, 1536)).total + 64
    c = parse_spec("W3-g64+o0.5+ip")
    assert c.inner == parse_spec("W3-g64+o0.5") and c.name == "W3-g64+o0.5+ip"
    assert "incoherent" not in parse_spec("W3-g64+o0.5").to_dict()  # old composites keep their dicts
    with pytest.raises(ValueError, match="Hadamard matrix of order 6 .output side"):
        parse_spec("W3-channel+ip").cost((6, 64))


def _heavy_layer(R=128, C=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.distributions.StudentT(3.0).sample((R, C)) * 0.02
    W[:, :4] *= 8  # a few outlier input channels
    X = torch.randn(2048, C, generator=g)
    X[:, :4] *= 10
    return W, X.T @ X / X.shape[0]


@pytest.mark.parametrize("spec", ["W2-g64-asym", "W3-g64", "W3-channel"])
def test_ip_lowers_the_gptq_output_error_on_heavy_tailed_weights(spec):
    W, H = _heavy_layer()
    plain = gptq_quantize(W, H, parse_spec(spec)).proxy_loss
    qt, W_hat, _ = quantize_layer(W, parse_spec(spec + "+ip"), H, "gptq")
    assert isinstance(qt, IncoherentQTensor)
    assert torch.allclose(qt.dequantize(), W_hat, atol=1e-5)
    assert qt.proxy_loss < 0.8 * plain, (qt.proxy_loss, plain)


def test_rtn_and_composite_inner():
    W, H = _heavy_layer(64, 128)
    for name in ("NF3-g32+ip", "W3-g32+o0.5+ip"):
        qt, W_hat, _ = quantize_layer(W, parse_spec(name), None, "rtn")
        assert torch.allclose(qt.dequantize(), W_hat, atol=1e-5)
        pc = PackedComposite.from_qtensor(qt)
        assert "ip.seeds" in pc.parts and pc.to_qtensor().seeds == qt.seeds
        assert torch.equal(pc.dequantize(), qt.dequantize())
        assert abs(pc.nbytes * 8 - parse_spec(name).cost((64, 128)).total) < 8 * len(pc.parts)


def test_save_load_packed_and_fake(tiny_model, tiny_tokenizer, tmp_path):
    model = tiny_model("llama")
    fqns = list(api.resolve_specs(model, "W4-g32"))
    names = ["W3-g32+ip", "W4-g32+ip", "W3-g32+o0.5+ip", "W4-g32"]
    specs = {f: parse_spec(names[i % len(names)]) for i, f in enumerate(fqns)}
    res = api.quantize_model(model, specs, method="gptq", calib_ids=IDS, progress=False)
    with torch.no_grad():
        ref = model(IDS).logits
    d = save_quantized(tmp_path / "q", model, tiny_tokenizer, res.qtensors, {"base_model": "tiny", "method": "gptq"})
    info, packed, _ = read_packed(d)
    for f, s in specs.items():
        assert parse_spec(info["layers"][f]["spec"]) == s
        if s.name.endswith("+ip"):
            assert isinstance(packed[f], PackedComposite)
    fake, _, _ = load_quantized(d)
    pk, _, _ = load_quantized(d, packed=True)
    ip_layers = [m for m in pk.modules() if isinstance(m, IncoherentLinear)]
    assert len(ip_layers) == sum(s.name.endswith("+ip") for s in specs.values())
    assert any(isinstance(m.inner, QuantLinear) for m in ip_layers)
    with torch.no_grad():
        a, b = fake(IDS).logits, pk(IDS).logits
    assert torch.allclose(a, ref, atol=1e-4) and torch.allclose(b, ref, atol=1e-3)
    usage = kernel_usage(pk)
    assert sum(usage.values()) == len(specs) and any(k.startswith("ip+") for k in usage)
    mem = memory_report(pk)
    assert mem["quant_linears"] == len(specs)
    assert mem["packed_weights"] * 8 >= sum(s.cost(packed[f].shape).total for f, s in specs.items())


def test_measurement_prices_ip_candidates(tiny_model):
    from mixq.measure import measure

    model = tiny_model("llama")
    cands = [parse_spec(n) for n in ("W3-g32", "W3-g32+ip", "W4-g32", "FP16")]
    table = measure(model, IDS, cands, metric="hessian", algorithm="gptq", progress=False)
    for e in table.layers:
        assert parse_spec("W3-g32+ip") in e.candidates
        errs = dict(zip(e.candidates, e.errors))
        assert errs[parse_spec("W3-g32+ip")] >= 0 and errs[parse_spec("FP16")] <= errs[parse_spec("W3-g32")]


def test_fast_kernel_for_composites():
    from mixq.runtime.kernels import fast_kernel_for

    for n in ("W3-g64", "W4-g64", "W2-g64-asym"):
        assert fast_kernel_for(parse_spec(n + "+ip"), (576, 576)) == fast_kernel_for(parse_spec(n), (576, 576))
    for n in ("W3-g64+o0.5", "W3-g64+o0.5+ip", "NF3-g64+ip", "SLIM3-g64"):
        assert fast_kernel_for(parse_spec(n), (576, 576)) == "reference", n


def test_one_sided_spec_transform_and_cost():
    s = parse_spec("TCQ3-channel+ip1")
    assert s.incoherent and s.ip_one_sided and s.ip_sides == 1 and s.name == "TCQ3-channel+ip1"
    assert parse_spec(s.name) == s and parse_spec(s.to_dict()) == s and s.inner == parse_spec("TCQ3-channel")
    assert parse_spec("TCQ3-channel+ip").ip_sides == 2 and parse_spec("TCQ3-channel+ip") != s
    assert s.cost((42, 128)).total == parse_spec("TCQ3-channel").cost((42, 128)).total + 32  # one seed
    with pytest.raises(ValueError, match="output side"):  # 42 rows have no Hadamard order: two-sided cannot
        parse_spec("TCQ3-channel+ip").cost((42, 128))
    W = torch.randn(42, 128)
    assert torch.allclose(rotate_weight(W, (3,)), W @ transform(128, 3).T, atol=1e-4)
    assert torch.allclose(unrotate_weight(rotate_weight(W, (3,)), (3,)), W, atol=1e-4)
    qt, W_hat, _ = quantize_layer(W, s, torch.eye(128), "gptq")
    assert qt.seeds == (SEED_IN,) and qt.stored_bits() == s.cost((42, 128)).total
    pc = PackedComposite.from_qtensor(qt)
    assert pc.parts["ip.seeds"].numel() == 1 and torch.equal(pc.dequantize(), qt.dequantize())
    assert torch.allclose(qt.dequantize(), W_hat, atol=1e-5)


@pytest.mark.parametrize("spec", ["TCQ3-channel+ip1", "TCQ2.5-channel+ip1", "TCQ4L10-channel+ip1"])
def test_one_sided_trellis_weights_rows(spec):
    """A trellis path runs down a column, so the search trades error between rows: given each row's weight in the
    loss it moves error off the heavy rows (a lower weighted loss than the unweighted search's); under two
    transforms the rows of W' are mixtures of all, and the weights are dropped (the same result)."""
    W, H = _heavy_layer(128, 256, seed=1)
    g = torch.rand(128, generator=torch.Generator().manual_seed(2)) ** 4 * 50

    def weighted(Wq):
        d = (W - Wq).double()
        return float((g.double() * ((d @ H.double()) * d).sum(1)).sum())

    plain = quantize_layer(W, parse_spec(spec), H, "gptq")[1]
    rows = quantize_layer(W, parse_spec(spec), H, "gptq", row_weight=g)[1]
    assert weighted(rows) < 0.9 * weighted(plain), (weighted(rows), weighted(plain))
    two = parse_spec(spec[:-1])
    assert torch.equal(quantize_layer(W, two, H, "gptq", row_weight=g)[1], quantize_layer(W, two, H, "gptq")[1])


def test_row_weights_travel_from_measurement_to_the_walk(tiny_model, tmp_path):
    """A ``+ip1`` trellis is measured with its rows weighted by the layer's G; the table keeps those weights
    (float16, mean 1), the plan carries them for the layers that chose a ``+ip1`` spec, through its JSON, and the
    walk quantizes with them (a different result from the same plan without them)."""
    from mixq import pipeline as P
    from mixq.allocate import Budget, Plan, SensitivityTable, allocate
    from mixq.measure import measure

    model = tiny_model("llama")
    cands = [parse_spec(n) for n in ("TCQ2-channel+ip1", "TCQ3-channel+ip1", "W4-g32", "FP16")]
    table = measure(model, IDS, cands, metric="kfac", algorithm="gptq", progress=False)
    for e in table.layers:
        assert e.row_weight is not None and len(e.row_weight) == e.shape[0]
        assert abs(sum(e.row_weight) / e.shape[0] - 1) < 1e-2
    back = SensitivityTable.load(table.save(tmp_path / "m.json"))
    assert [e.row_weight for e in back.layers] == [e.row_weight for e in table.layers]
    plan = allocate(back, Budget(bpw=3.0))
    ip1 = {f for f, s in plan.layers.items() if getattr(s, "ip_one_sided", False)}
    assert ip1 and set(plan.row_weights) == ip1
    plan = Plan.load(plan.save(tmp_path / "plan.json"))
    assert set(plan.row_weights) == ip1
    m1, m2 = tiny_model("llama"), tiny_model("llama")
    P.quantize(m1, plan=plan, method="gptq", calib=IDS, progress=False)
    P.quantize(m2, plan=Plan(**{**plan.__dict__, "row_weights": {}}), method="gptq", calib=IDS, progress=False)
    W = {f: (m1.get_submodule(f).weight, m2.get_submodule(f).weight) for f in plan.layers}
    assert any(not torch.equal(*W[f]) for f in ip1)
    first = [f for f in plan.layers if ".layers.0." in f and f not in ip1]  # same inputs, no row weights: the same
    assert first and all(torch.equal(*W[f]) for f in first)


def test_plan_rejects_row_weights_of_the_wrong_length(tiny_model):
    from mixq.allocate import Budget, allocate
    from mixq.allocate.plan import Plan
    from mixq.measure import measure

    table = measure(tiny_model("llama"), IDS, [parse_spec("TCQ3-channel+ip1"), parse_spec("FP16")], metric="kfac",
                    algorithm="gptq", progress=False)
    plan = allocate(table, Budget(bpw=4.0))
    f = next(iter(plan.row_weights))
    with pytest.raises(ValueError, match="one weight per output row"):
        Plan(**{**plan.__dict__, "row_weights": {f: plan.row_weights[f][:-1]}})


@pytest.mark.parametrize("rows", [1, 64])  # a decode step's few bytes (compared as bytes), a prompt's (by sum)
def test_a_rotated_input_is_reused_only_while_unchanged(rows):
    from mixq.algorithms.composite.incoherence import rotate
    from mixq.runtime import composite_linear as cl

    x = torch.randn(1, rows, 576, dtype=torch.bfloat16)
    with torch.inference_mode():
        a = cl._rotate_input(x, 7, torch.float32)
        assert cl._rotate_input(x, 7, torch.float32) is a  # q, then k: the same tensor, unchanged
        assert cl._rotate_input(x, 8, torch.float32) is not a  # another seed
        a = cl._rotate_input(x, 7, torch.float32)
        x.add_(1.0)  # changed in place: an inference tensor keeps no version counter
        b = cl._rotate_input(x, 7, torch.float32)
        assert b is not a and torch.equal(b, rotate(x.float(), 7))
        assert cl._rotate_input(x.clone(), 7, torch.float32) is not b  # equal values, another tensor


def test_a_two_sided_weight_is_rebuilt_under_bf16_autocast():
    """The end-to-end epoch rebuilds an ``+ip`` int layer's weight under bf16 autocast (``--e2e-amp auto`` on a CPU
    with AMX): the per-factor products of the two transforms come back in bf16 and must meet factors of their dtype
    -- the result matches the float32 one within bf16 rounding, and gradients flow."""
    from mixq.algorithms.composite.incoherence import unrotate_weight

    W = torch.randn(1536, 576, generator=torch.Generator().manual_seed(0), requires_grad=True)
    ref = unrotate_weight(W.detach(), (3, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = unrotate_weight(W, (3, 5))
    assert float((out.float() - ref).abs().max()) < 0.02 * float(ref.abs().max())
    out.float().square().sum().backward()
    assert W.grad is not None and torch.isfinite(W.grad).all()
