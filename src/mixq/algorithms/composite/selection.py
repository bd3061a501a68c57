"""What a composite keeps apart or widens: outlier selection (``+oP``) and SliM-LLM group bits (``SLIM``).

Steps 2 and 3 of :mod:`mixq.algorithms.composite.quant`; both rank by the ``d``-weighted RTN error of the dense part
(:func:`mixq.algorithms.composite.dense.rtn_dense`).
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ... import formats
from .dense import rtn_dense

OUTLIER_ROUNDS = 4
SELECT_KMEANS_ITERS = 8  # Lloyd iterations of the k-means fits that only rank outlier candidates


def select_outliers(Wd, k, bounds, cs, score_imp, imp) -> torch.Tensor:
    """The ``k`` weights whose removal saves the most ``d``-weighted error, peeled in rounds.

    A weight's score is its own damage ``d (w - q(w))²`` plus, for the extreme of its (row, group)
    (farthest from the centre of the group's range), the error the *other* weights of the group lose
    when the group is refitted without it (SpQR's leave-one-out criterion, evaluated for the one weight
    per group that can move the range).  Each of ``OUTLIER_ROUNDS`` rounds refits with the outliers so
    far excluded and adds its share of the ``k``, so groups with several outliers are peeled in turn.
    """
    R, n = Wd.shape
    mask = torch.zeros(R, n, dtype=torch.bool)
    if k == 0:
        return mask
    bits = (cs.bits,) * len(bounds)
    ts = formats.compute_tensor_scale(Wd, cs.base)
    d = (torch.ones(1, n) if score_imp is None else score_imp).expand(R, n)
    cs = replace(cs, clip="minmax")  # ranking only: the range effect is what matters, and it is 21x cheaper
    centred = cs.dtype != "kmeans" and cs.symmetric
    for r in range(OUTLIER_ROUNDS):
        take = -(-(k - int(mask.sum())) // (OUTLIER_ROUNDS - r))
        if take <= 0:
            break
        Q0 = rtn_dense(Wd, mask, bounds, cs, bits, imp, ts, SELECT_KMEANS_ITERS)[3]
        ext = _extremes(Wd, mask, bounds, centred)
        Q1 = rtn_dense(Wd, mask | ext, bounds, cs, bits, imp, ts, SELECT_KMEANS_ITERS)[3]
        others = ~(mask | ext)
        saved = d * ((Wd - Q0) ** 2 - (Wd - Q1) ** 2) * others
        score = d * (Wd - Q0) ** 2
        for s, e in bounds:
            score[:, s:e] += ext[:, s:e] * saved[:, s:e].sum(1, keepdim=True)
        score = score.masked_fill(mask, -float("inf"))
        mask.view(-1)[torch.topk(score.reshape(-1), take).indices] = True
    return mask


def _extremes(Wd, mask, bounds, centred: bool) -> torch.Tensor:
    """One-hot per (row, group) of the unmasked weight farthest from the range centre (0 for symmetric
    grids, the midrange otherwise); none where fewer than two weights are unmasked."""
    out = torch.zeros_like(mask)
    for s, e in bounds:
        x, m = Wd[:, s:e], mask[:, s:e]
        if centred:
            c = torch.zeros(x.shape[0], 1)
        else:
            lo = x.masked_fill(m, float("inf")).amin(1, keepdim=True)
            c = (lo + x.masked_fill(m, -float("inf")).amax(1, keepdim=True)) / 2
        dist = (x - c).abs().masked_fill(m, -1.0)
        j = dist.argmax(1)
        ok = (~m).sum(1) >= 2
        out[ok.nonzero().flatten(), s + j[ok]] = True
    return out


def slim_bits(Wd, mask, bounds, cs, score_imp, imp) -> tuple[int, ...]:
    """SliM-LLM bit map: the k most salient full group columns take b+1 bits, the k least b-1."""
    b, G = cs.bits, len(bounds)
    glen = cs.granularity.size
    d = torch.ones(1, Wd.shape[1]) if score_imp is None else score_imp
    keep = (~mask).float()
    dk = d * keep
    ts = formats.compute_tensor_scale(Wd.masked_fill(mask, 0.0), cs.base)

    def per_group(x):
        return torch.stack([x[:, s:e].sum(dtype=torch.float64) for s, e in bounds])

    sal = per_group(dk * Wd**2)
    err = {bb: per_group(dk * (Wd - rtn_dense(Wd, mask, bounds, cs, (bb,) * G, imp, ts)[3]) ** 2)
           for bb in (b - 1, b, b + 1)}
    full = [j for j, (s, e) in enumerate(bounds) if e - s == glen]
    order = sorted(full, key=lambda j: -float(sal[j]))
    gain = torch.tensor([float(err[b + 1][j] - err[b][j]) for j in order], dtype=torch.float64)  # <= 0 mostly
    loss = torch.tensor([float(err[b - 1][j] - err[b][j]) for j in order[::-1]], dtype=torch.float64)
    best_k, best = 0, 0.0
    for k in range(1, len(full) // 2 + 1):
        delta = float(gain[:k].sum() + loss[:k].sum())
        if delta < best:
            best_k, best = k, delta
    bits = [b] * G
    for j in order[:best_k]:
        bits[j] = b + 1
    for j in order[len(order) - best_k:] if best_k else []:
        bits[j] = b - 1
    return tuple(bits)
