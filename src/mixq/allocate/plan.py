"""Budgets, the allocation entry point, and the :class:`Plan` artifact (``plan.json``).

    table (SensitivityTable) + Budget + Constraints --allocate--> Plan --save--> plan.json

A plan maps every layer's fqn to one :class:`QuantSpec` and records where it came from
(metric, solver, budget, constraints, the measurement's hash).  Its sizes are always derived
from ``spec.cost(shape)`` -- the one bit accounting -- and checked again when a plan is read.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path

from ..config import QuantSpec
from ..jsonio import read_json, write_json_atomic
from .constraints import KEEP, Constraints, build_problem
from .solvers import InfeasibleBudget, solve
from .table import (SensitivityTable, _check_header, row_weight_from_json, row_weight_json, spec_from_json,
                    spec_to_json)
from .tcq_states import reprice

log = logging.getLogger(__name__)

PLAN_VERSION = 1
BUDGET_VERSION = 1


@dataclass(frozen=True)
class Budget:
    """Exactly one of ``bpw`` (average bits per weight over the allocated layers, every stored
    bit counted) or ``bytes`` (total storage of those layers)."""

    bpw: float | None = None
    bytes: int | None = None

    def __post_init__(self):
        if (self.bpw is None) == (self.bytes is None):
            raise ValueError("give exactly one of Budget(bpw=...) or Budget(bytes=...)")
        if self.bpw is not None:
            if isinstance(self.bpw, bool) or not isinstance(self.bpw, (int, float)) or not 0 < self.bpw < math.inf:
                raise ValueError(f"Budget.bpw must be a positive finite number of bits per weight, got {self.bpw!r}")
            object.__setattr__(self, "bpw", float(self.bpw))
        elif isinstance(self.bytes, bool) or not isinstance(self.bytes, int) or self.bytes <= 0:
            raise ValueError(f"Budget.bytes must be a positive integer, got {self.bytes!r}")

    def to_bits(self, total_numel: int) -> int:
        """The budget in bits, rounded down so it is never exceeded.

        ``bpw``: ``floor(bpw * numel)`` computed exactly on the decimal the user wrote
        (``Fraction(repr(bpw))``), so ``4.25`` means 17/4 and not its binary approximation.
        """
        if self.bytes is not None:
            return 8 * self.bytes
        if total_numel <= 0:
            raise ValueError(f"total_numel must be positive, got {total_numel}")
        return math.floor(Fraction(repr(self.bpw)) * total_numel)

    def __str__(self) -> str:
        return f"{self.bpw:g} bpw" if self.bpw is not None else human_bytes(self.bytes)

    def to_dict(self) -> dict:
        return {"_type": "Budget", "_version": BUDGET_VERSION, "bpw": self.bpw, "bytes": self.bytes}

    @classmethod
    def from_dict(cls, d: dict) -> "Budget":
        _check_header(d, "Budget", BUDGET_VERSION)
        return cls(bpw=d.get("bpw"), bytes=d.get("bytes"))


def parse_bytes(value) -> int:
    """A byte count: an int, or a string such as ``"50MB"`` (units B, KB, MB, GB of 1024)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    units = {"kb": 1024, "mb": 1024**2, "gb": 1024**3, "b": 1}
    t = str(value).strip().lower()
    for u, f in units.items():
        if t.endswith(u) and t[: -len(u)].strip().replace(".", "", 1).isdigit():
            return int(float(t[: -len(u)]) * f)
    if t.isdigit():
        return int(t)
    raise ValueError(f"{value!r}: give a number of bytes, or a string such as '50MB' (KB, MB, GB)")


