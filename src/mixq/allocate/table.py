"""The allocator's input: a sensitivity table (layer x candidate -> error) and its JSON form.

The measurement stage fills one :class:`LayerEntry` per quantizable layer: its weight shape
``(out, in)``, the candidate specs it was measured with, and one error per candidate (the
``metric`` says which proxy, e.g. ``hessian_trace`` = tr(dW H dW^T), additive across layers
by assumption).  Bit costs are never stored: they follow exactly from ``spec.cost(shape)``.

A layer may also carry ``row_weight``: its output rows' relative weight in the loss (the measurement's
output-gradient energy ``G``, scaled to mean 1), which the quantize walk hands to quantizers that trade error
between rows (a trellis under ``+ip1``, :mod:`mixq.algorithms.composite.tcq`), so they make what was measured.
Stored as base64 float16 (``row_weight_f16``): relative weights need no more, and a 7B model's stay a few MB.
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..config import QuantSpec
from ..config import parse_spec
from ..jsonio import read_json, write_json_atomic

TABLE_VERSION = 1


def spec_to_json(s: QuantSpec) -> str | dict:
    """A spec's canonical name when it parses back to the same spec, else its full dict."""
    try:
        if parse_spec(s.name) == s:  # plain specs and intra-tensor composites (mixq.config.composite)
            return s.name
    except ValueError:
        pass
    return s.to_dict()


def spec_from_json(x, where: str) -> QuantSpec:
    """Inverse of :func:`spec_to_json`; ``where`` names the layer in the error message."""
    try:
        return parse_spec(x)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: unknown or invalid spec {x!r}: {e}") from None


