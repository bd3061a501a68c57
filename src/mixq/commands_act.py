"""CLI glue for activations and the KV cache: ``mixq eval --act/--kv``, ``mixq plan --memory``, ``mixq measure-kv``.

``mixq eval TARGET --act NAME``
    ``NAME`` is a W/A preset (``W8A8``, ``W4A8-g64``, ``W4A4-rot``, ``W8A8-fp8``, ``MXFP4``, ``NVFP4``: on a
    plain model its W-part quantizes the block linears with RTN first — group sizes that do not
    divide a row shrink — and ``-rot`` rotates first; on a mixq directory the weights are the
    directory's and only the A-part is used) or an activation name (``A8``, ``INT8``, ``A4``, ``FP8``,
    ``MXFP8``, ``NVFP4``...: activations only).  Order: rotate → ``--smooth`` → weights → calibrate →
    activation hooks (:func:`mixq.act.prepare_for_act_quant`).
``--act-outliers``
    ``int8[:T][:calib]`` LLM.int8() columns ``|x| ≥ T`` (default 6) kept fp; ``atom:K[:SPEC]`` the ``K``
    largest-absmax channels at ``SPEC`` (default ``W8-token``, static mode ``W8-tensor``);
    ``resq[:F]`` ResQ: the top-variance fraction ``F`` (default 1/8) of a PCA basis at 8 bits, the
    rest at the ``--act`` spec (dynamic only).
``--kv``
    ``4`` / ``KV4`` / ``KV4-kivi`` (KIVI grids, keys per channel in groups of 32 tokens, values per
    token, fp window of 32 tokens), ``4/2`` or ``K4V2`` (K and V widths), ``KV2-r0`` (no fp window),
    ``KV4-g64`` (key groups of 64), ``KV2-mikv`` (MiKV: the 20% most attended tokens of each key group
    at 8 bits; ``-mikv10`` 10%, ``-hi16`` kept fp), ``KV4-prerope`` (KVQuant: keys quantized before
    RoPE), ``KV2-rot`` / ``-rotk`` / ``-rotv`` (Hadamard rotation of K and V / K / V), or
    ``kivi:BITS[:residual=R][:group=G][:vgroup=N][:zero=int][:important=F][:hi=B][:pre_rope=1][:rotate=kv]``.
    ``--kv-plan FILE``: per-layer widths from ``mixq plan --memory``.  Chunking: the cache engine
    (default) feeds each window as a prefill of ``--kv-prefill`` tokens (default ``--kv-chunk``) then
    ``--kv-chunk`` tokens per forward (default 16; tokens of one chunk see each other in fp); the
    ``simulate`` engine gives the same numbers in one forward per window and makes ``--kv-chunk 1``
    (true token-by-token decoding) affordable.
"""
from __future__ import annotations

import copy
import json
import logging
import re
import time
from pathlib import Path

from .bos import add_bos_argument
from .calibset import DEFAULT_CALIB
from .cli import DEFAULT_MODEL, UserError, write_json_atomic

log = logging.getLogger(__name__)

KV_DEFAULT_CHUNK = 16


# ---------------------------------------------------------------------------- parsing
def parse_act_arg(name: str, mode: str):
    """``(weight spec | None, act spec, rotate, kind)`` of ``--act NAME`` (kind ``"preset"`` or ``"act"``)."""
    from .act import parse_act_spec, parse_wa_preset

    try:
        p = parse_wa_preset(name, mode)
        kind = "preset"
        weight, act, rotate = p.weight, p.act, p.rotate
    except ValueError as e1:
        try:
            weight, act, rotate, kind = None, parse_act_spec(name, mode), False, "act"
        except ValueError as e2:
            raise UserError(f"--act {name!r} is neither a W/A preset ({_line(e1)}) nor an activation spec "
                            f"({_line(e2)})") from None
    if act is None:
        raise UserError(f"--act {name!r} keeps the activations in 16 bits: give an A-part below 16 (e.g. W4A8)")
    return weight, act, rotate, kind


