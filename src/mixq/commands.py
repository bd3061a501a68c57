"""Subcommands of the ``mixq`` CLI: argument definitions and thin drivers over :mod:`mixq.api`.

Inputs are validated before any heavy work (model loading, calibration), so a typo costs
nothing and no output is half-written.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from . import commands_act
from . import commands_alloc
from . import commands_bench
from . import commands_export
from . import commands_report
from .bos import add_bos_argument
from .calibset import DEFAULT_CALIB
from .cli import DEFAULT_MODEL, UserError, write_json_atomic

log = logging.getLogger(__name__)


def register(sub) -> None:
    q = sub.add_parser("quantize", help="quantize a model and write a mixq directory",
                       description="Quantize MODEL with one spec for every block linear (or a plan) and write DIR.")
    q.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id, local path or embedded name (default {DEFAULT_MODEL})")
    src = q.add_mutually_exclusive_group()
    src.add_argument("--spec", default=None, help="one spec for every block linear, e.g. W4-g64, W3-g64-asym, NF4-g64, "
                                                  "MXFP4, NVFP4 (`mixq specs`; default W4-g64)")
    src.add_argument("--plan", default=None, help="a plan JSON from `mixq plan` (one spec per layer)")
    src.add_argument("--bpw", type=float, default=None, help="measure + plan + quantize in one go at this budget "
                                                             "(bits per weight over the block linears, metadata counted)")
    q.add_argument("--measurement", default=None, help="with --bpw: reuse this measurement (else one is made and saved in --out)")
    q.add_argument("--method", default="rtn", choices=["rtn", "gptq", "awq", "awq+gptq"],
                   help="rtn (no data), or calibrated: gptq, awq (AWQ scaling + clipping, then RTN), awq+gptq")
    q.add_argument("--rotate", action="store_true",
                   help="rotate the residual stream first (QuaRot, RMSNorm families; fused into the weights)")
    q.add_argument("--group-fallback", default="error", choices=["error", "shrink"],
                   help="when a group size does not divide a layer's rows: error (default) or shrink it per layer")
    q.add_argument("--lazy", action="store_true", help="GPTQ on a local safetensors model directory without loading "
                                                       "it: decoder blocks are streamed one at a time")
    q.add_argument("--offload-dir", default=None, help="GPTQ: keep the walk's two [nsamples, seqlen, hidden] activation "
                                                       "buffers in memory-mapped files here instead of RAM")
    q.add_argument("--lm-head", default="keep", help="'keep' (default) or a spec to quantize the output head with RTN")
    _calib_args(q)
    q.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening, fraction of mean(diag H)")
    q.add_argument("--act-order", action="store_true", help="GPTQ: visit columns by decreasing diag(H) (static groups)")
    commands_alloc.measure_args(q)
    commands_alloc.constraint_args(q)
    q.add_argument("--solver", default="exact", choices=["exact", "greedy"], help="with --bpw: allocation solver")
    q.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    q.add_argument("--force", action="store_true", help="replace --out if it exists")
    q.set_defaults(func=cmd_quantize)
    commands_alloc.register(sub, _calib_args)

    e = sub.add_parser("eval", help="perplexity, KL and top-1 agreement of a model or mixq directory",
                       description="Evaluate a mixq directory (or any model) on a corpus; KL is measured against "
                                   "the reference (by default the directory's base model).")
    e.add_argument("target", nargs="?", default=DEFAULT_MODEL, help="mixq directory, hub id, local path or embedded name")
    _eval_args(e)
    commands_act.eval_args(e)
    e.add_argument("--reference", default=None, help="reference model for KL (default: the base model of a mixq dir; none for a plain model)")
    e.add_argument("--ci", action="store_true", help="add 95%% bootstrap intervals over windows (mixq.eval.stats; one "
                                                     "more pass of the model) and check calibration/evaluation overlap")
    e.add_argument("--out", default=None, help="write the results JSON here")
    e.add_argument("--force", action="store_true", help="replace --out if it exists")
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("specs", help="list the named spec presets and their exact bits per weight")
    s.add_argument("--shape", default="576x1536", help="tensor shape OUTxIN for the bpw column (default 576x1536)")
    s.set_defaults(func=cmd_specs)

    d = sub.add_parser("demo", help="the main job on the embedded model: quantize, evaluate, print a table")
    d.add_argument("--tokens", type=int, default=4096, help="PTB test tokens to score (default 4096)")
    d.add_argument("--bpw", type=float, default=3.5, help="budget in bits per weight (default 3.5)")
    d.add_argument("--out", default=None, help="also write the table's data as JSON here")
    add_bos_argument(d)
    d.set_defaults(func=cmd_demo)
    commands_export.register(sub)
    commands_act.register(sub)
    commands_report.register(sub)
    commands_bench.register(sub)


def _calib_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", default=DEFAULT_CALIB,
                   help=f"calibration text: self (written by the model itself: varied openers and chat exchanges, "
                        f"cached), ptb, fortunes, wikitext2, c4, a .txt/.jsonl path, or a mixture joined by '+' "
                        f"(default {DEFAULT_CALIB}; see mixq.calibset)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration samples (default 128)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration sample (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sampler")
    add_bos_argument(p)


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", default=None,
                   help="ptb (embedded), fortunes (Debian quotations), wikitext2, c4 or a .txt/.jsonl path, or several "
                        "joined by ',' (default ptb,fortunes: the calibration domain and text calibration never saw; "
                        "fortunes is skipped with a warning where it is not installed)")
    p.add_argument("--split", default="test", help="split to evaluate on (default test)")
    p.add_argument("--tokens", type=int, default=32768, help="score the first N tokens (default 32768)")
    p.add_argument("--seqlen", type=int, default=512, help="window length (default 512)")
    p.add_argument("--stride", type=int, default=None, help="sliding-window stride (default: non-overlapping)")
    add_bos_argument(p)


# ---------------------------------------------------------------------------- quantize
def cmd_quantize(args) -> int:
    from . import api
    from .allocate import Budget, Plan, SensitivityTable, allocate
    from .bos import resolve_bos
    from .calibset import calibration_for, parse_sources
    from .config import parse_spec
    from .export.native import save_quantized
    from .models import load_model

    spec = commands_act.quantize_spec(args) if args.plan is None and args.bpw is None else None
    plan = Plan.load(args.plan) if args.plan else None
    budget = Budget(bpw=args.bpw) if args.bpw is not None else None
    table = SensitivityTable.load(args.measurement) if args.measurement else None
    lm_head = None if args.lm_head == "keep" else parse_spec(args.lm_head)
    out = Path(args.out)
    if out.exists() and not args.force:
        raise FileExistsError(f"output directory {out} already exists: choose another --out or pass --force")
    _check_positive(nsamples=args.nsamples, seqlen=args.seqlen)
    if args.lazy:
        _check_lazy(args)
    if args.offload_dir is not None and args.method != "gptq":
        raise UserError("--offload-dir applies to the GPTQ block walk: use --method gptq")
    needs_calib = args.method != "rtn" or (budget is not None and table is None)
    if needs_calib:
        parse_sources(args.calib)  # a bad --calib fails before the model is loaded
    if budget is not None:
        commands_alloc.load_candidate_set(args.candidates)
    model, tok = _load_lazy(args.model) if args.lazy else load_model(args.model)
    t0 = time.perf_counter()
    bos = resolve_bos(tok, model, args.bos)
    calib = calibration_for(model, tok, args, bos) if needs_calib else None
    extra: dict = {"lazy": True} if args.lazy else {}
    rotate = args.rotate
    if rotate and budget is not None and table is None:
        # rotate before measuring: the plan must be chosen for the weights that will be quantized
        from .algorithms.rotation import rotate_model

        rotate_model(model, online_down=False)
        rotate = False
    if budget is not None:
        if table is None:
            # saved beside --out while it runs, so an interrupted measurement resumes on the next call
            scratch = out.with_name(f".{out.name}.measurement.json")
            table = commands_alloc.finished_measurement(scratch, model, calib.ids, args)
            if table is None:
                table = commands_alloc.run_measure(model, calib.ids, args, scratch)
        plan = allocate(table, budget, constraints=commands_alloc.constraints_from(args), method=args.solver)
        extra["measure_plan_seconds"] = time.perf_counter() - t0
    if lm_head is not None:
        from .arch import untie_lm_head

        untie_lm_head(model)
    if plan is not None:
        plan.check({r.fqn: r.shape for r in api.iter_layers(model)})
        specs = dict(plan.layers)  # FP16 "keep" choices are applied too: cast through fp16, counted at 16 bits
        if lm_head is not None:
            specs.update(api.resolve_specs(model, {}, lm_head=lm_head, allow_empty=True))
    else:
        specs = api.resolve_specs(model, spec, lm_head=lm_head, group_fallback=args.group_fallback)
    calib_ids = None if calib is None or args.method == "rtn" else calib.ids
    source, kept = _lazy_source(model, args.model, specs) if args.lazy else (None, {})
    walk = None
    if args.method == "gptq":
        from .calib.checkpoint import WalkCheckpoint

        # every block is saved beside --out while the walk runs, so an interrupted run resumes on the next call;
        # release: a finished block's codes live only in its file until the output is written (out-of-core)
        walk = WalkCheckpoint(out.with_name(f".{out.name}.partial-walk"), announce=print, release=True)
    res = api.quantize_model(model, specs, method=args.method, calib_ids=calib_ids, damp=args.damp,
                             act_order=args.act_order, rotate=rotate, online_rotation=False, source=source,
                             checkpoint=walk, offload_dir=args.offload_dir)
    if walk is not None and walk.resumed_from:
        extra["walk_resumed_at_block"] = walk.resumed_from
    if kept:  # the blocks' unquantized tensors (norms, biases), collected as the walk left each block
        model.load_state_dict(kept, strict=False, assign=True)
    size = api.size_report(model, specs)
    label = spec.name if spec is not None else f"mixed plan ({plan.achieved_bpw:.3f} bpw, {plan.metric}/{plan.solver})"
    meta = {"base_model": args.model, "method": args.method, "spec": label, "rotate": args.rotate,
            "lm_head": args.lm_head, "seconds": time.perf_counter() - t0, "size": size,
            "group_fallback": api.fallbacks(specs, spec) if spec is not None else {},
            "plan": plan.to_dict() if plan is not None else None, **extra,
            "calibration": None if calib is None else calib.record(), "bos": bos.to_dict(),
            "proxy_loss": res.proxy_loss or None}
    save_quantized(out, model, tok, res.qtensors, meta, overwrite=args.force)
    if walk is not None:
        walk.clear()
    if budget is not None and args.measurement is None:
        table.meta["calibration_record"] = calib.record()
        table.save(out / "measurement.json", overwrite=True)
        out.with_name(f".{out.name}.measurement.json").unlink(missing_ok=True)
    if plan is not None:
        plan.save(out / "plan.json", overwrite=True)
    print(f"wrote {out}: {len(specs)} layers, {label} ({args.method}), "
          f"{size['bpw_quantized']:.3f} bpw over quantized layers, {_human(size['bytes_all'])} in all, "
          f"{meta['seconds']:.1f} s")
    return 0


def _check_lazy(args) -> None:
    p = Path(args.model)
    if not (p / "config.json").is_file() or not any(p.glob("*.safetensors")):
        raise UserError(f"--lazy needs a local model directory with config.json and *.safetensors, not {args.model}")
    if args.method != "gptq" or args.rotate or (args.bpw is not None and args.measurement is None):
        raise UserError("--lazy streams the blocks through GPTQ's calibration walk: use --method gptq, no --rotate, "
                        "and with --bpw an existing --measurement")
    from .calibset import SELF, parse_sources

    if SELF in parse_sources(args.calib):
        raise UserError(f"--lazy never holds the whole model, so it cannot write self-generated calibration text "
                        f"(--calib {args.calib}): pass --calib ptb or a .txt/.jsonl file")


def _load_lazy(path: str):
    """The model on ``meta`` with only what lies outside the decoder blocks loaded, and its tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    from .calib.lazy import load_outside_blocks, skeleton_from_config

    model = skeleton_from_config(AutoConfig.from_pretrained(path))
    load_outside_blocks(model, path)
    return model, AutoTokenizer.from_pretrained(path)


