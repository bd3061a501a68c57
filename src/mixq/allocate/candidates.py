"""Candidate sets: the specs the allocator may choose from, per layer.

Every candidate is measured for every layer (one error proxy evaluation each), so the default
set is kept to 32 specs that span 2.1 to 16 bpw without near-duplicates:

=====  ====================================================  ==========================
bits   specs                                                  why
=====  ====================================================  ==========================
2      W2-g32-asym  W2-g64-asym  W2-g128-asym                 a symmetric 2-bit grid
                                                              wastes one of four levels
3      W3-g32-asym  W3-g64-asym  W3-g128-asym  W3-g64 W3-g128  3 bits is where asym vs sym
                                                              and group size matter most
4      W4-g32  W4-g64  W4-g128  W4-channel                    the workhorse precision
       W4-g64-asym  W4-g128-asym
5, 6   W5-g32  W5-g64  W5-g128  W5-channel  W6-g64  W6-g128    sensitive layers: cheap
       W6-channel                                             upgrades from 4 bits
8      W8-g128  W8-channel                                    near-lossless
LUT    NF3-g64  NF4-g64                                       non-uniform (QLoRA) grids
keep   FP16                                                   outlier-heavy layers
+ip    W2-g32-asym+ip  W2-g64-asym+ip  W3-g64+ip               incoherence processing
       W3-channel+ip  W4-g64+ip  W4-channel+ip                (mixq.intra.incoherence): at
                                                              2-4 bits the lowest error per
                                                              bit on almost every layer
=====  ====================================================  ==========================

The ``+ip`` rows moved the mixed GPTQ plans of SmolLM2 at 3.0 bpw from KL 0.93 / 1.36 (PTB / fortunes) to
0.77 / 1.14 (bench/results/generalization.md, runs ``self+ptb`` and ``ip``).

Costs (metadata included) for a 1536-wide row, e.g.: W2-g128-asym 2.14 bpw, W3-g64 3.25,
W4-g128 4.125, W4-channel 4.01, W8-channel 8.01, FP16 16.  Group sizes that do not divide a
layer's in-features are dropped for that layer by :func:`candidates_for` (e.g. every g128
spec for a 576-wide layer, which leaves 18 candidates).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ..config import QuantSpec, parse_spec
from ..intra.candidates import intra_candidates

log = logging.getLogger(__name__)

DEFAULT_CANDIDATE_NAMES: tuple[str, ...] = (
    "W2-g32-asym", "W2-g64-asym", "W2-g128-asym",
    "W3-g32-asym", "W3-g64-asym", "W3-g128-asym", "W3-g64", "W3-g128",
    "W4-g32", "W4-g64", "W4-g128", "W4-channel", "W4-g64-asym", "W4-g128-asym",
    "W5-g32", "W5-g64", "W5-g128", "W5-channel",
    "W6-g64", "W6-g128", "W6-channel",
    "W8-g128", "W8-channel",
    "NF3-g64", "NF4-g64",
    "FP16",
    "W2-g32-asym+ip", "W2-g64-asym+ip", "W3-g64+ip", "W3-channel+ip", "W4-g64+ip", "W4-channel+ip",
)
NAMED_SETS = ("intra", "default+intra")  # composite sets by name (mixq.intra.candidates), ``:small`` / ``:all`` too


def default_candidates() -> list[QuantSpec]:
    """The default candidate specs (see the module docstring for the rationale)."""
    return _unique([parse_spec(n) for n in DEFAULT_CANDIDATE_NAMES], "default candidates")


def extended_candidates(level: str = "default") -> list[QuantSpec]:
    """The default candidates followed by :func:`mixq.intra.intra_candidates` of ``level``."""
    return default_candidates() + intra_candidates(level)


def named_candidate_set(name: str) -> list[QuantSpec] | None:
    """``intra`` / ``default+intra`` (optionally ``:small`` / ``:all``) -> the set; ``None`` for other names."""
    head, _, level = str(name).partition(":")
    if head not in NAMED_SETS:
        return None
    level = level or "default"
    return intra_candidates(level) if head == "intra" else extended_candidates(level)


def load_candidates(path: str | Path) -> list[QuantSpec]:
    """Read candidate specs from ``path``.

    Accepted formats: a JSON list of spec names or ``QuantSpec.to_dict()`` objects, a JSON
    object ``{"candidates": [...]}``, or plain text with one spec name per line (``#`` starts
    a comment).  Duplicates (two names for the same spec) and empty sets are rejected.
    """
    p = Path(path)
    if not p.exists():  # named composite sets: ``intra``, ``default+intra`` (mixq.intra.candidates)
        named = named_candidate_set(str(path))
        if named is not None:
            return _unique(named, str(path))
    try:
        text = p.read_text()
    except OSError as e:
        raise ValueError(f"cannot read candidate file {p}: {e}") from None
    stripped = text.lstrip()
    if stripped.startswith(("[", "{")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} is not valid JSON ({e}): "
                             "expected a list of spec names such as [\"W4-g128\"]") from None
        if isinstance(data, dict):
            data = data.get("candidates")
        if not isinstance(data, list):
            raise ValueError(f"{p}: expected a JSON list of spec names or {{\"candidates\": [...]}}")
    else:
        data = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
        data = [d for d in data if d]
    specs = []
    for item in data:
        try:
            specs.append(parse_spec(item))  # plain specs and intra-tensor composites
        except ValueError as e:
            raise ValueError(f"{p}: bad candidate {item!r}: {e}") from None
    if not specs:
        raise ValueError(f"{p} lists no candidate specs: add at least one, e.g. W4-g128")
    return _unique(specs, str(p))


def candidates_for(shape: tuple[int, int], specs: list[QuantSpec], *, fqn: str = "") -> list[QuantSpec]:
    """The specs that can store a ``(out, in)`` weight: those whose group size divides ``in``.

    Dropped specs are reported at INFO level (``fqn`` names the layer in the message).
    """
    kept, dropped = [], []
    for s in specs:
        try:
            s.cost(shape)
        except ValueError:
            dropped.append(s.name)
            continue
        kept.append(s)
    if dropped:
        log.info("%s%s: dropped %d candidate(s) whose group size does not divide %d: %s",
                 f"{fqn} " if fqn else "", tuple(shape), len(dropped), shape[1], ", ".join(dropped))
    return kept


def _unique(specs: list[QuantSpec], where: str) -> list[QuantSpec]:
    seen: dict[QuantSpec, str] = {}
    for s in specs:
        if s in seen:
            raise ValueError(f"{where}: spec {s.name} is listed twice: remove the duplicate")
        seen[s] = s.name
    return list(specs)
