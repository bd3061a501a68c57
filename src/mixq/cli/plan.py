"""``mixq plan``: one spec per layer under bit budgets, in seconds, from a measurement; with ``--memory``
one budget for the weights and the KV cache together (from ``mixq measure-kv``)."""
from __future__ import annotations

import time
from pathlib import Path

from ..allocate import parse_bytes
from .common import UserError, budget_args, constraints_from, parse_budgets, parse_kv_arg


def register(sub) -> None:
    p = sub.add_parser("plan", help="solve for one spec per layer under bit budgets (seconds, from a measurement)",
                       description="Allocate bits from MEASUREMENT under each budget; writes DIR/plan-<budget>.json.")
    p.add_argument("measurement", help="a measurement JSON written by `mixq measure`")
    budget_args(p)
    g = p.add_argument_group("joint weights + KV cache budget")
    g.add_argument("--memory", default=None, help="budget(s) for the block linears + KV cache together, e.g. 120MB,100MB")
    g.add_argument("--kv-measurement", default=None, help="a KV measurement from `mixq measure-kv` (needed by --memory)")
    g.add_argument("--context", type=int, default=2048, help="tokens per sequence the KV cache holds (default 2048)")
    g.add_argument("--batch", type=int, default=1, help="sequences held at once (default 1)")
    g.add_argument("--kv-bits", default=None, help="KV widths allowed (default: every measured one, 16 included)")
    g.add_argument("--kv-tied", action="store_true", help="K and V of a layer take the same width")
    g.add_argument("--kv-uniform", default=None, help="baseline instead of the joint solve: the KV cache uniform at "
                                                     "these bits (e.g. 4 or 4/2), the weights get the rest")
    p.add_argument("--out", default=None, help="directory for the plans (required unless --dry-run)")
    p.add_argument("--dry-run", action="store_true", help="print the per-layer table and sizes, write nothing")
    p.add_argument("--force", action="store_true", help="replace existing plan files")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    from ..allocate import SensitivityTable, allocate, budget_range, format_plan_table

    if getattr(args, "memory", None):
        return _plan_joint(args)
    budgets = parse_budgets(args)
    constraints = constraints_from(args)
    if not args.dry_run and not args.out:
        raise UserError("--out DIR is required (or use --dry-run)")
    table = SensitivityTable.load(args.measurement)
    feasible = budget_range(table, constraints)
    for b in budgets:  # every budget checked before any is solved or written
        feasible.check(b)
    plans = []
    for b in budgets:
        t0 = time.perf_counter()
        plan = allocate(table, b, constraints=constraints, method=args.solver, tcq_state_bits=args.tcq_state_bits)
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


def _plan_joint(args) -> int:
    from ..allocate.joint import allocate_joint, allocate_separately
    from ..allocate.kv_table import KVSensitivityTable
    from ..allocate import SensitivityTable

    if args.bpw or args.bytes:
        raise UserError("give either --memory (weights + KV cache) or --bpw/--bytes (weights only), not both")
    if not args.kv_measurement:
        raise UserError("--memory needs --kv-measurement KV.json (from `mixq measure-kv`)")
    if args.solver == "uniform":
        raise UserError("--solver uniform has no meaning with --memory: use --kv-uniform BITS for a split baseline")
    if args.context < 1 or args.batch < 1:
        raise UserError(f"--context and --batch must be positive, got {args.context} and {args.batch}")
    if not args.dry_run and not args.out:
        raise UserError("--out DIR is required (or use --dry-run)")
    budgets = []
    for tok in args.memory.split(","):
        try:
            budgets.append(parse_bytes(tok.strip()))
        except ValueError as e:
            raise UserError(f"bad --memory {tok.strip()!r}: {e}") from None
        if budgets[-1] <= 0:
            raise UserError(f"bad --memory {tok.strip()!r}: must be positive")
    allowed = None
    if args.kv_bits:
        try:
            allowed = [int(b) for b in args.kv_bits.split(",") if b.strip()]
        except ValueError:
            raise UserError(f"--kv-bits {args.kv_bits!r}: expected comma-separated integers, e.g. 2,4,8,16") from None
    uniform = parse_kv_arg(args.kv_uniform)[0] if args.kv_uniform else None
    constraints = constraints_from(args)
    table = SensitivityTable.load(args.measurement)
    kv_table = KVSensitivityTable.load(args.kv_measurement)
    plans = []
    for mem in budgets:
        if uniform is not None:
            plan = allocate_separately(table, kv_table, mem, args.context, args.batch, kv_bits=uniform,
                                       constraints=constraints, method=args.solver,
                                       tcq_state_bits=args.tcq_state_bits)
        else:
            plan = allocate_joint(table, kv_table, mem, args.context, args.batch, constraints=constraints,
                                  kv_bits=allowed, kv_tied=args.kv_tied, method=args.solver,
                                  tcq_state_bits=args.tcq_state_bits)
        plans.append((mem, plan))
    for mem, plan in plans:
        print(plan.format())
        if args.dry_run:
            from ..allocate import format_plan_table

            print()
            print(format_plan_table(plan.weights))
        print()
    if not args.dry_run:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for mem, plan in plans:
            tag = f"{mem}B-ctx{args.context}-b{args.batch}"
            wp = out / f"plan-{tag}.json"
            plan.as_plan().save(wp, overwrite=args.force)  # weights and KV widths in one plan
            print(f"wrote {wp} (mixq quantize --plan records its KV widths; mixq eval applies them)")
    return 0