def parse_outliers(text: str | None, mode: str):
    """``None``, :class:`FPOutliers`, :class:`HiChannels` or ``("resq", fraction)`` from ``--act-outliers``."""
    from .act import FPOutliers, HiChannels

    if not text:
        return None
    parts = [p.strip() for p in text.split(":")]
    head = parts[0].lower()
    try:
        if head in ("int8", "llm.int8", "llmint8"):
            thr = float(parts[1]) if len(parts) > 1 and parts[1] else 6.0
            rest = parts[2:]
            if rest not in ([], ["calib"], ["batch"]):
                raise ValueError(f"unknown option {':'.join(rest)!r} (use int8[:T][:calib])")
            return FPOutliers(threshold=thr, source=rest[0] if rest else "batch")
        if head == "atom":
            if len(parts) < 2 or len(parts) > 3:
                raise ValueError("use atom:K[:SPEC], e.g. atom:32")
            spec = parts[2] if len(parts) > 2 else ("W8-token" if mode == "dynamic" else "W8-tensor")
            return HiChannels(k=int(parts[1]), spec=spec)
        if head == "resq":
            if len(parts) > 2:
                raise ValueError("use resq[:FRACTION], e.g. resq:1/8")
            frac = _fraction(parts[1]) if len(parts) > 1 else 1 / 8
            if not 0 < frac < 1:
                raise ValueError(f"the fraction must be in (0, 1), got {frac}")
            if mode != "dynamic":
                raise ValueError("ResQ uses dynamic per-token scales: drop --act-mode static")
            return ("resq", frac)
    except ValueError as e:
        raise UserError(f"--act-outliers {text!r}: {_line(e)}") from None
    raise UserError(f"--act-outliers {text!r}: use int8[:T], atom:K[:SPEC] or resq[:FRACTION]")


def parse_kv_arg(text: str):
    """``(bits, KVSettings)`` of ``--kv`` (module doc; :func:`mixq.act.presets.parse_kv_preset`)."""
    from .act.presets import parse_kv_preset

    try:
        return parse_kv_preset(text)
    except ValueError as e:
        raise UserError(f"--kv {text!r}: {_line(e)}") from None


def _fraction(s: str) -> float:
    if "/" in s:
        a, b = s.split("/", 1)
        return float(a) / float(b)
    return float(s)


def _full_attention(model) -> None:
    from .act.kvsens import _check_full_attention

    try:
        _check_full_attention(model.config)
    except NotImplementedError as e:
        raise UserError(f"KV-cache quantization: {_line(e)}") from None


def _positive(**kw) -> None:
    for k, v in kw.items():
        if v is not None and v <= 0:
            raise UserError(f"--{k.replace('_', '-')} must be positive, got {v}")


def _line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def quantize_spec(args):
    """The weight spec of ``mixq quantize --spec`` (a spec name, or a W/A preset's W-part; ``-rot`` sets --rotate)."""
    from .act import parse_wa_preset
    from .config import parse_spec

    name = args.spec or "W4-g64"
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
    log.warning("--spec %s: quantizing the weights with %s; apply the activations at evaluation (mixq eval DIR --act %s)",
                name, p.weight.name, name)
    return p.weight


