"""The activation and KV-cache path of ``mixq eval`` (``--act``, ``--kv``, ``--kv-plan``, ``--smooth``, ``--act-outliers``);
:mod:`.eval` dispatches here and prints what :func:`run` returns.

``mixq eval TARGET --act NAME``
    ``NAME`` is a W/A preset (``W8A8``, ``W4A8-g64``, ``W4A4-rot``, ``W8A8-fp8``, ``MXFP4``, ``NVFP4``: on a
    plain model its W-part quantizes the block linears with RTN first — group sizes that do not
    divide a row shrink — and ``-rot`` rotates first; on a mixq directory the weights are the
    directory's and only the A-part is used) or an activation name (``A8``, ``INT8``, ``A4``, ``FP8``,
    ``MXFP8``, ``NVFP4``...: activations only).  Order: rotate → ``--smooth`` → weights → calibrate →
    activation hooks (:func:`mixq.runtime.act_outliers.prepare_for_act_quant`).
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
    ``--kv-plan FILE``: per-layer widths of a plan from ``mixq plan --memory`` (a directory quantized with
    ``--plan`` of such a plan records them, and they apply without a flag).  Chunking: the cache engine
    (default) feeds each window as a prefill of ``--kv-prefill`` tokens (default ``--kv-chunk``) then
    ``--kv-chunk`` tokens per forward (default 16; tokens of one chunk see each other in fp); the
    ``simulate`` engine gives the same numbers in one forward per window and makes ``--kv-chunk 1``
    (true token-by-token decoding) affordable.
"""
from __future__ import annotations

import copy
import json
import re
import time
from pathlib import Path

from ..formats.act import MODES
from ..runtime.kv_sim import KV_ENGINES
from ..targets import load_target
from .common import (UserError, calib_args, check_full_attention, check_out_file, check_positive, eval_windows_for,
                     one_line, parse_kv_arg)

KV_DEFAULT_CHUNK = 16


# ---------------------------------------------------------------------------- parsing
def parse_act_arg(name: str, mode: str):
    """``(weight spec | None, act spec, rotate, kind)`` of ``--act NAME`` (kind ``"preset"`` or ``"act"``)."""
    from ..formats.act import parse_act_spec, parse_wa_preset

    try:
        p = parse_wa_preset(name, mode)
        kind = "preset"
        weight, act, rotate = p.weight, p.act, p.rotate
    except ValueError as e1:
        try:
            weight, act, rotate, kind = None, parse_act_spec(name, mode), False, "act"
        except ValueError as e2:
            raise UserError(f"--act {name!r} is neither a W/A preset ({one_line(e1)}) nor an activation spec "
                            f"({one_line(e2)})") from None
    if act is None:
        raise UserError(f"--act {name!r} keeps the activations in 16 bits: give an A-part below 16 (e.g. W4A8)")
    return weight, act, rotate, kind


def parse_outliers(text: str | None, mode: str):
    """``None``, :class:`FPOutliers`, :class:`HiChannels` or ``("resq", fraction)`` from ``--act-outliers``."""
    from ..runtime.act_outliers import FPOutliers, HiChannels

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
        raise UserError(f"--act-outliers {text!r}: {one_line(e)}") from None
    raise UserError(f"--act-outliers {text!r}: use int8[:T], atom:K[:SPEC] or resq[:FRACTION]")


def _fraction(s: str) -> float:
    if "/" in s:
        a, b = s.split("/", 1)
        return float(a) / float(b)
    return float(s)


