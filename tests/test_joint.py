"""KV sensitivity, the exact KIVI decode simulation, the joint weight + KV knapsack, and ResQ — on tiny models."""
from __future__ import annotations

import copy
import itertools
import math
from dataclasses import replace

import pytest
import torch

from mixq.algorithms.resq import ResQQuantizer, apply_resq
from mixq.allocate import Constraints, LayerEntry, Plan, SensitivityTable
from mixq.allocate.joint import (InfeasibleMemory, allocate_joint, allocate_kv, allocate_separately, load_kv_plan,
                                 min_memory_bytes, uniform_kv)
from mixq.allocate.kv_table import KVEntry, KVSensitivityTable
from mixq.config import parse_spec
from mixq.data import eval_windows
from mixq.eval.kv import eval_with_kv_quant, kv_compare
from mixq.formats.act import fake_quant_act, parse_act_spec
from mixq.jsonio import write_json_atomic
from mixq.measure.kv import measure_kv
from mixq.models import model_fingerprint
from mixq.runtime.act_quant import apply_act_quant
from mixq.runtime.kv_cache import KIVICache
from mixq.runtime.kv_cost import kv_cache_bits
from mixq.runtime.kv_feed import decode_logits
from mixq.runtime.kv_settings import KVSettings, kv_part_bits
from mixq.runtime.kv_sim import simulate_kivi
from tiny import make_tiny

IDS = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))
SMALL = KVSettings(k_group=4, residual=8)


# ---------------------------------------------------------------------------- decode simulation
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("bits, chunk, prefill", [(2, 1, None), ({0: (2, 16), 1: (16, 3)}, 1, None),
                                                  ((3, 2), 5, 7), (16, 3, None)])
@torch.no_grad()
def test_simulation_equals_the_real_cache(family, bits, chunk, prefill):
    model = make_tiny(family)
    cache = KIVICache(model.config, bits, **SMALL.kw())
    real = torch.cat([lg for _, _, lg in decode_logits(model, IDS, cache, chunk=chunk, prefill=prefill)], 1)
    with simulate_kivi(model, bits, settings=SMALL, chunk=chunk, prefill=prefill):
        sim = model(IDS, use_cache=False).logits
    assert torch.allclose(sim, real, atol=2e-5, rtol=0)
    plain = model(IDS, use_cache=False).logits  # the context manager restored the attention
    if bits != 16:
        assert (plain - real).abs().max() > 1e-4
    assert model.config._attn_implementation == "sdpa"


def test_kv_compare_engines_agree_with_eval_with_kv_quant():
    model = make_tiny("llama")
    tokens = torch.randint(0, 128, (96,), generator=torch.Generator().manual_seed(3))
    win = eval_windows(tokens, 32)
    base = eval_with_kv_quant(model, win, (4, 2), chunk=4, prefill=8, batch_size=2, **SMALL.kw())
    ref = copy.deepcopy(model)
    c = kv_compare(model, win, (4, 2), ref, settings=SMALL, chunk=4, prefill=8, batch_size=2)
    s = kv_compare(model, win, (4, 2), ref, settings=SMALL, chunk=4, prefill=8, batch_size=3, engine="simulate")
    assert c["n_scored"] == s["n_scored"] == base["n_scored"] == 93
    assert abs(c["nll"] - base["nll"]) < 1e-6 and abs(s["nll"] - base["nll"]) < 1e-5
    assert abs(c["kl"] - s["kl"]) < 1e-5 and c["kl"] > 0 and c["top1_agreement"] == s["top1_agreement"]
    fp = kv_compare(model, win, 16, ref, settings=SMALL, chunk=4)
    assert fp["kl"] < 1e-7 and fp["top1_agreement"] == 1.0


