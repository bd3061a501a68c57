"""How many trellis states a plan's ``TCQ`` layers are encoded with, and what that does to the measured errors.

A measurement prices the trellis-coded candidates as ``TCQ<rate>`` (``L = 8`` state bits): their search is 3-4x
cheaper than at ``L = 10``, and the measurement runs it for every candidate on every layer.  The same stream of
bits decodes through ``2^10`` states as ``TCQ<rate>L10`` (:mod:`mixq.formats.composite.tcq_codebook`) with less
error, at exactly the same cost.  :func:`reprice` turns a table into the one a plan at ``L`` state bits is chosen
from: each ``TCQ<rate>`` candidate becomes ``TCQ<rate>L<L>`` with its error times :func:`error_ratio` -- the
trellis's squared error on N(0, 1) targets at ``L`` over that at 8, computed from the committed tables (L = 10:
about 0.94 at 2 bits a weight to 0.87 at 3.5-4; L = 12: 0.90 to 0.80, and 0.72 / 0.54 at 5 / 6 bits, where the
8-bit trellis has little memory; ``bench/results/tcq.md``).  ``+ip`` weights are what those tables are
trained for, and RTN errors of TCQ candidates scale with that error, so the ratio carries over; the solver then
weighs the larger gain at higher rates against the scalar grids.  Layers a ``force`` constraint pins keep their
named spec.
"""
from __future__ import annotations

import re
from dataclasses import replace
from functools import lru_cache

from .constraints import Constraints
from .table import SensitivityTable


@lru_cache(maxsize=None)
def error_ratio(rate, L: int) -> float:
    """Squared error of the ``L``-state-bit trellis at ``rate`` over the 8-bit one's, on the same seeded N(0, 1)
    sequences (:func:`mixq.algorithms.composite.tcq_search.mse`)."""
    from ..algorithms.composite.tcq_search import mse
    from ..formats.composite.tcq_codebook import check_state_bits, lut

    if check_state_bits(L) == 8:
        return 1.0
    return mse(rate, table=lut(rate, L)) / mse(rate)


def reprice(table: SensitivityTable, L: int, constraints: Constraints = Constraints()) -> SensitivityTable:
    """``table`` with every ``TCQ<rate>`` candidate (8 state bits) replaced by its ``L``-state-bit twin, its error
    scaled by :func:`error_ratio` (module doc); the table itself when ``L`` is 8."""
    from ..formats.composite.tcq_codebook import check_state_bits

    if check_state_bits(L) == 8:
        return table
    forced = [p for p, _ in constraints.force]
    layers = []
    for x in table.layers:
        if any(re.search(p, x.fqn) for p in forced):
            layers.append(x)
            continue
        cands, errs = [], []
        for s, e in zip(x.candidates, x.errors):
            if getattr(s, "trellis", 0) and s.state_bits == 8:
                s, e = replace(s, state_bits=L), e * error_ratio(s.tcq_rate, L)
            cands.append(s)
            errs.append(e)
        layers.append(x.with_candidates(cands, errs))
    return SensitivityTable(tuple(layers), table.metric, {**table.meta, "tcq_state_bits": L})
