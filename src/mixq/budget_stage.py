"""The budget stage: (rotated) weights -> sensitivity table -> plan, in the order these must run.

``mixq quantize --bpw X`` and :func:`mixq.plan_for_budget` run it; nothing else wires the order again::

    bp = plan_for_budget(model, calib, Budget(bpw=3.0), rotate=True)   # rotates the model in place, measures
    quantize(model, plan=bp.plan, method="gptq", calib=calib)          # rotate=False: the weights already are

What must hold, and why it lives here:

* **Rotation comes first.**  With ``rotate=True`` the model is rotated in place (QuaRot's fused rotations, without
  the online down-projection rotation) *before* it is measured: the plan must be chosen for the weights that will
  be quantized.  The caller quantizes them as they are (``rotate=False``), so they are not rotated twice.
* **A given table must be a measurement of these weights.**  With ``rotate=True`` that can only be checked after
  rotating, so it is checked here (the model fingerprint in the table against the rotated model's).
* **An interrupted measurement resumes.**  ``scratch`` is where the table is saved while it is measured (its
  ``.partial`` file resumes a killed run); a finished table already there for the same model, calibration rows,
  candidates, metric and algorithm is reused as it is.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BudgetPlan:
    """What the budget stage hands on: the ``plan``, the ``table`` it was chosen from, whether that table was
    measured in this call (``measured``: a caller that keeps it should save it) and whether the model was rotated
    in place (``rotated``)."""

    plan: object
    table: object
    measured: bool
    rotated: bool


def plan_for_budget(model, calib, budget, *, table=None, rotate: bool = False, candidates="default",
                    metric: str | None = None, algorithm: str = "rtn", grad_samples: int = 16, block_samples: int = 4,
                    constraints=None, solver: str = "exact", scratch: str | os.PathLike | None = None,
                    progress: bool = True, tcq_state_bits: int | None = None, amp: str = "off") -> BudgetPlan:
    """Measure ``model`` on ``calib`` (unless ``table`` is given) and choose a plan within ``budget``.

    ``budget``: a :class:`~mixq.allocate.Budget`.  ``table``: a :class:`~mixq.allocate.SensitivityTable` of these
    weights (rotated ones with ``rotate=True``).  ``candidates`` / ``metric`` / ``algorithm`` / ``grad_samples`` /
    ``block_samples``: as :func:`mixq.measure` (candidates as a list of specs or a named set).  ``constraints``: a
    :class:`~mixq.allocate.Constraints`; ``solver``: as :func:`mixq.plan`.  ``scratch``: save the measurement
    there while it runs (module doc).  ``tcq_state_bits``: the trellis the plan's TCQ layers are encoded with
    (:func:`mixq.allocate.tcq_states.reprice`; default the recipe's).  ``amp``: the measurement's forward passes
    (:mod:`mixq.amp`).
    Returns a :class:`BudgetPlan`; the plan's meta records ``rotate``.
    """
    from .allocate import Constraints
    from .models import model_fingerprint
    from .pipeline import _calib_ids, _candidates, measure, plan as plan_table
    from .recipe import DEFAULT_RECIPE

    if rotate:
        from .algorithms.rotation import rotate_model

        rotate_model(model, online_down=False)
        if table is not None and table.meta.get("model") not in (None, model_fingerprint(model)):
            raise ValueError(f"the measurement was made of other weights (model fingerprint {table.meta['model']}, "
                             f"this model rotated {model_fingerprint(model)}): drop the measurement (--measurement) to "
                             "measure the rotated weights in this run")
    measured = table is None
    if measured:
        ids = _calib_ids(calib)
        cands = _candidates(candidates)
        metric = metric or DEFAULT_RECIPE["metric"]
        table = _finished(scratch, model, ids, cands, metric, algorithm, amp) or measure(
            model, calib, metric=metric, candidates=cands, algorithm=algorithm, grad_samples=grad_samples,
            block_samples=block_samples, out=scratch, progress=progress, amp=amp)  # records calib's provenance
        table.meta["rotate"] = bool(rotate)  # provenance: which weights were measured
    plan = plan_table(table, bpw=budget.bpw, bytes=budget.bytes, constraints=constraints or Constraints(),
                      solver=solver, tcq_state_bits=tcq_state_bits)
    return BudgetPlan(plan=plan, table=table, measured=measured, rotated=bool(rotate))


def _finished(path, model, ids, candidates, metric: str, algorithm: str, amp: str):
    """The table at ``path`` if an earlier (interrupted) run finished it for this model, data and metric."""
    from .allocate import SensitivityTable
    from .measure import is_measurement_of, measurement_key

    if path is None or not Path(path).exists():
        return None
    try:
        table = SensitivityTable.load(path)
    except Exception:  # noqa: BLE001 - a damaged scratch file is simply measured again
        return None
    if not is_measurement_of(table.meta, measurement_key(model, ids, candidates, metric, algorithm, amp)):
        return None
    log.info("reusing the finished measurement %s", path)
    return table