def _lazy_source(model, path: str, specs: dict):
    """Streams blocks from ``path``; keeps each block's tensors that are not quantized (to save them)."""
    import ctypes

    from .arch import arch_for
    from .calib.lazy import LazySafetensorsBlocks

    prefix, kept = arch_for(model).blocks, {}

    def sink(i: int, state: dict) -> None:
        for k, v in state.items():
            name = f"{prefix}.{i}.{k}"
            if name.removesuffix(".weight") not in specs:
                kept[name] = v

    src = LazySafetensorsBlocks(path, prefix, sink=sink)
    try:  # hand the last block's freed pages back to the OS before the next one (glibc keeps them otherwise)
        trim, load = ctypes.CDLL("libc.so.6").malloc_trim, src.load
        src.load = lambda i, block, device: (trim(0), load(i, block, device))[1]
    except (OSError, AttributeError):
        pass
    return src, kept


# ---------------------------------------------------------------------------- eval
def load_target(target: str):
    """A mixq directory or a model name → ``(model, tokenizer, info | None)``."""
    from .export.native import is_quantized_dir, load_quantized
    from .models import load_model

    if is_quantized_dir(target):
        return load_quantized(target)
    m, t = load_model(target)
    return m, t, None


def eval_windows_for(args, tok, model=None) -> list:
    """``[(corpus, windows, protocol)]`` for each domain of ``args.corpus`` (split, tokens, seqlen, stride, bos)."""
    from . import data
    from .bos import resolve_bos
    from .eval import Protocol
    from .eval.domains import load_domains, parse_corpora

    names, defaults = parse_corpora(args.corpus)
    texts = load_domains(names, args.split, defaults)
    bos = resolve_bos(tok, model, getattr(args, "bos", "auto"))
    out = []
    for corpus, text in texts.items():
        ids = data.tokenize(text, tok)
        win = data.eval_windows(ids, args.seqlen, stride=args.stride, max_tokens=args.tokens, bos_id=bos.bos_id)
        proto = Protocol.for_windows(win, corpus=corpus, split=args.split,
                                     tokenizer=getattr(tok, "name_or_path", "") or "", dtype="float32",
                                     bos_decision=bos)
        out.append((corpus, win, proto))
    return out


