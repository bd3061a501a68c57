"""User constraints on the allocation, and the table -> :class:`Problem` step that applies them.

Patterns are regular expressions matched with ``re.search`` against a layer's fqn.

``keep``      layers pinned to FP16 (error: the table's FP16 entry if measured, else 0)
``force``     ``(pattern, spec name)``: layers pinned to that (measured) spec
``min_bits``  ``{pattern: b}``: other matching layers only take candidates with ``spec.bits >= b``
``max_bits``  ``{pattern: b}``: ... with ``spec.bits <= b`` (FP16 counts as 16 bits)
``tied``      patterns whose matches *within one block* share a spec (e.g. fused q/k/v):
              layers are tied when they match the same pattern and their fqns agree outside the
              matched span (``model.layers.3.self_attn.`` + ``q_proj`` / ``k_proj`` / ``v_proj``)
``tie_experts``  every MoE block's experts of one projection share a spec (``model.layers.3.mlp.experts.*.
              down_proj``: :func:`mixq.moe.experts.split_expert_name`), as llama.cpp stores them (one stacked
              ``ffn_down_exps`` tensor of one ggml type); implied by ``target="gguf"``

``fast_on``   ``"cpu"``: other layers only take candidates whose decode kernel on that device beats the dense
              full-precision GEMV for their shape (:func:`mixq.runtime.kernels.decodes_faster`: int grids on
              ``cpu-int4``; ``+ip`` ones only on layers wide enough to repay their transforms), so the
              deployed model decodes faster than the fp32 one: never the dequantize-every-call reference
              kernel, nor the gather-bound codebook kernels (VQ, TCQ)
``target``    ``"gguf"``, ``"gptq"`` or ``"compressed-tensors"``: other layers only take candidates that runtime
              holds exactly for their shape (:func:`mixq.export.runtime_targets.holds_exactly`; gguf: a ggml block
              type for the row length), so the exported file decodes to the plan's weights bit for bit and its
              size is the plan's

``keep`` and ``force`` pin a layer and take precedence over ``min_bits``/``max_bits``/``fast_on``/``target``; a layer
that matches both ``keep`` and ``force`` (to a non-FP16 spec), or two different ``force``
specs, is rejected.  Tied layers keep the candidates they all have, in the first one's order.

Ties are *tie keys*: layers with the same key (a ``tied`` pattern and the fqn outside its match, or an experts
module and projection) form one group, and groups that share a layer merge.  The solver takes a group as one
item whose cost and error are its members' sums (:meth:`mixq.allocate.solvers.Problem.items`) and gives every
member the chosen spec.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from ..config import QuantSpec, parse_spec
from ..export.runtime_targets import TARGETS, holds_exactly
from .solvers import Problem
from .table import SensitivityTable, _check_header

log = logging.getLogger(__name__)

CONSTRAINTS_VERSION = 1
KEEP = parse_spec("FP16")
FAST_DEVICES = (None, "cpu")
RUNTIME_TARGETS = (None, *TARGETS)  # None: any runtime


@dataclass(frozen=True)
class Constraints:
    keep: tuple[str, ...] = ()
    force: tuple[tuple[str, str], ...] = ()
    min_bits: dict[str, int] = field(default_factory=dict)
    max_bits: dict[str, int] = field(default_factory=dict)
    tied: tuple[str, ...] = ()
    fast_on: str | None = None
    target: str | None = None
    tie_experts: bool = False

    def __post_init__(self):
        if not isinstance(self.tie_experts, bool):
            raise ValueError(f"Constraints.tie_experts must be True or False, got {self.tie_experts!r}")
        if self.fast_on not in FAST_DEVICES:
            raise ValueError(f"Constraints.fast_on must be one of {FAST_DEVICES}, got {self.fast_on!r}")
        if self.target not in RUNTIME_TARGETS:
            raise ValueError(f"Constraints.target must be one of {RUNTIME_TARGETS}, got {self.target!r}")
        for name in ("keep", "tied"):
            val = getattr(self, name)
            if isinstance(val, str):
                raise ValueError(f"Constraints.{name} must be a tuple of regexes, not one string: use ({val!r},)")
            object.__setattr__(self, name, tuple(val))
        force = tuple(tuple(f) for f in self.force)
        if any(len(f) != 2 for f in force):
            raise ValueError(f"Constraints.force entries must be (regex, spec name) pairs, got {self.force!r}")
        object.__setattr__(self, "force", force)
        for name in ("min_bits", "max_bits"):
            d = dict(getattr(self, name))
            for k, v in d.items():
                if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 32:
                    raise ValueError(f"Constraints.{name}[{k!r}] must be an integer number of bits in 1..32, got {v!r}")
            object.__setattr__(self, name, d)
        for pat in (*self.keep, *self.tied, *(p for p, _ in force), *self.min_bits, *self.max_bits):
            try:
                re.compile(pat)
            except (re.error, TypeError) as e:
                raise ValueError(f"invalid layer regex {pat!r} in Constraints: {e}") from None
        for _, name in force:
            parse_spec(name)

    @property
    def ties_experts(self) -> bool:
        """Whether a block's experts of one projection share a spec: asked for, or needed by the target (gguf)."""
        return self.tie_experts or self.target == "gguf"

    def to_dict(self) -> dict:
        return {"_type": "Constraints", "_version": CONSTRAINTS_VERSION, "keep": list(self.keep),
                "force": [list(f) for f in self.force], "min_bits": self.min_bits, "max_bits": self.max_bits,
                "tied": list(self.tied), "fast_on": self.fast_on, **({"target": self.target} if self.target else {}),
                **({"tie_experts": True} if self.tie_experts else {})}

    @classmethod
    def from_dict(cls, d: dict) -> "Constraints":
        _check_header(d, "Constraints", CONSTRAINTS_VERSION)
        unknown = set(d) - {"_type", "_version", "keep", "force", "min_bits", "max_bits", "tied", "fast_on", "target",
                            "tie_experts"}
        if unknown:
            raise ValueError(f"unknown Constraints fields {sorted(unknown)}")
        return cls(tuple(d.get("keep", ())), tuple(tuple(f) for f in d.get("force", ())),
                   dict(d.get("min_bits", {})), dict(d.get("max_bits", {})), tuple(d.get("tied", ())),
                   d.get("fast_on"), d.get("target"), bool(d.get("tie_experts", False)))


