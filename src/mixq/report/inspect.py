"""``mixq inspect``: what a plan or a quantized directory allocates to each layer.

Sources, in this order of preference:

* a plan JSON (``mixq plan``): specs, shapes and the measurement's predicted errors;
* a mixq directory (or its ``mixq.json``): the ``"plan"`` it was quantized with, if any, else its
  ``"layers"`` table (specs and shapes; no predicted errors, e.g. a uniform ``--spec`` run).

Bits always follow from ``spec.cost(shape)``, the one bit accounting of mixq.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..allocate.plan import Plan, human_bytes
from ..config import QuantSpec
from ..config import parse_spec
from ..jsonio import read_json
from .plots import allocation_heatmap, layer_key


@dataclass(frozen=True)
class LayerRow:
    fqn: str
    spec: QuantSpec
    shape: tuple[int, int]
    error: float | None

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def bits(self) -> int:
        return self.spec.cost(self.shape).total

    @property
    def bpw(self) -> float:
        return self.bits / self.numel


@dataclass(frozen=True)
class Allocation:
    """One spec per layer, from a plan or a quantized directory (``plan`` is set for the former)."""

    rows: tuple[LayerRow, ...]
    source: str
    metric: str | None = None
    budget: str | None = None
    plan: Plan | None = None

    @property
    def total_bits(self) -> int:
        return sum(r.bits for r in self.rows)

    @property
    def numel(self) -> int:
        return sum(r.numel for r in self.rows)

    @property
    def achieved_bpw(self) -> float:
        return self.total_bits / self.numel

    @property
    def predicted_error(self) -> float | None:
        errs = [r.error for r in self.rows]
        return None if any(e is None for e in errs) else math.fsum(errs)

    @property
    def per_layer(self) -> dict[str, dict]:
        """fqn -> {spec (name), shape, bits, bpw, error}: the shape :func:`allocation_heatmap` reads."""
        return {r.fqn: {"spec": r.spec.name, "shape": list(r.shape), "bits": r.bits, "bpw": r.bpw, "error": r.error}
                for r in self.rows}

    def by_type(self) -> dict[str, dict]:
        """Layer type -> {layers, bpw (weighted by weights), error (sum or None)}."""
        acc: dict[str, list[LayerRow]] = {}
        for r in self.rows:
            acc.setdefault(layer_key(r.fqn)[1], []).append(r)
        out = {}
        for kind, rows in acc.items():
            errs = [r.error for r in rows]
            out[kind] = {"layers": len(rows), "bpw": sum(r.bits for r in rows) / sum(r.numel for r in rows),
                         "error": None if any(e is None for e in errs) else math.fsum(errs)}
        return out


def _from_plan(plan: Plan, source: str) -> Allocation:
    rows = tuple(LayerRow(f, s, plan.shapes[f], plan.errors[f]) for f, s in plan.layers.items())
    return Allocation(rows, source, plan.metric, f"{plan.budget} ({plan.solver} solver)", plan)


def _from_info(info: dict, source: str) -> Allocation:
    if isinstance(info.get("plan"), dict):
        return _from_plan(Plan.from_dict(info["plan"]), source)
    layers = info.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{source}: mixq.json has neither a plan nor a layers table")
    rows = []
    for fqn, layer in layers.items():
        try:
            spec = parse_spec(layer["spec"])
            shape = (int(layer["shape"][0]), int(layer["shape"][1]))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"{source}: layer {fqn} has a bad spec or shape in mixq.json ({e})") from None
        rows.append(LayerRow(fqn, spec, shape, None))
    label = info.get("spec")
    return Allocation(tuple(rows), source, None, f"uniform {label}" if isinstance(label, str) else None)


def load_allocation(path: str | Path) -> Allocation:
    """Read a plan JSON, a mixq directory or its ``mixq.json`` (see the module docstring)."""
    p = Path(path)
    if p.is_dir():
        from ..export.native import read_info

        return _from_info(read_info(p), str(p))
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist: give a plan JSON (`mixq plan --out`) or a mixq directory")
    doc = read_json(p)
    kind = doc.get("_type") if isinstance(doc, dict) else None
    if kind == "Plan":
        try:
            return _from_plan(Plan.from_dict(doc), str(p))
        except ValueError as e:
            raise ValueError(f"{p}: {e}") from None
    if isinstance(doc, dict) and doc.get("format") == "mixq-native":
        return _from_info(doc, str(p))
    if kind == "SensitivityTable":
        raise ValueError(f"{p} is a measurement, not a plan: make plans from it with `mixq plan {p} --bpw ... --out DIR`")
    raise ValueError(f"{p} is neither a plan JSON (`mixq plan`) nor a mixq.json (found _type={kind!r})")


def format_allocation(a: Allocation) -> str:
    """Per-layer table (layer, type, spec, shape, bpw, predicted error), per-type summary and totals."""
    err_head = f"error ({a.metric})" if a.metric else "error"
    head = ("layer", "type", "spec", "shape", "bpw", err_head)
    rows = [(r.fqn, layer_key(r.fqn)[1], r.spec.name, f"{r.shape[0]}x{r.shape[1]}", f"{r.bpw:.3f}",
             "-" if r.error is None else f"{r.error:.4g}") for r in a.rows]
    w = [max(len(str(c)) for c in col) for col in zip(head, *rows)]

    def line(r):
        return "  ".join(str(c).ljust(w[j]) if j < 3 else str(c).rjust(w[j]) for j, c in enumerate(r))

    out = [line(head), "  ".join("-" * n for n in w), *map(line, rows), ""]
    types = a.by_type()
    out.append("by layer type: " + ", ".join(
        f"{k} {v['bpw']:.2f} bpw" + ("" if v["error"] is None else f" (error {v['error']:.3g})")
        for k, v in types.items()))
    counts: dict[str, int] = {}
    for r in a.rows:
        counts[r.spec.name] = counts.get(r.spec.name, 0) + 1
    out.append("specs: " + ", ".join(f"{n} x{k}" for n, k in sorted(counts.items(), key=lambda t: (-t[1], t[0]))))
    budget = f" (budget {a.budget})" if a.budget else ""
    out.append(f"total: {len(a.rows)} layers, {a.numel:,} weights, {human_bytes(math.ceil(a.total_bits / 8))} = "
               f"{a.achieved_bpw:.4f} bpw{budget}")
    pe = a.predicted_error
    out.append(f"predicted error ({a.metric}): {pe:.6g}" if pe is not None
               else "predicted error: not recorded (no plan; quantized with one spec)")
    return "\n".join(out)


def inspect_allocation(path: str | Path, out: str | Path | None = None, *, title: str | None = None) -> tuple[str, Path | None]:
    """``(printed table, heatmap path or None)`` for ``path``; writes the heatmap when ``out`` is given."""
    a = load_allocation(path)
    figure = None
    if out is not None:
        figure = allocation_heatmap(a, out, title=title or heatmap_title(a))
    return format_allocation(a), figure


def heatmap_title(a: Allocation) -> str:
    what = f"budget {a.budget}" if a.plan is not None else (a.budget or Path(a.source).name)
    return f"Bits per weight per layer: {a.achieved_bpw:.3f} bpw overall, {what}"
