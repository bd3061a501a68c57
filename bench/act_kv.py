"""Activations and the KV cache on SmolLM2-135M / PTB test: W·A presets and outlier handling, KIVI KV widths,
mixed per-layer KV widths, and one memory budget for weights + KV cache vs a fixed split.

    OMP_NUM_THREADS=2 python bench/act_kv.py [--tokens 4096] [--sections wa,kv,kvmix,joint]

Sections (rows are saved to bench/results/act_kv.partial.json as they finish; a rerun skips them):

``wa``     weights RTN (W8-channel or W4-g64, as the preset says) + simulated activation quantization:
           W8A8 naive dynamic/static, SmoothQuant (α = 0.5) dynamic/static, LLM.int8()-style fp columns
           (τ = 6); W4A16, W4A8 ± QuaRot rotation, W4A4 ± rotation ± Atom (32 channels at 8 bits),
           W4A4 with ResQ (1/8 PCA subspace at 8 bits).  Calibration: 8 × 512 PTB-train tokens.
``kv``     fp weights, KIVI cache at 8/4/3/2 bits (keys per channel in groups of 32 tokens, values per
           token, fp16 scale + offset), with the 32-token fp window and without it (R = 0: values all
           quantized; keys still wait for a full group of 32), decoded token by token (the exact
           one-forward simulation, ``chunk = 1``); plus a cross-check of the simulation against the
           real cache at ``chunk = 16``.  Options on top of KIVI (R = 32, same decoding): token-level
           mixed precision (MiKV/ZipCache: the 20 % / 15 % / 10 % most attended tokens of each key group
           at 8 bits, or 10 % kept fp16, over 2-bit; 15 % costs what KV3 costs, ≈ 4.5 bits per element
           at 512 tokens — the table lists every row's bits per element),
           pre-RoPE keys (KVQuant) at 3 and 2 bits vs the post-RoPE rows, a Hadamard rotation of K+V
           or V only at 3 and 2 bits, and MiKV cross-checked against the real cache (eager attention).
``kvmix``  per-layer K/V widths from the measured KV sensitivity (KL, 1 × 512 PTB-train tokens,
           cached in bench/cache/) at the bytes of uniform 2, 2.5 (between 2 and 3), 3 and 4 bits.
``joint``  weights (kfac table, RTN) + KV cache under one memory budget at context 2048, batch 4,
           solved as one knapsack, vs a fixed split (uniform KV 2/4/8 bits, the weights get the rest), at
           the memory of "W4-g64 + KV4" and of "W3-g64-asym + KV3".  Quality is measured on the
           PTB windows (512 tokens) with the planned weights and per-layer KV widths.

Expected runtime on 2 cores (Xeon, torch CPU, fp32), estimated from a 512-token forward of a model of
SmolLM2's shape (≈ 1.3 s on one busy core) — not measured on the real model: about 15–20 minutes from
scratch.  Set-up + fp reference ≈ 1 min; ``wa`` 13 rows ≈ 6 min (≈ 20 s each; calibration passes for
static/SmoothQuant/Atom ≈ 12 s each; ResQ ≈ 1.5 min: Hessians, 120 eigendecompositions, extra
projections); ``kv`` 23 rows ≈ 6 min; KV sensitivity ≈ 4.5 min (240 forwards of 512 tokens with the
earlier blocks replayed, float64 KL) + ``kvmix`` 4 rows ≈ 1 min; kfac weight table (8 candidates, 8 × 512
calibration, 8 gradient samples) ≈ 2 min + ``joint`` ≤ 8 rows ≈ 2.5 min.  ``--sections`` runs a subset;
reruns reuse bench/cache/ and the partial results (per row).

Writes bench/results/act_kv.{md,json}.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

from common import RESULTS, Setup, header, peak_rss_mb

import mixq
from mixq.algorithms.resq import apply_resq
from mixq.allocate import SensitivityTable
from mixq.allocate.joint import InfeasibleMemory, allocate_joint, allocate_kv, allocate_separately, uniform_kv
from mixq.allocate.kv_table import KVSensitivityTable
from mixq.config import parse_spec
from mixq.eval.kv import kv_compare
from mixq.formats.act import parse_wa_preset
from mixq.jsonio import write_json_atomic
from mixq.measure.kv import measure_kv  # KV sensitivity and the joint weight+KV plans: no stage (weights only)
from mixq.runtime.act_outliers import FPOutliers, HiChannels, prepare_for_act_quant
from mixq.runtime.act_quant import apply_act_quant
from mixq.runtime.kv_cost import kv_cache_bytes, kv_dims
from mixq.runtime.kv_settings import KVSettings

CACHE = Path(__file__).parent / "cache"
SECTIONS = ("wa", "kv", "kvmix", "joint")
JOINT_CANDIDATES = ("W2-g64-asym", "W3-g64-asym", "W4-g64", "W5-g64", "W6-g64", "W8-channel", "NF4-g64", "FP16")
CTX, BATCH = 2048, 4  # the joint budget's cache: 4 sequences of 2048 tokens
EVAL_CHUNK = 1        # KV rows decode token by token (exact simulation)
ATOM_K = 32

KV_OPTION_ROWS = [  # (label, bits, settings): options on top of KIVI (fp window 32, key groups of 32)
    ("KV2 MiKV 20%@8", 2, KVSettings(important=0.2)),
    ("KV2 MiKV 15%@8", 2, KVSettings(important=0.15)),  # 5/32 tokens: ≈ the bits of KV3 (4.51 vs 4.52 per element)
    ("KV2 MiKV 10%@8", 2, KVSettings(important=0.1)),
    ("KV2 MiKV 10%@16", 2, KVSettings(important=0.1, important_bits=16)),
    ("KV3 pre-RoPE", 3, KVSettings(pre_rope=True)),
    ("KV2 pre-RoPE", 2, KVSettings(pre_rope=True)),
    ("KV3 rot K+V", 3, KVSettings(rotate="kv")),
    ("KV2 rot K+V", 2, KVSettings(rotate="kv")),
    ("KV3 rot V", 3, KVSettings(rotate="v")),
    ("KV2 rot V", 2, KVSettings(rotate="v")),
    ("KV2 MiKV 20%@8 + pre-RoPE", 2, KVSettings(important=0.2, pre_rope=True)),
]

WA_ROWS = [  # (label, preset, mode, smooth alpha, outliers)
    ("W8A8 naive dynamic", "W8A8", "dynamic", None, None),
    ("W8A8 naive static", "W8A8", "static", None, None),
    ("W8A8 SmoothQuant dynamic", "W8A8", "dynamic", 0.5, None),
    ("W8A8 SmoothQuant static", "W8A8", "static", 0.5, None),
    ("W8A8 LLM.int8() τ=6", "W8A8", "dynamic", None, "int8"),
    ("W4A16", "W4A16-g64", "dynamic", None, None),
    ("W4A8", "W4A8-g64", "dynamic", None, None),
    ("W4A8 rot", "W4A8-g64-rot", "dynamic", None, None),
    ("W4A4", "W4A4-g64", "dynamic", None, None),
    ("W4A4 rot", "W4A4-g64-rot", "dynamic", None, None),
    ("W4A4 Atom", "W4A4-g64", "dynamic", None, "atom"),
    ("W4A4 rot + Atom", "W4A4-g64-rot", "dynamic", None, "atom"),
    ("W4A4 ResQ", "W4A4-g64", "dynamic", None, "resq"),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--nsamples", type=int, default=8, help="calibration windows of 512 (SmoothQuant, static, Atom, ResQ, kfac)")
    ap.add_argument("--kv-nsamples", type=int, default=1, help="calibration windows of 512 for the KV sensitivity "
                    "(the first of the --nsamples ones)")
    args = ap.parse_args()
    sections = [s for s in args.sections.split(",") if s]
    bad = sorted(set(sections) - set(SECTIONS))
    if bad:
        raise SystemExit(f"unknown sections {bad}: choose from {SECTIONS}")
    t_start = time.perf_counter()
    S = Setup(tokens=args.tokens, nsamples=args.nsamples)
    partial = RESULTS / "act_kv.partial.json"
    key = dict(tokens=args.tokens, nsamples=args.nsamples, kv_nsamples=args.kv_nsamples)
    state = json.loads(partial.read_text()) if partial.exists() else {}
    rows = state.get("rows", []) if state.get("key") == key else []
    done = {r["label"] for r in rows}
    extra = state.get("extra", {}) if state.get("key") == key else {}

    def save():
        write_json_atomic(partial, {"key": key, "rows": rows, "extra": extra}, overwrite=True)

    def run(section, label, fn):
        if label in done:
            return
        t = time.perf_counter()
        r = fn()
        r.update(section=section, label=label, seconds=time.perf_counter() - t)
        rows.append(r)
        done.add(label)
        print(f"[{time.perf_counter() - t_start:6.0f} s] {section:6} {label:32} ppl {r['perplexity']:.3f} "
              f"KL {_kl(r['kl'])} ({r['seconds']:.0f} s)", flush=True)
        save()

    t = time.perf_counter()
    fp = S.evaluate(S.ref)
    extra["fp_seconds"] = time.perf_counter() - t
    run("fp", "fp32", lambda: _metrics(fp))
    if "wa" in sections:
        for label, preset, mode, smooth, outl in WA_ROWS:
            run("wa", label, lambda p=preset, m=mode, s=smooth, o=outl: wa_row(S, p, m, s, o))
    if "kv" in sections:
        for R in (32, 0):
            for b in (8, 4, 3, 2):
                run("kv", f"KV{b} R{R}", lambda b=b, R=R: kv_row(S, S.ref, b, KVSettings(residual=R)))
        run("kv", "KV4 R32 cache engine chunk16",
            lambda: kv_row(S, S.ref, 4, KVSettings(), engine="cache", chunk=16, batch_size=8))
        run("kv", "KV4 R32 simulate chunk16", lambda: kv_row(S, S.ref, 4, KVSettings(), chunk=16))
        for label, b, st in KV_OPTION_ROWS:
            run("kv", label, lambda b=b, st=st: kv_row(S, S.ref, b, st))
        mikv = KVSettings(important=0.2)
        run("kv", "KV2 MiKV 20%@8 cache engine chunk16",
            lambda: kv_row(S, S.ref, 2, mikv, engine="cache", chunk=16, batch_size=8))
        run("kv", "KV2 MiKV 20%@8 simulate chunk16", lambda: kv_row(S, S.ref, 2, mikv, chunk=16))
    kv_table = None
    if "kvmix" in sections or "joint" in sections:
        kv_table = kv_measurement(S, args.kv_nsamples, extra)
        save()
    if "kvmix" in sections:
        uni = {b: uniform_kv(kv_table, b, S.seqlen, 1) for b in (2, 3, 4)}
        budgets = {"2": uni[2].kv_bits_total, "2.5": (uni[2].kv_bits_total + uni[3].kv_bits_total) // 2,
                   "3": uni[3].kv_bits_total, "4": uni[4].kv_bits_total}
        for tag, bits in budgets.items():
            run("kvmix", f"KV mixed @ uniform-{tag} bytes",
                lambda bits=bits: kvmix_row(S, kv_table, math.ceil(bits / 8)))
    if "joint" in sections:
        wt = weight_measurement(S, extra)
        save()
        for tag, wspec, kvb in (("W4+KV4", "W4-g64", 4), ("W3+KV3", "W3-g64-asym", 3)):
            w_bits = sum(parse_spec(wspec).cost(x.shape).total for x in wt.layers)
            mem = math.ceil((w_bits + uniform_kv(kv_table, kvb, CTX, BATCH).kv_bits_total) / 8)
            extra.setdefault("joint_budgets", {})[tag] = mem
            run("joint", f"{tag} joint", lambda mem=mem: joint_row(S, allocate_joint(wt, kv_table, mem, CTX, BATCH)))
            for sb in (2, 4, 8):
                def sep(mem=mem, sb=sb):
                    return joint_row(S, allocate_separately(wt, kv_table, mem, CTX, BATCH, kv_bits=sb))
                try:
                    allocate_separately(wt, kv_table, mem, CTX, BATCH, kv_bits=sb)
                except InfeasibleMemory:
                    continue
                run("joint", f"{tag} separate KV{sb}", sep)
    extra["total_seconds"] = extra.get("total_seconds", 0) + time.perf_counter() - t_start
    save()
    write(rows, fp, S, args, extra, sections)
    if set(sections) == set(SECTIONS):
        partial.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- rows
def _metrics(r: dict) -> dict:
    return {k: r.get(k) for k in ("perplexity", "kl", "kl_p99", "top1_agreement", "n_scored")}


def wa_row(S, preset, mode, smooth, outliers) -> dict:
    p = parse_wa_preset(preset, mode)
    model = copy.deepcopy(S.ref)
    prepare_for_act_quant(model, rotate=p.rotate, smooth_alpha=smooth, calib_ids=S.calib if smooth else None)
    res = mixq.quantize(model, p.weight, group_fallback="shrink", progress=False) if p.weight is not None else None
    specs = res.specs if res is not None else {}
    a_bits = p.act.bits if p.act is not None else 16
    if outliers == "resq":
        apply_resq(model, S.calib, hi="A8", lo=p.act, fraction=1 / 8)
        a_bits = "4 + 1/8 subspace at 8"
    elif p.act is not None:
        needs = mode == "static" or outliers == "atom"
        apply_act_quant(model, p.act, mode=mode, calib_ids=S.calib if needs else None,
                                 fp_outliers=FPOutliers(6.0) if outliers == "int8" else None,
                                 hi_channels=HiChannels(ATOM_K, "W8-token") if outliers == "atom" else None)
        if outliers == "atom":
            a_bits = f"{a_bits} + {ATOM_K} ch at 8"
        elif outliers == "int8":
            a_bits = f"{a_bits} + fp cols ≥ 6"
    r = S.evaluate(model)
    size = res.meta["size"] if specs else None
    del model
    return {**_metrics(r), "preset": preset, "mode": mode, "smooth": smooth, "outliers": outliers,
            "weights": sorted({s.name for s in specs.values()}) if specs else "fp32",
            "act": p.act.name if p.act is not None else "—", "act_bits": a_bits, "rotate": p.rotate,
            "weight_bytes": size["bits_quantized"] / 8 if size else None}


def _kv_bytes(model_config, bits, settings):
    return {"kv_bytes_512x1": kv_cache_bytes(model_config, bits, 512, 1, **settings.kw()),
            f"kv_bytes_{CTX}x{BATCH}": kv_cache_bytes(model_config, bits, CTX, BATCH, **settings.kw()),
            "kv_options": settings.describe()}


def _bits_per_element(model_config, nbytes, context=512):
    """Every stored bit (codes, scales, offsets, important-token maps, fp window) per K or V element."""
    L, H, D = kv_dims(model_config)
    return 8 * nbytes / (2 * L * H * D * context)


def kv_row(S, model, bits, settings, *, engine="simulate", chunk=EVAL_CHUNK, batch_size=2) -> dict:
    r = kv_compare(model, S.windows, bits, S.cache, settings=settings, engine=engine, chunk=chunk,
                   batch_size=batch_size)
    return {**_metrics(r), "kv": r["kv"], **_kv_bytes(S.ref.config, bits, settings)}


def kv_measurement(S, n, extra) -> KVSensitivityTable:
    CACHE.mkdir(exist_ok=True)
    path = CACHE / f"kv-measure-kl-{n}x{S.seqlen}.json"
    if path.exists():
        return KVSensitivityTable.load(path)
    t = time.perf_counter()  # the first n calibration windows (PTB train, seed 0); resumes from path.partial
    table = measure_kv(S.ref, S.calib[:n], batch_size=1, out=path, progress=True)
    extra["kv_measure_seconds"] = time.perf_counter() - t
    print(f"KV sensitivity measured in {extra['kv_measure_seconds']:.0f} s", flush=True)
    return table


def weight_measurement(S, extra) -> SensitivityTable:
    CACHE.mkdir(exist_ok=True)
    shared = CACHE / "measure-kfac-rtn-32x512.json"  # bench/allocation.py's, when it has been run
    if shared.exists():
        extra["weight_table"] = shared.name
        return SensitivityTable.load(shared)
    path = CACHE / f"measure-kfac-rtn-{S.nsamples}x{S.seqlen}-joint.json"
    extra["weight_table"] = path.name
    if path.exists():
        return SensitivityTable.load(path)
    t = time.perf_counter()
    table = mixq.measure(S.ref, S.calib, candidates=JOINT_CANDIDATES, metric="kfac", algorithm="rtn", grad_samples=8,
                         out=path, progress=False)
    extra["weight_measure_seconds"] = time.perf_counter() - t
    print(f"kfac weight table measured in {extra['weight_measure_seconds']:.0f} s", flush=True)
    return table


def kvmix_row(S, table, nbytes) -> dict:
    plan = allocate_kv(table, nbytes, S.seqlen, 1)
    r = kv_row(S, S.ref, plan.kv_bits_dict(), table.settings)
    k, v = plan.mean_kv_bits()
    return {**r, "kv_budget_bytes_512x1": nbytes, "mean_k_bits": k, "mean_v_bits": v, "predicted": plan.kv_error,
            "kv_plan": [list(x) for x in plan.kv]}


def joint_row(S, plan) -> dict:
    model = copy.deepcopy(S.ref)
    mixq.quantize(model, plan=plan.weights, progress=False)
    r = kv_row(S, model, plan.kv_bits_dict(), plan.settings)
    del model
    k, v = plan.mean_kv_bits()
    return {**r, **{f"plan_{k_}": v_ for k_, v_ in plan.summary().items()}, "mean_k_bits": k, "mean_v_bits": v,
            "kv_plan": [list(x) for x in plan.kv]}


# ---------------------------------------------------------------------------- report
def _mb(x):
    return "—" if x is None else f"{x / 2**20:.2f}"


def _secs(x):
    return "cached in bench/cache" if x is None else f"{x:.0f} s"


def _kl(x):
    return "—" if x is None else (f"{x:.4f}" if x >= 0.01 else f"{x:.2e}")


def write(rows, fp, S, args, extra, sections):
    p = S.protocol
    by = {r["label"]: r for r in rows}
    lines = header("Activations and the KV cache — SmolLM2-135M-Instruct, PTB test",
                   f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python bench/act_kv.py "
                   f"--tokens {args.tokens} --sections {','.join(sections)} --nsamples {args.nsamples} "
                   f"--kv-nsamples {args.kv_nsamples}")
    lines += [f"Protocol: PTB test, first {p.max_tokens} tokens ({p.n_windows} windows of {p.seqlen}, {p.n_scored} "
              f"scored), fp32 perplexity {fp['perplexity']:.3f}; KL(fp32 ‖ variant) in nats per token, mean over scored "
              f"tokens; top-1 = argmax agreement with fp32. Weights RTN on the 210 block linears (embeddings, norms kept); "
              f"weight MiB count every stored bit of them. Activations: simulated quantize→dequantize of every block "
              f"linear's input (dynamic = per-token scales at run time; static = one per-tensor scale from "
              f"{args.nsamples} × 512 PTB-train calibration tokens). KV: KIVI cache (keys per channel in groups of 32 "
              f"tokens, values per token, fp16 scale + offset per group, R fp tokens), every token decoded one at a time "
              f"(exact one-forward simulation of the real cache; the cross-check rows compare it with the real cache at "
              f"16 tokens per forward); KV MiB at 512 tokens × 1 sequence and at {CTX} × {BATCH}. "
              f"Total run {extra.get('total_seconds', 0):.0f} s, peak RSS {peak_rss_mb():.0f} MB.", ""]
    carried = sorted({r["source"] for r in rows if r.get("source")})
    if carried:
        n_new = sum(not r.get("source") for r in rows)
        lines += [f"Rows carried over from {'; '.join(carried)} (same protocol and command; resumed from its rows): "
                  f"{len(rows) - n_new}; measured in this run (the commit above): {n_new}. The total run time adds "
                  "both runs.", ""]
    wa = [r for r in rows if r["section"] == "wa"]
    if wa:
        lines += ["## Weights × activations", "",
                  "| variant | weights | act spec | act bits | mode | rot | SmoothQuant α | weight MiB | perplexity | KL | top-1 | s |",
                  "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|",
                  f"| fp32 | fp32 | — | 32 | — | — | — | — | {fp['perplexity']:.3f} | 0 | 1 | — |"]
        for r in wa:
            w = r["weights"] if isinstance(r["weights"], str) else ", ".join(r["weights"])
            lines.append(f"| {r['label']} | {w} | {r['act']} | {r['act_bits']} | {r['mode']} | "
                         f"{'yes' if r['rotate'] else 'no'} | {r['smooth'] if r['smooth'] is not None else '—'} | "
                         f"{_mb(r['weight_bytes'])} | {r['perplexity']:.3f} | {_kl(r['kl'])} | "
                         f"{r['top1_agreement']:.3f} | {r['seconds']:.0f} |")
        lines += ["", "Atom keeps the activations of the 32 largest-absmax input channels of each linear at 8 bits "
                      "(the matching weight columns stay W4 here); LLM.int8() keeps the columns whose magnitude reaches "
                      "6 in the current batch in fp; ResQ projects each linear's input on its calibration PCA basis, "
                      "quantizes the top 1/8 subspace at 8 bits and the rest at 4, with a random Hadamard rotation "
                      "inside each (weights quantized in the original basis). Rotation is QuaRot's residual rotation plus the "
                      "online rotation of the down-projection input, before RTN of the weights.", ""]
    kv = [r for r in rows if r["section"] == "kv" and not r.get("kv_options")]
    kvo = [r for r in rows if r["section"] == "kv" and r.get("kv_options")]
    if kv:
        lines += ["## KV cache widths (fp weights)", "",
                  "| variant | K/V bits | fp window | engine, tokens per forward | KV MiB 512×1 | "
                  f"KV MiB {CTX}×{BATCH} | perplexity | KL | top-1 | s |", "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
                  f"| fp16 cache | 16 | — | — | {_mb(kv_cache_bytes(S.ref.config, 16, 512, 1))} | "
                  f"{_mb(kv_cache_bytes(S.ref.config, 16, CTX, BATCH))} | {fp['perplexity']:.3f} | 0 | 1 | — |"]
        for r in kv:
            b = r["kv"]["bits"][0]
            lines.append(f"| {r['label']} | {b[0]} | {r['kv']['residual']} | {r['kv']['engine']}, {r['kv']['chunk']} | "
                         f"{_mb(r['kv_bytes_512x1'])} | {_mb(r[f'kv_bytes_{CTX}x{BATCH}'])} | {r['perplexity']:.3f} | "
                         f"{_kl(r['kl'])} | {r['top1_agreement']:.3f} | {r['seconds']:.0f} |")
        lines += ["", "R = 0: every value is quantized as soon as it is written; keys wait for a complete group of 32 "
                      "tokens (up to 31 recent keys stay fp), as in KIVI.", ""]
    if kvo:
        lines += ["### Options on top of KIVI (fp window 32, key groups of 32)", "",
                  "| variant | K/V bits | options | engine, tokens per forward | bits / KV element 512×1 | KV MiB 512×1 | "
                  f"KV MiB {CTX}×{BATCH} | perplexity | KL | top-1 | s |",
                  "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in [x for x in kv if x["kv"]["residual"] == 32 and x["kv"]["chunk"] == EVAL_CHUNK] + kvo:
            b = r["kv"]["bits"][0]
            lines.append(f"| {r['label']} | {b[0]} | {r.get('kv_options') or 'KIVI'} | {r['kv']['engine']}, "
                         f"{r['kv']['chunk']} | {_bits_per_element(S.ref.config, r['kv_bytes_512x1']):.3f} | {_mb(r['kv_bytes_512x1'])} | "
                         f"{_mb(r[f'kv_bytes_{CTX}x{BATCH}'])} | {r['perplexity']:.3f} | {_kl(r['kl'])} | "
                         f"{r['top1_agreement']:.3f} | {r['seconds']:.0f} |")
        lines += ["", "MiKV: in each key group of 32 tokens, the tokens with the most attention received so far (summed "
                      "over the query heads of the KV head and every earlier query) are stored at 8 bits (per-token "
                      "grids) or fp16, decided once when the group leaves the fp window; the others keep KIVI's 2-bit "
                      "grids; a 1-bit map per token, head and tensor marks them (all counted in the bits per element, "
                      "which include the fp window). Pre-RoPE: keys un-rotated with the model's rotary tables, "
                      "quantized per channel, re-rotated. Rotation: a fixed randomised Hadamard matrix on the head "
                      "dimension before quantizing (undone after).", ""]
    mix = [r for r in rows if r["section"] == "kvmix"]
    if mix:
        lines += ["## Uniform vs mixed per-layer KV widths at the same bytes (fp weights, fp window 32)", "",
                  f"KV sensitivity: KL per layer × K/V × width (2, 3, 4, 8) on {args.kv_nsamples} × 512 PTB-train "
                  f"tokens ({_secs(extra.get('kv_measure_seconds'))}); the mixed plans are exact knapsack solutions "
                  "for the bytes of a 512-token sequence.", "",
                  "| budget | plan | mean K bits | mean V bits | KV MiB 512×1 | predicted KL | perplexity | KL | top-1 |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in mix:
            tag = r["label"].split("uniform-")[1].split(" ")[0]
            u = by.get(f"KV{tag} R32")
            if u is not None:
                lines.append(f"| uniform {tag} | uniform | {tag} | {tag} | {_mb(u['kv_bytes_512x1'])} | — | "
                             f"{u['perplexity']:.3f} | {_kl(u['kl'])} | {u['top1_agreement']:.3f} |")
            lines.append(f"| uniform {tag} bytes | mixed | {r['mean_k_bits']:.2f} | {r['mean_v_bits']:.2f} | "
                         f"{_mb(r['kv_bytes_512x1'])} | {r['predicted']:.4g} | {r['perplexity']:.3f} | {_kl(r['kl'])} | "
                         f"{r['top1_agreement']:.3f} |")
        lines.append("")
    jr = [r for r in rows if r["section"] == "joint"]
    if jr:
        lines += [f"## One memory budget: weights + KV cache ({CTX} tokens × {BATCH} sequences)", "",
                  f"Weight errors: kfac table `{extra.get('weight_table', '?')}` (RTN); KV errors: the KL table above; "
                  "both nats per token, summed. Budgets: the memory of uniform W4-g64 + KV4 and of W3-g64-asym + KV3 "
                  f"({', '.join(f'{k} {v / 2**20:.2f} MiB' for k, v in extra.get('joint_budgets', {}).items())}). "
                  "`separate KVb`: the cache fixed at b bits, the weights allocated (exact) in the rest.", "",
                  "| budget | plan | weight MiB | weight bpw | KV MiB | mean K/V bits | predicted (w + kv) | perplexity | KL | top-1 |",
                  "|---|---|---:|---:|---:|---|---|---:|---:|---:|"]
        for r in jr:
            tag, how = r["label"].split(" ", 1)
            lines.append(f"| {tag} {_mb(r['plan_memory_bytes'])} MiB | {how} | {_mb(r['plan_weight_bytes'])} | "
                         f"{r['plan_weight_bpw']:.3f} | {_mb(r['plan_kv_bytes'])} | {r['mean_k_bits']:.2f}/{r['mean_v_bits']:.2f} | "
                         f"{r['plan_weight_error']:.4g} + {r['plan_kv_error']:.4g} | {r['perplexity']:.3f} | {_kl(r['kl'])} | "
                         f"{r['top1_agreement']:.3f} |")
        lines.append("")
    (RESULTS / "act_kv.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "act_kv.json").write_text(json.dumps({"protocol": p.to_dict(), "fp32": fp, "rows": rows,
                                                     "extra": extra}, indent=1, default=str))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
