"""The default recipe: what ``mixq quantize --bpw X`` runs when no other flag is given, under one name.

Every setting below is the default of its command-line flag (:mod:`mixq.cli` reads them from here), chosen from
the benchmarks in ``bench/results`` (``frontier.md``, ``generalization.md``): calibration text the model writes
itself mixed with PTB, a kfac sensitivity measurement of every default candidate -- vector codebooks after
incoherence processing (VQ2-4-channel+ip) and the scalar grids plans still choose -- with the errors GPTQ leaves,
the exact knapsack solver, and GPTQ.  ``mixq-default-2`` was the same with 32 scalar candidates (KL 0.77 / 1.14
at 3.0 bpw on PTB / fortunes against 0.26 / 0.37 now).  A directory's ``mixq.json``
records :func:`recipe_record`: this name, and every setting the run changed from it.
"""
from __future__ import annotations

from .calibset import DEFAULT_CALIB

RECIPE_NAME = "mixq-default-3"
DEFAULT_RECIPE: dict[str, object] = {
    "method": "gptq",          # --method: GPTQ on the calibration rows (rtn needs none and loses much more)
    "calib": DEFAULT_CALIB,    # --calib: self-generated text + PTB
    "nsamples": 32,            # --nsamples x --seqlen calibration rows (every benchmark in bench/results uses 32
                               # x 512; GPTQ papers use 128 on 7B models -- pass --nsamples 128 there)
    "seqlen": 512,
    "metric": "kfac",          # --metric of the sensitivity measurement
    "algorithm": "gptq",       # --algorithm: errors after GPTQ (per-bits GPTQ/RTN ratios)
    "candidates": "default",   # --candidates: mixq.allocate.candidates.DEFAULT_CANDIDATE_NAMES
    "solver": "exact",         # --solver
    "damp": 0.01,              # --damp (GPTQ)
    "act_order": False,        # --act-order
    "rotate": False,           # --rotate (QuaRot): +ip candidates transform each layer instead
    "finetune": False,         # --finetune (block-wise distillation of scales and norms)
}


def recipe_record(args) -> dict:
    """``{"name", "deviations"}``: the recipe's name and each setting ``args`` (a parsed command line or any object
    with those attributes) changed from it (``{}`` when it ran the default recipe exactly)."""
    dev = {}
    for k, v in DEFAULT_RECIPE.items():
        have = getattr(args, k, v)
        if k == "algorithm" and have is None:
            have = "gptq" if getattr(args, "method", v) == "gptq" else "rtn"
        if have != v:
            dev[k] = have
    return {"name": RECIPE_NAME, "deviations": dev}
