"""Intra-tensor mixed precision (mixq.formats.composite, mixq.algorithms.composite): composite specs, exact costs,
quantizers, allocation."""
import json
import math

import pytest
import torch

from mixq import formats
from mixq.algorithms.gptq import gptq_quantize
from mixq.algorithms.rtn import rtn_quantize
from mixq.allocate import Budget, LayerEntry, Plan, SensitivityTable, allocate, extended_candidates, load_candidates
from mixq.config import CompositeSpec, QuantSpec, compose, is_composite, parse_spec
from mixq.formats.composite.sparse import CSR
from mixq.allocate.intra_candidates import intra_candidates
from mixq.algorithms.composite.quant import quantize_composite


def _hessian(C, n=1024, seed=0, corr=0.3, spread=None):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(C) + corr * torch.randn(C, C, generator=g) / C**0.5
    scale = torch.rand(C, generator=g) * 2 + 0.1 if spread is None else spread
    X = (torch.randn(n, C, generator=g) @ mix) * scale
    return X.T @ X / n


def _weight(R, C, seed=1, outliers=0.003, factor=20.0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(R, C, generator=g) * 0.05
    idx = torch.randperm(R * C, generator=g)[: int(outliers * R * C)]
    W.view(-1)[idx] *= factor
    return W


def _err(W, Wq, H):
    d = (W - Wq).double()
    return float(((d @ H.double()) * d).sum())


# ---------------------------------------------------------------------- names
def test_names_round_trip_and_errors():
    for s in intra_candidates("all"):
        assert is_composite(s) and isinstance(s, QuantSpec)
        assert parse_spec(s.name) == s and parse_spec(s.name).name == s.name
        assert CompositeSpec.from_dict(json.loads(json.dumps(s.to_dict()))) == s
        assert parse_spec(s.to_dict()) == s
    assert parse_spec("W3-g64") == parse_spec("W3-g64") and not is_composite(parse_spec("W3-g64"))
    assert parse_spec(parse_spec("W4-g32").to_dict()) == parse_spec("W4-g32")
    # any order and case on input, canonical order (sq, c, o) on output
    s = parse_spec("w3-g16+O0.25+SQ3")
    assert s.name == "W3-g16+sq3+o0.25" and s == compose("W3-g16", sq_bits=3, outliers=0.25)
    assert parse_spec("W3-g16+sq3g32").sq_group == 32 and parse_spec("W3-g16+sq3g32").name == "W3-g16+sq3g32"
    assert parse_spec("SLIM3-g64-asym") == compose("W3-g64-asym", slim=True)
    assert parse_spec("KM3+o0.45").name == "KM3-channel+o0.45"
    assert parse_spec("W3-g64+h5w6") == compose("W3-g64", hi_rows=5, hi_bits=6)
    assert parse_spec("W3-g64+h10").name == "W3-g64+h10" and parse_spec("W3-g64+h10").hi_bits == 8
    assert parse_spec("nf4-g32+D8+o0.5").name == "NF4-g32+o0.5+d8"
    assert parse_spec("W3-g64+o0.5") != parse_spec("W3-g64")  # a composite never equals its base
    assert len({parse_spec("W3-g64+o0.5"), parse_spec("W3-g64+o0.50"), parse_spec("W3-g64")}) == 2
    for bad in ["W3-g64+x1", "W3-g64+o0", "W3-g64+o1+o2", "SLIM8-g64", "SLIM3-channel", "KM3+sq3", "FP16+o1",
                "W3-tensor+o1", "W3-g64+o100", "NVFP4+sq3", "W3-g64+h10+o1", "W8-g64+h10", "W3-g64+h5w3",
                "W3-g64+d4", "NF4-g32+d3", "NF4-g32+d4+sq3"]:
        with pytest.raises(ValueError):
            parse_spec(bad)


# ---------------------------------------------------------------------- costs
def test_costs_by_hand():
    R, C = 96, 256
    hand = {
        # codes R*C*3, scales R*4*16, outliers floor(0.5% * 24576) = 122 -> 122*(16+16) + (R+1)*32
        "W3-g64+o0.5": (73728, 6144, 0, 0, 122 * 32 + 97 * 32),
        # 8 fp16 columns: n = 248 dense, ceil(248/64) = 4 group columns; extra R*8*16 + 8*16
        "W3-g64+c8": (96 * 248 * 3, 96 * 4 * 16, 0, 0, 96 * 8 * 16 + 8 * 16),
        # 1536 groups: scales 1536*3 + (16 group columns * ceil(96/16) second-level groups) * 32
        "W3-g16+sq3": (73728, 1536 * 3 + 96 * 32, 0, 0, 0),
        "W3-g16-asym+sq3": (73728, 1536 * 3 + 96 * 32, 1536 * 3, 0, 0),     # int zeros stay 3-bit
        "W3-g16-asymf+sq3g32": (73728, 1536 * 3 + 48 * 32, 1536 * 3 + 48 * 32, 0, 0),  # fp16 offsets too
        "SLIM3-g64": (73728, 6144, 0, 0, 4 * 2),                              # 2-bit map per group column
        "SLIM2-g64-asym": (49152, 6144, 96 * 4 * 2, 0, 4 * 2),
        # per-row codebooks 8*16; floor(0.45% * 24576) = 110 outliers
        "KM3+o0.45": (73728, 0, 0, 96 * 8 * 16, 110 * 32 + 97 * 32),
        "W3-g16-asym+sq3+o0.25": (73728, 1536 * 3 + 96 * 32, 1536 * 3, 0, 61 * 32 + 97 * 32),
        # 768 groups of 32 with an fp16 scale and a 3-bit dialect index each
        "NF4-g32+d8": (96 * 256 * 4, 768 * 16, 0, 0, 768 * 3),
        # floor(10% * 96) = 9 rows at W8-g64, 87 at W3-g64, 9 row indices of 16 bits
        "W3-g64+h10": (87 * 256 * 3 + 9 * 256 * 8, 96 * 4 * 16, 0, 0, 9 * 16),
    }
    for name, (codes, scales, zeros, codebook, extra) in hand.items():
        c = parse_spec(name).cost((R, C))
        assert (c.codes, c.scales, c.zeros, c.codebook, c.extra) == (codes, scales, zeros, codebook, extra), name
        assert c.numel == R * C and c.total == codes + scales + zeros + codebook + extra
    # a partial last group: 97 dense columns in groups of 10 -> 10 group columns
    c = parse_spec("W4-g10+c3").cost((10, 100))
    assert (c.codes, c.scales, c.extra) == (10 * 97 * 4, 10 * 10 * 16, 10 * 3 * 16 + 3 * 16)
    # column indices take 32 bits past 65536 columns
    c = parse_spec("W4-channel+o1").cost((1, 2**17))
    assert c.extra == 1310 * (16 + 32) + 2 * 32
    # the base must fit the full row, as a plain spec must
    with pytest.raises(ValueError, match="group size"):
        parse_spec("W3-g64+o0.5").cost((8, 96))
    with pytest.raises(ValueError, match="no dense column"):
        parse_spec("W3-channel+c8").cost((8, 8))


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_stored_parts_match_cost_and_rebuild_exactly(method):
    R, C = 48, 128
    W, H = _weight(R, C), _hessian(C)
    extra = ["W4-g32-asymf+sq4+c5+o1", "NF3-g32+o0.5", "FP4-g32+c3+o0.5+d16"]
    extra += ["BIN-g32+r16+o1w8", "BIN-g64+o2", "BIN-channel+r8"]
    for s in intra_candidates("all") + [parse_spec(n) for n in extra]:
        if s.name.startswith("W4-g64+o") or s.name.startswith("KM4") or C % getattr(s.granularity, "size", 1):
            continue  # same code paths as their 3-bit siblings; BIN-g192 does not fit 128 columns
        qt, Wq = quantize_composite(W, s, H, method)
        assert qt.stored_bits() == s.cost((R, C)).total, s.name
        assert torch.equal(qt.dequantize(), Wq), s.name
        if s.hi_rows:
            assert qt.hi_rows.numel() == s.n_hi_rows((R, C))
            continue
        if s.binary:
            assert qt.res_cols.numel() == s.residual and qt.n_outliers == s.n_outliers((R, C)), s.name
            if method == "gptq":
                assert qt.proxy_loss == pytest.approx(_err(W, Wq, H), rel=1e-6)
            continue
        assert qt.fp16_cols.numel() == s.columns
        assert (qt.sparse.nnz if qt.sparse is not None else 0) == s.n_outliers((R, C))
        if method == "gptq":
            assert qt.proxy_loss == pytest.approx(_err(W, Wq, H), rel=1e-6)
    qt, Wq = quantize_composite(W, "W3-g64+h10", H, method)
    assert qt.proxy_loss == pytest.approx(_err(W, Wq, H), rel=1e-6)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_packed_storage_is_the_accounted_size_and_round_trips(method):
    from mixq.algorithms.composite.families import pack_composite, unpack_composite
    from mixq.algorithms.composite.storage import packed_bits

    R, C = 40, 128
    W, H = _weight(R, C), _hessian(C)
    extra = ["W4-g32-asymf+sq4+c5+o1", "FP4-g32+c3+o0.5+d16", "SLIM2-g32-asym+c7", "W3-g32+h10",
             "BIN-g32+r16+o1w8", "BIN-g64+o2", "BIN-g32+o0.5w3", "BIN-channel+r5",
             "BIN-g32+o0.01w8", "W3-g32+o0.01"]  # the last two keep no weight (floor(0.01 % x 5120) = 0)
    for s in intra_candidates("all") + [parse_spec(n) for n in extra]:
        if C % getattr(s.granularity, "size", 1):
            continue
        qt, Wq = quantize_composite(W, s, H, method)
        t = pack_composite(qt)
        assert 0 <= packed_bits(t) - s.cost((R, C)).total < 8 * len(t), s.name  # byte padding only
        back = unpack_composite(t, s, (R, C))
        assert torch.equal(back.dequantize(), Wq), s.name


# ---------------------------------------------------------------------- sparse part
def test_csr_round_trips_exactly():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(7, 300, generator=g) * 10
    mask = torch.rand(7, 300, generator=g) < 0.05
    mask[2] = False  # an empty row
    mask[5, -1] = True
    sp = CSR.from_mask(W, mask)
    assert sp.nnz == int(mask.sum()) and torch.equal(sp.mask(), mask)
    assert sp.row_ptr.tolist()[0] == 0 and sp.row_ptr.tolist()[-1] == sp.nnz
    assert sp.row_ptr[3] == sp.row_ptr[2]
    dense = sp.to_dense()
    assert torch.equal(dense[mask], W[mask].half().float()) and not dense[~mask].any()
    again = CSR.from_mask(dense, sp.mask())
    for a, b in zip((sp.values, sp.cols, sp.row_ptr), (again.values, again.cols, again.row_ptr)):
        assert torch.equal(a, b)
    assert sp.bits() == sp.nnz * (16 + 16) + 8 * 32
    Z = torch.zeros(7, 300)
    assert torch.equal(sp.apply(Z), dense)
    # the composite's sparse part holds exactly the reconstruction's outlier values
    W2, H = _weight(32, 128), _hessian(128)
    qt, Wq = quantize_composite(W2, "W3-g32+o1", H, "gptq")
    m = qt.sparse.mask()
    assert torch.equal(qt.sparse.to_dense()[m], Wq[m])


# ---------------------------------------------------------------------- quality
def test_outliers_beat_plain_grid_at_equal_bits():
    """Planted outliers: 0.5 % fp16 outliers on a g64 grid cost less than g32 and err far less."""
    R, C = 128, 512
    W, H = _weight(R, C, outliers=0.004), _hessian(C)
    comp, plain = parse_spec("W3-g64+o0.5"), parse_spec("W3-g32")
    assert comp.cost((R, C)).total <= plain.cost((R, C)).total
    e_rtn = _err(W, quantize_composite(W, comp, H, "rtn")[1], H)
    assert e_rtn < 0.7 * _err(W, rtn_quantize(W, plain)[1], H)
    e_gptq = _err(W, quantize_composite(W, comp, H, "gptq")[1], H)
    assert e_gptq < 0.7 * _err(W, gptq_quantize(W, H, plain).weight, H)
    # the outliers found are the planted ones (0.4 % planted, 0.5 % kept)
    planted = W.abs() > 0.5
    for method in ("rtn", "gptq"):
        qt, _ = quantize_composite(W, comp, H, method)
        assert (qt.sparse.mask() & planted).sum() >= 0.95 * planted.sum()


def test_weighted_kmeans_beats_uniform_grid():
    """SqueezeLLM-style k-means with diag(H) weights: lower diag(H)-weighted error than a uniform 3-bit
    per-channel grid with the same code bits, and than unweighted k-means."""
    R, C = 64, 256
    spread = torch.logspace(-1.5, 1, C)[torch.randperm(C, generator=torch.Generator().manual_seed(0))]
    W, H = _weight(R, C, outliers=0.0), _hessian(C, corr=0.0, spread=spread)
    d = torch.diagonal(H)[None]

    def werr(Wq):
        return float((d * (W - Wq) ** 2).sum())

    km_w = formats.dequantize(formats.quantize(W, parse_spec("KM3"), weight=d))
    km_u = formats.dequantize(formats.quantize(W, parse_spec("KM3")))
    uni = rtn_quantize(W, parse_spec("W3-channel-asymf"))[1]
    assert werr(km_w) <= werr(uni) and werr(km_w) <= werr(km_u)
    # the composite path: KM3+o vs the uniform grid with the same outliers
    e_km = werr(quantize_composite(W, "KM3+o0.45", H, "rtn")[1])
    assert e_km <= werr(quantize_composite(W, "W3-channel-asymf+o0.45", H, "rtn")[1])
    assert e_km <= werr(km_w)


def test_slim_bit_map_keeps_its_average():
    R, C, g = 64, 1024, 64
    spread = torch.ones(C)
    spread[:g] = 8.0       # one very salient group column
    spread[5 * g: 7 * g] = 0.05  # two nearly idle ones
    H = torch.diag(spread**2)   # diagonal H: the SLIM objective is exactly the error below
    W = _weight(R, C, outliers=0.0)
    spec = parse_spec("SLIM3-g64")
    qt, Wq = quantize_composite(W, spec, H, "rtn")
    bits = qt.group_bits
    assert len(bits) == C // g and set(bits) <= {2, 3, 4}
    assert bits.count(4) == bits.count(2) >= 1 and sum(bits) == 3 * len(bits)
    assert bits[0] == 4 and 2 in (bits[5], bits[6])
    for j, b in enumerate(bits):
        assert int(qt.codes[:, j * g:(j + 1) * g].max()) < 2**b
    assert qt.stored_bits() == spec.cost((R, C)).total == parse_spec("W3-g64").cost((R, C)).total + (C // g) * 2
    assert _err(W, Wq, H) < _err(W, rtn_quantize(W, parse_spec("W3-g64"))[1], H)
    # with fp16 columns the last group column is partial and keeps the base bits
    qt2, _ = quantize_composite(W, "SLIM3-g64+c8", H, "gptq")
    assert qt2.group_bits[-1] == 3 and sum(qt2.group_bits) == 3 * len(qt2.group_bits)


def test_gptq_with_kept_values_beats_rtn_with_the_same():
    R, C = 96, 256
    spread = torch.rand(C, generator=torch.Generator().manual_seed(5)) + 0.2
    spread[[7, 100, 201]] = 12.0  # three input channels with large activations
    W, H = _weight(R, C), _hessian(C, corr=0.5, spread=spread)
    for name in ["W3-g64+o0.5", "W3-g64+c8", "W3-g16+sq3", "SLIM3-g64", "KM3+o0.45", "W3-g16-asym+sq3+o0.25"]:
        q_rtn, W_rtn = quantize_composite(W, name, H, "rtn")
        q_gptq, W_gptq = quantize_composite(W, name, H, "gptq")
        assert _err(W, W_gptq, H) < _err(W, W_rtn, H), name
    # OWQ keeps the high-activation columns in fp16
    qt, Wq = quantize_composite(W, "W3-g64+c8", H, "gptq")
    assert {7, 100, 201} <= set(qt.fp16_cols.tolist())
    assert _err(W, Wq, H) < _err(W, gptq_quantize(W, H, parse_spec("W3-g64")).weight, H)


def test_hi_rows_take_the_rows_that_gain_most():
    """MixLLM +h: the rows with the largest predicted gain (times G when given) go to 8 bits."""
    R, C = 100, 256
    W, H = _weight(R, C, outliers=0.0), _hessian(C)
    W[[3, 50, 77]] *= 10  # three rows with 10x the error of the others
    spec = parse_spec("W3-g64+h3")
    qt, Wq = quantize_composite(W, spec, H, "rtn")
    assert qt.hi_rows.tolist() == [3, 50, 77] and qt.hi.spec == parse_spec("W8-g64")
    assert qt.stored_bits() == spec.cost((R, C)).total and torch.equal(qt.dequantize(), Wq)
    G = torch.ones(R)
    G[[10, 11, 12]] = 1e4  # output-gradient energy: loss-based salience wins over weight error
    qt2, _ = quantize_composite(W, spec, H, "rtn", row_weight=G)
    assert qt2.hi_rows.tolist() == [10, 11, 12]
    qg, Wg = quantize_composite(W, spec, H, "gptq")
    assert _err(W, Wg, H) < _err(W, Wq, H) and torch.equal(qg.dequantize(), Wg)
    assert _err(W, Wq, H) < _err(W, rtn_quantize(W, parse_spec("W3-g64"))[1], H) / 3
    # rows are independent under GPTQ: the low rows equal plain GPTQ on them
    lo = qg.lo_rows()
    assert torch.allclose(Wg[lo], gptq_quantize(W[lo], H, parse_spec("W3-g64")).weight, atol=1e-6)


def test_block_dialects_never_worse_than_their_base():
    R, C = 64, 256
    spread = torch.logspace(-1, 0.5, C)
    W, H = _weight(R, C, outliers=0.002), torch.diag(spread**2)
    for base, name in [("NF4-g32", "NF4-g32+d8"), ("NF3-g32", "NF3-g32+d4"), ("FP4-g32", "FP4-g32+d16")]:
        qt, Wq = quantize_composite(W, name, H, "rtn")
        assert _err(W, Wq, H) <= _err(W, rtn_quantize(W, parse_spec(base))[1], H) * (1 + 1e-6), name
        used = torch.cat([p.zero.flatten() for p in qt.params]).long()
        assert used.max() < parse_spec(name).dialects and len(used.unique()) > 1
        assert qt.stored_bits() == parse_spec(name).cost((R, C)).total
        assert torch.equal(qt.dequantize(), Wq)


# ---------------------------------------------------------------------- allocation
def test_table_and_plan_json_round_trip(tmp_path):
    names = ["W2-g32-asym", "W3-g32", "W3-g32+o0.5", "SLIM3-g32", "W3-g16+sq3", "KM3+o0.45", "W4-g32", "FP16"]
    cands = [parse_spec(n) for n in names]
    layers = [LayerEntry(f"l{i}", (64, 128), tuple(cands), tuple(float(10 - k + i) for k in range(len(cands))))
              for i in range(3)]
    table = SensitivityTable(tuple(layers), "hessian")
    doc = json.loads(json.dumps(table.to_dict()))
    assert doc["layers"][0]["candidates"] == [c.name for c in cands]  # composites stored by name
    assert SensitivityTable.from_dict(doc).to_dict() == table.to_dict()
    plan = allocate(table, Budget(bpw=3.4))
    assert plan.total_bits <= plan.budget_bits
    p = plan.save(tmp_path / "plan.json")
    back = Plan.load(p)
    assert back.layers == plan.layers and back.total_bits == plan.total_bits
    # a composite stored as a dict (e.g. written by another tool) loads too
    d = plan.to_dict()
    f0 = next(iter(d["layers"]))
    d["layers"][f0]["spec"] = parse_spec("SLIM3-g32").to_dict()
    d["layers"][f0]["bits"] = parse_spec("SLIM3-g32").cost((64, 128)).total
    d.pop("total_bits")
    assert Plan.from_dict(d).layers[f0] == parse_spec("SLIM3-g32")
    # candidate files and named sets
    (tmp_path / "c.txt").write_text("W3-g32\nW3-g32+o0.5  # outliers\nSLIM3-g32\n")
    assert load_candidates(tmp_path / "c.txt") == [parse_spec(n) for n in ["W3-g32", "W3-g32+o0.5", "SLIM3-g32"]]
    (tmp_path / "c.json").write_text(json.dumps([parse_spec("KM3+o0.45").to_dict(), "W4-g32"]))
    assert load_candidates(tmp_path / "c.json")[0] == parse_spec("KM3+o0.45")
    assert load_candidates("default+intra") == extended_candidates()
    assert load_candidates("intra:small") == intra_candidates("small")


def _ids(n=8, L=32):
    return torch.randint(0, 100, (n, L), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("algorithm", ["rtn", "gptq"])
def test_measure_allocate_quantize_tiny_model(tiny_model, algorithm):
    from mixq import api
    from mixq.measure import measure

    model = tiny_model("llama")
    ids = _ids()
    plain = [parse_spec(n) for n in ["W2-g32-asym", "W3-g32", "W4-g32", "FP16"]]
    comps = [parse_spec(n) for n in ["W3-g32+o0.5", "W3-g16+sq3", "SLIM3-g32", "KM3+o0.45", "W3-g32+c4",
                                          "W2-g32-asym+o1", "W3-g32+h10", "NF3-g32+d4"]]
    table = measure(model, ids, plain + comps, metric="hessian", algorithm=algorithm, progress=False)
    assert len(table.layers) == 14
    tot = {}
    for e in table.layers:
        assert [c.name for c in e.candidates] == [c.name for c in plain + comps]
        for c, err in zip(e.candidates, e.errors):
            assert math.isfinite(err) and err >= 0
            tot[c.name] = tot.get(c.name, 0.0) + err
    assert tot["W3-g32+o0.5"] < tot["W3-g32"] and tot["W2-g32-asym+o1"] < tot["W2-g32-asym"]
    assert tot["W3-g16+sq3"] < tot["W3-g32"]
    for bpw in (2.6, 3.3, 3.6):
        plan = allocate(table, Budget(bpw=bpw), method="exact")
        assert plan.total_bits <= plan.budget_bits
    assert any(is_composite(s) for s in plan.layers.values())
    # quantize the model with the plan: the written weights are the composites' reconstructions
    specs = dict(plan.layers)
    res = api.quantize_model(model, specs, method=algorithm, calib_ids=ids if algorithm == "gptq" else None,
                             progress=False)
    size = api.size_report(model, specs)
    assert size["bits_quantized"] == plan.total_bits
    for fqn, s in specs.items():
        if is_composite(s):
            W = model.get_submodule(fqn).weight
            assert torch.equal(res.qtensors[fqn].dequantize(), W.float()), fqn
            assert res.qtensors[fqn].stored_bits() == s.cost(tuple(W.shape)).total
    with pytest.raises(ValueError, match="AWQ"):
        api.quantize_model(model, specs, method="awq", calib_ids=ids, progress=False)


# ---------------------------------------------------------------------- binarization (BiLLM / PB-LLM)
def test_binary_names_and_costs_by_hand():
    assert parse_spec("BIN-g64") == compose("W1-g64", binary=True) and parse_spec("BIN").name == "BIN-g128"
    s = parse_spec("bin-g64+O2W8+R32")
    assert s.name == "BIN-g64+r32+o2w8" and (s.residual, s.outliers, s.outlier_bits) == (32, 2.0, 8)
    assert parse_spec("BIN-g64+o1w16") == parse_spec("BIN-g64+o1")
    for bad in ["BIN-g64-asym", "BIN-g64-mse", "BIN-g64+sq3", "BIN-g64+c4", "BIN-g64+h5", "W3-g64+r8",
                "W3-g64+o1w8", "BIN-g64+o1w9", "BIN-g64+o1w1", "BIN-g64+w8", "BIN-se8m0", "SLIM1-g64"]:
        with pytest.raises(ValueError):
            parse_spec(bad)
    R, C = 96, 576
    hand = {
        # sign bits + one fp16 scale per 64
        "BIN-g64": (R * C, R * 9 * 16, 0),
        # 32 residual columns: 544 dense columns in ceil(544/64) = 9 groups, 2 planes + 2 fp16 scales per row,
        # 32 int16 column indices
        "BIN-g64+r32": (R * 544 + 2 * R * 32, R * 9 * 16 + 2 * R * 16, 32 * 16),
        # floor(2% * 55296) = 1105 salient weights: 8-bit codes + int16 columns, int32 row pointers,
        # an fp16 scale per row
        "BIN-g64+o2w8": (R * C, R * 9 * 16, 1105 * (8 + 16) + 97 * 32 + R * 16),
        "BIN-g64+o2": (R * C, R * 9 * 16, 1105 * (16 + 16) + 97 * 32),
        # 544 dense columns in groups of 192: 192, 192, 160
        "BIN-g192+r32+o1w8": (R * 544 + 2 * R * 32, R * 3 * 16 + 2 * R * 16, 32 * 16 + 552 * 24 + 97 * 32 + R * 16),
        "BIN-channel-sfp32+r8": (R * 568 + 2 * R * 8, R * 32 + 2 * R * 32, 8 * 16),
    }
    for name, (codes, scales, extra) in hand.items():
        c = parse_spec(name).cost((R, C))
        assert (c.codes, c.scales, c.zeros, c.codebook, c.extra) == (codes, scales, 0, 0, extra), name
    assert parse_spec("BIN-g64").cost((R, C)) == parse_spec("W1-g64").cost((R, C))
    for s in intra_candidates("all"):
        if s.binary:
            assert 1.0 < s.bpw((576, 1536)) <= s.bpw((576, 576)) < 2.0, s.name


def test_binary_error_falls_with_the_salient_fraction():
    """PB-LLM: more salient weights kept at 8 bits -> less error; BiLLM: residual columns help; GPTQ helps."""
    R, C = 64, 256
    spread = torch.rand(C, generator=torch.Generator().manual_seed(2)) + 0.2
    spread[[5, 70, 200]] = 6.0
    W, H = _weight(R, C, outliers=0.002), _hessian(C, corr=0.3, spread=spread)
    for method in ("rtn", "gptq"):
        errs = [_err(W, quantize_composite(W, f"BIN-g64+o{p}w8" if p else "BIN-g64", H, method)[1], H)
                for p in (0, 0.5, 1, 2, 5, 10)]
        assert all(b < a for a, b in zip(errs, errs[1:])), (method, errs)
        e_res = [_err(W, quantize_composite(W, f"BIN-g64+r{k}" if k else "BIN-g64", H, method)[1], H)
                 for k in (0, 8, 32)]
        assert e_res[2] < e_res[1] < e_res[0], (method, e_res)
    # the residual columns follow the Hessian: the three loud input channels are among them
    qt, _ = quantize_composite(W, "BIN-g64+r8", H, "rtn")
    assert {5, 70, 200} <= set(qt.res_cols.tolist())
    # the L2-optimal scale beats W1's absmax scale at equal bits, GPTQ beats RTN
    e_bin = _err(W, quantize_composite(W, "BIN-g64", H, "rtn")[1], H)
    assert e_bin < _err(W, rtn_quantize(W, parse_spec("W1-g64"))[1], H)
    assert _err(W, quantize_composite(W, "BIN-g64", H, "gptq")[1], H) < e_bin
    # 8-bit salient weights err little more than fp16 ones, for 8 fewer bits each
    e8 = _err(W, quantize_composite(W, "BIN-g64+o2w8", H, "rtn")[1], H)
    e16 = _err(W, quantize_composite(W, "BIN-g64+o2", H, "rtn")[1], H)
    assert e16 <= e8 < 1.05 * e16


def test_binary_stored_parts_are_what_they_claim():
    R, C = 32, 128
    W = _weight(R, C, outliers=0.01)
    qt, Wq = quantize_composite(W, "BIN-g32+r8+o1w4", None, "rtn")  # no statistics: plain means
    assert qt.res_codes.shape == (2, R, 8) and qt.res_scale.shape == (R, 2) and qt.scale.shape == (R, 4)
    assert int(qt.out_codes.abs().max()) <= 7 and qt.out_scale.shape == (R,)
    assert torch.equal(qt.out_scale, qt.out_scale.half().float())
    kept = torch.zeros(R, C, dtype=torch.bool)
    kept[qt.outlier_rows(), qt.out_cols.long()] = True
    assert int(kept.sum()) == qt.n_outliers == math.floor(0.01 * R * C)
    assert (W.abs()[kept].min() > W.abs()[~kept].median())  # the loud ones are kept
    dense = torch.ones(C, dtype=torch.bool)
    dense[qt.res_cols] = False
    sign = torch.where(W[:, dense] >= 0, 1.0, -1.0)
    free = ~kept[:, dense]
    groups = torch.arange(int(dense.sum())) // 32
    assert torch.equal((Wq[:, dense] * sign)[free] > 0, torch.ones(int(free.sum()), dtype=torch.bool))
    assert torch.allclose((Wq[:, dense].abs())[free], qt.scale[:, groups][free])
