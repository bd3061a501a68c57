"""How sure is a number: bootstrap intervals over evaluation windows, Wilson intervals for
accuracies, and a warning when calibration and evaluation text overlap.

Per-window sums
---------------
:func:`evaluate_windows` runs the same forward passes as :func:`mixq.eval.perplexity` /
:func:`mixq.eval.compare` (it calls their building blocks) but keeps one row per window::

    nll_sum[w]  = Σ_t −log p(x_t | x_<t)        over the scored tokens of window w (nats)
    n_tokens[w] = number of scored tokens of window w
    kl_sum[w]   = Σ_t KL_t(P_ref ‖ P_q),   agree[w] = Σ_t [argmax ref == argmax model]

so ``exp(nll_sum.sum() / n_tokens.sum())`` is exactly the perplexity ``evaluate`` reports.

Bootstrap
---------
Tokens of one window are not independent, windows nearly are (disjoint text), so the resampling
unit is the window.  ``B`` resamples draw ``W`` window indices with replacement (numpy
``Generator(PCG64(seed))``: a pure function of the inputs and the seed); each resample's statistic
is the ratio of sums ``Σ values / Σ weights`` (``stat="mean"``, the token-weighted mean) or its
``exp`` (``stat="ppl"``).  The interval is the percentile interval ``[q_{α/2}, q_{1−α/2}]`` of the
``B`` statistics (Efron & Tibshirani 1993, ch. 13).  Its width shrinks like ``1/sqrt(W)``, so
"method A beats B" needs the gap to exceed it, or better, :func:`bootstrap_diff`, which resamples
both methods with the same window indices (paired: the windows' shared difficulty cancels).

Wilson interval
---------------
For ``k`` successes out of ``n`` (zero-shot accuracy), with ``z = Φ⁻¹(1 − α/2)``::

    centre = (p̂ + z²/2n) / (1 + z²/n),   half = z / (1 + z²/n) · sqrt(p̂(1−p̂)/n + z²/4n²)

(Wilson 1927).  Unlike ``p̂ ± z·sqrt(p̂(1−p̂)/n)`` it stays inside [0, 1] and is not empty at 0 or n.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np
import torch

from mixq.data import EvalWindows
from mixq.eval.kl import ReferenceCache, _reference_batch, token_kl
from mixq.eval.perplexity import batches, eval_mode, scored_logits, token_nll

DEFAULT_RESAMPLES = 1000
DEFAULT_CONFIDENCE = 0.95
OVERLAP_N = 13  # GPT-3's contamination n-gram length
OVERLAP_FRACTION = 0.05  # PTB train vs test: 1.2 % of word 13-grams (repeated rate tables)


# ---------------------------------------------------------------------------- per-window evaluation
def evaluate_windows(model: torch.nn.Module, windows: EvalWindows,
                     reference: torch.nn.Module | ReferenceCache | None = None, *,
                     batch_size: int = 1, progress: bool = False) -> dict[str, np.ndarray | None]:
    """Per-window sums of the evaluation metrics of ``model`` on ``windows``.

    Returns ``{"nll_sum": float64 [W], "n_tokens": int64 [W], "kl_sum": float64 [W] | None,
    "agree": int64 [W] | None}`` (the last two need ``reference``: a model or a
    :class:`ReferenceCache` built on the same windows).  Feed them to :func:`bootstrap_ci` /
    :func:`confidence_intervals`.
    """
    if isinstance(reference, ReferenceCache):
        same = reference.windows is windows or (
            torch.equal(reference.windows.input_ids, windows.input_ids)
            and torch.equal(reference.windows.score_mask, windows.score_mask))
        if not same:
            raise ValueError("the ReferenceCache was built on other windows; build it with the same EvalWindows")
        ref_models = () if reference.model is model else (reference.model,)
    else:
        ref_models = () if reference is None or reference is model else (reference,)
    counts = windows.score_mask[:, 1:].sum(dim=1)
    nll_sum, kl_sum, agree = [], [], []
    with eval_mode(model, *ref_models):
        if isinstance(reference, ReferenceCache):
            reference.build()
        for i, j in batches(windows, batch_size, progress=progress, desc="windows"):
            logits, targets = scored_logits(model, windows.input_ids[i:j], windows.score_mask[i:j])
            sizes = counts[i:j].tolist()
            nll_sum += [float(x.double().sum()) for x in token_nll(logits, targets).cpu().split(sizes)]
            if reference is None:
                continue
            if isinstance(reference, ReferenceCache):
                r_rows, _, r_arg = reference.batch(i, j)
            elif reference is model:
                r_rows, r_arg = logits, logits.argmax(dim=-1)
            else:
                r_rows, _, r_arg = _reference_batch(reference, windows, i, j)
            kl_sum += [float(x.double().sum()) for x in token_kl(logits, r_rows).cpu().split(sizes)]
            same_top = logits.argmax(dim=-1).cpu() == r_arg.cpu()
            agree += [int(x.sum()) for x in same_top.split(sizes)]
    return {
        "nll_sum": np.asarray(nll_sum, dtype=np.float64),
        "n_tokens": counts.numpy().astype(np.int64),
        "kl_sum": None if reference is None else np.asarray(kl_sum, dtype=np.float64),
        "agree": None if reference is None else np.asarray(agree, dtype=np.int64),
    }


# ---------------------------------------------------------------------------- bootstrap
def _statistic(sums: np.ndarray, weights: np.ndarray, stat: str) -> np.ndarray:
    mean = sums / weights
    return np.exp(mean) if stat == "ppl" else mean


def _prepare(values, weights, stat: str, n_resamples: int, confidence: float):
    if stat not in ("ppl", "mean"):
        raise ValueError(f"stat must be 'ppl' (exp of the weighted mean) or 'mean', got {stat!r}")
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if v.size == 0 or v.shape != w.shape:
        raise ValueError(f"need one weight per value and at least one window (got {v.size} values, {w.size} weights)")
    if not np.all(np.isfinite(v)) or not np.all(w > 0):
        raise ValueError("values must be finite and weights (scored tokens per window) positive")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return v, w


def _resample_indices(n: int, n_resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def _interval(stats: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1.0 - confidence
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def bootstrap_ci(values: Sequence[float] | np.ndarray, weights: Sequence[float] | np.ndarray | None = None, *,
                 stat: str = "ppl", n_resamples: int = DEFAULT_RESAMPLES, confidence: float = DEFAULT_CONFIDENCE,
                 seed: int = 0) -> dict:
    """Percentile bootstrap interval over windows of ``Σ values / Σ weights`` (``stat="mean"``)
    or its exponential (``stat="ppl"``: values are per-window NLL sums, weights token counts).

    ``weights=None`` weighs every window equally (a plain mean).  Returns ``{"estimate" (on all
    windows), "low", "high", "stat", "confidence", "n_resamples", "n_windows", "seed"}``.
    """
    v, w = _prepare(values, weights, stat, n_resamples, confidence)
    idx = _resample_indices(v.size, n_resamples, seed)
    boot = _statistic(v[idx].sum(axis=1), w[idx].sum(axis=1), stat)
    lo, hi = _interval(boot, confidence)
    return {"estimate": float(_statistic(v.sum(), w.sum(), stat)), "low": lo, "high": hi, "stat": stat,
            "confidence": confidence, "n_resamples": n_resamples, "n_windows": int(v.size), "seed": seed}


def bootstrap_diff(values_a, values_b, weights=None, *, stat: str = "ppl", n_resamples: int = DEFAULT_RESAMPLES,
                   confidence: float = DEFAULT_CONFIDENCE, seed: int = 0) -> dict:
    """Paired bootstrap of ``statistic(a) − statistic(b)`` on the same windows (same resampled
    indices for both).  An interval that excludes 0 says the two differ beyond window noise.
    Returns the keys of :func:`bootstrap_ci` plus ``"p_a_not_better"``: the fraction of resamples
    where ``a``'s statistic is not below ``b``'s (for lower-is-better metrics)."""
    va, w = _prepare(values_a, weights, stat, n_resamples, confidence)
    vb, _ = _prepare(values_b, weights, stat, n_resamples, confidence)
    if va.shape != vb.shape:
        raise ValueError(f"paired bootstrap needs the same windows: {va.size} vs {vb.size} values")
    idx = _resample_indices(va.size, n_resamples, seed)
    ws = w[idx].sum(axis=1)
    diff = _statistic(va[idx].sum(axis=1), ws, stat) - _statistic(vb[idx].sum(axis=1), ws, stat)
    lo, hi = _interval(diff, confidence)
    est = _statistic(va.sum(), w.sum(), stat) - _statistic(vb.sum(), w.sum(), stat)
    return {"estimate": float(est), "low": lo, "high": hi, "stat": stat, "confidence": confidence,
            "n_resamples": n_resamples, "n_windows": int(va.size), "seed": seed,
            "p_a_not_better": float(np.mean(diff >= 0))}


def confidence_intervals(per_window: dict, *, n_resamples: int = DEFAULT_RESAMPLES,
                         confidence: float = DEFAULT_CONFIDENCE, seed: int = 0) -> dict:
    """Intervals for every metric in ``per_window`` (the output of :func:`evaluate_windows`):
    ``{"perplexity": {...}, "nll": {...}, "kl": {...} | None, "top1_agreement": {...} | None}``.
    All metrics use the same seed, hence the same resampled windows."""
    n = per_window["n_tokens"]
    kw = dict(n_resamples=n_resamples, confidence=confidence, seed=seed)
    out = {"perplexity": bootstrap_ci(per_window["nll_sum"], n, stat="ppl", **kw),
           "nll": bootstrap_ci(per_window["nll_sum"], n, stat="mean", **kw), "kl": None, "top1_agreement": None}
    if per_window.get("kl_sum") is not None:
        out["kl"] = bootstrap_ci(per_window["kl_sum"], n, stat="mean", **kw)
        out["top1_agreement"] = bootstrap_ci(per_window["agree"], n, stat="mean", **kw)
    return out


# ---------------------------------------------------------------------------- accuracy
def wilson_interval(successes: int, n: int, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval ``(low, high)`` of a binomial proportion ``successes / n``."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need n >= 1 and 0 <= successes <= n, got {successes}/{n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p, z2 = successes / n, z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


# ---------------------------------------------------------------------------- contamination
def _sequences(x, what: str) -> list[np.ndarray]:
    """Normalize text / ids / windows into a list of 1-D int64 arrays (n-grams never cross them)."""
    if isinstance(x, EvalWindows):
        return [row.numpy().astype(np.int64) for row in x.input_ids]
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        if x.ndim == 1:
            return [x.astype(np.int64)]
        if x.ndim == 2:
            return [r.astype(np.int64) for r in x]
        raise ValueError(f"{what}: expected ids of shape [N] or [rows, N], got {x.shape}")
    if isinstance(x, (list, tuple)):
        if x and isinstance(x[0], (list, tuple, np.ndarray, torch.Tensor)):
            return [np.asarray(r, dtype=np.int64).reshape(-1) for r in x]
        return [np.asarray(x, dtype=np.int64)]
    raise TypeError(f"{what}: expected text, token ids or EvalWindows, got {type(x).__name__}")


def _ngram_hashes(seqs: list[np.ndarray], n: int) -> np.ndarray:
    """64-bit polynomial hashes of every length-``n`` window (wrap-around arithmetic)."""
    base = np.uint64(0x100000001B3)
    powers = np.cumprod(np.full(n, base, dtype=np.uint64), dtype=np.uint64)
    parts = []
    for s in seqs:
        if s.size >= n:
            win = np.lib.stride_tricks.sliding_window_view(s.astype(np.uint64) + np.uint64(1), n)
            with np.errstate(over="ignore"):
                parts.append((win * powers).sum(axis=1, dtype=np.uint64))
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)


def ngram_overlap(calib, evaluation, n: int = OVERLAP_N, *, tokenizer=None) -> tuple[int, int]:
    """``(hits, total)``: how many of the evaluation's length-``n`` n-grams (counted with
    repetition) also occur in the calibration data.  See :func:`overlap_warning` for the inputs."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    calib, evaluation = _as_units(calib, evaluation, tokenizer)
    ref = np.unique(_ngram_hashes(calib, n))
    probe = _ngram_hashes(evaluation, n)
    return int(np.isin(probe, ref, assume_unique=False).sum()), int(probe.size)


