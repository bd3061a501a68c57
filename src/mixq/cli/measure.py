"""``mixq measure``: every layer × candidate error, once, for any number of budgets (and the measurement
side of ``mixq quantize --bpw``).

Under ``torchrun`` (``OMP_NUM_THREADS=1 torchrun --nproc-per-node N -m mixq.cli measure ...``) the processes
share the work (:mod:`mixq.measure.distributed`): rank 0 prepares the calibration rows and sends them to the
others, every rank walks the model, and rank 0 alone claims, resumes and writes ``--out``; the table equals
the single-process one."""
from __future__ import annotations

import time
from pathlib import Path

from ..recipe import DEFAULT_RECIPE
from .common import calib_args, claim_output, measure_args, model_arg, walk_amp_arg
from .placement import check_device, placement_args, placement_from


def register(sub) -> None:
    m = sub.add_parser("measure", help="measure every layer × candidate error once (for any number of budgets)",
                       description="Measure the sensitivity table of MODEL: for each block linear and candidate "
                                   "spec, the predicted error.  Resumes an interrupted run from OUT.partial.")
    model_arg(m)
    calib_args(m, nsamples=DEFAULT_RECIPE["nsamples"])
    measure_args(m)
    walk_amp_arg(m, "the block walk and the gradient pass")
    m.add_argument("--out", required=True, help="measurement JSON to write")
    m.add_argument("--force", action="store_true", help="replace --out if it exists")
    placement_args(m, "measured")
    m.set_defaults(func=cmd_measure)


def load_candidate_set(name: str):
    from ..allocate import default_candidates, load_candidates

    from ..export.runtime_targets import TARGETS, target_candidates

    if name in TARGETS:  # a runtime target's exact specs (``--candidates gguf``)
        return target_candidates(name)
    return default_candidates() if name == "default" else load_candidates(name)


def measure_algorithm(args) -> str:
    """``--algorithm``, or the one ``--method`` implies (``gptq`` measures GPTQ's error)."""
    return args.algorithm or ("gptq" if getattr(args, "method", DEFAULT_RECIPE["method"]) == "gptq" else "rtn")


def run_measure(model, calib_ids, args, out: Path | None, group=None):
    """Measure on ``calib_ids`` with the metric options in ``args``; returns the table."""
    from ..measure import measure

    return measure(model, calib_ids, load_candidate_set(args.candidates), metric=args.metric,
                   algorithm=measure_algorithm(args), grad_samples=args.grad_samples, block_samples=args.block_samples,
                   out=out, group=group, amp=args.walk_amp)


def cmd_measure(args) -> int:
    from ..measure.distributed import init_from_env, shutdown

    group = init_from_env(args.device)
    try:
        return _measure_in(group, args)
    finally:
        shutdown()


def _measure_in(group, args) -> int:
    from ..bos import resolve_bos
    from ..calibset import calibration_for, parse_sources
    from ..measure.distributed import process_device
    from ..models import load_model

    out = Path(args.out)
    if group.writer:
        if out.exists() and not args.force:
            raise FileExistsError(f"{out} already exists: choose another --out or pass --force")
        claim_output(out, args.force)
    load_candidate_set(args.candidates)  # validate before the heavy work
    parse_sources(args.calib)
    device = process_device(args.device, group)
    placement = placement_from(args, group)
    if placement is None:
        check_device(device)
    model, tok = load_model(args.model, device=device, placement=placement)
    t0 = time.perf_counter()
    calib = calibration_for(model, tok, args, resolve_bos(tok, model, args.bos)) if group.writer else None
    ids = group.broadcast(calib.ids.cpu() if calib is not None else None)  # one set of rows for every rank
    table = run_measure(model, ids, args, out, group)
    if not group.writer:
        return 0
    table.meta["calibration_record"] = calib.record()
    table.meta["rotate"] = False  # provenance: the weights as loaded (quantize --bpw --rotate records True)
    table.meta["processes"] = group.world
    table.save(out, overwrite=True)
    n = sum(len(e.candidates) for e in table.layers)
    print(f"wrote {out}: {len(table.layers)} layers × candidates = {n} errors ({table.metric}, "
          f"{table.meta['algorithm']}), {time.perf_counter() - t0:.1f} s")
    if "moe" in table.meta:  # tokens each expert saw (mixq.moe.routing)
        from ..moe.routing import RoutingRecord

        print("routing: " + RoutingRecord.from_dict(table.meta["moe"]).summary())
    return 0
