"""Extreme low-bit binarization (``BIN`` bases): BiLLM- and PB-LLM-style composites.

``BIN-g64`` binarizes every weight: ``ŵ = α · (2q − 1)``, ``q = [w ≥ 0]``, with one scale per group
of 64 input columns (per row); ``α = Σ d|w| / Σ d`` over the group is the importance-weighted
L2-optimal scale for fixed signs (``d`` below; the plain mean ``|w|`` without statistics), rounded
to the scale dtype.  Two extensions, alone or together:

``+r<k>`` (BiLLM, Huang et al. 2024): the ``k`` most salient input columns are *residual*-binarized —
    ``ŵ = α₁ s₁ + α₂ s₂`` with ``s₁ = sign(w)``, ``s₂ = sign(w − α₁ s₁)`` and two scales per row
    (``α₁``, ``α₂`` fitted on the row's ``k`` salient weights, importance-weighted as above).  Column
    salience is the predicted loss the second plane saves (kept weights excluded),
    ``Σ_i d_ij [(w_ij − b₁(w_ij))² − (w_ij − b₂(w_ij))²]`` (``b₁`` group binarization, ``b₂`` the
    residual one), so it follows the Hessian as BiLLM's ``w² / [H⁻¹]²_jj`` does.
``+o<P>w<b>`` (PB-LLM, Shang et al. 2024): ``floor(P % · R · C)`` salient weights are kept apart (CSR
    positions) at ``b`` bits on a symmetric grid with an fp16 scale per row (``+o<P>``: in fp16).
    Selected first, by damage ``d (w − b₁(w))²`` in two rounds (the group scales refitted without the
    weights already kept apart); every scale is then fitted without them.  Their sign bits stay in
    the sign planes (counted, unused), which keeps the codes plain 1-bit streams.

``d`` is the OBS weight of a coordinate as in :mod:`mixq.algorithms.composite.quant`: ``1 / [H⁻¹]_jj`` for GPTQ,
``diag(H)_j`` (or the Fisher ``F_ij``) for RTN, 1 without statistics.  GPTQ visits the dense
columns in order and the residual columns last (so they absorb compensation), fitting each group's
scale on entry from its current, compensated values; salient weights are rounded at their current
value (int grids: with row scales fixed beforehand from the original weights, clamped).

Exact cost: :meth:`mixq.config.CompositeSpec.cost` (``BIN`` rows of its docstring).  Bits per weight
on a 576-wide layer: ``BIN-g64`` 1.25, ``BIN-g192`` 1.08, ``BIN-g64+r32`` 1.36, ``BIN-g64+o2w8``
1.81, ``BIN-g192+r32+o1w8`` 1.52 (the 1536-wide down projection is a little cheaper).

Stored parts: :class:`~mixq.formats.composite.binary_tensor.BinaryQTensor`; storage:
:mod:`mixq.formats.composite.binary_storage`.
"""
from __future__ import annotations

import torch

from ...config.composite import FP16_BITS, CompositeSpec
from ...formats.composite.binary_tensor import BinaryQTensor, bin_decode, res_decode
from ...formats.composite.qtensor import dense_cols
from ...formats.mx import round_scale
from ...granularity import PerGroup
from ..gptq import _proxy, inverse_cholesky
from ..sweep import sweep
from .importance import importances

OUTLIER_ROUNDS = 2


def _l2_scale(x: torch.Tensor, w: torch.Tensor | None, keep: torch.Tensor | None, scale_dtype: str) -> torch.Tensor:
    """Per row of ``x [N, g]``: ``Σ w|x| / Σ w`` over the kept entries (plain mean |x| where the
    weights vanish), rounded to ``scale_dtype``; ``[N, 1]``."""
    a = x.abs()
    k = torch.ones_like(x) if keep is None else keep.float()
    ww = k if w is None else w.expand_as(x) * k
    den = ww.sum(-1, keepdim=True)
    s = (ww * a).sum(-1, keepdim=True) / den.clamp(min=1e-30)
    plain = (k * a).sum(-1, keepdim=True) / k.sum(-1, keepdim=True).clamp(min=1)
    s = torch.where(den > 0, s, plain)
    return round_scale(s, scale_dtype)


def _bin_groups(Wd, bounds, imp, mask, scale_dtype):
    """RTN binarization of the dense part: ``(codes [R, n], scale [R, G], Q [R, n])``."""
    R, n = Wd.shape
    codes = (Wd >= 0).to(torch.uint8)
    scale = torch.empty(R, len(bounds))
    Q = torch.empty(R, n)
    for j, (s, e) in enumerate(bounds):
        keep = None if mask is None else ~mask[:, s:e]
        scale[:, j:j + 1] = _l2_scale(Wd[:, s:e], None if imp is None else imp[:, s:e], keep, scale_dtype)
        Q[:, s:e] = bin_decode(codes[:, s:e], scale[:, j:j + 1])
    return codes, scale, Q


