"""``mixq quantize``: one spec for every block linear, a plan, or measure + plan + quantize at a ``--bpw``."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from ..algorithms.gptq import check_shrink
from ..api import GROUP_FALLBACKS, METHODS
from ..pipeline import FINETUNE_STAGES
from ..recipe import DEFAULT_RECIPE, recipe_record
from ..runtime.kernels import trellis_decodes_fast_here
from .common import (UserError, calib_args, check_free_space, check_positive, claim_output, constraint_args,
                     constraints_from, e2e_amp_arg, human, measure_args, model_arg, solver_arg,
                     walk_amp_arg)
from .measure import load_candidate_set, measure_algorithm
from .placement import check_device, placement_args, placement_from
from .quantize_lazy import check_lazy, lazy_source, load_lazy

log = logging.getLogger(__name__)


def register(sub) -> None:
    q = sub.add_parser("quantize", help="quantize a model and write a mixq directory",
                       description="Quantize MODEL with one spec for every block linear (or a plan) and write DIR.")
    model_arg(q)
    src = q.add_mutually_exclusive_group()
    src.add_argument("--spec", default=None, help="one spec for every block linear, e.g. W4-g64, W3-g64-asym, NF4-g64, "
                                                  "MXFP4, NVFP4, or a composite such as W3-g64+o0.5, SLIM3-g64 "
                                                  "(`mixq specs`; default W4-g64)")
    src.add_argument("--plan", default=None, help="a plan JSON from `mixq plan` (one spec per layer)")
    src.add_argument("--bpw", type=float, default=None, help="measure + plan + quantize in one go at this budget "
                                                             "(bits per weight over the block linears, metadata counted)")
    q.add_argument("--measurement", default=None, help="with --bpw: reuse this measurement (else one is made and saved in --out)")
    q.add_argument("--method", default=DEFAULT_RECIPE["method"], choices=METHODS,
                   help=f"gptq (default: calibrated), rtn (no data, much worse below 5 bpw), awq (AWQ scaling + "
                        f"clipping, then RTN), awq+gptq (default {DEFAULT_RECIPE['method']})")
    q.add_argument("--rotate", action="store_true",
                   help="rotate the residual stream first (QuaRot, RMSNorm families; fused into the weights)")
    q.add_argument("--group-fallback", default="error", choices=GROUP_FALLBACKS,
                   help="when a group size does not divide a layer's rows: error (default) or shrink it per layer")
    q.add_argument("--lazy", action="store_true", help="GPTQ on a local safetensors model directory without loading "
                                                       "it: decoder blocks are streamed one at a time")
    q.add_argument("--offload-dir", default=None, help="GPTQ: keep the walk's two [nsamples, seqlen, hidden] activation "
                                                       "buffers in memory-mapped files here instead of RAM")
    placement_args(q, "measured and quantized (--lazy: where each streamed block is quantized; the --finetune "
                      "stage runs on the CPU)")
    q.add_argument("--lm-head", default="keep", help="'keep' (default) or a spec to quantize the output head with RTN")
    calib_args(q, nsamples=DEFAULT_RECIPE["nsamples"])
    q.add_argument("--damp", type=float, default=DEFAULT_RECIPE["damp"], help="GPTQ dampening, fraction of mean(diag H)")
    q.add_argument("--hessian-shrink", type=float, default=DEFAULT_RECIPE["hessian_shrink"], metavar="S",
                   help="GPTQ: scale the input correlations its error feedback trusts by 1 - S (0: GPTQ as published, "
                        "1: each column rounded on its own, weighted by its energy); guards against fitting the "
                        "calibration text")
    q.add_argument("--act-order", action="store_true", help="GPTQ: visit columns by decreasing diag(H) (static groups)")
    q.add_argument("--gptq-target", choices=["quantized", "fp"], default=DEFAULT_RECIPE["gptq_target"],
                   help="GPTQ: fit each layer to its own output on the partly quantized model's inputs (quantized), "
                        "or the layers reading each block's input (q/k/v) to the full-precision model's output "
                        "(fp: GPTAQ's asymmetric calibration; one more block forward per block and two more "
                        "activation buffers)")
    measure_args(q)
    constraint_args(q)
    solver_arg(q, "with --bpw: allocation solver")
    q.add_argument("--finetune", nargs="?", const="e2e", default=None, choices=FINETUNE_STAGES,
                   help="then fine-tune the scales and norms with the codes fixed (`mixq finetune`'s settings, on "
                        "--finetune-samples rows of this --calib): 'e2e' all blocks at once on the base model's "
                        "logits (the default with --method gptq, and what a bare --finetune means), 'block' block by "
                        "block, 'block+e2e' both, 'none' neither (the default with other methods and with --lazy)")
    e2e_amp_arg(q)
    walk_amp_arg(q, "the measurement's block walk and gradient pass and the GPTQ walk")
    q.add_argument("--finetune-samples", type=int, default=None,
                   help="calibration rows of --finetune (default: the --nsamples rows the run quantized with)")
    q.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    q.add_argument("--force", action="store_true", help="replace --out if it exists")
    q.set_defaults(func=cmd_quantize)


def cmd_quantize(args) -> int:
    from .. import api
    from .. import pipeline as P
    from ..allocate import Budget, Plan, SensitivityTable
    from ..allocate.candidates import FAST_CPU
    from ..bos import resolve_bos
    from ..calibset import calibration_for, parse_sources
    from ..config import parse_spec
    from ..export.native_write import save_quantized
    from ..models import load_model

    if getattr(args, "target", None) and args.candidates == "default":
        args.candidates = args.target  # measure the runtime's exact specs (mixq.export.ggml_exact)
    if getattr(args, "fast_on", None) == "cpu" and args.candidates == "default":
        args.candidates = FAST_CPU  # measure specs that decode faster than fp32 (mixq.allocate.candidates)
        if trellis_decodes_fast_here():
            log.warning("--fast-on cpu keeps integer grids, fast on any CPU; on this one (AVX-512) the default plan's "
                        "trellis layers decode faster than fp32 too (1.4-1.7x, bench/results/deploy.md) at several "
                        "times lower KL: leave --fast-on out if the model will run on a CPU like this one")
    spec = quantize_spec(args) if args.plan is None and args.bpw is None else None
    plan = Plan.load(args.plan) if args.plan else None
    budget = Budget(bpw=args.bpw) if args.bpw is not None else None
    table = SensitivityTable.load(args.measurement) if args.measurement else None
    lm_head = None if args.lm_head == "keep" else parse_spec(args.lm_head)
    out = Path(args.out)
    if out.exists() and not args.force:
        raise FileExistsError(f"output directory {out} already exists: choose another --out or pass --force")
    claim_output(out, args.force)  # before any work: an unwritable, mistyped or busy --out fails now
    check_positive(nsamples=args.nsamples, seqlen=args.seqlen)
    args.finetune = resolve_finetune(args)
    if args.finetune_samples is None:  # the fine-tuning reuses the rows the run quantizes with
        args.finetune_samples = args.nsamples
    check_positive(finetune_samples=args.finetune_samples)
    if args.lazy:
        check_lazy(args)
    if args.offload_dir is not None and args.method != "gptq":
        raise UserError("--offload-dir applies to the GPTQ block walk: use --method gptq")
    try:
        check_shrink(args.hessian_shrink)
    except ValueError:
        raise UserError(f"--hessian-shrink {args.hessian_shrink} is not in [0, 1]: 0 is GPTQ as published, 1 drops "
                        f"every input correlation") from None
    if args.gptq_target != "quantized" and args.method != "gptq":
        raise UserError(f"--gptq-target {args.gptq_target} applies to GPTQ: use --method gptq")
    needs_calib = args.method != "rtn" or (budget is not None and table is None)
    if needs_calib:
        parse_sources(args.calib)  # a bad --calib fails before the model is loaded
    if budget is not None:
        load_candidate_set(args.candidates)
    placement = placement_from(args)
    if placement is None:
        check_device(args.device)
    if args.lazy:
        model, tok = load_lazy(args.model)
    else:
        model, tok = load_model(args.model, device=args.device, placement=placement)
    if plan is not None:  # a plan for another model fails before any calibration work
        plan.check({r.fqn: r.shape for r in api.iter_layers(model)})
        _check_plan(plan, model, args)
    if budget is not None and table is not None:  # a measurement of other weights fails before calibration
        _check_measurement(table, model, args)
    if budget is not None:  # an impossible budget fails before calibration and measurement (costs need no data)
        from ..allocate import budget_range, shape_table

        costs = table if table is not None else shape_table({r.fqn: r.shape for r in api.iter_layers(model)},
                                                            load_candidate_set(args.candidates))
        budget_range(costs, constraints_from(args)).check(budget)
    check_free_space(out, _expected_bytes(model, spec, plan, budget, args))
    t0 = time.perf_counter()
    bos = resolve_bos(tok, model, args.bos)
    calib = calibration_for(model, tok, args, bos) if needs_calib else None
    extra: dict = {"lazy": True} if args.lazy else {}
    rotate = args.rotate
    if budget is not None:
        from ..budget_stage import plan_for_budget

        # saved beside --out while it runs, so an interrupted measurement resumes on the next call
        scratch = out.with_name(f".{out.name}.measurement.json") if table is None else None
        bp = plan_for_budget(model, calib, budget, table=table, rotate=args.rotate,
                             candidates=load_candidate_set(args.candidates), metric=args.metric,
                             algorithm=measure_algorithm(args), grad_samples=args.grad_samples,
                             block_samples=args.block_samples, constraints=constraints_from(args),
                             solver=args.solver, scratch=scratch, tcq_state_bits=args.tcq_state_bits, amp=args.walk_amp)
        plan, table = bp.plan, bp.table
        rotate = rotate and not bp.rotated  # the budget stage rotated the weights before measuring them
        extra["measure_plan_seconds"] = time.perf_counter() - t0
    chosen = P.layer_specs(model, spec, plan=plan, lm_head=lm_head, group_fallback=args.group_fallback,
                           target=getattr(args, "target", None))  # a spec --target cannot hold: ValueError
    specs = chosen.specs
    source, kept = lazy_source(model, args.model, specs) if args.lazy else (None, {})
    walk = None
    if args.method == "gptq":
        from ..calib.checkpoint import WalkCheckpoint

        # every block is saved beside --out while the walk runs, so an interrupted run resumes on the next call;
        # release: a finished block's codes live only in its file until the output is written (out-of-core)
        walk = WalkCheckpoint(out.with_name(f".{out.name}.partial-walk"), announce=print, release=True)
    res = P.quantize(model, chosen, method=args.method, calib=calib if args.method != "rtn" else None,
                     damp=args.damp, act_order=args.act_order, rotate=rotate, source=source, checkpoint=walk,
                     offload_dir=args.offload_dir, device=args.device if args.lazy else None,
                     gptq_target=args.gptq_target, amp=args.walk_amp, hessian_shrink=args.hessian_shrink)
    if walk is not None and walk.resumed_from:
        extra["walk_resumed_at_block"] = walk.resumed_from
    if kept:  # the blocks' unquantized tensors (norms, biases), collected as the walk left each block
        model.load_state_dict(kept, strict=False, assign=True)
    size, label = res.meta["size"], chosen.label
    meta = {**res.meta, "base_model": args.model, "recipe": recipe_record(args), "rotate": args.rotate,
            "lm_head": args.lm_head, "seconds": time.perf_counter() - t0, **extra,
            "calibration": None if calib is None else calib.record(), "bos": bos.to_dict(),
            **({"activations": args.activations} if getattr(args, "activations", None) else {}),
            **({"kv_plan": plan.kv} if plan is not None and plan.kv is not None else {})}  # eval applies both
    final = out
    if args.finetune != "none":  # quantized into a scratch directory, fine-tuned from there into --out
        out = out.with_name(f".{out.name}.quantized")
        if out.exists():
            import shutil

            shutil.rmtree(out)
    measured = budget is not None and bp.measured
    save_quantized(out, model, tok, res.qtensors, meta, overwrite=args.force,
                   side_files=_side_files(plan, table if measured else None))
    n_layers = len(specs)
    if args.finetune != "none":
        # the quantized model lives in the scratch directory now: free it before fine-tuning loads it again
        rows = calib if calib is not None and args.finetune_samples == args.nsamples else None  # tokenised once
        model = res = calib = table = plan = chosen = specs = source = kept = None  # noqa: F841
        _release()
        _finetune(out, final, args, rows)
        out = final
    # only now, with --out whole: a run interrupted in the fine-tuning resumes with the measurement and every block
    # of the walk from these
    if walk is not None:
        walk.clear()
    if measured:  # the scratch measurement beside --out is in the output now
        final.with_name(f".{final.name}.measurement.json").unlink(missing_ok=True)
    print(f"wrote {out}: {n_layers} layers, {label} ({args.method}), "
          f"{size['bpw_quantized']:.3f} bpw over quantized layers, {human(size['bytes_all'])} in all, "
          f"{meta['seconds']:.1f} s")
    return 0


def _side_files(plan, table) -> dict[str, bytes]:
    """``plan.json`` and ``measurement.json`` (a measurement made by this run), written inside the output's atomic
    write and so listed with checksums in its ``mixq.json``."""
    from ..jsonio import json_bytes

    files = {"measurement.json": table, "plan.json": plan}
    return {name: json_bytes(obj.to_dict()) for name, obj in files.items() if obj is not None}


def _expected_bytes(model, spec, plan, budget, args) -> int:
    """About what the run writes: the kept tensors at their dtype, the quantized layers at their cost (twice with
    GPTQ, whose walk checkpoint holds them too until the output is written)."""
    from ..api import iter_layers

    refs = list(iter_layers(model))
    params = list(model.parameters()) + list(model.buffers())
    itemsize = params[0].element_size() if params else 2
    numel = sum(r.shape[0] * r.shape[1] for r in refs)
    if plan is not None:
        qbits = plan.total_bits
    elif budget is not None:
        qbits = budget.to_bits(numel)
    else:
        qbits = 0
        for r in refs:
            try:
                qbits += spec.cost(r.shape).total
            except ValueError:  # a group size that does not divide (--group-fallback shrink): about 16 bits
                qbits += 16 * r.shape[0] * r.shape[1]
    rest = max(0, sum(t.numel() * t.element_size() for t in params) - numel * itemsize)
    return rest + qbits // 8 * (2 if args.method == "gptq" else 1)


def _check_plan(plan, model, args) -> None:
    """Refuse a ``--plan`` chosen from a measurement of other weights (its recorded model fingerprint; not checked
    with ``--rotate`` or ``--lazy``) or with another ``--rotate``, naming the flag that fixes it."""
    from ..models import model_fingerprint

    p = f"--plan {args.plan}"
    redo = (f"make a plan for them (`mixq quantize --bpw X --model {args.model}"
            f"{' --rotate' if args.rotate else ''}` measures and plans in one go)")
    made = plan.meta.get("rotate")
    if made is not None and bool(made) != bool(args.rotate):
        raise UserError(f"{p} was chosen for {'rotated' if made else 'unrotated'} weights: "
                        f"{'add' if made else 'drop'} --rotate, or {redo}")
    fp = plan.meta.get("model")
    if fp is None or args.rotate or args.lazy:
        return
    mine = model_fingerprint(model)
    if fp != mine:
        raise UserError(f"{p} was chosen from a measurement of other weights (model fingerprint {fp}, this model "
                        f"{mine}): {redo}")


def _check_measurement(table, model, args) -> None:
    """Refuse a ``--measurement`` made of other weights than this run quantizes, naming the flag that fixes it.

    Checked before calibration: its layers and shapes, its ``--rotate`` record, and — without ``--rotate`` — its
    model fingerprint (with ``--rotate`` the budget stage compares it with the rotated model's,
    :mod:`mixq.budget_stage`).  A lazy model is never in memory, so only its layers are compared.
    """
    from ..api import iter_layers
    from ..models import model_fingerprint

    m = f"--measurement {args.measurement}"
    here = f"drop --measurement to measure --model {args.model}{' --rotate' if args.rotate else ''} in this run"
    have = {x.fqn: tuple(x.shape) for x in table.layers}
    want = {r.fqn: tuple(r.shape) for r in iter_layers(model)}
    if have != want:
        odd = sorted(set(have) ^ set(want)) or [f for f in want if have[f] != want[f]]
        raise UserError(f"{m} was made for another model (layer {odd[0]} differs, {len(odd)} such): {here}")
    made = table.meta.get("rotate")
    if made is not None and bool(made) != bool(args.rotate):
        fix = "add --rotate" if made else "drop --rotate"
        raise UserError(f"{m} was made {'with' if made else 'without'} --rotate: {fix}, or {here}")
    if args.rotate or args.lazy:
        return
    fp = table.meta.get("model")
    if fp is None:
        log.warning("%s records no model fingerprint: its provenance cannot be checked", m)
        return
    mine = model_fingerprint(model)
    if fp != mine:
        raise UserError(f"{m} was made of other weights (model fingerprint {fp}, this model {mine}): {here}, or "
                        f"measure it with `mixq measure --model {args.model}`")


def _release() -> None:
    import gc

    from ..memtrim import release_free_memory

    gc.collect()
    release_free_memory()


def _finetune(scratch: Path, out: Path, args, rows=None) -> None:
    """``pipeline.finetune`` from the quantized ``scratch`` into ``out``, on ``rows`` (the run's own
    CalibrationSet) when given, else on --finetune-samples new rows of --calib."""
    import shutil

    from ..distill_e2e import E2EConfig
    from ..pipeline import finetune

    stages = args.finetune.split("+")
    rep = finetune(scratch, out, calib=rows if rows is not None else args.calib, nsamples=args.finetune_samples,
                   seqlen=args.seqlen, seed=args.seed, bos=args.bos, overwrite=args.force, block="block" in stages,
                   e2e=E2EConfig(amp=args.e2e_amp) if "e2e" in stages else None)
    shutil.rmtree(scratch)
    parts = []
    if "held_out_gain" in rep:
        parts.append(f"held-out block loss x{rep['held_out_gain']:.3f} (geometric mean over blocks), "
                     f"{rep['seconds']:.0f} s")
    if "e2e" in rep:
        e = rep["e2e"]
        parts.append(f"end-to-end held-out KL {e['held_out_before']:.4f} -> {e['held_out_after']:.4f}, "
                     f"{e['seconds']:.0f} s")
    print("fine-tuned: " + "; ".join(parts) + (f"; curves in {rep['plot']}" if rep.get("plot") else ""))


def resolve_finetune(args) -> str:
    """The fine-tuning stages this run does: ``--finetune`` as given, else the recipe's with GPTQ on a model in
    memory (:mod:`mixq.recipe`), else none."""
    if args.finetune is not None:
        if args.finetune != "none" and args.lazy:
            raise UserError("--finetune needs the whole model in memory: it cannot run with --lazy "
                            "(fine-tune the directory afterwards with `mixq finetune` on a larger machine)")
        return args.finetune
    return DEFAULT_RECIPE["finetune"] if args.method == "gptq" and not args.lazy else "none"


def quantize_spec(args):
    """The weight spec of ``mixq quantize --spec`` (a spec name, or a W/A preset's W-part; ``-rot`` sets --rotate)."""
    from ..formats.act import parse_wa_preset
    from ..config import parse_spec

    name = "W4-g64" if args.spec is None else args.spec  # --spec "" is an error, not the default
    try:
        return parse_spec(name)
    except ValueError as e:
        try:
            p = parse_wa_preset(name)
        except ValueError:
            raise e from None
    if p.weight is None:
        raise UserError(f"--spec {name}: the preset keeps the weights in 16 bits, nothing to quantize")
    if p.rotate:
        args.rotate = True
    if p.act is not None:  # recorded in mixq.json: `mixq eval DIR` quantizes the activations with it
        args.activations = name
        print(f"--spec {name}: weights {p.weight.name}; the activation part is recorded in the directory and "
              f"`mixq eval DIR` applies it (dynamic)")
    return p.weight