@dataclass(frozen=True)
class Plan:
    """One spec per layer plus provenance.  ``layers``, ``shapes`` and ``errors`` share keys
    (fqns, in allocation order); ``errors`` are the table's predicted errors (unit: ``metric``).  ``kv``: the
    KV-cache widths chosen with the weights under one memory budget (``mixq plan --memory``), as the KVPlan JSON
    object of :mod:`mixq.allocate.joint`; ``mixq quantize --plan`` records it and ``mixq eval`` applies it."""

    layers: dict[str, QuantSpec]
    shapes: dict[str, tuple[int, int]]
    errors: dict[str, float]
    metric: str
    solver: str
    budget: Budget
    budget_bits: int
    lower_bound: float | None = None
    constraints: Constraints = field(default_factory=Constraints)
    meta: dict = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    version: int = PLAN_VERSION
    kv: dict | None = None  # a joint plan's KV-cache part (KVPlan JSON, mixq.allocate.joint): recorded, applied at eval
    # the measured output rows' weights (mean 1) of layers whose spec's quantizer weights rows (+ip1 trellises):
    # the walk hands them on, so a layer is quantized as it was measured (LayerEntry.row_weight)
    row_weights: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("layers", "shapes", "errors", "meta", "row_weights"):
            object.__setattr__(self, name, dict(getattr(self, name)))
        object.__setattr__(self, "shapes", {k: tuple(v) for k, v in self.shapes.items()})
        if self.version != PLAN_VERSION:
            raise ValueError(f"Plan version {self.version} is not supported (this mixq reads {PLAN_VERSION})")
        if not self.layers or list(self.layers) != list(self.shapes) or list(self.layers) != list(self.errors):
            raise ValueError("Plan.layers, shapes and errors must be non-empty, with the same fqns in the same order")
        for fqn, s in self.layers.items():
            if not isinstance(s, QuantSpec):
                raise ValueError(f"{fqn}: spec must be a QuantSpec, got {s!r}")
            _fit(fqn, s, self.shapes[fqn])
            if not math.isfinite(self.errors[fqn]) or self.errors[fqn] < 0:
                raise ValueError(f"{fqn}: predicted error must be finite and >= 0, got {self.errors[fqn]}")
        for fqn, w in self.row_weights.items():
            if fqn not in self.layers or len(w) != self.shapes[fqn][0]:
                raise ValueError(f"{fqn}: row weights need a layer of the plan and one weight per output row")
        if self.kv is not None and (not isinstance(self.kv, dict) or self.kv.get("_type") != "KVPlan"):
            raise ValueError("Plan.kv must be a KVPlan object (JointPlan.kv_plan_dict()), or None")
        if not isinstance(self.budget, Budget):
            raise ValueError(f"Plan.budget must be a Budget, got {self.budget!r}")
        if self.total_bits > self.budget_bits:
            raise ValueError(f"plan uses {self.total_bits} bits, over its budget of {self.budget_bits} bits")

    # ------------------------------------------------------------------ derived sizes
    def bits(self, fqn: str) -> int:
        return self.layers[fqn].cost(self.shapes[fqn]).total

    @property
    def total_bits(self) -> int:
        return sum(self.bits(f) for f in self.layers)

    @property
    def numel(self) -> int:
        return sum(r * c for r, c in self.shapes.values())

    @property
    def achieved_bpw(self) -> float:
        return self.total_bits / self.numel

    @property
    def predicted_error(self) -> float:
        return math.fsum(self.errors.values())

    @property
    def per_layer(self) -> dict[str, dict]:
        """fqn -> {spec, shape, bits, bpw, error}."""
        out = {}
        for f, s in self.layers.items():
            b, (r, c) = self.bits(f), self.shapes[f]
            out[f] = {"spec": spec_to_json(s), "shape": [r, c], "bits": b, "bpw": b / (r * c), "error": self.errors[f],
                      **row_weight_json(self.row_weights.get(f))}
        return out

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict:
        return {"_type": "Plan", "_version": self.version, "created": self.created, "metric": self.metric,
                "solver": self.solver, "budget": self.budget.to_dict(), "budget_bits": self.budget_bits,
                "lower_bound": self.lower_bound, "predicted_error": self.predicted_error,
                "total_bits": self.total_bits, "numel": self.numel, "achieved_bpw": self.achieved_bpw,
                "constraints": self.constraints.to_dict(), "meta": self.meta, "layers": self.per_layer,
                **({"kv": self.kv} if self.kv is not None else {})}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        """Rebuild a plan; rejects a wrong ``_type``/version, unknown specs, and stored sizes
        that disagree with ``spec.cost(shape)``."""
        _check_header(d, "Plan", PLAN_VERSION)
        derived = ("predicted_error", "total_bits", "numel", "achieved_bpw")
        known = {"_type", "_version", "created", "metric", "solver", "budget", "budget_bits", "lower_bound",
                 "constraints", "meta", "layers", "kv", *derived}
        if set(d) - known:
            raise ValueError(f"unknown Plan fields {sorted(set(d) - known)}")
        try:
            rows = d["layers"]
            if not isinstance(rows, dict):
                raise TypeError("layers must be an object {fqn: {...}}")
            specs = {f: spec_from_json(r["spec"], f) for f, r in rows.items()}
            plan = cls(specs, {f: tuple(r["shape"]) for f, r in rows.items()},
                       {f: float(r["error"]) for f, r in rows.items()}, d["metric"], d["solver"],
                       Budget.from_dict(d["budget"]), int(d["budget_bits"]), d.get("lower_bound"),
                       Constraints.from_dict(d["constraints"]) if "constraints" in d else Constraints(),
                       d.get("meta", {}), d.get("created", ""), kv=d.get("kv"),
                       row_weights={f: w for f, r in rows.items() if (w := row_weight_from_json(r)) is not None})
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed Plan: missing or bad field {e}") from None
        for f, r in rows.items():
            if "bits" in r and r["bits"] != plan.bits(f):
                raise ValueError(f"{f}: stored bits {r['bits']} disagree with {plan.layers[f].name} "
                                 f"on {plan.shapes[f]} = {plan.bits(f)} bits (edited or stale plan)")
        for k in ("total_bits", "numel"):
            if k in d and d[k] != getattr(plan, k):
                raise ValueError(f"stored {k}={d[k]} disagrees with the layers ({getattr(plan, k)}): "
                                 "edited or stale plan")
        return plan

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``plan.json`` atomically; refuses to replace an existing file unless ``overwrite``."""
        return write_json_atomic(path, self.to_dict(), overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        data = read_json(path)
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def check(self, model_layers: dict[str, tuple[int, int]]) -> None:
        """Raise ``ValueError`` naming the layer unless the plan fits ``model_layers`` (fqn -> (out, in)):
        the same layers, the same shapes, and every spec's group size dividing the in-features."""
        missing = [f for f in model_layers if f not in self.layers]
        extra = [f for f in self.layers if f not in model_layers]
        if extra:
            raise ValueError(f"plan layer {extra[0]} is not in the model ({len(extra)} such: {extra[:5]}): "
                             "the plan was made for another model")
        if missing:
            raise ValueError(f"model layer {missing[0]} has no spec in the plan ({len(missing)} such: {missing[:5]}): "
                             "re-run `mixq plan` on this model's measurement")
        for f, shape in model_layers.items():
            _fit(f, self.layers[f], tuple(shape))  # the more specific message first
            if tuple(shape) != self.shapes[f]:
                raise ValueError(f"{f}: the plan expects shape {self.shapes[f]}, the model has {tuple(shape)}")