# ---------------------------------------------------------------------------- KV sensitivity
def test_kv_sensitivity_table_shapes_monotone_and_round_trip(tmp_path):
    model = make_tiny("llama")
    calib = torch.randint(0, 128, (3, 48), generator=torch.Generator().manual_seed(1))
    out = tmp_path / "kv.json"
    t = measure_kv(model, calib, settings=SMALL, batch_size=2, out=out)
    assert t.dims == (2, 2, 16) and t.bits == (2, 3, 4, 8, 16) and len(t.entries) == 4
    assert t.model == model_fingerprint(model) and t.metric == "kl"
    for e in t.entries:
        assert e.error(16) == 0.0 and all(x >= 0 for x in e.errors)
        for lo, hi in zip(e.errors, e.errors[1:]):  # more bits never (beyond noise) hurt more
            assert hi <= lo * 1.05 + 1e-9
    assert max(t.entry(i, "v").error(2) for i in range(2)) > 1e-6  # 2-bit values do change the model
    back = KVSensitivityTable.load(out)
    assert back.to_dict() == t.to_dict() and not out.with_name("kv.json.partial").exists()
    back.check_model(model)
    with pytest.raises(ValueError, match="model"):
        back.check_model(make_tiny("llama", seed=1))
    # the real cache, chunk by chunk, measures the same errors
    c = measure_kv(model, calib[:2], settings=SMALL, bits=(2, 8), engine="cache", chunk=1)
    s = measure_kv(model, calib[:2], settings=SMALL, bits=(2, 8))
    for a, b in zip(c.entries, s.entries):
        assert all(abs(x - y) <= 1e-3 * max(x, y) + 1e-10 for x, y in zip(a.errors, b.errors))


def test_kv_measurement_resumes(tmp_path, monkeypatch):
    import mixq.measure.kv as ks

    model = make_tiny("llama")
    calib = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2))
    out = tmp_path / "kv.json"
    full = measure_kv(model, calib, settings=SMALL, bits=(2, 4))
    real = ks._score
    calls = {"n": 0}

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 6:  # fp pass (1) + layer 0's 4 candidates, then fail in layer 1
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ks, "_score", failing)
    with pytest.raises(KeyboardInterrupt):
        measure_kv(model, calib, settings=SMALL, bits=(2, 4), out=out)
    assert out.with_name("kv.json.partial").exists() and not out.exists()
    monkeypatch.setattr(ks, "_score", real)
    again = measure_kv(model, calib, settings=SMALL, bits=(2, 4), out=out)
    assert again.meta["resumed_layers"] == 1
    for a, b in zip(again.entries, full.entries):
        assert a.errors == pytest.approx(b.errors, rel=1e-9, abs=1e-15)


def test_part_costs_add_up_to_kv_cache_bits():
    model = make_tiny("llama")
    dims, st = (2, 2, 16), KVSettings(k_group=8, residual=16, v_group=8)
    plan = {0: (2, 8), 1: (16, 3)}
    for ctx, batch in [(1, 1), (20, 2), (100, 3), (257, 1)]:
        parts = sum(kv_part_bits(dims, "k", k, ctx, batch, st) + kv_part_bits(dims, "v", v, ctx, batch, st)
                    for k, v in plan.values())
        assert parts == kv_cache_bits(model.config, plan, ctx, batch, **st.kw())["total"]
    assert kv_part_bits(dims, "k", 16, 100, 1) == 2 * 100 * 16 * 16


# ---------------------------------------------------------------------------- joint allocation
def _weight_table():
    g = torch.Generator().manual_seed(5)
    cands = tuple(parse_spec(n) for n in ("W2-g32-asym", "W4-g32", "W8-channel"))
    layers = []
    for i, shape in enumerate([(16, 32), (32, 32), (8, 64)]):
        base = float(torch.rand(1, generator=g)) * 0.1 + 0.01
        layers.append(LayerEntry(f"l{i}", shape, cands, (base, base / 12, base / 900)))
    return SensitivityTable(tuple(layers), "kfac", {"model": "abc"})


def _kv_table(metric="kl"):
    g = torch.Generator().manual_seed(6)
    entries = []
    for i in range(2):
        for kind in ("k", "v"):
            e2 = float(torch.rand(1, generator=g)) * 0.05 + 0.001
            entries.append(KVEntry(i, kind, (2, 4, 8, 16), (e2, e2 / 10, e2 / 300, 0.0)))
    return KVSensitivityTable(tuple(entries), (2, 1, 8), metric, KVSettings(k_group=4, residual=4), "abc")