# ---------------------------------------------------------------------------- mixq eval --act / --kv
def eval_args(e) -> None:
    g = e.add_argument_group("activations and KV cache")
    g.add_argument("--act", default=None, help="activation quantization: a W/A preset (W8A8, W4A8-g64, W4A4-rot, "
                                               "W8A8-fp8, MXFP4, NVFP4) or an activation spec (A8, INT8, A4, FP8, MXFP8)")
    g.add_argument("--act-mode", default="dynamic", choices=["dynamic", "static"],
                   help="dynamic per-token scales (default) or static scales calibrated on --calib")
    g.add_argument("--act-outliers", default=None, help="int8[:T] (LLM.int8() fp columns, T=6), atom:K[:SPEC] "
                                                        "(K channels at 8 bits) or resq[:FRACTION] (ResQ subspace)")
    g.add_argument("--act-layers", default=None, help="regex of the block linears whose inputs are quantized (default all)")
    g.add_argument("--smooth", type=float, default=None, help="SmoothQuant migration strength alpha (e.g. 0.5) before "
                                                              "the weights are quantized (plain models only)")
    kv = g.add_mutually_exclusive_group()
    kv.add_argument("--kv", default=None, help="quantized KV cache: 4, 4/2, KV4, KV2-kivi, KV4-r0 (no fp window), "
                                               "KV2-mikv (20%% of tokens at 8 bits), KV4-prerope, KV2-rot, "
                                               "kivi:2:residual=32:group=32")
    kv.add_argument("--kv-plan", default=None, help="per-layer K/V widths from `mixq plan --memory` (kv-plan-*.json)")
    g.add_argument("--kv-engine", default="cache", choices=["cache", "simulate"],
                   help="cache: the real KIVI cache, chunk by chunk (default); simulate: the same decode in one "
                        "forward per window (fast, any --kv-chunk)")
    g.add_argument("--kv-chunk", type=int, default=KV_DEFAULT_CHUNK,
                   help=f"tokens per decode step after the prefill (default {KV_DEFAULT_CHUNK}; 1 = token by token)")
    g.add_argument("--kv-prefill", type=int, default=None, help="tokens of the first forward (default --kv-chunk)")
    g.add_argument("--kv-batch", type=int, default=8, help="windows decoded side by side (default 8)")
    g.add_argument("--calib", default=DEFAULT_CALIB, help="calibration text for static scales, calibrated outliers, "
                                                  f"SmoothQuant and ResQ (default {DEFAULT_CALIB}; see quantize --calib)")
    g.add_argument("--nsamples", type=int, default=32, help="calibration samples (default 32)")
    g.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration sample (default 512)")
    g.add_argument("--seed", type=int, default=0, help="seed of the calibration sampler and of rotations")


def wants_act_or_kv(args) -> bool:
    return any(getattr(args, k, None) is not None for k in ("act", "kv", "kv_plan", "smooth", "act_outliers"))