def _res_fit(X: torch.Tensor, w: torch.Tensor | None, keep: torch.Tensor | None, scale_dtype: str):
    """Residual binarization of ``X [R, k]`` (scales fitted on the ``keep`` entries):
    ``(q1, q2, scales [R, 2], X̂)``."""
    q1 = (X >= 0).to(torch.uint8)
    a1 = _l2_scale(X, w, keep, scale_dtype)
    r = X - bin_decode(q1, a1)
    q2 = (r >= 0).to(torch.uint8)
    a2 = _l2_scale(r, w, keep, scale_dtype)
    a = torch.cat([a1, a2], 1)
    return q1, q2, a, res_decode(q1, q2, a)


def _group_bounds(cs: CompositeSpec, C: int, width: int):
    """Group columns over ``width`` columns with the base's group size (``channel``: one)."""
    g = cs.granularity.size if isinstance(cs.granularity, PerGroup) else width
    return [(s, min(s + g, width)) for s in range(0, width, g)]


def _outlier_scale(v: torch.Tensor, rows: torch.Tensor, R: int, bits: int) -> torch.Tensor:
    """fp16-representable per-row scale ``max |v| / (2^(b-1) - 1)`` (0 for rows without kept weights)."""
    lim = 2 ** (bits - 1) - 1
    amax = torch.zeros(R).scatter_reduce_(0, rows, v.abs().float(), "amax", include_self=True)
    s = (amax / lim).clamp(max=65504.0)
    s16 = s.to(torch.float16).float()
    return torch.where((s > 0) & (s16 == 0), torch.full_like(s, 2.0**-24), s16)


def _outlier_codes(v: torch.Tensor, scale_rows: torch.Tensor, bits: int) -> torch.Tensor:
    lim = 2 ** (bits - 1) - 1
    safe = torch.where(scale_rows > 0, scale_rows, torch.ones_like(scale_rows))
    return torch.round(v / safe).clamp(-lim, lim).to(torch.int16) * (scale_rows > 0)


