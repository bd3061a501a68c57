"""Bit allocation as a multiple-choice knapsack, with one signature for every solver.

Layer ``i`` takes exactly one candidate ``c`` from its set ``C_i``; candidate ``c`` costs
``b_ic`` bits (an exact integer, :meth:`QuantSpec.cost`) and adds ``e_ic >= 0`` to the
predicted error (additive across layers by assumption).  With ``x_ic`` in {0, 1}::

    minimise  sum_ic e_ic x_ic   s.t.  sum_c x_ic = 1  for every i,   sum_ic b_ic x_ic <= B

Tied layers (``Problem.groups``) must take the same candidate index; every solver merges a
group into one *item* whose cost and error are the members' sums (equivalent to the equality
constraints ``x_ic = x_jc``, with fewer variables).  Inside an item, candidates dominated by
a cheaper-or-equal, lower-or-equal-error one are dropped first (never changes the optimum).

Methods (``solve(problem, budget_bits, method=...)``)
    ``exact``    greedy bound + Lagrangian reduced-cost fixing + MILP (HiGHS via
                 :func:`scipy.optimize.milp`, relative gap 0): optimal up to HiGHS's absolute
                 objective tolerance (~1e-6 of the largest per-layer error range).  The budget
                 is re-checked in integers after solving and never exceeded.
    ``dp``       dynamic programme over costs divided by their GCD, exact; for small problems
                 or costs with a large common divisor (refuses tables over ``mckp.DP_MAX_CELLS``).
    ``greedy``   convex-hull / Lagrangian greedy plus a fill pass; returns the LP-relaxation
                 (= Lagrangian dual) lower bound.
    ``uniform``  baseline: one spec for every layer (``uniform=`` a label or index; default:
                 the lowest-error uniform choice that fits).
"""
from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass

import numpy as np

from . import mckp

METHODS = ("exact", "dp", "greedy", "uniform")


class InfeasibleBudget(ValueError):
    """The budget is below the cheapest allowed choice.  ``min_bits``: the smallest feasible budget."""

    def __init__(self, min_bits: int, budget_bits: int, numel: int | None = None, what: str = "choice",
                 feasible: str | None = None):
        self.min_bits, self.budget_bits, self.numel = int(min_bits), int(budget_bits), numel
        self.min_bpw = None if not numel else math.ceil(min_bits / numel * 1e4) / 1e4
        msg = f"a budget of {budget_bits} bits is infeasible: the cheapest allowed {what} needs {min_bits} bits"
        if numel:
            msg += (f" = {self.min_bpw:.4f} bpw = {math.ceil(min_bits / 8)} bytes over {numel} weights;"
                    f" raise the budget to at least bpw={self.min_bpw:.4f} or bytes={math.ceil(min_bits / 8)}")
        else:
            msg += f"; raise the budget to at least {min_bits} bits"
        if feasible:
            msg += f"; feasible budgets are {feasible}"
        super().__init__(msg + " (or relax the constraints)")


@dataclass(frozen=True)
class Problem:
    """``costs[i][c]``: bits (int >= 0); ``errors[i][c]``: predicted error (finite, >= 0).

    ``groups``: tuples of layer indices that must take the same candidate index (all members
    need the same number of candidates, and the same ``labels`` when given).  ``labels[i][c]``:
    optional candidate names (spec names), used by ``method="uniform"`` to match one spec across
    layers whose candidate lists differ.
    """

    layers: tuple[str, ...]
    costs: tuple[tuple[int, ...], ...]
    errors: tuple[tuple[float, ...], ...]
    groups: tuple[tuple[int, ...], ...] = ()
    labels: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self):
        n = len(self.layers)
        if n == 0:
            raise ValueError("a Problem needs at least one layer")
        if len(set(self.layers)) != n:
            raise ValueError("Problem.layers contains duplicate names")
        if len(self.costs) != n or len(self.errors) != n or (self.labels and len(self.labels) != n):
            raise ValueError(f"costs/errors/labels must have one entry per layer ({n})")
        costs, errors = [], []
        for name, cs, es in zip(self.layers, self.costs, self.errors):
            if len(cs) == 0 or len(cs) != len(es):
                raise ValueError(f"layer {name}: needs >= 1 candidate and as many errors as costs")
            if any(isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 0 for c in cs):
                raise ValueError(f"layer {name}: costs must be non-negative integers (bits), got {list(cs)}")
            if any(not math.isfinite(e) or e < 0 for e in es):
                raise ValueError(f"layer {name}: errors must be finite and >= 0, got {list(es)}")
            costs.append(tuple(int(c) for c in cs))
            errors.append(tuple(float(e) for e in es))
        object.__setattr__(self, "costs", tuple(costs))
        object.__setattr__(self, "errors", tuple(errors))
        object.__setattr__(self, "groups", tuple(tuple(int(i) for i in g) for g in self.groups))
        if self.labels:
            object.__setattr__(self, "labels", tuple(tuple(str(s) for s in ls) for ls in self.labels))
            for name, ls, cs in zip(self.layers, self.labels, costs):
                if len(ls) != len(cs) or len(set(ls)) != len(ls):
                    raise ValueError(f"layer {name}: labels must be unique, one per candidate")
        seen: set[int] = set()
        for g in self.groups:
            if not g or any(not 0 <= i < n for i in g) or len(set(g)) != len(g) or seen & set(g):
                raise ValueError(f"tied group {g}: indices must be distinct, in 0..{n - 1}, in one group only")
            seen |= set(g)
            ref = g[0]
            for i in g[1:]:
                if len(costs[i]) != len(costs[ref]) or (self.labels and self.labels[i] != self.labels[ref]):
                    raise ValueError(f"tied layers {self.layers[ref]} and {self.layers[i]} "
                                     "must have the same candidates")

    def items(self) -> list[tuple[int, ...]]:
        """Layers merged into items: every tied group, then every untied layer alone."""
        grouped = {i for g in self.groups for i in g}
        return list(self.groups) + [(i,) for i in range(len(self.layers)) if i not in grouped]

    def min_bits(self) -> int:
        return sum(min(sum(self.costs[i][c] for i in it) for c in range(len(self.costs[it[0]]))) for it in self.items())