def build_problem(table: SensitivityTable, constraints: Constraints = Constraints()) -> Problem:
    """Apply ``constraints`` to ``table``: one :class:`Problem` row per layer, in table order.

    ``costs[i][c] = spec.cost(shape).total`` (exact bits); ``labels[i][c] = spec.name``.
    Raises ``ValueError`` naming the layer when its constraints leave no candidate.
    """
    fqns = [x.fqn for x in table.layers]
    c = constraints
    for pat in (*c.keep, *(p for p, _ in c.force), *c.min_bits, *c.max_bits, *c.tied):
        if not any(re.search(pat, f) for f in fqns):
            log.warning("constraint pattern %r matches no layer of the table (typo?)", pat)
    rows = [_layer_choices(x, constraints) for x in table.layers]
    groups = _tied_groups(fqns, constraints.tied, experts=constraints.ties_experts)
    for g in groups:
        first = [s.name for s, _ in rows[g[0]]]
        common = [n for n in first if all(n in {s.name for s, _ in rows[i]} for i in g)]
        if not common:
            names = ", ".join(table.layers[i].fqn for i in g)
            raise ValueError(f"tied layers {names} have no candidate spec in common: relax keep/force/min/max bits")
        for i in g:
            by = {s.name: (s, e) for s, e in rows[i]}
            dropped = sorted(set(by) - set(common))
            if dropped:
                log.info("%s: tied, dropping candidates not shared by its group: %s", table.layers[i].fqn, dropped)
            rows[i] = [by[n] for n in common]
    return Problem(
        layers=tuple(x.fqn for x in table.layers),
        costs=tuple(tuple(s.cost(x.shape).total for s, _ in r) for x, r in zip(table.layers, rows)),
        errors=tuple(tuple(e for _, e in r) for r in rows),
        groups=tuple(groups),
        labels=tuple(tuple(s.name for s, _ in r) for r in rows),
    )


