"""mixq.eval.stats: per-window sums, bootstrap intervals, Wilson intervals, calibration overlap."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from tiny import make_tiny

from mixq.data import calibration_batch, eval_windows, load_corpus
from mixq.eval import Protocol, ReferenceCache, evaluate
from mixq.eval.stats import (bootstrap_ci, bootstrap_diff, confidence_intervals, evaluate_windows, ngram_overlap,
                             overlap_warning, wilson_interval)

SEQLEN = 32


@pytest.fixture(scope="module")
def model():
    return make_tiny("llama")


@pytest.fixture(scope="module")
def noisy(model):
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in out.parameters():
            if p.ndim == 2:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2 * p.std())
    return out


@pytest.fixture(scope="module")
def windows():
    tokens = torch.randint(0, 128, (12 * SEQLEN,), generator=torch.Generator().manual_seed(0))
    return eval_windows(tokens, SEQLEN)


@pytest.mark.parametrize("batch_size", [1, 5])
def test_per_window_sums_reproduce_evaluate(model, noisy, windows, batch_size):
    proto = Protocol.for_windows(windows, corpus="random", split="test", tokenizer="ids", dtype="float32")
    ref = evaluate(noisy, windows, proto, reference=model, progress=False)
    pw = evaluate_windows(noisy, windows, model, batch_size=batch_size)
    assert pw["nll_sum"].shape == pw["kl_sum"].shape == pw["agree"].shape == (windows.n_windows,)
    assert pw["n_tokens"].sum() == windows.n_scored == ref["n_scored"]
    assert math.exp(pw["nll_sum"].sum() / pw["n_tokens"].sum()) == pytest.approx(ref["perplexity"], rel=1e-6)
    assert pw["kl_sum"].sum() / pw["n_tokens"].sum() == pytest.approx(ref["kl"], rel=1e-5)
    assert pw["agree"].sum() / pw["n_tokens"].sum() == pytest.approx(ref["top1_agreement"], abs=1e-12)
    cached = evaluate_windows(noisy, windows, ReferenceCache(model, windows, progress=False, dtype=torch.float32))
    np.testing.assert_allclose(cached["kl_sum"], pw["kl_sum"], rtol=1e-4, atol=1e-7)
    alone = evaluate_windows(noisy, windows)
    assert alone["kl_sum"] is None and alone["agree"] is None
    np.testing.assert_allclose(alone["nll_sum"], pw["nll_sum"], rtol=1e-6)


def test_self_reference_has_zero_kl(model, windows):
    pw = evaluate_windows(model, windows, model)
    assert np.all(pw["kl_sum"] == 0) and np.all(pw["agree"] == pw["n_tokens"])


def test_cache_on_other_windows_is_rejected(model, windows):
    other = eval_windows(torch.arange(4 * SEQLEN) % 128, SEQLEN)
    with pytest.raises(ValueError, match="other windows"):
        evaluate_windows(model, windows, ReferenceCache(model, other, progress=False))


def test_bootstrap_contains_estimate_and_is_seeded(model, noisy, windows):
    pw = evaluate_windows(noisy, windows, model)
    cis = confidence_intervals(pw, n_resamples=500, seed=3)
    for key in ("perplexity", "nll", "kl", "top1_agreement"):
        ci = cis[key]
        assert ci["low"] <= ci["estimate"] <= ci["high"], key
        assert ci["low"] < ci["high"]
    assert cis["perplexity"]["estimate"] == pytest.approx(math.exp(cis["nll"]["estimate"]))
    assert confidence_intervals(pw, n_resamples=500, seed=3) == cis
    assert confidence_intervals(pw, n_resamples=500, seed=4)["perplexity"]["low"] != cis["perplexity"]["low"]


def test_bootstrap_narrows_with_more_windows():
    rng = np.random.default_rng(0)

    def width(w):
        n = rng.integers(20, 40, size=w)
        nll = n * (3.0 + rng.normal(0, 0.3, size=w))
        ci = bootstrap_ci(nll, n, stat="ppl", n_resamples=400, seed=0)
        return ci["high"] - ci["low"]

    small, large = width(16), width(400)
    assert large < small / 3  # ~ sqrt(400 / 16) = 5 in expectation


def test_bootstrap_plain_mean_and_degenerate_cases():
    v = np.array([1.0, 2.0, 3.0, 4.0])
    ci = bootstrap_ci(v, stat="mean", n_resamples=200)
    assert ci["estimate"] == 2.5 and 1.0 <= ci["low"] <= 2.5 <= ci["high"] <= 4.0
    const = bootstrap_ci([2.0] * 10, [1.0] * 10, stat="ppl", n_resamples=50)
    assert const["low"] == const["high"] == pytest.approx(math.e ** 2)
    with pytest.raises(ValueError, match="stat"):
        bootstrap_ci(v, stat="median")
    with pytest.raises(ValueError, match="one weight per value"):
        bootstrap_ci(v, [1.0, 2.0])


def test_paired_difference():
    rng = np.random.default_rng(1)
    n = np.full(50, 30.0)
    difficulty = rng.normal(3.0, 0.5, size=50) * n  # shared by both methods: cancels when paired
    a, b = difficulty + 0.05 * n, difficulty
    d = bootstrap_diff(a, b, n, stat="mean", n_resamples=300)
    assert d["estimate"] == pytest.approx(0.05) and d["low"] > 0 and d["p_a_not_better"] == 1.0
    same = bootstrap_diff(b, b, n, stat="mean", n_resamples=100)
    assert same["low"] == same["high"] == 0.0


def test_wilson_matches_newcombe_1998():
    """Table I of Newcombe (1998), method 3 (score interval without continuity correction)."""
    for (k, n), (lo, hi) in {(81, 263): (0.2553, 0.3662), (15, 148): (0.0624, 0.1605),
                             (0, 20): (0.0, 0.1611), (1, 29): (0.0061, 0.1718)}.items():
        got = wilson_interval(k, n)
        assert got == pytest.approx((lo, hi), abs=6e-5)
    z = 1.959963984540054
    p, n = 0.35, 20
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert wilson_interval(7, 20) == pytest.approx((centre - half, centre + half), rel=1e-12)
    lo, hi = wilson_interval(20, 20)
    assert hi == 1.0 and lo == pytest.approx(1 - wilson_interval(0, 20)[1])
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_overlap_warning_on_ids():
    stream = torch.randint(0, 50_000, (20_000,), generator=torch.Generator().manual_seed(0))
    other = torch.randint(0, 50_000, (20_000,), generator=torch.Generator().manual_seed(1))
    win = eval_windows(stream, 512)
    msg = overlap_warning(calibration_batch(stream, 32, 512, seed=0), win)
    assert msg is not None and "13-grams" in msg and "test split" in msg
    assert overlap_warning(stream, stream.tolist()) is not None
    assert overlap_warning(calibration_batch(other, 32, 512, seed=0), win) is None
    hits, total = ngram_overlap(other, win)
    assert hits == 0 and total == win.n_windows * (512 - 13 + 1)


def test_overlap_warning_on_ptb_text():
    test = load_corpus("ptb", "test")
    train = load_corpus("ptb", "train")
    assert overlap_warning(test, test) is not None
    assert overlap_warning(test[: len(test) // 2], test) is not None
    assert overlap_warning(train[: len(train) // 3], test) is None  # disjoint splits (~1 % boilerplate)
    with pytest.raises(ValueError, match="tokenizer"):
        overlap_warning(test, torch.arange(100))