# ---------------------------------------------------------------------- quantizer
@torch.no_grad()
def quantize_binary(W0: torch.Tensor, spec: CompositeSpec, H: torch.Tensor | None, method: str, *,
                    fisher: torch.Tensor | None = None, damp: float = 0.01, block_size: int = 128,
                    hinv_chol=None) -> tuple[BinaryQTensor, torch.Tensor]:
    """``(stored parts, Ŵ float32)`` of ``W0 [R, C]`` (float32, CPU) with a ``BIN`` composite."""
    R, C = W0.shape
    n, bounds = spec.layout((R, C))
    W, Hf, Hfix, fit_imp, score_imp, U_nat = importances(W0, H, method, fisher, damp, hinv_chol)
    d = (torch.ones(1, C) if score_imp is None else score_imp).expand(R, C)
    sd = spec.scale_dtype
    fb = _group_bounds(spec, C, C)  # the base's groups over the full row (selection only)

    # 1. salient weights kept apart (PB-LLM): largest damage, groups refitted without those already kept
    K = spec.n_outliers((R, C))
    mask = torch.zeros(R, C, dtype=torch.bool)
    for r in range(OUTLIER_ROUNDS if K else 0):
        take = -(-(K - int(mask.sum())) // (OUTLIER_ROUNDS - r))
        if take <= 0:
            break
        Q0 = _bin_groups(W, fb, fit_imp, mask, sd)[2]
        score = (d * (W - Q0) ** 2).masked_fill(mask, -float("inf"))
        mask.view(-1)[torch.topk(score.reshape(-1), take).indices] = True

    # 2. residual columns (BiLLM): the columns whose second sign plane saves the most
    k = spec.residual
    if k:
        keep = ~mask
        Q1 = _bin_groups(W, fb, fit_imp, mask, sd)[2]
        E1 = (W - Q1) * keep
        Q2 = torch.empty_like(W)
        for s, e in fb:
            a2 = _l2_scale(E1[:, s:e], None if fit_imp is None else fit_imp[:, s:e], keep[:, s:e], sd)
            Q2[:, s:e] = Q1[:, s:e] + bin_decode((E1[:, s:e] >= 0).to(torch.uint8), a2)
        gain = (d * (E1**2 - ((W - Q2) * keep) ** 2)).sum(0)
        res_cols = torch.topk(gain, k).indices.sort().values
    else:
        res_cols = torch.zeros(0, dtype=torch.long)
    dense = dense_cols(C, res_cols)

    ob = spec.outlier_bits
    int_out = bool(spec.outliers) and ob != FP16_BITS
    orow, ocol = mask.nonzero(as_tuple=True)  # row-major
    oscale = _outlier_scale(W[orow, ocol], orow, R, ob) if int_out else None

    def keep_value(v, rows):  # rounding of a kept weight
        if not int_out:
            return v.half().float()
        return oscale[rows] * _outlier_codes(v, oscale[rows], ob).float()

    # 3. dense part and residual columns
    if method == "rtn":
        codes, scale, _ = _bin_groups(W[:, dense], bounds, None if fit_imp is None else fit_imp[:, dense],
                                      mask[:, dense], sd)
        if k:
            q1, q2, ra, _ = _res_fit(W[:, res_cols], None if fit_imp is None else fit_imp[:, res_cols],
                                     ~mask[:, res_cols], sd)
        kept = W[orow, ocol]
    else:
        codes, scale, q1, q2, ra, kept = _gptq_binary(W, dense, res_cols, Hfix, U_nat, damp, bounds, spec, mask,
                                                      fit_imp, keep_value, block_size)
    if k:
        qt = BinaryQTensor(spec, (R, C), codes, scale, res_cols, torch.stack([q1, q2]), ra)
    else:
        qt = BinaryQTensor(spec, (R, C), codes, scale, res_cols, torch.zeros(2, R, 0, dtype=torch.uint8),
                           torch.zeros(R, 0))
    if spec.outliers:  # stored even when floor(P % * R * C) == 0 (row pointers, row scales: what cost counts)
        ptr = torch.zeros(R + 1, dtype=torch.int64)
        ptr[1:] = torch.bincount(orow, minlength=R).cumsum(0)
        qt.out_cols, qt.out_row_ptr = ocol.to(torch.int32), ptr.to(torch.int32)
        if int_out:
            qt.out_codes, qt.out_scale = _outlier_codes(kept, oscale[orow], ob), oscale
        else:
            qt.out_values = kept.half()
    W_hat = qt.dequantize()
    if Hf is not None:
        qt.proxy_loss = _proxy(W0 - W_hat, Hf)
    return qt, W_hat


def _gptq_binary(W, dense, res_cols, Hfix, U_nat, damp, bounds, cs, mask, imp, keep_value, block_size):
    """GPTQ over the permuted columns ``[dense..., residual...]``; returns the stored parts and the
    compensated values of the kept weights (row-major in original coordinates, before rounding)."""
    R, C = W.shape
    n, k = dense.numel(), res_cols.numel()
    perm = torch.cat([dense, res_cols])
    U = inverse_cholesky(Hfix[perm][:, perm], damp)[0] if k else U_nat
    Wk = W[:, perm].clone()
    mp = mask[:, perm]
    impp = None if imp is None else imp.expand(R, C)[:, perm]
    sd = cs.scale_dtype
    codes = torch.zeros(R, n, dtype=torch.uint8)
    scale = torch.zeros(R, len(bounds))
    kept = torch.zeros(R, C)  # permuted coordinates
    q1 = torch.zeros(R, k, dtype=torch.uint8)
    q2 = torch.zeros(R, k, dtype=torch.uint8)
    ra = torch.zeros(R, 2)
    group_of = torch.empty(n, dtype=torch.long)
    for j, (s, e) in enumerate(bounds):
        group_of[s:e] = j
    started = [False] * len(bounds)
    has_out = mp.any(0)

    def round_column(i, w, ahead):
        if i < n:
            j = int(group_of[i])
            if not started[j]:  # entering group column j: fit its scales on the current values
                s, e = bounds[j]
                scale[:, j:j + 1] = _l2_scale(ahead(e - s), None if impp is None else impp[:, s:e], ~mp[:, s:e], sd)
                started[j] = True
            c = (w >= 0).to(torch.uint8)
            codes[:, i] = c
            q = bin_decode(c[:, None], scale[:, j:j + 1])[:, 0]
        else:
            jr = i - n
            if jr == 0:  # entering the residual columns: fit both planes' row scales
                ra[:] = _res_fit(ahead(C - i), None if impp is None else impp[:, n:], ~mp[:, n:], sd)[2]
            c1 = (w >= 0).to(torch.uint8)
            c2 = (w - bin_decode(c1, ra[:, 0]) >= 0).to(torch.uint8)
            q1[:, jr], q2[:, jr] = c1, c2
            q = res_decode(c1[:, None], c2[:, None], ra)[:, 0]
        if bool(has_out[i]):
            rows = mp[:, i].nonzero().flatten()
            kept[rows, i] = w[rows]
            q = q.clone()
            q[rows] = keep_value(w[rows], rows)
        return q

    sweep(Wk, U, round_column, block_size=block_size)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(C)
    orow, ocol = mask.nonzero(as_tuple=True)
    return codes, scale, q1, q2, ra, kept[orow, inv[ocol]]