def _as_units(calib, evaluation, tokenizer):
    """Both sides as sequences of the same units: words when both are text, else token ids
    (text is tokenized with ``tokenizer``)."""
    c_text, e_text = isinstance(calib, str), isinstance(evaluation, str)
    if c_text and e_text:
        vocab: dict[str, int] = {}
        enc = [np.asarray([vocab.setdefault(w, len(vocab)) for w in t.split()], dtype=np.int64)
               for t in (calib, evaluation)]
        return [enc[0]], [enc[1]]
    if c_text or e_text:
        if tokenizer is None:
            raise ValueError("one side is text and the other token ids: pass the tokenizer that made the ids")
        from mixq.data import tokenize

        if c_text:
            calib = tokenize(calib, tokenizer, progress=False)
        else:
            evaluation = tokenize(evaluation, tokenizer, progress=False)
    return _sequences(calib, "calibration"), _sequences(evaluation, "evaluation")


def overlap_warning(calib, evaluation, n: int = OVERLAP_N, *, max_fraction: float = OVERLAP_FRACTION,
                    tokenizer=None) -> str | None:
    """A warning (str) when more than ``max_fraction`` of the evaluation's ``n``-grams also occur
    in the calibration data, else ``None``.

    ``calib`` / ``evaluation``: raw text (compared as whitespace-separated words when both are
    text), token ids (``[N]`` streams or ``[rows, N]`` batches such as :func:`mixq.data.calibration_batch`;
    n-grams never cross rows) or :class:`~mixq.data.EvalWindows`.  Mixed text and ids need the
    ``tokenizer``.  Calibrating on the split that is scored (PTB test for PTB perplexity) makes
    every calibration-sensitive number optimistic.  Disjoint splits still share some boilerplate:
    PTB train and test share 1.2 % of the test's word 13-grams (repeated interest-rate tables), a
    sample of the test split itself shares tens of percent; hence the 5 % default.
    """
    hits, total = ngram_overlap(calib, evaluation, n, tokenizer=tokenizer)
    if total == 0 or hits / total <= max_fraction:
        return None
    return (f"calibration and evaluation data share {hits / total:.1%} of the evaluation's {n}-grams "
            f"({hits:,} of {total:,}; threshold {max_fraction:.1%}): the model was calibrated on the text it is "
            "scored on (e.g. the test split), so its numbers are optimistic; calibrate on the train split")
