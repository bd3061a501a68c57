"""The allocator's input: a sensitivity table (layer x candidate -> error) and its JSON form.

The measurement stage fills one :class:`LayerEntry` per quantizable layer: its weight shape
``(out, in)``, the candidate specs it was measured with, and one error per candidate (the
``metric`` says which proxy, e.g. ``hessian_trace`` = tr(dW H dW^T), additive across layers
by assumption).  Bit costs are never stored: they follow exactly from ``spec.cost(shape)``.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

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

    def __post_init__(self):
        if not self.fqn or not isinstance(self.fqn, str):
            raise ValueError(f"layer name must be a non-empty string, got {self.fqn!r}")
        shape = tuple(self.shape)
        if len(shape) != 2 or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
            raise ValueError(f"{self.fqn}: shape must be (out, in) positive integers, got {self.shape!r}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "candidates", tuple(self.candidates))
        object.__setattr__(self, "errors", tuple(float(e) for e in self.errors))
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
                            "errors": list(x.errors)} for x in self.layers]}

    @classmethod
    def from_dict(cls, d: dict) -> "SensitivityTable":
        _check_header(d, "SensitivityTable", TABLE_VERSION)
        try:
            layers = [LayerEntry(x["fqn"], tuple(x["shape"]),
                                 tuple(spec_from_json(s, x["fqn"]) for s in x["candidates"]), tuple(x["errors"]))
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
            layers.append(LayerEntry(x.fqn, x.shape, tuple(s for s, _ in keep), tuple(e for _, e in keep)))
        return SensitivityTable(tuple(layers), self.metric, {**self.meta, "without": sorted(drop)})

    def fingerprint(self) -> str:
        """SHA-256 of the canonical JSON form: identifies the measurement a plan came from."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        return write_json_atomic(path, self.to_dict(), overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path) -> "SensitivityTable":
        return cls.from_dict(read_json(path))


def _check_header(d, typ: str, version: int) -> None:
    if not isinstance(d, dict) or d.get("_type") != typ:
        got = d.get("_type") if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"not a {typ} (found _type={got!r})")
    if d.get("_version") != version:
        raise ValueError(f"{typ} version {d.get('_version')!r} is not supported (this mixq reads version {version})")