@dataclass(frozen=True)
class Solution:
    """``choice[i]``: candidate index of layer ``i``; ``lower_bound``: a proven bound on the optimum."""

    choice: tuple[int, ...]
    total_bits: int
    total_error: float
    method: str
    seconds: float
    lower_bound: float | None


def solve(problem: Problem, budget_bits: int, *, method: str = "exact", uniform: int | str | None = None,
          time_limit: float = 60.0) -> Solution:
    """Choose one candidate per layer minimising total error with ``total_bits <= budget_bits``.

    Raises :class:`InfeasibleBudget` (with ``min_bits``) when no allowed choice fits.
    """
    if method not in METHODS:
        raise ValueError(f"unknown allocation method {method!r}: choose one of {', '.join(METHODS)}")
    if isinstance(budget_bits, bool) or not isinstance(budget_bits, numbers.Integral) or budget_bits < 0:
        raise ValueError(f"budget_bits must be a non-negative integer, got {budget_bits!r}")
    if uniform is not None and method != "uniform":
        raise ValueError("`uniform=` only applies to method='uniform'")
    budget_bits = int(budget_bits)
    t0 = time.perf_counter()
    if method == "uniform":
        choice, lb = _uniform(problem, budget_bits, uniform), None
    else:
        items = problem.items()
        cost, err, keep = _item_tables(problem, items)
        base = sum(int(c.min()) for c in cost)
        if base > budget_bits:
            raise InfeasibleBudget(base, budget_bits)
        if method == "exact":
            pick, lb = mckp.exact(cost, err, budget_bits, time_limit)
        elif method == "dp":
            pick, lb = mckp.dp(cost, err, budget_bits), math.inf  # exact: the bound is the optimum
        else:
            pick, lb, _ = mckp.greedy(cost, err, budget_bits)
        choice = [0] * len(problem.layers)
        for it, k, p in zip(items, keep, pick):
            for i in it:
                choice[i] = int(k[p])
    return _finish(problem, tuple(choice), budget_bits, method, t0, lb)


def _item_tables(problem: Problem, items):
    """Per item: Pareto-efficient candidates' summed costs (int64) and errors, and their indices."""
    cost, err, keep = [], [], []
    for it in items:
        c = np.sum([problem.costs[i] for i in it], axis=0, dtype=np.int64)
        e = np.sum([problem.errors[i] for i in it], axis=0, dtype=np.float64)
        order = np.lexsort((e, c))
        kept, best = [], math.inf
        for j in order:
            if e[j] < best:
                kept.append(j)
                best = e[j]
        k = np.array(kept)
        cost.append(c[k])
        err.append(e[k])
        keep.append(k)
    return cost, err, keep


def _uniform(problem: Problem, budget: int, which: int | str | None) -> list[int]:
    """Same spec everywhere: by label when the problem has labels, else by candidate index."""
    n = len(problem.layers)
    if problem.labels:
        common = [s for s in problem.labels[0] if all(s in ls for ls in problem.labels)]
        index = [{s: c for c, s in enumerate(ls)} for ls in problem.labels]
        options = {s: [index[i][s] for i in range(n)] for s in common}
    else:
        m = len(problem.costs[0])
        if any(len(cs) != m for cs in problem.costs):
            raise ValueError("uniform allocation without labels needs the same number of candidates per layer")
        options = {c: [c] * n for c in range(m)}
    if which is not None:
        key = which if problem.labels else int(which)
        if key not in options:
            raise ValueError(f"uniform candidate {which!r} is not available for every layer: "
                             f"choose from {list(options)}")
        options = {key: options[key]}
    if not options:
        raise ValueError("no candidate spec is shared by all layers: a uniform allocation is impossible")
    tot = {k: (sum(problem.costs[i][c] for i, c in enumerate(ch)),
               math.fsum(problem.errors[i][c] for i, c in enumerate(ch))) for k, ch in options.items()}
    fits = [k for k in options if tot[k][0] <= budget]
    if not fits:
        raise InfeasibleBudget(min(t[0] for t in tot.values()), budget, what="uniform spec")
    best = min(fits, key=lambda k: (tot[k][1], tot[k][0]))
    return options[best]


def _finish(problem: Problem, choice, budget: int, method: str, t0: float, lb) -> Solution:
    bits = sum(problem.costs[i][c] for i, c in enumerate(choice))
    err = math.fsum(problem.errors[i][c] for i, c in enumerate(choice))
    if bits > budget or any(len({choice[i] for i in g}) > 1 for g in problem.groups):
        raise RuntimeError(f"internal error: {method} returned an invalid allocation ({bits} > {budget} bits?)")
    if lb is not None:
        lb = min(float(lb), err)
    return Solution(choice, bits, err, method, time.perf_counter() - t0, lb)
