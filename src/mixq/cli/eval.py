"""``mixq eval``: perplexity, KL to a reference and top-1 agreement of a mixq directory or a model, on one
or several domains; with ``--act``/``--kv`` the activation and KV-cache path of :mod:`.eval_act`."""
from __future__ import annotations

import contextlib
import logging

from ..jsonio import write_json_atomic
from ..models import DEFAULT_MODEL
from ..targets import load_target
from . import eval_act
from .common import UserError, check_out_file, check_positive, eval_args, eval_windows_for

log = logging.getLogger(__name__)


def register(sub) -> None:
    e = sub.add_parser("eval", help="perplexity, KL and top-1 agreement of a model or mixq directory",
                       description="Evaluate a mixq directory (or any model) on a corpus; KL is measured against "
                                   "the reference (by default the directory's base model).")
    e.add_argument("target", nargs="?", default=DEFAULT_MODEL, help="mixq directory, hub id, local directory or .gguf file, or embedded name")
    eval_args(e)
    eval_act.add_arguments(e)
    e.add_argument("--reference", default=None, help="reference model for KL (default: the base model of a mixq dir; none for a plain model)")
    e.add_argument("--ci", action="store_true", help="add 95%% bootstrap intervals over windows (mixq.eval.stats; one "
                                                     "more pass of the model) and check calibration/evaluation overlap")
    e.add_argument("--runtime", choices=("mixq", "llamacpp"), default="mixq",
                   help="llamacpp: each linear layer's input rounded as llama.cpp's CPU dot product for the layer's "
                        "ggml type rounds it (q8_0 / q8_K / fp16; mixq.export.ggml_actsim), so a --target gguf "
                        "directory scores what its GGUF scores in llama.cpp")
    e.add_argument("--out", default=None, help="write the results JSON here")
    e.add_argument("--force", action="store_true", help="replace --out if it exists")
    e.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from ..eval import evaluate
    from ..eval.domains import combine

    recorded = eval_act.recorded(args)
    if eval_act.wanted(args):
        if args.runtime != "mixq":
            raise UserError("--runtime llamacpp rounds activations as llama.cpp does; it does not combine with "
                            "--act / --kv, which set their own")
        res, notes = eval_act.run(args)
        if args.out:
            write_json_atomic(args.out, res, overwrite=True)
        _print_result(res)
        for line in recorded + notes:
            print(line)
        return 0
    check_positive(tokens=args.tokens, seqlen=args.seqlen)
    check_out_file(args.out, args.force)
    model, tok, info = load_target(args.target)
    ref_name = args.reference or (info or {}).get("base_model")
    reference = None
    if ref_name:
        reference, _, _ = load_target(ref_name)
    if tok is None:
        raise UserError(f"{args.target} has no tokenizer files: re-quantize it with this mixq version")
    runtime = _runtime(args, model, info)
    results = {}
    for corpus, win, proto in eval_windows_for(args, tok, model):
        ref = reference
        if args.ci and ref is not None:
            from ..eval import ReferenceCache

            ref = ReferenceCache(ref, win)  # the reference runs once for both passes
        with runtime():
            results[corpus] = evaluate(model, win, proto, reference=ref)
            results[corpus]["protocol"]["runtime"] = args.runtime
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


def _runtime(args, model, info):
    """A context (no arguments) under which ``model`` computes as ``--runtime`` does."""
    if args.runtime == "mixq":
        return contextlib.nullcontext
    from ..export.ggml_actsim import simulate, types_of_directory

    if not info:
        raise UserError(f"--runtime llamacpp evaluates a mixq directory quantized with --target gguf; {args.target} "
                        "is a plain model")
    try:
        types = types_of_directory(model, info)
    except ValueError as e:
        raise UserError(str(e)) from None
    return lambda: simulate(model, types)


def _intervals(model, win, reference, info, tok) -> dict:
    """``--ci``: bootstrap intervals over windows, and the calibration/evaluation overlap warning."""
    from ..calibset import corpus_rows
    from ..eval.stats import confidence_intervals, evaluate_windows, overlap_warning

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
          f"BOS {res['protocol']['bos']} ({res['protocol'].get('bos_policy')}: {res['protocol'].get('bos_source')})"
          + (f", runtime {rt}" if (rt := res['protocol'].get('runtime')) not in (None, "mixq") else "") + ")")
