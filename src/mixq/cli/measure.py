"""``mixq measure``: every layer × candidate error, once, for any number of budgets (and the measurement
side of ``mixq quantize --bpw``).

Under ``torchrun`` (``OMP_NUM_THREADS=1 torchrun --nproc-per-node N -m mixq.cli measure ...``) the processes
share the work (:mod:`mixq.measure.distributed`): rank 0 prepares the calibration rows and sends them to the
others, every rank walks the model, and rank 0 alone claims, resumes and writes ``--out``; the table equals
the single-process one."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from ..calib.dispatch import NAMED_DEVICE_MAPS
from ..recipe import DEFAULT_RECIPE
from .common import UserError, calib_args, claim_output, measure_args, model_arg, one_line

log = logging.getLogger(__name__)


def register(sub) -> None:
    m = sub.add_parser("measure", help="measure every layer × candidate error once (for any number of budgets)",
                       description="Measure the sensitivity table of MODEL: for each block linear and candidate "
                                   "spec, the predicted error.  Resumes an interrupted run from OUT.partial.")
    model_arg(m)
    calib_args(m, nsamples=DEFAULT_RECIPE["nsamples"])
    measure_args(m)
    m.add_argument("--out", required=True, help="measurement JSON to write")
    m.add_argument("--force", action="store_true", help="replace --out if it exists")
    m.add_argument("--device", default="cpu",
                   help="where the model is loaded and measured: cpu (default), cuda, cuda:N; under torchrun, "
                        "cuda means the first of each process's GPUs (NCCL), cpu uses gloo")
    m.add_argument("--device-map", default=None,
                   help=f"spread the model with accelerate instead of --device: {', '.join(NAMED_DEVICE_MAPS)}, or a "
                        "JSON file {module: device} (GPU index, cpu, disk); blocks that fit nowhere are offloaded and "
                        "materialized one at a time by the walk (see README, 'Several devices and processes')")
    m.add_argument("--max-memory", default=None, metavar="DEV=SIZE,...",
                   help="with --device-map: memory per device, e.g. 0=70GiB,1=70GiB,cpu=200GiB; gpu=SIZE is every "
                        "GPU; under torchrun, each process's own GPUs (the node's GPUs split evenly among its "
                        "processes), and then required")
    m.add_argument("--offload-folder", default=None, help="with --device-map: where weights offloaded to disk go")
    m.set_defaults(func=cmd_measure)


def load_candidate_set(name: str):
    from ..allocate import default_candidates, load_candidates

    from ..export.ggml_exact import TARGETS, target_candidates

    if name in TARGETS:  # a runtime target's exact specs (``--candidates gguf``)
        return target_candidates(name)
    return default_candidates() if name == "default" else load_candidates(name)


def finished_measurement(path: Path, model, calib_ids, args):
    """The table at ``path`` if a previous (interrupted) run finished it for this model, data and metric."""
    from ..allocate import SensitivityTable
    from ..measure import measurement_key

    if not path.exists():
        return None
    try:
        table = SensitivityTable.load(path)
    except Exception:  # noqa: BLE001 - a damaged scratch file is simply measured again
        return None
    key = measurement_key(model, calib_ids, load_candidate_set(args.candidates), args.metric, _algorithm(args))
    if any(table.meta.get(k) != v for k, v in key.items()):
        return None
    log.info("reusing the finished measurement %s", path)
    return table


def _algorithm(args) -> str:
    return args.algorithm or ("gptq" if getattr(args, "method", DEFAULT_RECIPE["method"]) == "gptq" else "rtn")


def run_measure(model, calib_ids, args, out: Path | None, group=None):
    """Measure on ``calib_ids`` with the metric options in ``args``; returns the table."""
    from ..measure import measure

    return measure(model, calib_ids, load_candidate_set(args.candidates), metric=args.metric,
                   algorithm=_algorithm(args), grad_samples=args.grad_samples, block_samples=args.block_samples,
                   out=out, group=group)


def placement_from(args, group):
    """accelerate's placement from ``--device-map``, ``--max-memory`` and ``--offload-folder`` (``None``: --device)."""
    import json

    from ..calib.dispatch import Placement, parse_max_memory
    from ..measure.distributed import local_gpus

    if not args.device_map:
        if args.max_memory or args.offload_folder:
            raise UserError("--max-memory and --offload-folder go with --device-map")
        return None
    dm = args.device_map
    if dm not in NAMED_DEVICE_MAPS:
        try:
            dm = json.loads(Path(dm).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"--device-map {args.device_map!r}: not {'/'.join(NAMED_DEVICE_MAPS)} nor a readable "
                            f"JSON file ({one_line(e)})") from None
    import torch

    gpus = local_gpus(torch.cuda.device_count()) if group.world > 1 else None
    try:
        mem = parse_max_memory(args.max_memory, gpus)
    except ValueError as e:
        raise UserError(str(e)) from None
    if gpus is not None and isinstance(dm, str):
        if not mem or any(k not in gpus for k in mem if isinstance(k, int)) or not any(k in gpus for k in mem):
            raise UserError(f"under torchrun, --device-map needs --max-memory gpu=SIZE: this process's GPUs are "
                            f"{gpus} and a string device map must not reach the others'")
    return Placement(dm, mem, args.offload_folder)


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
    model, tok = load_model(args.model, device=process_device(args.device, group), placement=placement_from(args, group))
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