def allocate(table: SensitivityTable, budget: Budget, *, constraints: Constraints = Constraints(),
             method: str = "exact", uniform: str | None = None, tcq_state_bits: int = 8) -> Plan:
    """Choose one spec per layer of ``table`` minimising the summed predicted error within ``budget``.

    Raises :class:`InfeasibleBudget` (message: the minimum feasible bpw and bytes) when even the
    cheapest allowed choice does not fit.  ``uniform``: with ``method="uniform"``, a spec name.
    ``tcq_state_bits``: the trellis the plan's ``TCQ<rate>`` layers are encoded with, chosen from the table as
    :func:`mixq.allocate.tcq_states.reprice` prices them (8: as measured).
    """
    source, table = table, reprice(table, tcq_state_bits, constraints)
    problem = build_problem(table, constraints)
    numel = table.numel
    bits = budget.to_bits(numel)
    try:
        sol = solve(problem, bits, method=method, uniform=uniform)
    except InfeasibleBudget as e:
        raise InfeasibleBudget(e.min_bits, bits, numel=numel,
                               what="uniform spec" if method == "uniform" else "choice") from None
    layers, errors = {}, {}
    for i, x in enumerate(table.layers):
        name = problem.labels[i][sol.choice[i]]
        by = {s.name: s for s in (*x.candidates, KEEP)}
        layers[x.fqn], errors[x.fqn] = by[name], problem.errors[i][sol.choice[i]]
    log.info("allocated %d layers with %s in %.3fs: %.4f bpw (budget %s), predicted %s %.6g",
             len(layers), method, sol.seconds, sol.total_bits / numel, budget, table.metric, sol.total_error)
    return Plan(layers, {x.fqn: x.shape for x in table.layers}, errors, table.metric, method, budget, bits,
                sol.lower_bound, constraints, {**table.meta, "table_sha256": source.fingerprint()},
                row_weights=row_weights_for(table, layers))


