"""Subcommands for mixed precision: ``mixq measure`` and ``mixq plan`` (and the plan side of quantize)."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from . import commands_act
from .cli import DEFAULT_MODEL, UserError

log = logging.getLogger(__name__)


def register(sub, calib_args) -> None:
    m = sub.add_parser("measure", help="measure every layer × candidate error once (for any number of budgets)",
                       description="Measure the sensitivity table of MODEL: for each block linear and candidate "
                                   "spec, the predicted error.  Resumes an interrupted run from OUT.partial.")
    m.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id, local path or embedded name (default {DEFAULT_MODEL})")
    calib_args(m)
    measure_args(m)
    m.add_argument("--out", required=True, help="measurement JSON to write")
    m.add_argument("--force", action="store_true", help="replace --out if it exists")
    m.set_defaults(func=cmd_measure)

    p = sub.add_parser("plan", help="solve for one spec per layer under bit budgets (seconds, from a measurement)",
                       description="Allocate bits from MEASUREMENT under each budget; writes DIR/plan-<budget>.json.")
    p.add_argument("measurement", help="a measurement JSON written by `mixq measure`")
    budget_args(p)
    commands_act.plan_args(p)
    p.add_argument("--out", default=None, help="directory for the plans (required unless --dry-run)")
    p.add_argument("--dry-run", action="store_true", help="print the per-layer table and sizes, write nothing")
    p.add_argument("--force", action="store_true", help="replace existing plan files")
    p.set_defaults(func=cmd_plan)


def measure_args(p) -> None:
    p.add_argument("--metric", default="kfac", choices=["kfac", "hessian", "fisher", "block", "block-rel"],
                   help="error proxy: kfac (Fisher-weighted output error, default), hessian (layer output MSE), "
                        "fisher (diagonal Fisher), block (block-output error weighted by the residual gradient, "
                        "slowest and most faithful), block-rel (ExLlamaV2-style relative block-output error)")
    p.add_argument("--algorithm", default=None, choices=["rtn", "gptq", "gptq-exact"],
                   help="algorithm whose error is measured (default: the --method of quantize, else rtn)")
    p.add_argument("--candidates", default="default", help="'default' or a file listing spec names")
    p.add_argument("--grad-samples", type=int, default=16, help="calibration samples for the gradient statistics")
    p.add_argument("--block-samples", type=int, default=4,
                   help="calibration samples each candidate is run on by the block metrics")


def budget_args(p) -> None:
    p.add_argument("--bpw", default=None, help="budget(s) in bits per weight over the quantized layers, e.g. 2.5,3,3.5")
    p.add_argument("--bytes", default=None, help="budget(s) in bytes of the quantized layers, e.g. 40MB,50MB")
    p.add_argument("--solver", default="exact", choices=["exact", "greedy", "uniform", "dp"], help="allocation solver")
    constraint_args(p)


def constraint_args(p) -> None:
    p.add_argument("--keep", action="append", default=[], help="regex of layers kept in fp16 (repeatable)")
    p.add_argument("--force-spec", action="append", default=[], metavar="REGEX=SPEC", help="force a spec (repeatable)")
    p.add_argument("--tied", action="append", default=[], help="regex of layers in a block that share a spec, "
                                                               r"e.g. 'self_attn\.(q|k|v)_proj'")
    p.add_argument("--min-bits", action="append", default=[], metavar="REGEX=N", help="minimum bits for matching layers")
    p.add_argument("--max-bits", action="append", default=[], metavar="REGEX=N", help="maximum bits for matching layers")
    p.add_argument("--fast-on", default=None, choices=["cpu"],
                   help="only candidates a fast kernel runs on this device (e.g. cpu: int grids through the int4 "
                        "GEMM; no NF/FP/FP16 layers, which would run the slow dequantize-per-call kernel)")


def parse_budgets(args) -> list:
    from .allocate import Budget

    if bool(args.bpw) == bool(args.bytes):
        raise UserError("give exactly one of --bpw (e.g. 3.5) or --bytes (e.g. 50MB)")
    out = []
    for tok in (args.bpw or args.bytes).split(","):
        tok = tok.strip()
        try:
            out.append(Budget(bpw=float(tok)) if args.bpw else Budget(bytes=_parse_bytes(tok)))
        except ValueError as e:
            raise UserError(f"bad budget {tok!r}: {e}") from None
    return out


def _parse_bytes(tok: str) -> int:
    units = {"kb": 1024, "mb": 1024**2, "gb": 1024**3, "b": 1}
    t = tok.lower()
    for u, f in units.items():
        if t.endswith(u) and t[: -len(u)].replace(".", "", 1).isdigit():
            return int(float(t[: -len(u)]) * f)
    if t.isdigit():
        return int(t)
    raise ValueError("use a number of bytes, or KB/MB/GB")


def constraints_from(args):
    from .allocate import Constraints

    def pairs(items, conv, flag):
        out = []
        for it in items:
            if "=" not in it:
                raise UserError(f"{flag} {it!r}: expected REGEX=VALUE")
            k, v = it.rsplit("=", 1)
            try:
                out.append((k, conv(v)))
            except ValueError:
                raise UserError(f"{flag} {it!r}: bad value {v!r}") from None
        return out

    return Constraints(keep=tuple(args.keep), force=tuple(pairs(args.force_spec, str, "--force-spec")),
                       min_bits=dict(pairs(args.min_bits, int, "--min-bits")),
                       max_bits=dict(pairs(args.max_bits, int, "--max-bits")), tied=tuple(args.tied),
                       fast_on=getattr(args, "fast_on", None))


def load_candidate_set(name: str):
    from .allocate import default_candidates, load_candidates

    return default_candidates() if name == "default" else load_candidates(name)


def finished_measurement(path: Path, model, calib_ids, args):
    """The table at ``path`` if a previous (interrupted) run finished it for this model, data and metric."""
    from .allocate import SensitivityTable
    from .measure import measurement_key

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
    return args.algorithm or ("gptq" if getattr(args, "method", "rtn") == "gptq" else "rtn")


def run_measure(model, calib_ids, args, out: Path | None):
    """Measure on ``calib_ids`` with the metric options in ``args``; returns the table."""
    from .measure import measure

    return measure(model, calib_ids, load_candidate_set(args.candidates), metric=args.metric,
                   algorithm=_algorithm(args), grad_samples=args.grad_samples, block_samples=args.block_samples,
                   out=out)


def cmd_measure(args) -> int:
    from .bos import resolve_bos
    from .calibset import parse_sources
    from .calibset import calibration_for
    from .models import load_model

    out = Path(args.out)
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} already exists: choose another --out or pass --force")
    load_candidate_set(args.candidates)  # validate before the heavy work
    parse_sources(args.calib)
    model, tok = load_model(args.model)
    t0 = time.perf_counter()
    calib = calibration_for(model, tok, args, resolve_bos(tok, model, args.bos))
    table = run_measure(model, calib.ids, args, out)
    table.meta["calibration_record"] = calib.record()
    if out is not None:
        table.save(out, overwrite=True)
    n = sum(len(e.candidates) for e in table.layers)
    print(f"wrote {out}: {len(table.layers)} layers × candidates = {n} errors ({table.metric}, "
          f"{table.meta['algorithm']}), {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_plan(args) -> int:
    from .allocate import SensitivityTable, allocate, format_plan_table

    if getattr(args, "memory", None):
        return commands_act.cmd_plan_joint(args)
    budgets = parse_budgets(args)
    constraints = constraints_from(args)
    if not args.dry_run and not args.out:
        raise UserError("--out DIR is required (or use --dry-run)")
    table = SensitivityTable.load(args.measurement)
    plans = []
    for b in budgets:
        t0 = time.perf_counter()
        plan = allocate(table, b, constraints=constraints, method=args.solver)
        plans.append((b, plan, time.perf_counter() - t0))
    for b, plan, secs in plans:
        if args.dry_run:
            print(format_plan_table(plan))
        print(f"budget {b}: {plan.achieved_bpw:.4f} bpw, {plan.total_bits / 8 / 2**20:.2f} MiB of quantized layers, "
              f"predicted {plan.metric} error {plan.predicted_error:.5g}, {args.solver} solver {secs * 1000:.0f} ms")
    if not args.dry_run:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for b, plan, _ in plans:
            path = out / f"plan-{_budget_tag(b)}.json"
            plan.save(path, overwrite=args.force)
            print(f"wrote {path}")
    return 0


def _budget_tag(b) -> str:
    return f"{b.bpw:g}bpw" if b.bpw is not None else f"{b.bytes}B"
