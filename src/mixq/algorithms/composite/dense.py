"""The dense part of a composite: fitting its group columns with the kept weights excluded, RTN and GPTQ.

Step 4 of :mod:`mixq.algorithms.composite.quant`: :func:`fit_rows` / :func:`fit_group` (outliers replaced by the mean of
the group's other weights and weighted 0; k-means, dialects and second-level scales), :func:`rtn_dense`
(group columns of equal length and bits fitted as one batch) and :func:`gptq_dense` (the column loop over
``[dense..., fp16...]`` with kept values fixed at fp16 of their compensated value).
"""
from __future__ import annotations

import torch

from ... import formats
from ...config import QuantSpec
from ...config.composite import CompositeSpec
from ...formats import QParams, lut
from ...formats.composite.dialects import fit_dialects
from ...formats.composite.qtensor import group_spec
from ...formats.composite.second_level import second_level
from ..sweep import sweep


def fit_rows(x, mask, spec_j: QuantSpec, imp, ts, kmeans_iters: int = lut.KMEANS_ITERS, cs=None) -> QParams:
    """Params of rows ``x [N, g]`` with the ``mask``ed weights excluded: they are replaced by the mean of
    the row's other weights (which moves no min / max) and weighted 0 (k-means, ``-mse`` clipping)."""
    w = imp
    if mask is not None and bool(mask.any()):
        keep = ~mask
        mean = (x * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp(min=1)
        x = torch.where(mask, mean, x)
        w = (torch.ones(1, x.shape[1]) if w is None else w).expand_as(x) * keep
    if cs is not None and cs.dialects:
        return fit_dialects(x, cs, w)
    if spec_j.dtype == "kmeans":
        return lut.fit_kmeans(x, spec_j, w, iters=kmeans_iters)
    return formats.fit(x, spec_j, weight=w if spec_j.clip == "mse" else None, tensor_scale=ts)


def fit_group(span, mask, spec_j: QuantSpec, imp, ts, cs: CompositeSpec, kmeans_iters: int = lut.KMEANS_ITERS):
    """Params of one group column ``span [R, g]`` (outliers excluded, + second level)."""
    return second_level(fit_rows(span, mask, spec_j, imp, ts, kmeans_iters, cs), cs)


def rtn_dense(Wd, mask, bounds, cs, bits, imp, ts, kmeans_iters: int = lut.KMEANS_ITERS):
    """RTN of the dense part; returns ``(codes, params, l2, Q)``.  Group columns of equal length and
    bits are fitted together as one batch of rows (row ``r * J + jj`` = row r of the batch's jj-th)."""
    R, n = Wd.shape
    codes = torch.empty(R, n, dtype=torch.uint8)
    Q = torch.empty(R, n)
    G = len(bounds)
    params: list = [None] * G
    l2s: list = [None] * G
    batches: dict[tuple[int, int], list[int]] = {}
    for j, (s, e) in enumerate(bounds):
        batches.setdefault((e - s, bits[j]), []).append(j)
    for (L, b), js in batches.items():
        sp = group_spec(cs, b)
        J = len(js)
        idx = torch.cat([torch.arange(bounds[j][0], bounds[j][1]) for j in js])
        x = Wd[:, idx].reshape(R * J, L)
        m = None if mask is None else mask[:, idx].reshape(R * J, L)
        w = None if imp is None else imp[:, idx].expand(R, -1).reshape(R * J, L)
        p = fit_rows(x, m, sp, w, ts, kmeans_iters, cs)
        parts = [p.select(slice(jj, None, J)) for jj in range(J)]
        if cs.sq_bits:
            done = [second_level(pj, cs) for pj in parts]
            parts = [d[0] for d in done]
            for jj, j in enumerate(js):
                l2s[j] = done[jj][1]
            p = _interleave(parts, p.tensor_scale)
        for jj, j in enumerate(js):
            params[j] = parts[jj]
        c = formats.encode(x, p, sp)
        codes[:, idx] = c.reshape(R, -1)
        Q[:, idx] = formats.decode(c, p, sp).reshape(R, -1)
    return codes, params, l2s, Q


def _interleave(parts: list[QParams], tensor_scale) -> QParams:
    """Inverse of ``p.select(slice(jj, None, J))`` over ``jj``: rows ``r * J + jj``."""
    def cat(f):
        ts_ = [getattr(q, f) for q in parts]
        return None if ts_[0] is None else torch.stack(ts_, 1).reshape(-1, ts_[0].shape[1])
    return QParams(scale=cat("scale"), zero=cat("zero"), offset=cat("offset"), codebook=cat("codebook"),
                   tensor_scale=tensor_scale)


def gptq_dense(Wp, U, n, bounds, cs, bits, mask, imp, ts, block_size):
    """GPTQ over permuted columns ``[dense..., fp16...]``; kept values are fixed at fp16 of their
    compensated value.  Returns ``(codes, params, l2, Q)`` with ``Q [R, C]`` in permuted order."""
    R, C = Wp.shape
    codes = torch.zeros(R, n, dtype=torch.uint8)
    Q = torch.zeros(R, C)
    G = len(bounds)
    params: list = [None] * G
    l2s: list = [None] * G
    group_of = torch.empty(n, dtype=torch.long)
    for j, (s, e) in enumerate(bounds):
        group_of[s:e] = j
    specs = [group_spec(cs, bb) for bb in bits]
    has_out = mask.any(0)

    def round_column(i, w, ahead):
        if i >= n:  # a kept column: fp16 of its compensated value
            q = w.half().float()
        else:
            j = int(group_of[i])
            if params[j] is None:  # entering group column j (i == its start)
                s, e = bounds[j]
                params[j], l2s[j] = fit_group(ahead(e - s), mask[:, s:e], specs[j],
                                               None if imp is None else imp[:, s:e], ts, cs)
            c = formats.encode(w[:, None], params[j], specs[j])[:, 0]
            q = formats.decode(c[:, None], params[j], specs[j])[:, 0]
            codes[:, i] = c
            if bool(has_out[i]):
                q = torch.where(mask[:, i], w.half().float(), q)
        Q[:, i] = q
        return q

    sweep(Wp.clone(), U, round_column, block_size=block_size)
    return codes, params, l2s, Q
