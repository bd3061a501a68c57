"""Bit allocation: choose one quantization spec per layer under a bit budget.

    SensitivityTable (measure/) --build_problem--> Problem --solve--> Solution
    allocate(table, Budget(bpw=3.5), constraints=Constraints(...)) -> Plan  (plan.json)

Modules: :mod:`.candidates` (candidate sets), :mod:`.table` (the input table and JSON I/O),
:mod:`.constraints` (keep/force/min/max bits/tied -> Problem), :mod:`.solvers` (one signature:
exact | dp | greedy | uniform) with the knapsack cores in :mod:`.mckp`, :mod:`.plan` (Budget,
Plan, allocate, format_plan_table), :mod:`.feasible` (the budgets a candidate set admits on given layer
shapes, known before measuring).  The KV cache joins the same knapsack: :mod:`.kv_table` (the KV measurement,
``KVSensitivityTable``) and :mod:`.joint` (one memory budget over weights and KV cache: ``allocate_joint``,
``JointPlan``, the KV plan file); neither is imported here (they import :mod:`mixq.runtime`'s KV cost).
"""
from .candidates import (DEFAULT_CANDIDATE_NAMES, candidates_for, default_candidates, extended_candidates,
                         load_candidates, named_candidate_set)
from .constraints import Constraints, build_problem
from .feasible import BudgetRange, budget_range, shape_table
from .plan import Budget, Plan, allocate, format_plan_table, parse_bytes
from .solvers import METHODS, InfeasibleBudget, Problem, Solution, solve
from .table import LayerEntry, SensitivityTable

__all__ = [
    "parse_bytes", "BudgetRange", "budget_range", "shape_table",
    "DEFAULT_CANDIDATE_NAMES", "METHODS", "Budget", "Constraints", "InfeasibleBudget", "LayerEntry", "Plan",
    "Problem", "SensitivityTable", "Solution", "allocate", "build_problem", "candidates_for",
    "default_candidates", "extended_candidates", "format_plan_table", "load_candidates", "named_candidate_set",
    "solve",
]