def _dir_info(target: str) -> dict | None:
    from .export.native import is_quantized_dir

    if not is_quantized_dir(target):
        return None
    try:
        return json.loads((Path(target) / "mixq.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{target}/mixq.json cannot be read: {e}") from None


def cmd_eval_act(args) -> int:
    from . import commands
    from .act import apply_act_quant, prepare_for_act_quant

    # ---- validate everything before loading anything
    _positive(tokens=args.tokens, seqlen=args.seqlen, kv_chunk=args.kv_chunk, kv_prefill=args.kv_prefill,
              kv_batch=args.kv_batch, nsamples=args.nsamples, calib_seqlen=args.calib_seqlen)
    if args.out and Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a directory: give a file name such as results.json")
    if args.out and Path(args.out).exists() and not args.force:
        raise FileExistsError(f"{args.out} already exists: choose another --out or pass --force")
    act = parse_act_arg(args.act, args.act_mode) if args.act else None
    outliers = parse_outliers(args.act_outliers, args.act_mode)
    if act is None and (outliers is not None or args.smooth is not None or args.act_layers):
        raise UserError("--act-outliers, --smooth and --act-layers need --act (e.g. --act W8A8)")
    if args.smooth is not None and not 0 < args.smooth <= 1:
        raise UserError(f"--smooth must be in (0, 1], got {args.smooth}")
    if args.act_layers:
        try:
            re.compile(args.act_layers)
        except re.error as e:
            raise UserError(f"--act-layers {args.act_layers!r}: {e}") from None
    kv_bits = settings = None
    kv_doc = None
    if args.kv is not None:
        kv_bits, settings = parse_kv_arg(args.kv)
    elif args.kv_plan is not None:
        from .act.joint import load_kv_plan

        kv_bits, settings, kv_doc = load_kv_plan(args.kv_plan)
    info = _dir_info(args.target)
    weight, act_spec, rotate, kind = act if act else (None, None, False, None)
    if info is not None:
        if args.smooth is not None:
            raise UserError("--smooth migrates scales into the weights before they are quantized: evaluate the base "
                            f"model instead (mixq eval {info.get('base_model', 'MODEL')} --act ... --smooth ...)")
        if rotate and not info.get("rotate"):
            raise UserError(f"--act {args.act} rotates before the weights are quantized, but {args.target} was "
                            "quantized without --rotate: quantize with --rotate, or evaluate the base model")
        rotate, weight = False, None  # the directory's weights (already rotated if it was quantized so)
    batch_outliers = getattr(outliers, "source", None) == "batch"  # LLM.int8() columns chosen per forward
    needs_calib = act is not None and (args.act_mode == "static" or args.smooth is not None
                                       or (outliers is not None and not batch_outliers))
    if needs_calib:
        from .calibset import parse_sources

        parse_sources(args.calib)

    # ---- load, prepare, quantize
    model, tok, info = commands.load_target(args.target)
    if tok is None:
        raise UserError(f"{args.target} has no tokenizer files: re-quantize it with this mixq version")
    if kv_bits is not None:
        from .act.kvcache import kv_dims, resolve_kv_bits

        _full_attention(model)
        resolve_kv_bits(kv_bits, kv_dims(model.config)[0])
    ref_name = args.reference or (info or {}).get("base_model")
    if ref_name:
        reference, _, _ = commands.load_target(ref_name)
    else:
        reference, ref_name = copy.deepcopy(model), f"{args.target} (fp, before --act/--kv)"
    calib_ids = calib_record = None
    if needs_calib:
        from .bos import resolve_bos
        from .calibset import build_calibration

        # self-generated rows come from the reference (full-precision) model
        calib = build_calibration(reference, tok, args.calib, args.nsamples, args.calib_seqlen, args.seed,
                                  bos_id=resolve_bos(tok, model, args.bos).bos_id, progress=False)
        calib_ids, calib_record = calib.ids, calib.record()
    t0 = time.perf_counter()
    act_info: dict | None = None
    if act is not None:
        from . import api

        if rotate or args.smooth is not None:
            prepare_for_act_quant(model, rotate=rotate, smooth_alpha=args.smooth, calib_ids=calib_ids, seed=args.seed)
        wspecs = None
        if weight is not None:
            wspecs = api.resolve_specs(model, weight, group_fallback="shrink")
            api.quantize_model(model, wspecs, method="rtn", progress=False)
        if isinstance(outliers, tuple):
            from .act.resq import apply_resq

            apply_resq(model, calib_ids, layers=args.act_layers,
                       fraction=outliers[1], hi="A8", lo=act_spec, seed=args.seed, fold=False)
        else:
            from .act import FPOutliers, HiChannels

            apply_act_quant(model, act_spec, mode=args.act_mode, layers=args.act_layers, calib_ids=calib_ids,
                            fp_outliers=outliers if isinstance(outliers, FPOutliers) else None,
                            hi_channels=outliers if isinstance(outliers, HiChannels) else None)
        act_info = {"name": args.act, "kind": kind, "act_spec": act_spec.name, "mode": args.act_mode,
                    "weights": (sorted({s.name for s in wspecs.values()}) if wspecs else
                                (info or {}).get("spec") if info else "fp"),
                    "rotate": bool(rotate), "smooth": args.smooth, "outliers": args.act_outliers,
                    "layers": args.act_layers,
                    "calibration": calib_record}
    results = {}
    for corpus, win, proto in commands.eval_windows_for(args, tok, model):
        if kv_bits is not None:
            from .act import kv_cache_bytes
            from .act.kvsens import kv_compare

            res = kv_compare(model, win, kv_bits, reference, settings=settings, engine=args.kv_engine,
                             chunk=args.kv_chunk, prefill=args.kv_prefill, batch_size=args.kv_batch, progress=False)
            res["kv"]["bytes_at_seqlen"] = kv_cache_bytes(model.config, kv_bits, args.seqlen, 1, **settings.kw())
            if kv_doc is not None:
                res["kv"]["plan"] = args.kv_plan
            res["protocol"] = proto.to_dict()
        else:
            from .eval import evaluate

            res = evaluate(model, win, proto, reference=reference, progress=False)
        results[corpus] = res
    from .eval.domains import combine

    res = combine(results)
    res.update(target=args.target, reference=ref_name, act=act_info)
    res["seconds_total"] = time.perf_counter() - t0
    if info:
        res["size"], res["spec"] = info.get("size"), info.get("spec")
        res["calibration"] = info.get("calibration")
    if args.out:
        write_json_atomic(args.out, res, overwrite=True)
    commands._print_result(res)
    if act_info:
        print(f"activations: {act_info['act_spec']} ({act_info['mode']}), weights {act_info['weights']}"
              f"{', rotated' if act_info['rotate'] else ''}"
              f"{', SmoothQuant alpha ' + str(args.smooth) if args.smooth is not None else ''}"
              f"{', outliers ' + args.act_outliers if args.act_outliers else ''}")
    if kv_bits is not None:
        kv = res["kv"]
        widths = sorted({tuple(b) for b in kv["bits"]})
        desc = "K/V " + ", ".join(f"{k}/{v}" for k, v in widths) if len(widths) <= 3 else f"{len(widths)} K/V width pairs"
        print(f"KV cache: KIVI {desc}, key groups {kv['k_group']}, fp window {kv['residual']}, engine {kv['engine']}, "
              f"prefill {kv['prefill']} then {kv['chunk']} tokens per forward"
              f"{'; ' + settings.describe() if settings.describe() else ''}; "
              f"{kv['bytes_at_seqlen'] / 1024:.1f} KiB per sequence of {args.seqlen}")
    return 0


# ---------------------------------------------------------------------------- mixq measure-kv
def register(sub) -> None:
    m = sub.add_parser("measure-kv", help="measure every layer's K and V sensitivity to KV-cache bits (KIVI)",
                       description="For each attention layer and each of K and V, quantize only that tensor's cache "
                                   "at each width and record the KL to the fp model (nats per token) on calibration "
                                   "windows.  Resumes from OUT.partial.")
    m.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id, local path or embedded name (default {DEFAULT_MODEL})")
    m.add_argument("--calib", default=DEFAULT_CALIB, help=f"calibration text (default {DEFAULT_CALIB}; see quantize --calib)")
    m.add_argument("--nsamples", type=int, default=2, help="calibration windows (default 2)")
    m.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    m.add_argument("--seed", type=int, default=0, help="seed of the calibration sampler")
    add_bos_argument(m)
    m.add_argument("--bits", default="2,3,4,8", help="KV widths to measure (default 2,3,4,8; 16 is always free)")
    m.add_argument("--metric", default="kl", choices=["kl", "loss"], help="kl (default) or loss increase")
    m.add_argument("--engine", default="simulate", choices=["simulate", "cache"],
                   help="simulate (one forward per candidate, default) or the real cache chunk by chunk")
    m.add_argument("--chunk", type=int, default=1, help="decode tokens per forward the errors assume (default 1)")
    m.add_argument("--prefill", type=int, default=None, help="prefill tokens (default --chunk)")
    m.add_argument("--residual", type=int, default=32, help="fp window of recent tokens (default 32)")
    m.add_argument("--k-group", type=int, default=32, help="tokens per key group (default 32)")
    m.add_argument("--v-group", type=int, default=None, help="channels per value group (default head_dim)")
    m.add_argument("--zero", default="fp16", choices=["fp16", "int"], help="fp16 offset (KIVI) or int zero point")
    m.add_argument("--important", type=float, default=0.0, help="MiKV: fraction of each key group's tokens (the "
                                                                "most attended) kept at --important-bits (default 0: off)")
    m.add_argument("--important-bits", type=int, default=8, help="bits of the important tokens (default 8; 16 = fp)")
    m.add_argument("--pre-rope", action="store_true", help="quantize keys before the rotary embedding (KVQuant)")
    m.add_argument("--rotate", default="", choices=["", "k", "v", "kv"], help="Hadamard-rotate K, V or both first")
    m.add_argument("--batch-size", type=int, default=2, help="calibration windows per forward (default 2)")
    m.add_argument("--out", required=True, help="KV measurement JSON to write")
    m.add_argument("--force", action="store_true", help="replace --out if it exists")
    m.set_defaults(func=cmd_measure_kv)


def cmd_measure_kv(args) -> int:
    from . import commands
    from .act.kvsens import KVSettings, measure_kv
    from .bos import resolve_bos
    from .calibset import build_calibration, parse_sources
    from .models import load_model

    out = Path(args.out)
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} already exists: choose another --out or pass --force")
    _positive(nsamples=args.nsamples, chunk=args.chunk, prefill=args.prefill, batch_size=args.batch_size)
    if args.seqlen < 2:
        raise UserError(f"--seqlen must be at least 2, got {args.seqlen}")
    try:
        bits = [int(b) for b in args.bits.split(",") if b.strip()]
    except ValueError:
        raise UserError(f"--bits {args.bits!r}: expected comma-separated integers, e.g. 2,3,4,8") from None
    try:
        settings = KVSettings(k_group=args.k_group, v_group=args.v_group, residual=args.residual, zero=args.zero,
                              important=args.important, important_bits=args.important_bits, pre_rope=args.pre_rope,
                              rotate=args.rotate)
    except ValueError as e:
        raise UserError(f"measure-kv: {_line(e)}") from None
    parse_sources(args.calib)
    model, tok = load_model(args.model)
    _full_attention(model)
    cset = build_calibration(model, tok, args.calib, args.nsamples, args.seqlen, args.seed,
                             bos_id=resolve_bos(tok, model, args.bos).bos_id, progress=False)
    calib = cset.ids
    t0 = time.perf_counter()
    table = measure_kv(model, calib, bits=bits, metric=args.metric, settings=settings, engine=args.engine,
                       chunk=args.chunk, prefill=args.prefill, batch_size=args.batch_size, out=out,
                       progress=args.verbose > 0)
    table.meta.update(model_name=args.model, calib=cset.record())
    table.save(out, overwrite=True)
    print(table.format())
    print(f"wrote {out}: {table.n_layers} layers × K/V × {len(table.bits) - 1} widths ({table.metric}, nats/token, "
          f"engine {args.engine}, chunk {args.chunk}), {time.perf_counter() - t0:.1f} s")
    return 0