def _layer_choices(x, c: Constraints) -> list[tuple[QuantSpec, float]]:
    """The (spec, error) pairs that layer ``x`` may take under ``c``."""
    measured = list(zip(x.candidates, x.errors))
    kept = any(re.search(p, x.fqn) for p in c.keep)
    forced = {parse_spec(s) for p, s in c.force if re.search(p, x.fqn)}
    if len(forced) > 1:
        raise ValueError(f"{x.fqn}: forced to several specs {sorted(s.name for s in forced)}: "
                         "make the force regexes disjoint")
    if kept and forced and forced != {KEEP}:
        raise ValueError(f"{x.fqn}: matches both keep and force={next(iter(forced)).name}: remove one of them")
    if kept or forced == {KEEP}:
        err = [e for s, e in measured if s == KEEP]
        return [(KEEP, err[0] if err else 0.0)]
    if forced:
        spec = next(iter(forced))
        pinned = [(s, e) for s, e in measured if s == spec]
        if not pinned:
            raise ValueError(f"{x.fqn}: forced spec {spec.name} was not measured for this layer: "
                             f"add it to the candidates and re-run `mixq measure`")
        return pinned
    lo = max([b for p, b in c.min_bits.items() if re.search(p, x.fqn)], default=0)
    hi = min([b for p, b in c.max_bits.items() if re.search(p, x.fqn)], default=99)
    out = [(s, e) for s, e in measured if lo <= s.bits <= hi]
    if not out:
        raise ValueError(f"{x.fqn}: no measured candidate has {lo} <= bits <= {hi} "
                         f"(measured: {', '.join(s.name for s in x.candidates)}): relax min_bits/max_bits")
    if c.fast_on:
        from ..runtime.kernels import decodes_faster

        fast = [(s, e) for s, e in out if decodes_faster(s, x.shape, c.fast_on)]
        if not fast:
            raise ValueError(f"{x.fqn} {tuple(x.shape)}: no candidate within its bit limits has a fast {c.fast_on} "
                             f"kernel (left: {', '.join(s.name for s, _ in out)}): measure int candidates "
                             f"(e.g. W4-g64, W3-g64) or drop fast_on")
        out = fast
    if c.target:
        held = [(s, e) for s, e in out if holds_exactly(c.target, s, x.shape)]
        if not held:
            raise ValueError(f"{x.fqn} {tuple(x.shape)}: no candidate within its limits is held exactly by the "
                             f"{c.target} runtime (left: {', '.join(s.name for s, _ in out)}): measure its exact "
                             f"specs (--candidates {c.target}) or drop --target")
        out = held
    return out


def _tied_groups(fqns: list[str], patterns: tuple[str, ...], *, experts: bool = False) -> list[tuple[int, ...]]:
    """Indices of layers that share a spec: one group per tie key with two or more layers, groups that share a
    layer merged (in table order).  Keys: ``(pattern, fqn before the match, fqn after it)`` for each ``tied``
    pattern; with ``experts``, ``(experts module, projection)`` of every expert layer."""
    keys: dict[tuple, list[int]] = {}
    for t, pat in enumerate(patterns):
        rx = re.compile(pat)
        for i, f in enumerate(fqns):
            m = rx.search(f)
            if m:
                keys.setdefault(("re", t, f[: m.start()], f[m.end():]), []).append(i)
    if experts:
        from ..moe.experts import split_expert_name

        for i, f in enumerate(fqns):
            parts = split_expert_name(f)
            if parts is not None:
                keys.setdefault(("experts", parts[0], parts[2]), []).append(i)
    root = list(range(len(fqns)))  # union-find over layer indices

    def find(i: int) -> int:
        while root[i] != i:
            root[i] = root[root[i]]
            i = root[i]
        return i

    for members in keys.values():
        for i in members[1:]:
            a, b = find(members[0]), find(i)
            if a != b:
                root[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for members in keys.values():
        for i in members:
            groups.setdefault(find(i), []).append(i)
    return [tuple(sorted(set(g))) for _, g in sorted(groups.items()) if len(set(g)) > 1]