@dataclass(frozen=True)
class LayerEntry:
    """One layer's measured candidates: ``errors[c]`` belongs to ``candidates[c]`` (>= 0, finite)."""

    fqn: str
    shape: tuple[int, int]
    candidates: tuple[QuantSpec, ...]
    errors: tuple[float, ...]
    row_weight: tuple[float, ...] | None = None  # per output row, mean 1 (module docstring)

    def __post_init__(self):
        if not self.fqn or not isinstance(self.fqn, str):
            raise ValueError(f"layer name must be a non-empty string, got {self.fqn!r}")
        shape = tuple(self.shape)
        if len(shape) != 2 or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
            raise ValueError(f"{self.fqn}: shape must be (out, in) positive integers, got {self.shape!r}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "candidates", tuple(self.candidates))
        object.__setattr__(self, "errors", tuple(float(e) for e in self.errors))
        if self.row_weight is not None:
            rw = tuple(float(v) for v in self.row_weight)
            if len(rw) != shape[0] or not all(math.isfinite(v) and v >= 0 for v in rw):
                raise ValueError(f"{self.fqn}: row_weight needs {shape[0]} finite weights >= 0, one per output row")
            object.__setattr__(self, "row_weight", rw)
        if not self.candidates or len(self.candidates) != len(self.errors):
            raise ValueError(f"{self.fqn}: needs >= 1 candidate and exactly one error per candidate "
                             f"({len(self.candidates)} candidates, {len(self.errors)} errors)")
        names = [s.name for s in self.candidates if isinstance(s, QuantSpec)]
        if len(names) != len(self.candidates) or len(set(names)) != len(names):
            raise ValueError(f"{self.fqn}: candidates must be distinct QuantSpecs with distinct names, got {names}")
        for s, e in zip(self.candidates, self.errors):
            if not math.isfinite(e) or e < 0:
                raise ValueError(f"{self.fqn}: error of {s.name} must be finite and >= 0, got {e}")
            try:
                s.cost(shape)
            except ValueError as err:
                raise ValueError(f"{self.fqn} {shape}: candidate {s.name} does not fit ({err}); "
                                 "filter candidates with mixq.allocate.candidates_for") from None

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def with_candidates(self, candidates, errors) -> "LayerEntry":
        """The same layer (and row weights) with other candidates and errors."""
        return replace(self, candidates=tuple(candidates), errors=tuple(errors))

    def costs(self) -> tuple[int, ...]:
        """Exact bits of each candidate, ``spec.cost(shape).total``."""
        return tuple(s.cost(self.shape).total for s in self.candidates)


@dataclass(frozen=True)
class SensitivityTable:
    """All layers' measured candidates; ``metric`` names the error proxy, ``meta`` is provenance
    (model fingerprint, calibration data, ...), passed through to the plan."""

    layers: tuple[LayerEntry, ...]
    metric: str
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "meta", dict(self.meta))
        if not self.layers or not all(isinstance(x, LayerEntry) for x in self.layers):
            raise ValueError("a SensitivityTable needs at least one LayerEntry")
        names = [x.fqn for x in self.layers]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"duplicate layers in the sensitivity table: {dup[:5]}")
        if not self.metric or not isinstance(self.metric, str):
            raise ValueError("metric must name the error proxy, e.g. 'hessian_trace'")
        try:
            json.dumps(self.meta)
        except (TypeError, ValueError) as e:
            raise ValueError(f"meta must be JSON-serializable: {e}") from None

    @property
    def numel(self) -> int:
        return sum(x.numel for x in self.layers)

    def to_dict(self) -> dict:
        return {"_type": "SensitivityTable", "_version": TABLE_VERSION, "metric": self.metric, "meta": self.meta,
                "layers": [{"fqn": x.fqn, "shape": list(x.shape), "candidates": [spec_to_json(s) for s in x.candidates],
                            "errors": list(x.errors), **row_weight_json(x.row_weight)} for x in self.layers]}

    @classmethod
    def from_dict(cls, d: dict) -> "SensitivityTable":
        _check_header(d, "SensitivityTable", TABLE_VERSION)
        try:
            layers = [LayerEntry(x["fqn"], tuple(x["shape"]),
                                 tuple(spec_from_json(s, x["fqn"]) for s in x["candidates"]), tuple(x["errors"]),
                                 row_weight_from_json(x))
                      for x in d["layers"]]
            return cls(tuple(layers), d["metric"], d.get("meta", {}))
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed SensitivityTable: missing or bad field {e}") from None

    def without(self, names) -> "SensitivityTable":
        """The table with the candidates named in ``names`` (spec names) left out of every layer: an A/B of those
        candidates on one measurement.  ``meta["without"]`` records them; a layer left with no candidate raises."""
        drop = set(names)
        layers = []
        for x in self.layers:
            keep = [(s, e) for s, e in zip(x.candidates, x.errors) if s.name not in drop]
            if not keep:
                raise ValueError(f"{x.fqn}: leaving out {sorted(drop)} leaves no candidate")
            layers.append(x.with_candidates((s for s, _ in keep), (e for _, e in keep)))
        return SensitivityTable(tuple(layers), self.metric, {**self.meta, "without": sorted(drop)})

    def fingerprint(self) -> str:
        """SHA-256 of the canonical JSON form: identifies the measurement a plan came from."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        return write_json_atomic(path, self.to_dict(), overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path) -> "SensitivityTable":
        return cls.from_dict(read_json(path))


def normalized_row_weight(G) -> tuple[float, ...] | None:
    """``G [R]`` scaled to mean 1 and rounded to float16 (as stored), or None when it has no positive mean."""
    g = torch.as_tensor(G).detach().double().cpu().reshape(-1).clamp_min(0)
    m = float(g.mean()) if g.numel() else 0.0
    if not m > 0 or not math.isfinite(m):
        return None
    return tuple((g / m).clamp(max=65504.0).half().float().tolist())


def row_weight_json(rw) -> dict:
    if rw is None:
        return {}
    return {"row_weight_f16": base64.b64encode(np.asarray(rw, dtype="<f2").tobytes()).decode("ascii")}


def row_weight_from_json(x: dict):
    b = x.get("row_weight_f16")
    if b is None:
        return None
    return tuple(np.frombuffer(base64.b64decode(b), dtype="<f2").astype(float).tolist())


def _check_header(d, typ: str, version: int) -> None:
    if not isinstance(d, dict) or d.get("_type") != typ:
        got = d.get("_type") if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"not a {typ} (found _type={got!r})")
    if d.get("_version") != version:
        raise ValueError(f"{typ} version {d.get('_version')!r} is not supported (this mixq reads version {version})")
