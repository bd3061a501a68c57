"""The budgets an allocation admits, known before anything is measured.

A plan's size depends only on the candidates' costs and the layers' shapes (``spec.cost(shape)``), never on the
measured errors, so the feasible range of ``--bpw`` / ``--bytes`` is fixed by the candidate set, the model's
layer shapes and the constraints.  ``mixq quantize --bpw`` checks it before calibration and measurement (an
impossible budget used to fail only after the whole measurement), ``mixq plan`` before solving.

    budget_range(shape_table(shapes, candidates), constraints).check(Budget(bpw=0.5))  # raises InfeasibleBudget
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import QuantSpec
from .candidates import candidates_for
from .constraints import Constraints, build_problem
from .plan import Budget
from .solvers import InfeasibleBudget
from .table import LayerEntry, SensitivityTable


@dataclass(frozen=True)
class BudgetRange:
    """From the cheapest allowed choice (``min_bits``) to the most any plan stores (``max_bits``: every tied group
    and layer its most expensive allowed candidate), over ``numel`` weights."""

    min_bits: int
    max_bits: int
    numel: int

    @property
    def min_bpw(self) -> float:
        return math.ceil(self.min_bits / self.numel * 1e4) / 1e4

    @property
    def max_bpw(self) -> float:
        return math.floor(self.max_bits / self.numel * 1e4) / 1e4

    def describe(self) -> str:
        return (f"{self.min_bpw:.4f} to {self.max_bpw:.4f} bpw "
                f"({math.ceil(self.min_bits / 8)} to {self.max_bits // 8} bytes)")

    def check(self, budget: Budget) -> None:
        """Raise :class:`InfeasibleBudget` below the range, ``ValueError`` above it (nothing more to buy: every
        layer would get its largest candidate), each naming the feasible range."""
        bits = budget.to_bits(self.numel)
        if bits < self.min_bits:
            raise InfeasibleBudget(self.min_bits, bits, numel=self.numel, feasible=self.describe())
        if bits > self.max_bits:
            raise ValueError(f"a budget of {budget} is more than any plan can use: with every layer at its largest "
                             f"allowed candidate the layers take {self.max_bpw:.4f} bpw; feasible budgets are "
                             f"{self.describe()}")


def budget_range(table: SensitivityTable, constraints: Constraints = Constraints()) -> BudgetRange:
    """The feasible budgets of ``table`` under ``constraints`` (its errors play no part)."""
    problem = build_problem(table, constraints)
    top = sum(max(sum(problem.costs[i][c] for i in it) for c in range(len(problem.costs[it[0]])))
              for it in problem.items())
    return BudgetRange(problem.min_bits(), top, table.numel)


def shape_table(shapes: dict[str, tuple[int, int]], candidates: list[QuantSpec]) -> SensitivityTable:
    """The table a measurement of layers ``shapes`` (fqn -> (out, in)) with ``candidates`` will hold, every error 0:
    its costs, and so its :func:`budget_range`, are already those of the real measurement."""
    rows = []
    for fqn, shape in shapes.items():
        shape = tuple(int(d) for d in shape)
        cands = candidates_for(shape, candidates, fqn=fqn)
        if not cands:
            raise ValueError(f"{fqn} {shape}: no candidate spec fits this layer (their group sizes do not divide "
                             f"{shape[1]}): add one that does to --candidates, e.g. W4-channel")
        rows.append(LayerEntry(fqn, shape, tuple(cands), (0.0,) * len(cands)))
    return SensitivityTable(tuple(rows), metric="none (costs only)")
