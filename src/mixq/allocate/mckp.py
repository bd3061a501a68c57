"""Multiple-choice knapsack cores, on *items* prepared by :func:`mixq.allocate.solvers.solve`.

Every function takes, per item ``k``, ``cost[k]`` (int64 bits, strictly increasing) and
``err[k]`` (float, strictly decreasing): the Pareto-efficient candidates, so candidate 0 is
the cheapest.  Each returns ``pick[k]`` (an index into those arrays) for a budget ``B`` bits
that the caller has checked is at least ``sum_k cost[k][0]``.

    greedy   convex-hull greedy + fill pass; LP-relaxation (Lagrangian) lower bound
    exact    greedy bound -> Lagrangian reduced-cost fixing -> MILP (HiGHS) on the rest
    dp       dynamic programme over GCD-divided costs
"""
from __future__ import annotations

import contextlib
import heapq
import logging
import math
import os
import sys
import tempfile
from functools import reduce

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

log = logging.getLogger(__name__)

DP_MAX_CELLS = 20_000_000  # items x (capacity + 1) of the DP table


def _units(cost):
    """Costs shifted by each item's minimum and divided by the GCD ``g`` of all shifts.

    ``sum_k b_k <= B``  <=>  ``sum_k (b_k - m_k) / g <= floor((B - sum_k m_k) / g)`` for integers.
    """
    base = sum(int(c[0]) for c in cost)
    g = reduce(math.gcd, (int(v - c[0]) for c in cost for v in c), 0) or 1
    return [(c - c[0]) // g for c in cost], base, g


def exact(cost, err, budget: int, time_limit: float):
    """Greedy upper bound, Lagrangian reduced-cost fixing, then the MILP on what is left.

    With the LP multiplier ``lam`` and ``L = sum_i min_c (e_ic + lam b_ic) - lam B``, every
    feasible ``x`` has ``e(x) >= L + sum_i r_i(x_i)`` with reduced costs
    ``r_ic = e_ic + lam b_ic - min_c' (e_ic' + lam b_ic') >= 0``; a candidate with
    ``r_ic > UB - L`` (``UB``: the greedy error) is in no solution better than the greedy one
    and is dropped.  On real tables this removes most candidates, so HiGHS closes fast.
    """
    pick, lb, lam = greedy(cost, err, budget)
    if lam == 0.0:  # greedy never hit the budget: every item is at its minimum error
        return pick, lb
    ub = math.fsum(float(e[p]) for e, p in zip(err, pick))
    red = [e + lam * c.astype(np.float64) for c, e in zip(cost, err)]
    low = math.fsum(float(r.min()) for r in red) - lam * budget
    tol = 1e-9 * math.fsum(float(np.abs(r).max()) for r in red) + 1e-300
    keep = []
    for k, r in enumerate(red):
        ok = r - r.min() <= (ub - low) + tol
        ok[pick[k]] = True
        keep.append(np.flatnonzero(ok))
    free = [k for k in range(len(cost)) if len(keep[k]) > 1]
    if not free:
        return pick, ub
    fixed = sum(int(cost[k][keep[k][0]]) for k in range(len(cost)) if len(keep[k]) == 1)
    sub, lb2 = _milp([cost[k][keep[k]] for k in free], [err[k][keep[k]] for k in free], budget - fixed, time_limit)
    milp_err = math.fsum(float(err[k][keep[k][p]]) for k, p in zip(free, sub))
    if milp_err > math.fsum(float(err[k][pick[k]]) for k in free):
        return pick, lb  # only possible after tolerance re-solves: never worse than the greedy
    for k, p in zip(free, sub):
        pick[k] = int(keep[k][p])
    fixed_err = math.fsum(float(err[k][keep[k][0]]) for k in range(len(cost)) if len(keep[k]) == 1)
    return pick, (None if lb2 is None else max(lb2 + fixed_err, min(low, lb)))


HIGHS_ABS_GAP = 1e-6  # HiGHS's default mip_abs_gap, in the MILP's scaled objective (scipy's milp does not expose it)


def _milp(cost, err, budget: int, time_limit: float):
    """MILP ``min sum e x  s.t.  sum_c x_kc = 1,  sum b' x <= floor(B'/g)`` with x binary (HiGHS, gap 0).

    Costs in :func:`_units`; errors shifted by each item's minimum and divided by the largest
    range, so HiGHS's absolute tolerances (~1e-6) are relative to the problem's scale.  The
    rounded solution is re-checked in integers; if solver tolerance let it exceed the budget,
    the capacity is cut by the excess and the MILP re-solved (the budget is never exceeded).
    Returns ``pick`` and HiGHS's dual bound less its absolute gap (in error units), ``None`` after a re-solve.
    """
    units, base, g = _units(cost)
    cap = (budget - base) // g
    emin = [float(e.min()) for e in err]
    scale = max(float(e.max() - e.min()) for e in err) or 1.0
    w = np.concatenate(units).astype(np.float64)
    obj = np.concatenate([(e - m) / scale for e, m in zip(err, emin)])
    sizes = [len(c) for c in cost]
    rows = np.repeat(np.arange(len(cost)), sizes)
    one = csr_array((np.ones(len(w)), (rows, np.arange(len(w)))), shape=(len(cost), len(w)))
    cut = 0
    for _ in range(6):
        with _stdout_to_log():
            res = milp(obj, integrality=np.ones(len(w)), bounds=Bounds(0, 1),
                       constraints=[LinearConstraint(one, 1, 1), LinearConstraint(w[None, :], -np.inf, cap - cut)],
                       options={"mip_rel_gap": 0.0, "time_limit": time_limit})
        if res.x is None:
            raise RuntimeError(f"HiGHS found no solution ({res.message}); try method='greedy' or 'dp'")
        if res.status != 0:
            log.warning("MILP stopped early (%s): returning the best solution found", res.message)
        pick, offs = [], np.cumsum([0] + sizes)
        for a, b in zip(offs[:-1], offs[1:]):
            pick.append(int(np.argmax(res.x[a:b])))
        over = sum(int(u[p]) for u, p in zip(units, pick)) - cap
        if over <= 0:
            dual = float(res.mip_dual_bound if res.mip_dual_bound is not None else res.fun)
            # HiGHS stops once primal - dual <= its absolute gap and may then report the dual bound at the primal
            # value: only dual - that gap is a bound on the optimum
            lb = sum(emin) + scale * (dual - HIGHS_ABS_GAP)
            return pick, lb if cut == 0 else None
        log.debug("MILP solution exceeds the budget by %d units (tolerance); re-solving tighter", over)
        cut += over
    raise RuntimeError("MILP kept exceeding the budget within solver tolerance; use method='dp' or 'greedy'")


@contextlib.contextmanager
def _stdout_to_log():
    """Route C-level stdout to the debug log while HiGHS runs.

    HiGHS 1.12 (bundled with scipy 1.17) prints ``HighsMipSolverData::transformNewInteger
    FeasibleSolution tmpSolver.run();`` unconditionally (ERGO-Code/HiGHS#2783); on stdout it
    would corrupt ``mixq plan`` output.  File descriptor 1 points at a temporary file meanwhile.
    """
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace").strip()
            if text:
                log.debug("HiGHS: %s", text)


def dp(cost, err, budget: int) -> list[int]:
    """``D_k[w] = min_c D_{k-1}[w - b'_kc] + e_kc`` over shifted, GCD-divided costs ``b'``; O(items x W)."""
    units, base, g = _units(cost)
    cap = min((budget - base) // g, int(sum(int(u[-1]) for u in units)))
    cells = len(cost) * (cap + 1)
    if cells > DP_MAX_CELLS:
        raise ValueError(f"the DP table would need {cells:,} cells (> {DP_MAX_CELLS:,}; cost GCD is {g} bits): "
                         "use method='exact' (MILP)")
    d = np.zeros(cap + 1)
    arg = np.zeros((len(cost), cap + 1), dtype=np.int16 if max(map(len, cost)) < 2**15 else np.int32)
    for k, (u, e) in enumerate(zip(units, err)):
        new = np.full(cap + 1, np.inf)
        for c, (uc, ec) in enumerate(zip(u.tolist(), e.tolist())):
            if uc > cap:
                break
            cand = d[: cap + 1 - uc] + ec
            better = cand < new[uc:]
            new[uc:][better] = cand[better]
            arg[k, uc:][better] = c
        d = new
    pick, w = [0] * len(cost), cap
    for k in range(len(cost) - 1, -1, -1):
        pick[k] = int(arg[k, w])
        w -= int(units[k][pick[k]])
    return pick


def greedy(cost, err, budget: int):
    """Convex-hull greedy for the multiple-choice knapsack, then a fill pass.

    Per item keep the lower convex hull of its (cost, error) points; start every item at its
    cheapest point and repeatedly take the hull step with the most negative slope
    ``de/db`` (error saved per bit) that still fits.  Steps taken in this global slope order
    solve the LP relaxation; at the first step that does not fit, the LP optimum is the current
    error plus that step's fraction ``left/db * de`` -- the Lagrangian dual bound
    ``max_lambda sum_i min_c (e_ic + lambda b_ic) - lambda B``, returned as ``lower_bound``.
    The fill pass then spends the leftover bits on the single swap (any candidate, hull or
    not) with the largest error reduction, until none fits.
    """
    hulls = [_lower_hull(c, e) for c, e in zip(cost, err)]
    pos = [0] * len(cost)
    left = budget - sum(int(c[0]) for c in cost)
    now = math.fsum(float(e[0]) for e in err)
    lb, lam = None, 0.0

    def step(k):
        a, b = hulls[k][pos[k]], hulls[k][pos[k] + 1]
        return int(cost[k][b] - cost[k][a]), float(err[k][b] - err[k][a])

    heap = []
    for k in range(len(cost)):
        if len(hulls[k]) > 1:
            db, de = step(k)
            heap.append((de / db, k))
    heapq.heapify(heap)
    while heap:
        _, k = heapq.heappop(heap)
        db, de = step(k)
        if db <= left:
            left, now, pos[k] = left - db, now + de, pos[k] + 1
            if pos[k] + 1 < len(hulls[k]):
                db, de = step(k)
                heapq.heappush(heap, (de / db, k))
        elif lb is None:
            lb, lam = now + de * left / db, -de / db
    pick = [h[p] for h, p in zip(hulls, pos)]
    while True:  # fill pass
        best, arg = 0.0, None
        for k, (c, e) in enumerate(zip(cost, err)):
            gain = np.where(c - c[pick[k]] <= left, e[pick[k]] - e, 0.0)
            j = int(np.argmax(gain))
            if gain[j] > best:
                best, arg = float(gain[j]), (k, j)
        if arg is None:
            break
        k, j = arg
        left -= int(cost[k][j] - cost[k][pick[k]])
        pick[k] = j
    return pick, (now if lb is None else lb), lam


def _lower_hull(c, e) -> list[int]:
    """Indices of the lower convex hull of points sorted by strictly increasing cost."""
    h: list[int] = []
    for j in range(len(c)):
        while len(h) >= 2:
            a, b = h[-2], h[-1]
            if float(e[b] - e[a]) * float(c[j] - c[a]) >= float(e[j] - e[a]) * float(c[b] - c[a]):
                h.pop()
            else:
                break
        h.append(j)
    return h