def cmd_eval(args) -> int:
    from .eval import evaluate
    from .eval.domains import combine

    if commands_act.wants_act_or_kv(args):
        return commands_act.cmd_eval_act(args)
    _check_positive(tokens=args.tokens, seqlen=args.seqlen)
    if args.out and Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a directory: give a file name such as results.json")
    if args.out and Path(args.out).exists() and not args.force:
        raise FileExistsError(f"{args.out} already exists: choose another --out or pass --force")
    model, tok, info = load_target(args.target)
    ref_name = args.reference or (info or {}).get("base_model")
    reference = None
    if ref_name:
        reference, _, _ = load_target(ref_name)
    if tok is None:
        raise UserError(f"{args.target} has no tokenizer files: re-quantize it with this mixq version")
    results = {}
    for corpus, win, proto in eval_windows_for(args, tok, model):
        ref = reference
        if args.ci and ref is not None:
            from .eval import ReferenceCache

            ref = ReferenceCache(ref, win)  # the reference runs once for both passes
        results[corpus] = evaluate(model, win, proto, reference=ref)
        if args.ci:
            results[corpus].update(_intervals(model, win, ref, info, tok))
    res = combine(results)
    res["target"] = args.target
    res["reference"] = ref_name
    if info:
        res["size"] = info.get("size")
        res["spec"] = info.get("spec")
        res["calibration"] = info.get("calibration")  # what the directory was fitted on (None: RTN)
    if args.out:
        write_json_atomic(args.out, res, overwrite=True)
    _print_result(res)
    return 0