def _brute(wt, kt, memory, context, batch, tied=False):
    w_rows = [[(s.cost(x.shape).total, e) for s, e in zip(x.candidates, x.errors)] for x in wt.layers]
    kv_rows = [list(zip(c, e)) for _, _, c, e in kt.rows(context, batch)]
    best = math.inf
    for w in itertools.product(*w_rows):
        wb, we = sum(c for c, _ in w), sum(e for _, e in w)
        if wb > 8 * memory:
            continue
        for kv in itertools.product(*[range(len(r)) for r in kv_rows]):
            if tied and any(kv[2 * i] != kv[2 * i + 1] for i in range(len(kv) // 2)):
                continue
            bits = wb + sum(kv_rows[j][c][0] for j, c in enumerate(kv))
            if bits <= 8 * memory:
                best = min(best, we + sum(kv_rows[j][c][1] for j, c in enumerate(kv)))
    return best


@pytest.mark.parametrize("context, batch", [(16, 1), (40, 2)])
def test_joint_equals_brute_force_and_never_exceeds(context, batch):
    wt, kt = _weight_table(), _kv_table()
    lo = min_memory_bytes(wt, kt, context, batch)
    hi = math.ceil((sum(x.costs()[-1] for x in wt.layers) + sum(max(r[2]) for r in kt.rows(context, batch))) / 8)
    for memory in sorted({lo, lo + 7, (lo + hi) // 3, (lo + hi) // 2, (2 * lo + 3 * hi) // 5, hi, hi + 100}):
        for tied in (False, True):
            plan = allocate_joint(wt, kt, memory, context, batch, kv_tied=tied)
            assert plan.total_bytes <= memory
            assert plan.predicted_error == pytest.approx(_brute(wt, kt, memory, context, batch, tied), rel=1e-6, abs=1e-12)
            assert plan.weights.total_bits + plan.kv_bits_total == 8 * plan.total_bytes
            exact = kv_cache_bits(_cfg(kt), plan.kv_bits_dict(), context, batch, **kt.settings.kw())["total"]
            assert plan.kv_bits_total == exact
            if tied:
                assert all(k == v for k, v in plan.kv)
        sep = allocate_separately(wt, kt, memory, context, batch, kv_bits=4) if memory >= _min_sep(wt, kt, context, batch) else None
        if sep is not None:
            assert sep.total_bytes <= memory
            assert plan.predicted_error <= sep.predicted_error + 1e-12


def _cfg(kt):
    from types import SimpleNamespace

    L, H, D = kt.dims
    return SimpleNamespace(num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=H, head_dim=D, hidden_size=H * D)


def _min_sep(wt, kt, context, batch):
    return math.ceil(sum(x.costs()[0] for x in wt.layers) / 8) + math.ceil(uniform_kv(kt, 4, context, batch).kv_bytes)


def test_infeasible_memory_names_the_minimum_and_units_are_checked(tmp_path):
    wt, kt = _weight_table(), _kv_table()
    lo = min_memory_bytes(wt, kt, 64, 2)
    with pytest.raises(InfeasibleMemory) as e:
        allocate_joint(wt, kt, lo - 1, 64, 2)
    assert e.value.min_bytes == lo and f"at least {lo} bytes" in str(e.value)
    assert allocate_joint(wt, kt, lo, 64, 2).total_bytes <= lo
    assert allocate_joint(wt, kt, lo, 64, 2, kv_bits=(2, 16)).kv == ((2, 2), (2, 2))
    with pytest.raises(ValueError, match="nats"):
        allocate_joint(SensitivityTable(wt.layers, "hessian", {}), kt, 10**6, 64)
    assert allocate_joint(SensitivityTable(wt.layers, "kfac-tok", {}), kt, 10**6, 64).total_bytes <= 10**6  # nats too
    with pytest.raises(ValueError, match="same model"):
        allocate_joint(SensitivityTable(wt.layers, "kfac", {"model": "other"}), kt, 10**6, 64)
    with pytest.raises(ValueError, match="uniform"):
        allocate_joint(wt, kt, 10**6, 64, method="uniform")
    # the KV-only allocation at the bytes of a uniform width is at least as good as that width
    for b in (2, 4, 8):
        uni = uniform_kv(kt, b, 64, 2)
        mixed = allocate_kv(kt, math.ceil(uni.kv_bytes), 64, 2)
        assert mixed.kv_bytes <= math.ceil(uni.kv_bytes) and mixed.kv_error <= uni.kv_error + 1e-12
    # the KV plan file round trip (mixq eval --kv-plan)
    plan = allocate_joint(wt, kt, lo + 5000, 64, 2, constraints=Constraints(keep=("l2",)))
    assert plan.weights.layers["l2"].name == "FP16"
    write_json_atomic(tmp_path / "kv.json", plan.kv_plan_dict())
    bits, settings, _ = load_kv_plan(tmp_path / "kv.json")
    assert bits == plan.kv_bits_dict() and settings == kt.settings
    plan.save(tmp_path / "joint.json")
    assert load_kv_plan(tmp_path / "joint.json")[0] == bits
    # one plan file for weights and KV (mixq plan --memory): it round-trips and carries the same widths
    one = plan.as_plan()
    one.save(tmp_path / "plan.json")
    back = Plan.load(tmp_path / "plan.json")
    assert back.layers == plan.weights.layers and back.kv == plan.kv_plan_dict()
    assert load_kv_plan(tmp_path / "plan.json")[0] == bits and load_kv_plan(back.to_dict()["kv"])[0] == bits
    with pytest.raises(ValueError, match="weights-only"):
        load_kv_plan(plan.weights.to_dict())
    with pytest.raises(ValueError, match="KVPlan"):
        replace(plan.weights, kv={"layers": []})
    assert "K bits" in plan.format()


# ---------------------------------------------------------------------------- ResQ
def _low_rank(T=512, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(T, 4, generator=g) * 10
    return z @ torch.randn(4, n, generator=g) + 0.3 * torch.randn(T, n, generator=g)


def test_resq_exact_at_16_bits_and_better_than_4_bit_on_low_rank_data():
    x = _low_rank()
    H = x.T @ x / x.shape[0]
    same = ResQQuantizer.fit(H, hi=None, lo=16)
    assert torch.allclose(same(x), x, atol=1e-4, rtol=1e-5)
    q = ResQQuantizer.fit(H, hi="A8", lo="A4")
    assert q.r == 8 and q.bits_per_element() == 4.5
    P = q.P.double()
    assert torch.allclose(P.T @ P, torch.eye(64, dtype=torch.float64), atol=1e-5)
    err = (q(x) - x).pow(2).mean()
    plain4 = (fake_quant_act(x, parse_act_spec("A4")) - x).pow(2).mean()
    assert err < 0.05 * plain4
    no_rot = ResQQuantizer.fit(H, hi="A8", lo="A4", rotate=False)
    assert (no_rot(x) - x).pow(2).mean() < plain4


@pytest.mark.parametrize("fold", [False, True])
@torch.no_grad()
def test_resq_on_a_model_16_bits_unchanged(fold):
    model = make_tiny("llama")
    ids, calib = IDS[:, :16], torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    ref = model(ids).logits
    m = copy.deepcopy(model)
    h = apply_resq(m, calib, hi=None, lo=None, fold=fold)
    assert len(h.quantizers) == 14
    assert torch.allclose(m(ids).logits, ref, atol=2e-5)
    h.remove()
    m = copy.deepcopy(model)
    h = apply_resq(m, calib, hi="A8", lo="A4", fold=fold)
    out = m(ids).logits
    assert not torch.allclose(out, ref, atol=1e-3) and torch.isfinite(out).all()
    shared = {id(q): q for q in h.quantizers.values()}  # q/k/v and gate/up share a quantizer (one input each)
    assert len(shared) == 8 and sum(q.calls for q in shared.values()) == 14
    h.remove()
    with apply_act_quant(m, "A8"):  # composes with the plain activation hooks
        m(ids)
