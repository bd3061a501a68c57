"""Candidate sets: the specs the allocator may choose from, per layer.

Every candidate is measured for every layer (one error proxy evaluation each, plus one GPTQ reference sweep per
family and bit band), so the default set is kept to the 15 specs that mixed plans actually choose:

=======  ==============================================  ==============================================
bits     specs                                           why
=======  ==============================================  ==============================================
2 - 6    TCQ2-channel+ip1  TCQ2.5-channel+ip1            trellis-coded after (one-sided) incoherence processing
         TCQ3-channel+ip1  TCQ3.5-channel+ip1            (mixq.algorithms.composite.tcq): 0.75-0.9x the error of the 2-D
         TCQ4-channel+ip1  TCQ5-channel+ip1              vector codebooks (VQ), which were 0.4-0.6x a
         TCQ6-channel+ip1                                scalar grid + ip's, at equal bits; rows weighted by G
2, 3     W2-g64-asym  W3-g64-asym                        for layers +ip cannot take (no Hadamard
                                                         construction for their width)
4        W4-g64                                          the int4 grid (fast CPU kernel, --fast-on cpu)
5 - 8    W5-g64  W6-g64  W6-channel  W8-channel          sensitive layers where +ip cannot go
keep     FP16                                            outlier-heavy layers
=======  ==============================================  ==============================================

Why these (bench/results/generalization.md, runs ``vq`` and ``tcq``; bench/results/vq.md, tcq.md): with the 26
scalar grids, the six scalar ``+ip`` grids and the five VQ codebooks all measured on SmolLM2, the plans at 2.5-4.5
bpw put 85-97 % of the layers on VQ and the rest almost only on W5/W6/W8-g64 or -channel; restricted to this set
the same measurement gives plans whose predicted loss is within 0.1 % at every budget.  The VQ plan at 3.0 bpw
scored KL 0.26 / 0.37 (PTB / fortunes) against 0.77 / 1.14 for the scalar default before it.  The trellis bases
took the VQ ones' place (``mixq-default-5``): same rates and costs, 10-23 % less error per layer, and the mixed
plans at 2.5 / 3.0 bpw scored 0.336 / 0.540 and 0.186 / 0.282 against VQ's 0.472 / 0.695 and 0.247 / 0.385.
``TCQ5`` and ``TCQ6`` (``mixq-default-10``) give the layers that need more than 4 bits a trellis too: before them the
4.0- and 4.5-bpw plans put 29 and 80 of SmolLM2's 210 layers on W5/W6/W8 grids (0.25 bpw of group scales, no
trellis gain); with them almost none.

``+ip1`` in place of ``+ip`` (``mixq-default-11``): the input transform only, so the trellis search can weight each
output row by its output-gradient energy (:mod:`mixq.algorithms.composite.tcq`), and one seed instead of two.  On
SmolLM2 the plans' KL fell from 0.136 / 0.213 to 0.111 / 0.188 at 3.0 bpw and from 0.040 / 0.066 to 0.034 / 0.055 at
4.0 (PTB / fortunes; generalization.md runs ``tcq56-L12``, ``L12-b`` and ``ip1``); layer by layer:
bench/results/row_weight_3.md and row_weight_4.md.

``mixq-default-6`` dropped W4-g64-asym and NF4-g64: in the ``mixq-default-5`` measurement of SmolLM2 (run ``tcq``)
a trellis candidate of no more bits had a smaller error in 201 and 206 of the 210 layers, and each cost a
measurement reference sweep (W2/W3-g64-asym, dominated as often, stay for the layers ``+ip`` cannot take).

Costs (metadata included) for a 576-wide row: TCQ<r>-channel+ip1 r + 0.03 bpw, W4-g64 4.25, W8-channel 8.03,
FP16 16.

``fast-cpu`` (:data:`FAST_CPU_CANDIDATE_NAMES`, what ``--fast-on cpu`` measures by default): int grids only, all
on the ``cpu-int4`` kernel, three of them after incoherence processing (two native transforms around the same
kernel: still faster than the dense GEMV, :func:`mixq.runtime.kernels.decodes_faster`).

Group sizes that do not divide a layer's in-features are dropped for that layer by
:func:`candidates_for`; ``+ip`` candidates are dropped where the width has no Hadamard construction.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ..config import QuantSpec, parse_spec
from .intra_candidates import intra_candidates

log = logging.getLogger(__name__)

DEFAULT_CANDIDATE_NAMES: tuple[str, ...] = (
    "TCQ2-channel+ip1", "TCQ2.5-channel+ip1", "TCQ3-channel+ip1", "TCQ3.5-channel+ip1", "TCQ4-channel+ip1",
    "TCQ5-channel+ip1", "TCQ6-channel+ip1",
    "W2-g64-asym", "W3-g64-asym",
    "W4-g64",
    "W5-g64", "W6-g64", "W6-channel", "W8-channel",
    "FP16",
)
# What ``--fast-on cpu`` measures when no --candidates is given: every spec here decodes on ``cpu-int4``, the ``+ip``
# ones between two native Kronecker transforms (still faster than fp32: decodes_faster).
FAST_CPU_CANDIDATE_NAMES: tuple[str, ...] = (
    "W2-g64-asym+ip", "W3-g64+ip", "W4-g64+ip",
    "W2-g64-asym", "W3-g64-asym", "W4-g64",
    "W5-g64", "W6-g64", "W8-channel",
    "FP16",
)
FAST_CPU = "fast-cpu"
# by name (intra: mixq.allocate.intra_candidates, ``:small`` / ``:all``)
NAMED_SETS = ("intra", "default+intra", FAST_CPU)


def default_candidates() -> list[QuantSpec]:
    """The default candidate specs (see the module docstring for the rationale)."""
    return _unique([parse_spec(n) for n in DEFAULT_CANDIDATE_NAMES], "default candidates")


def extended_candidates(level: str = "default") -> list[QuantSpec]:
    """The default candidates followed by :func:`mixq.allocate.intra_candidates.intra_candidates` of ``level``."""
    return default_candidates() + intra_candidates(level)


def named_candidate_set(name: str) -> list[QuantSpec] | None:
    """``intra`` / ``default+intra`` (optionally ``:small`` / ``:all``), ``fast-cpu`` -> the set; ``None`` for
    other names."""
    if str(name) == FAST_CPU:
        return [parse_spec(n) for n in FAST_CPU_CANDIDATE_NAMES]
    head, _, level = str(name).partition(":")
    if head not in NAMED_SETS or head == FAST_CPU:
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
    if not p.exists():  # named composite sets: ``intra``, ``default+intra`` (mixq.allocate.intra_candidates)
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