# ---------------------------------------------------------------------------- mixq plan --memory
def plan_args(p) -> None:
    g = p.add_argument_group("joint weights + KV cache budget")
    g.add_argument("--memory", default=None, help="budget(s) for the block linears + KV cache together, e.g. 120MB,100MB")
    g.add_argument("--kv-measurement", default=None, help="a KV measurement from `mixq measure-kv` (needed by --memory)")
    g.add_argument("--context", type=int, default=2048, help="tokens per sequence the KV cache holds (default 2048)")
    g.add_argument("--batch", type=int, default=1, help="sequences held at once (default 1)")
    g.add_argument("--kv-bits", default=None, help="KV widths allowed (default: every measured one, 16 included)")
    g.add_argument("--kv-tied", action="store_true", help="K and V of a layer take the same width")
    g.add_argument("--kv-uniform", default=None, help="baseline instead of the joint solve: the KV cache uniform at "
                                                     "these bits (e.g. 4 or 4/2), the weights get the rest")


def cmd_plan_joint(args) -> int:
    from .act.joint import allocate_joint, allocate_separately
    from .act.kvsens import KVSensitivityTable
    from .allocate import SensitivityTable
    from .commands_alloc import _parse_bytes, constraints_from

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
            budgets.append(_parse_bytes(tok.strip()))
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
                                       constraints=constraints, method=args.solver)
        else:
            plan = allocate_joint(table, kv_table, mem, args.context, args.batch, constraints=constraints,
                                  kv_bits=allowed, kv_tied=args.kv_tied, method=args.solver)
        plans.append((mem, plan))
    for mem, plan in plans:
        print(plan.format())
        if args.dry_run:
            from .allocate import format_plan_table

            print()
            print(format_plan_table(plan.weights))
        print()
    if not args.dry_run:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for mem, plan in plans:
            tag = f"{mem}B-ctx{args.context}-b{args.batch}"
            wp, kp = out / f"plan-{tag}.json", out / f"kv-plan-{tag}.json"
            for p in (wp, kp):
                if p.exists() and not args.force:
                    raise FileExistsError(f"{p} already exists: choose another --out or pass --force")
            plan.weights.save(wp, overwrite=args.force)
            write_json_atomic(kp, plan.kv_plan_dict(), overwrite=args.force)
            print(f"wrote {wp} (mixq quantize --plan) and {kp} (mixq eval --kv-plan)")
    return 0
