"""Integration on a fixed slice of SmolLM2-135M + PTB (marked `integration`; ~1-2 minutes in all).

Slice: PTB test, first 2048 tokens, 4 windows of 512.  Calibration: 16 × 256 tokens of PTB train, seed 0.
"""
import copy

import pytest
import torch

from mixq import api, data
from mixq.cli import main
from mixq.eval import Protocol, ReferenceCache, evaluate

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def setup(smollm2):
    model, tok = smollm2
    ids = data.tokenize(data.load_corpus("ptb", "test"), tok, progress=False)
    win = data.eval_windows(ids, 512, max_tokens=2048)
    proto = Protocol.for_windows(win, corpus="ptb", split="test", tokenizer="smollm2-135m", dtype="float32")
    cache = ReferenceCache(model, win, progress=False)
    train = data.tokenize(data.load_corpus("ptb", "train"), tok, progress=False)
    calib = data.calibration_batch(train, 16, 256, seed=0)
    return model, tok, win, proto, cache, calib


def _run(setup, spec, method="rtn", blocks=None):
    """Quantize every block linear (or only those of the first ``blocks`` blocks) and evaluate."""
    model, _, win, proto, cache, calib = setup
    m = copy.deepcopy(model)
    specs = api.resolve_specs(m, spec, group_fallback="shrink")
    if blocks is not None:
        specs = {f: s for f, s in specs.items() if int(f.split(".layers.")[1].split(".")[0]) < blocks}
    api.quantize_model(m, specs, method=method, calib_ids=calib, progress=False)
    return evaluate(m, win, proto, reference=cache, progress=False)


def test_fp_reference_is_sane(setup):
    model, _, win, proto, cache, _ = setup
    r = evaluate(model, win, proto, reference=cache, progress=False)
    assert 40 < r["perplexity"] < 150
    assert r["kl"] < 1e-4 and r["top1_agreement"] > 0.999


def test_q4_1_grid_is_recovered_losslessly(setup):
    """The embedded weights are Q4_1: the same grid (4-bit, g32, fp16 scale + offset) gives KL ~ 0."""
    assert _run(setup, "W4-g32-asymf")["kl"] < 1e-3


def test_quality_orders_as_expected(setup, headline):
    """W8 near-lossless; at 3 bits GPTQ far closer to fp than RTN (the GPTQ walk is the headline's uniform plan)."""
    w8 = _run(setup, "W8-channel")
    w3 = _run(setup, "W3-g64")
    assert w8["kl"] < 0.02
    assert w8["kl"] < w3["kl"]
    assert headline["uniform_spec"] == "W3-g64"
    assert headline["uniform"] < 0.8 * w3["kl"], (headline["uniform"], w3["kl"])  # GPTQ far closer at 3 bits


def test_cli_quantize_then_eval(tmp_path, smollm2):
    out = tmp_path / "w4"
    assert main(["quantize", "--spec", "W4-g64", "--method", "rtn", "--out", str(out)]) == 0
    res = tmp_path / "r.json"
    assert main(["eval", str(out), "--tokens", "1024", "--out", str(res)]) == 0
    import json
    r = json.loads(res.read_text())
    assert r["protocol"]["n_scored"] == 2 * 511 and 0 < r["kl"] < 1.5 and r["reference"] == "smollm2-135m"



@pytest.fixture(scope="module")
def headline(setup):
    """A fast RTN/K-FAC measurement (4 x 256 tokens) over W2/W3/W4-g64, the best uniform spec and the exact mixed
    plan at 3.5 bpw, each quantized by the same GPTQ walk over the whole model (8 x 256 tokens): their KL."""
    from mixq.allocate import Budget, allocate
    from mixq.config import parse_spec
    from mixq.measure import measure

    model, _, win, proto, cache, calib = setup
    cands = [parse_spec(n) for n in ("W2-g64", "W3-g64", "W4-g64")]
    table = measure(model, calib[:4], cands, metric="kfac", algorithm="rtn", grad_samples=1, progress=False)
    out = {}
    for solver in ("uniform", "exact"):
        plan = allocate(table, Budget(bpw=3.5), method=solver)
        assert plan.achieved_bpw <= 3.5
        if solver == "uniform":
            out["uniform_spec"] = next(iter({s.name for s in plan.layers.values()}))
            assert len({s.name for s in plan.layers.values()}) == 1
        m = copy.deepcopy(model)
        api.quantize_model(m, dict(plan.layers), method="gptq", calib_ids=calib[:8], progress=False)
        out[solver] = evaluate(m, win, proto, reference=cache, progress=False)["kl"]
    return out


def test_mixed_plan_beats_the_best_uniform_spec_at_3_5_bpw(headline):
    """The headline at the same budget, with GPTQ on the whole embedded model: a measured mixed plan is closer to fp
    than the best single spec from the same candidates that fits 3.5 bpw.  The W4 candidate is symmetric g64, not
    the embedded Q4_1 grid, so 4-bit layers are not free.  Measured when written: uniform W3-g64 (3.25 bpw) KL
    0.97, mixed (3.5 bpw) 0.50."""
    assert headline["exact"] < 0.8 * headline["uniform"], headline