def add_arguments(e) -> None:
    g = e.add_argument_group("activations and KV cache")
    g.add_argument("--act", default=None, help="activation quantization: a W/A preset (W8A8, W4A8-g64, W4A4-rot, "
                                               "W8A8-fp8, MXFP4, NVFP4) or an activation spec (A8, INT8, A4, FP8, MXFP8)")
    g.add_argument("--act-mode", default="dynamic", choices=MODES,
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
    kv.add_argument("--kv-plan", default=None, help="per-layer K/V widths of a plan from `mixq plan --memory` (a "
                                                    "directory quantized from such a plan applies its own)")
    g.add_argument("--kv-engine", default="cache", choices=KV_ENGINES,
                   help="cache: the real KIVI cache, chunk by chunk (default); simulate: the same decode in one "
                        "forward per window (fast, any --kv-chunk)")
    g.add_argument("--kv-chunk", type=int, default=KV_DEFAULT_CHUNK,
                   help=f"tokens per decode step after the prefill (default {KV_DEFAULT_CHUNK}; 1 = token by token)")
    g.add_argument("--kv-prefill", type=int, default=None, help="tokens of the first forward (default --kv-chunk)")
    g.add_argument("--kv-batch", type=int, default=8, help="windows decoded side by side (default 8)")
    calib_args(g, nsamples=32, seqlen="--calib-seqlen", bos=False,
               what="calibration text for static scales, calibrated outliers, SmoothQuant and ResQ",
               seed="seed of the calibration sampler and of rotations")


def wanted(args) -> bool:
    """Whether ``mixq eval`` takes this path (any of --act, --kv, --kv-plan, --smooth, --act-outliers)."""
    return any(getattr(args, k, None) is not None for k in ("act", "kv", "kv_plan", "kv_plan_doc", "smooth",
                                                             "act_outliers"))


def recorded(args) -> list[str]:
    """What a quantized directory records for its activations and KV cache, applied where the command line gives
    none: the activation part of a W/A preset (``quantize --spec W8A8``; sets ``args.act``) and the KV widths of a
    joint plan (``quantize --plan`` of ``mixq plan --memory``; sets ``args.kv_plan_doc``).  Returns one line per
    part applied."""
    info = _dir_info(args.target) or {}
    lines = []
    if getattr(args, "act", None) is None and info.get("activations"):
        args.act = info["activations"]
        lines.append(f"activations: {args.act}, as recorded in {args.target} (--act overrides)")
    if getattr(args, "kv", None) is None and getattr(args, "kv_plan", None) is None and info.get("kv_plan"):
        args.kv_plan_doc = info["kv_plan"]
        lines.append(f"KV cache: the joint plan's widths, as recorded in {args.target} (--kv / --kv-plan override)")
    return lines


def _dir_info(target: str) -> dict | None:
    from ..export.native import is_quantized_dir

    if not is_quantized_dir(target):
        return None
    try:
        return json.loads((Path(target) / "mixq.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{target}/mixq.json cannot be read: {e}") from None


def run(args) -> tuple[dict, list[str]]:
    """``mixq eval --act/--kv``: the results document and the lines that describe the activations and the cache."""
    from ..runtime.act_quant import apply_act_quant
    from ..runtime.act_outliers import prepare_for_act_quant

    # ---- validate everything before loading anything
    check_positive(tokens=args.tokens, seqlen=args.seqlen, kv_chunk=args.kv_chunk, kv_prefill=args.kv_prefill,
                   kv_batch=args.kv_batch, nsamples=args.nsamples, calib_seqlen=args.calib_seqlen)
    check_out_file(args.out, args.force)
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
    elif args.kv_plan is not None or getattr(args, "kv_plan_doc", None) is not None:
        from ..allocate.joint import load_kv_plan

        kv_bits, settings, kv_doc = load_kv_plan(args.kv_plan if args.kv_plan is not None else args.kv_plan_doc)
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
        from ..calibset import parse_sources

        parse_sources(args.calib)

    # ---- load, prepare, quantize
    model, tok, info = load_target(args.target)
    if tok is None:
        raise UserError(f"{args.target} has no tokenizer files: re-quantize it with this mixq version")
    if kv_bits is not None:
        from ..runtime.kv_cost import kv_dims, resolve_kv_bits

        check_full_attention(model)
        resolve_kv_bits(kv_bits, kv_dims(model.config)[0])
    ref_name = args.reference or (info or {}).get("base_model")
    if ref_name:
        reference, _, _ = load_target(ref_name)
    else:
        reference, ref_name = copy.deepcopy(model), f"{args.target} (fp, before --act/--kv)"
    calib_ids = calib_record = None
    if needs_calib:
        from ..bos import resolve_bos
        from ..calibset import build_calibration

        # self-generated rows come from the reference (full-precision) model
        calib = build_calibration(reference, tok, args.calib, args.nsamples, args.calib_seqlen, args.seed,
                                  bos_id=resolve_bos(tok, model, args.bos).bos_id, progress=False)
        calib_ids, calib_record = calib.ids, calib.record()
    t0 = time.perf_counter()
    act_info: dict | None = None
    if act is not None:
        from .. import api

        if rotate or args.smooth is not None:
            prepare_for_act_quant(model, rotate=rotate, smooth_alpha=args.smooth, calib_ids=calib_ids, seed=args.seed)
        wspecs = None
        if weight is not None:
            wspecs = api.resolve_specs(model, weight, group_fallback="shrink")
            api.quantize_model(model, wspecs, method="rtn", progress=False)
        if isinstance(outliers, tuple):
            from ..algorithms.resq import apply_resq

            apply_resq(model, calib_ids, layers=args.act_layers,
                       fraction=outliers[1], hi="A8", lo=act_spec, seed=args.seed, fold=False)
        else:
            from ..runtime.act_outliers import FPOutliers, HiChannels

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
    for corpus, win, proto in eval_windows_for(args, tok, model):
        if kv_bits is not None:
            from ..runtime.kv_cost import kv_cache_bytes
            from ..eval.kv import kv_compare

            res = kv_compare(model, win, kv_bits, reference, settings=settings, engine=args.kv_engine,
                             chunk=args.kv_chunk, prefill=args.kv_prefill, batch_size=args.kv_batch, progress=False)
            res["kv"]["bytes_at_seqlen"] = kv_cache_bytes(model.config, kv_bits, args.seqlen, 1, **settings.kw())
            if kv_doc is not None:
                res["kv"]["plan"] = args.kv_plan if args.kv_plan is not None else f"recorded in {args.target}"
            res["protocol"] = proto.to_dict()
        else:
            from ..eval import evaluate

            res = evaluate(model, win, proto, reference=reference, progress=False)
        results[corpus] = res
    from ..eval.domains import combine

    res = combine(results)
    res.update(target=args.target, reference=ref_name, act=act_info)
    res["seconds_total"] = time.perf_counter() - t0
    if info:
        res["size"], res["spec"] = info.get("size"), info.get("spec")
        res["calibration"] = info.get("calibration")
    notes = []
    if act_info:
        notes.append(f"activations: {act_info['act_spec']} ({act_info['mode']}), weights {act_info['weights']}"
                     f"{', rotated' if act_info['rotate'] else ''}"
                     f"{', SmoothQuant alpha ' + str(args.smooth) if args.smooth is not None else ''}"
                     f"{', outliers ' + args.act_outliers if args.act_outliers else ''}")
    if kv_bits is not None:
        kv = res["kv"]
        widths = sorted({tuple(b) for b in kv["bits"]})
        desc = "K/V " + ", ".join(f"{k}/{v}" for k, v in widths) if len(widths) <= 3 else f"{len(widths)} K/V width pairs"
        notes.append(f"KV cache: KIVI {desc}, key groups {kv['k_group']}, fp window {kv['residual']}, engine "
                     f"{kv['engine']}, prefill {kv['prefill']} then {kv['chunk']} tokens per forward"
                     f"{'; ' + settings.describe() if settings.describe() else ''}; "
                     f"{kv['bytes_at_seqlen'] / 1024:.1f} KiB per sequence of {args.seqlen}")
    return res, notes