def _intervals(model, win, reference, info, tok) -> dict:
    """``--ci``: bootstrap intervals over windows, and the calibration/evaluation overlap warning."""
    from .calibset import corpus_rows
    from .eval.stats import confidence_intervals, evaluate_windows, overlap_warning

    ci = confidence_intervals(evaluate_windows(model, win, reference))
    out = {"ci": {k: v for k, v in ci.items() if v is not None}, "overlap_warning": None}
    cal = (info or {}).get("calibration")
    ids = corpus_rows(cal, tok) if cal else None
    if ids is not None:
        out["overlap_warning"] = overlap_warning(ids, win)
        if out["overlap_warning"]:
            log.warning("%s", out["overlap_warning"])
    for k, v in out["ci"].items():
        print(f"{k}: {v['estimate']:.5g}  {v['confidence']:.0%} CI [{v['low']:.5g}, {v['high']:.5g}] "
              f"({v['n_windows']} windows, {v['n_resamples']} resamples)")
    return out


def _print_result(res: dict) -> None:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for one in (res.get("domains") or {"": res}).values():
        _print_one(one, f)
    for corpus, r in (res.get("kl_ratio") or {}).items():
        print(f"KL on {corpus} / KL on {res['protocol']['corpus']}: {f(r, '.2f')}")


def _print_one(res: dict, f) -> None:
    print(f"perplexity {f(res.get('perplexity'), '.3f')}  KL {f(res.get('kl'), '.4f')}  "
          f"top-1 {f(res.get('top1_agreement'), '.4f')}  ({res.get('n_scored')} tokens, "
          f"{res['protocol']['corpus']}/{res['protocol']['split']}, seqlen {res['protocol']['seqlen']}, "
          f"BOS {res['protocol']['bos']} ({res['protocol'].get('bos_policy')}: {res['protocol'].get('bos_source')}))")


# ---------------------------------------------------------------------------- specs / demo
def cmd_specs(args) -> int:
    from .config import PRESETS, parse_spec

    try:
        rows, cols = (int(x) for x in args.shape.lower().split("x"))
    except ValueError:
        raise UserError(f"--shape {args.shape!r} is not OUTxIN, e.g. 576x1536") from None
    print(f"{'preset':<14}{'bpw':>8}  description   (bpw for a {rows}x{cols} tensor, metadata included)")
    for name, desc in PRESETS.items():
        try:
            bpw = f"{parse_spec(name).bpw((rows, cols)):.4f}"
        except ValueError:
            bpw = "n/a"
        print(f"{name:<14}{bpw:>8}  {desc}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(tokens=args.tokens, bpw=args.bpw, out=args.out, bos=args.bos)
    return 0


def _check_positive(**kw) -> None:
    for k, v in kw.items():
        if v is not None and v <= 0:
            raise UserError(f"--{k} must be positive, got {v}")


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return f"{nbytes:.1f} GB"