def row_weights_for(table: SensitivityTable, layers: dict) -> dict:
    """The table's row weights of the layers whose chosen spec weights rows (``CompositeSpec.weights_rows``)."""
    return {x.fqn: x.row_weight for x in table.layers
            if x.row_weight is not None and getattr(layers[x.fqn], "weights_rows", False)}


def format_plan_table(plan: Plan) -> str:
    """Per-layer table (fqn, spec, shape, bits, bpw, predicted error) and totals, for ``mixq plan --dry-run``."""
    rows = [(f, r["spec"] if isinstance(r["spec"], str) else plan.layers[f].name, f"{r['shape'][0]}x{r['shape'][1]}",
             f"{r['bits']:,}", f"{r['bpw']:.3f}", f"{r['error']:.4g}") for f, r in plan.per_layer.items()]
    head = ("layer", "spec", "shape", "bits", "bpw", f"error ({plan.metric})")
    w = [max(len(str(c)) for c in col) for col in zip(head, *rows)]

    def line(r):
        return "  ".join(str(c).ljust(w[j]) if j < 2 else str(c).rjust(w[j]) for j, c in enumerate(r))

    out = [line(head), "  ".join("-" * n for n in w), *map(line, rows)]
    counts: dict[str, int] = {}
    for s in plan.layers.values():
        counts[s.name] = counts.get(s.name, 0) + 1
    bound = "" if plan.lower_bound is None else f" (lower bound {plan.lower_bound:.6g})"
    size = human_bytes(math.ceil(plan.total_bits / 8))
    out += ["", f"total: {len(plan.layers)} layers, {plan.numel:,} weights, {size}"
                f" = {plan.achieved_bpw:.4f} bpw (budget {plan.budget}, {plan.budget_bits:,} bits)",
            f"predicted error ({plan.metric}): {plan.predicted_error:.6g}{bound}; solver: {plan.solver}",
            "specs: " + ", ".join(f"{n} x{k}" for n, k in sorted(counts.items(), key=lambda t: -t[1]))]
    return "\n".join(out)


def human_bytes(n: int) -> str:
    """``1536 -> '1.50 KiB'`` (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _fit(fqn: str, spec: QuantSpec, shape: tuple[int, int]) -> None:
    try:
        spec.cost(shape)
    except ValueError as e:
        raise ValueError(f"{fqn} {shape}: spec {spec.name} does not fit: {e}") from None
