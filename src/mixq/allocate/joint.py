"""One memory budget for the weights and the KV cache, solved as one multiple-choice knapsack.

What the budget counts (``memory_bytes``)::

    memory = Σ_block linears  spec.cost(shape).total / 8            (every stored bit: codes, scales,
                                                                     zeros — exactly Budget(bytes=...))
           + kv_cache_bits(config, per-layer (K, V) bits, context, batch) / 8
           + other_bytes                                             (a constant: 0 by default)

i.e. by default the quantized block linears and the KV cache of ``batch`` sequences of ``context``
tokens; embeddings, norms and a kept ``lm_head`` are not counted (as with ``--bytes``) unless the
caller adds them as ``other_bytes``.

The knapsack: one group per block linear (its candidate specs, costs ``spec.cost(shape)``, errors from
the weight :class:`~mixq.allocate.SensitivityTable`), plus one group per layer and per K/V (widths
from the :class:`~mixq.allocate.kv_table.KVSensitivityTable`, costs
:func:`~mixq.runtime.kv_settings.kv_part_bits` at ``context``/``batch``, errors the measured KV loss
increase).  Both error kinds are per-token loss increases in nats (``kfac``/``fisher``/``block`` weight
metrics; ``kl``/``loss`` KV metrics), assumed additive; weight metrics in other units (``hessian``,
``block-rel``) are refused unless ``allow_mixed_units=True``.  The solver is :func:`mixq.allocate.solve` (exact by default): the plan
never exceeds the budget and is optimal for the summed predicted error.

:func:`allocate_separately` is the baseline that splits the budget first (a fixed KV width, or a
fixed KV byte share allocated per layer, and the weights get the rest).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace

from ..jsonio import read_json, write_json_atomic
from ..runtime.kv_cost import resolve_kv_bits
from ..runtime.kv_settings import KVSettings
from .constraints import KEEP, Constraints, build_problem
from .kv_table import KVSensitivityTable, check_doc
from .plan import Budget, Plan, allocate, human_bytes, row_weights_for
from .tcq_states import reprice
from .solvers import InfeasibleBudget, Problem, solve
from .table import SensitivityTable

log = logging.getLogger(__name__)

NAT_METRICS = ("kfac", "kfac-tok", "kfac-pos", "kfac-kv", "fisher", "block")  # errors in nats of loss increase
KV_PLAN_VERSION = 1


class InfeasibleMemory(ValueError):
    """The memory budget is below the cheapest allowed choice; ``min_bytes`` is the smallest feasible one."""

    def __init__(self, memory_bytes: int, min_bytes: int, parts: dict, context: int, batch: int):
        self.memory_bytes, self.min_bytes, self.parts = int(memory_bytes), int(min_bytes), parts
        detail = ", ".join(f"{k} {human_bytes(v)}" for k, v in parts.items() if v)
        super().__init__(f"a memory budget of {human_bytes(memory_bytes)} ({memory_bytes} bytes) is infeasible at "
                         f"context {context}, batch {batch}: the cheapest allowed choice needs {min_bytes} bytes "
                         f"({detail}); raise the budget to at least {min_bytes} bytes (or relax the constraints, "
                         "shorten the context, allow fewer KV bits)")


@dataclass(frozen=True)
class JointPlan:
    """Weights and KV cache under one memory budget.

    ``weights``: a standard :class:`~mixq.allocate.Plan` (``mixq quantize --plan``), ``None`` for a
    KV-only plan.  ``kv``: ``(k_bits, v_bits)`` per layer, ``kv_errors`` their predicted errors.
    Byte figures are exact (bits / 8).
    """

    weights: Plan | None
    kv: tuple[tuple[int, int], ...]
    kv_errors: tuple[tuple[float, float], ...]
    kv_bits_total: int
    context: int
    batch: int
    settings: KVSettings
    memory_bytes: int | None
    other_bytes: int = 0
    solver: str = "exact"
    kv_metric: str = "kl"
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)

    @property
    def weight_bits(self) -> int:
        return 0 if self.weights is None else self.weights.total_bits

    @property
    def weight_bytes(self) -> float:
        return self.weight_bits / 8

    @property
    def kv_bytes(self) -> float:
        return self.kv_bits_total / 8

    @property
    def total_bytes(self) -> float:
        return (self.weight_bits + self.kv_bits_total) / 8 + self.other_bytes

    @property
    def weight_error(self) -> float:
        return 0.0 if self.weights is None else self.weights.predicted_error

    @property
    def kv_error(self) -> float:
        return math.fsum(k + v for k, v in self.kv_errors)

    @property
    def predicted_error(self) -> float:
        return self.weight_error + self.kv_error

    def kv_bits_dict(self) -> dict:
        """For :class:`~mixq.runtime.kv_cache.KIVICache` / ``eval_with_kv_quant``: ``{layer: (k, v)}``."""
        return {i: tuple(kv) for i, kv in enumerate(self.kv)}

    def mean_kv_bits(self) -> tuple[float, float]:
        return (sum(k for k, _ in self.kv) / len(self.kv), sum(v for _, v in self.kv) / len(self.kv))

    def as_plan(self) -> Plan:
        """The one plan file ``mixq plan --memory`` writes: the weights' :class:`~mixq.allocate.Plan` carrying the KV
        widths (``Plan.kv``), which ``mixq quantize --plan`` records and ``mixq eval`` applies."""
        if self.weights is None:
            raise ValueError("a KV-only joint plan has no weights: save its kv_plan_dict() instead")
        return replace(self.weights, kv=self.kv_plan_dict())

    def kv_plan_dict(self) -> dict:
        """The KV part as a ``KVPlan`` JSON object (``mixq eval --kv-plan``), with the joint summary."""
        return {"_type": "KVPlan", "_version": KV_PLAN_VERSION, "context": self.context, "batch": self.batch,
                "settings": self.settings.to_dict(), "kv_metric": self.kv_metric,
                "kv_bytes": self.kv_bytes, "kv_predicted_error": self.kv_error,
                "layers": [{"layer": i, "k": k, "v": v, "k_error": ek, "v_error": ev}
                           for i, ((k, v), (ek, ev)) in enumerate(zip(self.kv, self.kv_errors))],
                "joint": self.summary(), "meta": self.meta}

    def summary(self) -> dict:
        k, v = self.mean_kv_bits()
        return {"memory_bytes": self.memory_bytes, "other_bytes": self.other_bytes, "context": self.context,
                "batch": self.batch, "solver": self.solver, "weight_bytes": self.weight_bytes,
                "kv_bytes": self.kv_bytes, "total_bytes": self.total_bytes,
                "weight_bpw": None if self.weights is None else self.weights.achieved_bpw,
                "mean_k_bits": k, "mean_v_bits": v, "weight_error": self.weight_error, "kv_error": self.kv_error,
                "predicted_error": self.predicted_error,
                "weight_metric": None if self.weights is None else self.weights.metric, "kv_metric": self.kv_metric,
                "seconds": self.seconds}

    def to_dict(self) -> dict:
        return {"_type": "JointPlan", "_version": KV_PLAN_VERSION, "summary": self.summary(),
                "weights": None if self.weights is None else self.weights.to_dict(), "kv": self.kv_plan_dict()}

    def format(self) -> str:
        """What goes where: totals, then one line per layer (K/V bits, KV bytes, errors)."""
        k, v = self.mean_kv_bits()
        mem = "no budget" if self.memory_bytes is None else f"budget {human_bytes(self.memory_bytes)}"
        lines = [f"memory: {human_bytes(round(self.total_bytes))} of {mem} at context {self.context}, batch {self.batch}"
                 f" (block linears + KV cache{' + ' + human_bytes(self.other_bytes) + ' other' if self.other_bytes else ''};"
                 f" solver {self.solver})"]
        if self.weights is not None:
            w = self.weights
            lines.append(f"  weights  {human_bytes(round(self.weight_bytes)):>12}  {w.achieved_bpw:.3f} bpw over "
                         f"{len(w.layers)} block linears, predicted {w.metric} error {self.weight_error:.5g}")
        lines.append(f"  KV cache {human_bytes(round(self.kv_bytes)):>12}  mean K {k:.2f} / V {v:.2f} bits, "
                     f"predicted {self.kv_metric} error {self.kv_error:.5g}")
        lines.append(f"  total predicted error {self.predicted_error:.5g} nats/token")
        lines.append("")
        lines.append("layer  K bits  V bits   K error    V error")
        for i, ((kb, vb), (ek, ev)) in enumerate(zip(self.kv, self.kv_errors)):
            lines.append(f"{i:>5}  {kb:>6}  {vb:>6}  {ek:9.3g}  {ev:9.3g}")
        if self.weights is not None:
            counts: dict[str, int] = {}
            for s in self.weights.layers.values():
                counts[s.name] = counts.get(s.name, 0) + 1
            lines += ["", "weight specs: " + ", ".join(f"{n} x{c}" for n, c in sorted(counts.items(), key=lambda t: -t[1]))]
        return "\n".join(lines)

    def save(self, path, *, overwrite: bool = False):
        return write_json_atomic(path, self.to_dict(), overwrite=overwrite)


def load_kv_plan(src) -> tuple[dict, KVSettings, dict]:
    """``(bits {layer: (k, v)}, settings, document)`` of a KV plan: a plan file of ``mixq plan --memory`` (a Plan
    with its ``kv``), a KVPlan or JointPlan JSON file, or such a document already read (``src`` a dict, e.g. what a
    quantized directory's ``mixq.json`` records as ``kv_plan``)."""
    path = "the KV plan" if isinstance(src, dict) else src
    d = src if isinstance(src, dict) else read_json(src)
    if isinstance(d, dict) and d.get("_type") in ("JointPlan", "Plan"):
        if d.get("_type") == "Plan" and d.get("kv") is None:
            raise ValueError(f"{path} is a weights-only plan: make one with KV widths with `mixq plan --memory ... "
                             "--kv-measurement KV.json`")
        d = d.get("kv")
    check_doc(d, "KVPlan", KV_PLAN_VERSION, "KV plan", "mixq plan --memory ...", where=f"{path}: ")
    try:
        bits = {int(r["layer"]): (int(r["k"]), int(r["v"])) for r in d["layers"]}
        settings = KVSettings.from_dict(d.get("settings", {}))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: malformed KV plan ({e})") from None
    resolve_kv_bits(bits, len(bits))  # validates the widths and that layers are 0..n-1
    return bits, settings, d


# ---------------------------------------------------------------------------- solving
def _check_units(weight_table: SensitivityTable | None, kv_table: KVSensitivityTable, allow: bool) -> None:
    if weight_table is None or allow:
        return
    if weight_table.metric not in NAT_METRICS:
        raise ValueError(f"weight errors measured with {weight_table.metric!r} are not in nats of loss increase: "
                         f"measure with --metric kfac (or kfac-tok, kfac-pos, fisher, block) to share a budget with the KV cache")
    wm, km = weight_table.meta.get("model"), kv_table.model
    if wm and km and wm != km:
        raise ValueError(f"the weight measurement is of model {wm} and the KV measurement of model {km}: "
                         "measure both on the same model")


def _kv_rows(kv_table: KVSensitivityTable, context: int, batch: int, allowed, fp_bits: int):
    allowed = None if allowed is None else {int(b) for b in allowed}
    return kv_table.rows(context, batch, allowed=allowed, fp_bits=fp_bits)


def _kv_part(kv_table, rows, picks):
    """Per-layer (k, v) bits and errors from the chosen KV row indices (rows in table order)."""
    kv, errs = [], []
    for i in range(kv_table.n_layers):
        (_, kb, _, ke), (_, vb, _, ve) = rows[2 * i], rows[2 * i + 1]
        pk, pv = picks[2 * i], picks[2 * i + 1]
        kv.append((kb[pk], vb[pv]))
        errs.append((ke[pk], ve[pv]))
    return tuple(kv), tuple(errs)


def _weight_plan(weight_table, problem, choice, constraints, solver, extra_meta, source) -> Plan:
    layers, errors = {}, {}
    for i, x in enumerate(weight_table.layers):
        name = problem.labels[i][choice[i]]
        by = {s.name: s for s in (*x.candidates, KEEP)}
        layers[x.fqn], errors[x.fqn] = by[name], problem.errors[i][choice[i]]
    bits = sum(problem.costs[i][c] for i, c in enumerate(choice))
    nbytes = max(1, math.ceil(bits / 8))
    return Plan(layers, {x.fqn: x.shape for x in weight_table.layers}, errors, weight_table.metric, solver,
                Budget(bytes=nbytes), 8 * nbytes, None, constraints,
                {**weight_table.meta, "table_sha256": source.fingerprint(), **extra_meta},
                row_weights=row_weights_for(weight_table, layers))


def _budget_bits(memory_bytes: int, other_bytes: int) -> int:
    if isinstance(memory_bytes, bool) or not isinstance(memory_bytes, int) or memory_bytes <= 0:
        raise ValueError(f"memory budget must be a positive integer number of bytes, got {memory_bytes!r}")
    if isinstance(other_bytes, bool) or not isinstance(other_bytes, int) or other_bytes < 0:
        raise ValueError(f"other_bytes must be a non-negative integer, got {other_bytes!r}")
    return 8 * (memory_bytes - other_bytes)


def allocate_joint(weight_table: SensitivityTable | None, kv_table: KVSensitivityTable, memory_bytes: int,
                   context: int, batch: int = 1, *, constraints: Constraints = Constraints(), kv_bits=None,
                   kv_tied: bool = False, other_bytes: int = 0, method: str = "exact", fp_bits: int = 16,
                   allow_mixed_units: bool = False, tcq_state_bits: int = 8) -> JointPlan:
    """Choose every block linear's spec and every layer's K and V width under one memory budget
    (module doc); ``weight_table=None`` allocates the KV cache alone.

    ``kv_bits``: allowed KV widths (default: every measured one, 16 included); ``kv_tied``: K and V of a
    layer take the same width; ``tcq_state_bits``: as :func:`mixq.allocate.allocate`.  Raises :class:`InfeasibleMemory` (with ``min_bytes``) when nothing fits.
    """
    if method == "uniform":
        raise ValueError("method='uniform' has no meaning for a joint plan: use allocate_separately")
    _check_units(weight_table, kv_table, allow_mixed_units)
    t0 = time.perf_counter()
    budget = _budget_bits(memory_bytes, other_bytes)
    source = weight_table
    if weight_table is not None:
        weight_table = reprice(weight_table, tcq_state_bits, constraints)
    wp = build_problem(weight_table, constraints) if weight_table is not None else None
    rows = _kv_rows(kv_table, context, batch, kv_bits, fp_bits)
    nw = 0 if wp is None else len(wp.layers)
    labels_kv = [tuple(f"{b}b" for b in r[1]) for r in rows]
    groups = list(wp.groups) if wp is not None else []
    if kv_tied:
        for i in range(kv_table.n_layers):
            a, b = nw + 2 * i, nw + 2 * i + 1
            if labels_kv[2 * i] != labels_kv[2 * i + 1]:
                raise ValueError(f"layer {i}: K and V were measured at different widths; cannot tie them")
            groups.append((a, b))
    problem = Problem(
        layers=(*(wp.layers if wp else ()), *(r[0] for r in rows)),
        costs=(*(wp.costs if wp else ()), *(r[2] for r in rows)),
        errors=(*(wp.errors if wp else ()), *(r[3] for r in rows)),
        groups=tuple(groups),
        labels=(*(wp.labels if wp else ()), *labels_kv),
    )
    try:
        sol = solve(problem, budget, method=method)
    except InfeasibleBudget as e:
        w_min = 0 if wp is None else wp.min_bits()
        parts = {"weights": math.ceil(w_min / 8), "KV cache": math.ceil((e.min_bits - w_min) / 8),
                 "other": other_bytes}
        raise InfeasibleMemory(memory_bytes, math.ceil(e.min_bits / 8) + other_bytes, parts, context, batch) from None
    kv, kv_err = _kv_part(kv_table, rows, sol.choice[nw:])
    kv_total = sum(rows[j][2][c] for j, c in enumerate(sol.choice[nw:]))
    meta = {"kv_table": kv_table.meta, "kv_model": kv_table.model}
    plan_meta = {"joint": {"memory_bytes": memory_bytes, "context": context, "batch": batch,
                           "kv_bytes": kv_total / 8, "other_bytes": other_bytes}}
    weights = None if wp is None else _weight_plan(weight_table, wp, sol.choice[:nw], constraints,
                                                   f"joint-{method}", plan_meta, source)
    plan = JointPlan(weights, kv, kv_err, kv_total, context, batch, kv_table.settings, memory_bytes, other_bytes,
                     f"joint-{method}", kv_table.metric, time.perf_counter() - t0, meta)
    if plan.total_bytes > memory_bytes:  # never: the solver checks in integer bits
        raise RuntimeError(f"internal error: joint plan uses {plan.total_bytes} bytes > {memory_bytes}")
    log.info("joint plan: weights %.0f B + KV %.0f B <= %d B, predicted %.5g", plan.weight_bytes, plan.kv_bytes,
             memory_bytes, plan.predicted_error)
    return plan


def allocate_kv(kv_table: KVSensitivityTable, kv_bytes: int, context: int, batch: int = 1, **kw) -> JointPlan:
    """The KV cache alone, mixed per layer and K/V within ``kv_bytes`` (:func:`allocate_joint` without weights)."""
    return allocate_joint(None, kv_table, kv_bytes, context, batch, **kw)


def uniform_kv(kv_table: KVSensitivityTable, bits, context: int, batch: int = 1, *, fp_bits: int = 16) -> JointPlan:
    """The KV part of a uniform cache (``bits``: int or ``(k, v)``), as a KV-only :class:`JointPlan`."""
    kv = tuple(resolve_kv_bits(bits, kv_table.n_layers))
    errs, total = [], 0
    for i, (kb, vb) in enumerate(kv):
        ek, ev = kv_table.entry(i, "k"), kv_table.entry(i, "v")
        if kb not in ek.bits or vb not in ev.bits:
            raise ValueError(f"the KV measurement has no error for K{kb}/V{vb} (measured: {ek.bits})")
        errs.append((ek.error(kb), ev.error(vb)))
        total += kv_table.part_bits("k", kb, context, batch, fp_bits) + kv_table.part_bits("v", vb, context, batch, fp_bits)
    return JointPlan(None, kv, tuple(errs), total, context, batch, kv_table.settings, None, 0, "uniform",
                     kv_table.metric)


def allocate_separately(weight_table: SensitivityTable, kv_table: KVSensitivityTable, memory_bytes: int,
                        context: int, batch: int = 1, *, kv_bits=4, kv_bytes: int | None = None,
                        constraints: Constraints = Constraints(), other_bytes: int = 0, method: str = "exact",
                        fp_bits: int = 16, allowed_kv_bits=None, tcq_state_bits: int = 8) -> JointPlan:
    """Baseline: split the budget first, then allocate each side alone.

    ``kv_bytes=None``: the cache is uniform at ``kv_bits`` (int or ``(k, v)``); else it gets ``kv_bytes``
    allocated per layer (:func:`allocate_kv`).  The weights get ``memory − other − KV`` bytes
    (:func:`mixq.allocate.allocate` with ``Budget(bytes=...)``).
    """
    t0 = time.perf_counter()
    _budget_bits(memory_bytes, other_bytes)
    if kv_bytes is None:
        kvp = uniform_kv(kv_table, kv_bits, context, batch, fp_bits=fp_bits)
        how = f"separate (KV uniform {kv_bits})"
    else:
        kvp = allocate_kv(kv_table, kv_bytes, context, batch, kv_bits=allowed_kv_bits, method=method, fp_bits=fp_bits)
        how = f"separate (KV {kv_bytes} B mixed)"
    left = memory_bytes - other_bytes - math.ceil(kvp.kv_bits_total / 8)
    w_min = build_problem(weight_table, constraints).min_bits()
    if left * 8 < w_min:
        parts = {"weights": math.ceil(w_min / 8), "KV cache": math.ceil(kvp.kv_bytes), "other": other_bytes}
        raise InfeasibleMemory(memory_bytes, sum(parts.values()), parts, context, batch)
    weights = allocate(weight_table, Budget(bytes=left), constraints=constraints, method=method,
                       tcq_state_bits=tcq_state_bits)
    plan = JointPlan(weights, kvp.kv, kvp.kv_errors, kvp.kv_bits_total, context, batch, kv_table.settings,
                     memory_bytes, other_bytes, how, kv_table.metric, time.perf_counter() - t0,
                     {"kv_table": kv_table.meta, "kv_model": kv_table.model})
    if plan.total_bytes > memory_bytes:
        raise RuntimeError(f"internal error: separate plan uses {plan.total_bytes} bytes > {memory_bytes}")
    return plan


def min_memory_bytes(weight_table: SensitivityTable | None, kv_table: KVSensitivityTable, context: int,
                     batch: int = 1, *, constraints: Constraints = Constraints(), kv_bits=None, other_bytes: int = 0,
                     fp_bits: int = 16) -> int:
    """The smallest feasible ``memory_bytes`` for :func:`allocate_joint` with these settings."""
    w = 0 if weight_table is None else build_problem(weight_table, constraints).min_bits()
    kv = sum(min(r[2]) for r in _kv_rows(kv_table, context, batch, kv_bits, fp_bits))
    return math.ceil((w + kv) / 8) + other_bytes


__all__ = ["InfeasibleMemory", "JointPlan", "allocate_joint", "allocate_kv", "allocate_separately", "load_kv_plan",
           "min_memory_bytes", "uniform_kv"]
