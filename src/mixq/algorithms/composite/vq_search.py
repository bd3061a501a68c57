"""The nearest-entry search of the ``VQ`` codebooks (what :mod:`mixq.algorithms.composite.vq` encodes with), and
how those codebooks are made: their definition, which the tables committed in
:mod:`mixq.formats.composite.vq_tables` (read by :mod:`mixq.formats.composite.vq_codebook`) were generated from.

After incoherence processing (``+ip``) a weight group divided by its scale is close to i.i.d. ``N(0, 1)``
(QuIP#, QTIP), so one codebook per ``(d, code bits)`` serves every layer and is never stored with a model.

``generate(d, k)``: the ``[2^k, d]`` codebook, the ``2^k``-entry minimum-MSE quantizer of ``N(0, I_d)``:

    d = 2   Lloyd's algorithm on the exact Gaussian density sampled on a 481 x 481 grid over [-6, 6]²
            (deterministic: no random numbers), started from the product of two 1-D Lloyd-Max quantizers of
            ``2^floor(k/2)`` and ``2^ceil(k/2)`` levels
    d >= 3  Lloyd (at most 200 steps) on 2^15 points of a ``torch.Generator`` seeded with ``SEED`` (the
            alternative to a lattice such as QuIP#'s E8P), started from ``2^k`` seeded draws

in float64, then rounded to fp16 (so that last-bit differences between machines' BLAS cannot change a
stored model's decoding), entries sorted lexicographically.  ``tests/test_vq.py`` pins a checksum of
every codebook.  MSE per dimension on N(0, 1) (``mse(d, k)``), d = 2: 0.1090 (2 bpw), 0.0570 (2.5), 0.0296 (3),
0.0153 (3.5), 0.0079 (4), against the scalar Lloyd-Max quantizer's 0.1175 (2 bits), 0.0345 (3) and 0.0095 (4):
0.3-0.8 dB better at integer rates, and the half-bit rates in between; d = 4 at 2 bpw (256 entries): 0.0992.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from ...formats.composite.vq_codebook import codebook
from ...runtime.kernels.vq_cpu import nearest as _native_nearest

SEED = 0x5EED
GRID = 481
SPAN = 6.0
MAX_ITERS = 1000
MAX_ITERS_SAMPLED = 200
SAMPLES = 2 ** 15
TOL = 1e-7
MAX_CODE_BITS = 8


def _lloyd(points: torch.Tensor, weights: torch.Tensor, C: torch.Tensor, iters: int = MAX_ITERS) -> torch.Tensor:
    """Weighted Lloyd iterations in float64: assign each point to its nearest centroid, move centroids to
    their cells' weighted means (an empty cell keeps its centroid)."""
    w = weights / weights.sum()
    for _ in range(iters):
        idx = nearest(points, C)
        mass = torch.zeros(C.shape[0], dtype=torch.float64).index_add_(0, idx, w)
        acc = torch.zeros_like(C).index_add_(0, idx, points * w[:, None])
        new = torch.where(mass[:, None] > 0, acc / mass.clamp_min(1e-300)[:, None], C)
        shift = float((new - C).abs().max())
        C = new
        if shift < TOL:
            break
    return C


def _lloyd_max_1d(levels: int) -> torch.Tensor:
    x = torch.linspace(-SPAN, SPAN, 20001, dtype=torch.float64)
    p = torch.exp(-0.5 * x * x)
    init = torch.linspace(-2.0, 2.0, levels, dtype=torch.float64) if levels > 1 else torch.zeros(1, dtype=torch.float64)
    return _lloyd(x[:, None], p, init[:, None])[:, 0]


def _product(axes: list[torch.Tensor]) -> torch.Tensor:
    grids = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], 1)


def generate(d: int, k: int) -> torch.Tensor:
    """Compute the ``[2^k, d]`` codebook from its definition (module docstring; seconds to minutes).

    d = 2: Lloyd on the density grid from two starts -- ``2^k`` seeded N(0, I) draws, and (k <= 6) the
    product of per-axis Lloyd-Max quantizers with every other row shifted by a quarter step -- keeping the
    one of lower grid-weighted MSE.  d >= 3: Lloyd on seeded samples from seeded draws."""
    if d < 1 or not 1 <= k <= MAX_CODE_BITS:
        raise ValueError(f"a VQ codebook needs d >= 1 and 1..{MAX_CODE_BITS} code bits, got d={d}, k={k}")
    K = 2 ** k
    gen = torch.Generator().manual_seed(SEED)
    if d <= 2:
        g = torch.linspace(-SPAN, SPAN, GRID if d == 2 else 20001, dtype=torch.float64)
        pts = _product([g] * d)
        wts = torch.exp(-0.5 * (pts * pts).sum(1))
    else:
        pts = torch.randn(SAMPLES, d, generator=gen, dtype=torch.float64)
        wts = torch.ones(pts.shape[0], dtype=torch.float64)
    starts = [torch.randn(K, d, generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)]
    if d == 2 and k <= 6:
        lo, hi = k // 2, k - k // 2
        P = _product([_lloyd_max_1d(2 ** lo), _lloyd_max_1d(2 ** hi)])
        step = float(P[1, 1] - P[0, 1])
        odd = (torch.arange(K) // 2 ** hi) % 2 == 1
        P[:, 1] += torch.where(odd, 0.25 * step, -0.25 * step)
        starts.append(P)
    best, best_err = None, float("inf")
    for C0 in starts:
        C = _lloyd(pts, wts, C0, MAX_ITERS if d <= 2 else MAX_ITERS_SAMPLED)
        err = float((((pts - C[nearest(pts, C)]) ** 2).sum(1) * wts).sum() / wts.sum())
        if err < best_err:
            best, best_err = C, err
    C = best.to(torch.float16).to(torch.float32)
    order = sorted(range(K), key=lambda i: tuple(C[i].tolist()))
    return C[order].contiguous()


def nearest(x: torch.Tensor, C: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """Index of the nearest row of ``C [K, d]`` for every row of ``x [N, d]`` (Euclidean), int64 ``[N]``.

    ``argmin_k ‖c_k‖² - 2 x·c_k``: in the native kernel (:func:`mixq.runtime.kernels.vq_cpu.nearest`) for float32 CPU inputs,
    else in chunks of ``chunk`` rows (one ``[chunk, K]`` product each).  The two may part on exact ties of
    rounding only."""
    if x.dtype == torch.float32 and x.device.type == "cpu" and x.shape[0]:
        got = _native_nearest(x, C)
        if got is not None:
            return got
    C = C.to(x.dtype)
    cn = (C * C).sum(1)
    out = torch.empty(x.shape[0], dtype=torch.long)
    for s in range(0, x.shape[0], chunk):
        xs = x[s:s + chunk]
        out[s:s + chunk] = torch.addmm(cn[None], xs, C.T, alpha=-2.0).argmin(1)
    return out


@lru_cache(maxsize=None)
def mse(d: int, k: int, n: int = 1 << 18) -> float:
    """Mean squared error per dimension of :func:`codebook` on ``n`` seeded N(0, I_d) samples."""
    C = codebook(d, k).double()
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(SEED + 1), dtype=torch.float64)
    return float(((x - C[nearest(x, C)]) ** 2).mean())
