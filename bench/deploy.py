"""Deployment on CPU, SmolLM2-135M: size on disk and in RAM, greedy decode speed, perplexity agreement.

    OMP_NUM_THREADS=2 python bench/deploy.py [--tokens 8192] [--threads N] [--keep runs/deploy]

Rows (RTN, except the `--dirs` ones; one process, one thread count):

- ``fp32`` and ``bf16``: the unquantized model.
- ``W4-g128``: 4-bit symmetric, fp16 scales; ``--group-fallback shrink`` gives the 180 layers that read
  the 576-wide residual stream g96 (down_proj keeps g128).  g96 still runs on the ``cpu-int4`` kernel
  (kernel group 32 inside each g96 group, scales repeated, exact), at the price of a bf16 scale/zero pair
  per 32 weights in the kernel layout (1 bit/weight of RAM for those layers).
- ``W4-g64``: the power-of-two alternative (kernel group 64: 0.5 bit/weight of kernel scales).
- ``W3-g128``: 3-bit symmetric (g96 fallback); 3-bit codes run on the int4 kernel too (codes + 4).
- ``mixed-3.5``: measure (kfac, RTN, ``--calib-samples`` x 512 PTB-train tokens) over mixq's default
  candidates, ``mixq.plan(table, bpw=3.5)``; its NF, FP and FP16 layers run the reference kernel.
- ``mixed-3.5-cpu``: the same measurement under ``Constraints(fast_on="cpu")`` (``mixq plan --fast-on cpu``):
  only int candidates, which ``cpu-int4`` runs (1-4 bits as one int4 plane, 5-8 bits as two), so every
  layer takes the fast path.
- ``--dirs LABEL=DIR``: a directory ``mixq quantize`` wrote (e.g. ``mixq quantize --bpw 3.0``, the default
  recipe: GPTQ, trellis layers, the end-to-end epoch), measured as it is.

For each quantized row: the native v2 directory (rest in fp32 as ``mixq quantize`` writes it, and
re-written with ``--rest-dtype bf16`` for deployment), the packed model's RAM (parameters + buffers,
plus the kernel layouts built on first use), greedy decode tokens/s (``--new-tokens`` after a
``--prompt-tokens`` PTB prompt, median of ``--repeats`` after a warm-up; packed models in bf16 with
``kernel="auto"``), and perplexity on PTB test (first ``--tokens``): the in-memory fake-quant model,
the native directory loaded packed in fp32 through the reference kernel (must agree), the packed bf16
model, and — if :mod:`mixq.export.gguf` is installed — the GGUF export loaded back through
transformers (``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)``, dequantized to fp32).

Writes bench/results/deploy.{md,json}.
"""
from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import os
import shutil
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch
from common import RESULTS, Setup, header, peak_rss_mb

import mixq
from mixq.allocate import SensitivityTable
from mixq.export.native import read_info
from mixq.models import model_fingerprint
from mixq.export.native_write import rewrite_native  # re-saves a directory with a bf16 rest: no stage does that
from mixq.runtime import greedy_generate, kernel_usage, memory_report
from mixq.runtime.generate import ENGINES
from mixq.runtime.dense_gemv import use_gemv

UNIFORM = ["W4-g128", "W4-g64", "W3-g128"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192, help="PTB test tokens for perplexity (default 8192)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calib-samples", type=int, default=16, help="PTB-train samples x 512 for the kfac measurement")
    ap.add_argument("--bpw", type=float, default=3.5, help="budget of the mixed plans")
    ap.add_argument("--rows", default=None, help="comma-separated subset of the quantized rows")
    ap.add_argument("--keep", default=None, help="keep the written directories / GGUF files here")
    ap.add_argument("--dirs", default=None, help="comma-separated LABEL=DIR: rows from directories `mixq quantize` "
                    "wrote (e.g. the default recipe's), measured as they are (no GGUF: their trellis layers have no "
                    "ggml type; `--target gguf` plans are the GGUF path)")
    ap.add_argument("--results", default="deploy", help="stem of the result files in bench/results (default deploy)")
    ap.add_argument("--interleave", type=int, default=0, help="after the rows, this many rounds of one decode of "
                    "every deployed model in turn (bench/decode_rounds.py): speeds a drifting host cannot skew")
    ap.add_argument("--engine", default="auto", choices=ENGINES, help="greedy_generate's engine for every row "
                    "(default auto: mixq's lean forward where it runs the model); with --interleave, fp32 through "
                    "transformers is timed in the rounds too")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    S = Setup(tokens=args.tokens, nsamples=args.calib_samples)
    prompt = S.windows.input_ids[:1, : args.prompt_tokens].clone()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mixq-deploy-"))
    work.mkdir(parents=True, exist_ok=True)
    has_gguf = importlib.util.find_spec("mixq.export.gguf") is not None
    rows = []
    try:
        # ---------------------------------------------------------------- unquantized baselines
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            model = S.ref if dtype == torch.float32 else copy.deepcopy(S.ref).to(dtype)
            if dtype == torch.bfloat16:
                use_gemv(model)  # as a packed model's kept bf16 linears: one token through torch.mv
            nbytes = memory_report(model)["params_buffers"]
            row = dict(row=name, spec=name, bpw_linears=32.0 if dtype == torch.float32 else 16.0,
                       disk_bytes=_param_bytes(model), ram_params_buffers=nbytes, ram_kernel_state=0,
                       ram_resident=nbytes, **_speed(model, prompt, args), ppl_fake=None, ppl_packed_fp32=None,
                       ppl_packed_bf16=None, agree=None, kernels=None)
            row["ppl"] = S.evaluate(model)["perplexity"]
            rows.append(row)
            print(row, flush=True)
            if model is not S.ref:
                del model
        # ---------------------------------------------------------------- quantized rows
        plans = {}
        wanted = args.rows.split(",") if args.rows else UNIFORM + [f"mixed-{args.bpw:g}", f"mixed-{args.bpw:g}-cpu"]
        if any(r.startswith("mixed") for r in wanted):
            t = time.perf_counter()
            cache = Path(__file__).parent / "cache" / f"measure-kfac-rtn-{args.calib_samples}x512.json"
            cache.parent.mkdir(exist_ok=True)
            table = SensitivityTable.load(cache) if cache.exists() else None
            if table is not None and table.meta.get("model") != model_fingerprint(S.ref):  # another model's table
                print(f"{cache} was measured on another model: measuring again", flush=True)
                table = None
            if table is None:
                table = mixq.measure(S.ref, S.calib, metric="kfac", algorithm="rtn", out=cache, progress=False)
            measure_s = time.perf_counter() - t
            plans[f"mixed-{args.bpw:g}"] = mixq.plan(table, bpw=args.bpw)
            plans[f"mixed-{args.bpw:g}-cpu"] = mixq.plan(table, bpw=args.bpw, fast_on="cpu")
            print(f"measured kfac in {measure_s:.0f} s", flush=True)
        for name in wanted:
            rows.append(_quantized_row(S, name, plans.get(name), prompt, args, work, has_gguf))
            print({k: v for k, v in rows[-1].items() if k != "layers"}, flush=True)
            gc.collect()
        for item in filter(None, (args.dirs or "").split(",")):
            name, _, src = item.partition("=")
            if not src or not Path(src).is_dir():
                raise SystemExit(f"--dirs {item!r}: give LABEL=DIR with DIR a directory `mixq quantize` wrote")
            rows.append(_dir_row(S, name, Path(src), prompt, args, work))
            print({k: v for k, v in rows[-1].items() if k != "layers"}, flush=True)
            gc.collect()
        hf32 = _interleave(S, rows, prompt, args, work) if args.interleave else None
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    _write(rows, S, args, time.perf_counter() - t_start, has_gguf, hf32)


HF32 = "fp32 (transformers)"


def _interleave(S, rows, prompt, args, work: Path) -> None:
    """Every row's deployed model decoding in turn (bench/decode_rounds.py): ``interleaved`` in each row."""
    from decode_rounds import interleaved

    def bf16():
        m = copy.deepcopy(S.ref).to(torch.bfloat16)
        use_gemv(m)
        return m

    loaders = {"fp32": lambda: S.ref, "bf16": bf16}
    for r in (r for r in rows if r["agree"] is not None):  # the quantized rows, as _write tells them
        d16 = work / f"{r['row']}-bf16rest"
        loaders[r["row"]] = lambda d16=d16: mixq.load_quantized(d16, dtype=torch.bfloat16, packed=True)[0]
    engines = {}
    if args.engine != "transformers":  # the baseline a user of transformers alone has, in the same rounds
        loaders[HF32] = lambda: S.ref
        engines[HF32] = "transformers"
    got = interleaved(loaders, prompt, args.new_tokens, args.interleave, "fp32",
                      {**{n: args.engine for n in loaders}, **engines})
    for r in rows:
        r["interleaved"] = got[r["row"]]
        if HF32 in got:
            r["interleaved"]["ratio_fp32_transformers"] = statistics.median(
                a / b for a, b in zip(got[r["row"]]["runs"], got[HF32]["runs"]))
    return got.get(HF32)


def _speed(model, prompt, args) -> dict:
    """Greedy decode: warm-up, then the median of ``repeats`` runs."""
    greedy_generate(model, prompt, args.new_tokens, stop_at_eos=False, engine=args.engine)
    runs = [greedy_generate(model, prompt, args.new_tokens, stop_at_eos=False, engine=args.engine)
            for _ in range(args.repeats)]
    return {"decode_tok_s": statistics.median(r.decode_tokens_per_s for r in runs),
            "decode_tok_s_runs": [r.decode_tokens_per_s for r in runs],
            "prefill_ms": statistics.median(r.prefill_s for r in runs) * 1000,
            "generated": runs[-1].new_ids[:16], "engine": runs[-1].engine}


def _param_bytes(model) -> int:
    """Bytes of a safetensors checkpoint of ``model`` (each tensor once, headers aside)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file())


def _quantized_row(S, name, plan, prompt, args, work: Path, has_gguf: bool) -> dict:
    model = copy.deepcopy(S.ref)
    label = name if plan is None else f"{name} ({plan.achieved_bpw:.3f} bpw)"
    res = mixq.quantize(model, None if plan is not None else name, plan=plan, group_fallback="shrink", progress=False)
    specs, quant_s, size = res.specs, res.seconds, res.meta["size"]
    fallback = len(res.meta["group_fallback"])  # {} for a plan
    d = work / name
    # the bare codes and this meta (not res.meta): the directory whose bytes the rows report
    mixq.save_quantized(d, model, S.tok, res.qtensors, {"method": "rtn", "spec": label}, base_model="smollm2-135m",
                        overwrite=True)
    row = _measured_row(S, name, label, d, model, prompt, args, work)
    row.update(bpw_linears=size["bpw_linears"], bpw_quantized=size["bpw_quantized"], group_fallback_layers=fallback,
               quant_s=quant_s, layers={s.name: sum(1 for v in specs.values() if v == s) for s in set(specs.values())})
    del model
    if has_gguf:
        row.update(_gguf(S, d, work, name))
    if not args.keep:
        shutil.rmtree(d, ignore_errors=True)
        if not args.interleave:  # else the rounds load it again; the work folder goes at the end
            shutil.rmtree(work / f"{name}-bf16rest", ignore_errors=True)
    return row


def _measured_row(S, name, label, d: Path, model, prompt, args, work: Path) -> dict:
    """The row of the native directory ``d`` whose fake-quant model is ``model``: sizes, the packed fp32 model
    against ``model``, decode speed and perplexity of the deployed (bf16 rest, packed, kernel auto) model."""
    d16 = work / f"{name}-bf16rest"
    rewrite_native(d, d16, overwrite=True, rest_dtype=torch.bfloat16)
    storage = read_info(d)["storage"]
    fake = S.evaluate(model)
    # the native directory, packed, fp32, reference kernel: must agree with the in-memory fake-quant model
    packed32, _, _ = mixq.load_quantized(d, dtype=torch.float32, packed=True, kernel="reference")
    with torch.no_grad():
        ids = S.windows.input_ids[:1, :128]
        max_logit_diff = float((packed32(ids).logits - model(ids).logits).abs().max())
    ppl_packed32 = S.evaluate(packed32)["perplexity"]
    del packed32
    gc.collect()
    # deployment: bf16 rest, bf16 activations, kernel auto
    packed, _, _ = mixq.load_quantized(d16, dtype=torch.bfloat16, packed=True)
    mem0 = memory_report(packed)
    speed = _speed(packed, prompt, args)
    mem = memory_report(packed)  # kernel layouts now built
    kernels = kernel_usage(packed)
    ppl_packed16 = S.evaluate(packed)["perplexity"]
    del packed
    gc.collect()
    return dict(row=name, spec=label,
               disk_bytes=_dir_bytes(d16), disk_bytes_fp32_rest=_dir_bytes(d),
               bytes_quantized_on_disk=storage["bytes_quantized_on_disk"],
               bytes_quantized_spec=storage["bytes_quantized_spec"],
               ram_params_buffers_at_load=mem0["params_buffers"], ram_params_buffers=mem["params_buffers"],
               ram_kernel_state=mem["kernel_state"], ram_resident=mem["resident"], **speed, kernels=kernels,
               ppl_fake=fake["perplexity"], kl_fake=fake["kl"], ppl=fake["perplexity"],
               ppl_packed_fp32=ppl_packed32, ppl_packed_bf16=ppl_packed16, max_logit_diff_packed_fp32=max_logit_diff,
               agree=abs(ppl_packed32 - fake["perplexity"]) <= 1e-4 * fake["perplexity"])


def _dir_row(S, name, src: Path, prompt, args, work: Path) -> dict:
    """A row from the directory ``src`` (``--dirs``): its plan as stored, measured like the rows made here."""
    model, _, info = mixq.load_quantized(src, dtype=torch.float32)
    size = info.get("size", {})
    rec = info.get("recipe") or {}
    dev = "".join(f", {k} {v}" for k, v in sorted((rec.get("deviations") or {}).items()))
    label = f"{name} ({size.get('bpw_linears', float('nan')):.3f} bpw, {rec.get('name', 'no recipe')}{dev})"
    row = _measured_row(S, name, label, src, model, prompt, args, work)
    specs = [v["spec"] for v in ((info.get("plan") or {}).get("layers") or {}).values()]
    row.update(bpw_linears=size.get("bpw_linears"), bpw_quantized=size.get("bpw_quantized"), source_dir=str(src),
               recipe=info.get("recipe"), layers={sp: specs.count(sp) for sp in set(specs)} if specs else None)
    if not args.interleave:
        shutil.rmtree(work / f"{name}-bf16rest", ignore_errors=True)
    return row


def _gguf(S, d: Path, work: Path, name: str) -> dict:
    """Export ``d`` to GGUF, load it back through transformers, score it.  Errors are recorded, not raised."""
    out = work / f"{name}.gguf"
    try:
        from transformers import AutoModelForCausalLM

        from mixq.export.gguf import export_gguf

        report = export_gguf(d, out, overwrite=True)
        totals = report.get("totals", {}) if isinstance(report, dict) else {}
        model = AutoModelForCausalLM.from_pretrained(str(work), gguf_file=out.name, dtype=torch.float32).eval()
        ppl = S.evaluate(model)["perplexity"]
        del model
        return {"gguf_bytes": out.stat().st_size, "gguf_ppl": ppl, "gguf_fallbacks": totals.get("fallbacks"),
                "gguf_types": totals.get("types"), "gguf_error": None}
    except Exception as e:  # noqa: BLE001 - reported in the table
        traceback.print_exc()
        return {"gguf_bytes": out.stat().st_size if out.exists() else None, "gguf_ppl": None,
                "gguf_error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]}
    finally:
        gc.collect()


def _mb(n) -> str:
    return "—" if n is None else f"{n / 2**20:.1f}"


def _f(v, fmt) -> str:
    return "—" if v is None else format(v, fmt)


ISA_ENV = ("MIXQ_KERNEL_CFLAGS", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")


def _write(rows, S, args, total_s, has_gguf, hf32=None):
    p = S.protocol
    # the settings that make this CPU run the code another one would (mixq's kernels built without some
    # instructions; torch's, MKL's and oneDNN's dispatch capped)
    isa = "".join(f"{k}='{os.environ[k]}' " for k in ISA_ENV if os.environ.get(k))
    cmd = (isa + f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python bench/deploy.py --tokens {args.tokens}"
           + (f" --threads {args.threads}" if args.threads else "") + f" --new-tokens {args.new_tokens} "
           f"--prompt-tokens {args.prompt_tokens} --repeats {args.repeats} --calib-samples {args.calib_samples} "
           f"--bpw {args.bpw:g}" + (f" --rows {args.rows}" if args.rows else "")
           + (f" --dirs {args.dirs}" if args.dirs else "")
           + (f" --results {args.results}" if args.results != "deploy" else "")
           + (f" --interleave {args.interleave}" if args.interleave else "")
           + (f" --engine {args.engine}" if args.engine != "auto" else ""))
    fp32 = next(r for r in rows if r["row"] == "fp32")
    lines = header("Deployment on CPU — SmolLM2-135M-Instruct: size, RAM, decode speed, perplexity", cmd)
    lines += [f"Protocol: greedy decode of {args.new_tokens} new tokens after the first {args.prompt_tokens} tokens of "
              f"PTB test, batch 1, KV cache; tokens/s over the {args.new_tokens - 1} steps after the prompt "
              f"(prefill reported apart), median of {args.repeats} runs after a warm-up, "
              f"{torch.get_num_threads()} torch threads for every row, engine `{args.engine}` (what ran: "
              f"{', '.join(sorted({r.get('engine', '?') for r in rows}))}; `lean` = mixq.runtime.lean_decode, the "
              f"blocks' glue in native calls, the same modules). Quantized rows: RTN (`--dirs` rows: as their "
              f"directory was made, named with its recipe), loaded with "
              f"`load_quantized(dir, dtype=torch.bfloat16, packed=True)` (kernel auto: cpu-int4 for int layers, "
              f"one int4 plane up to 4 bits, two for 5-8; reference = dequantize + matmul otherwise; the bf16 head's "
              f"one-token products through `torch.mv`, as in the `bf16` row), from the directory re-written with "
              f"`--rest-dtype bf16`. Perplexity: PTB test, first {p.max_tokens} tokens, {p.n_windows} windows of "
              f"{p.seqlen} ({p.n_scored} scored); `fake` = in-memory fake-quant fp32 model, `packed fp32` = the "
              f"native directory loaded packed through the reference kernel (must agree with `fake`), `packed bf16` "
              f"= the deployed model (prefill windows of {p.seqlen} tokens run the reference kernel in bf16). "
              f"Total run {total_s:.0f} s, peak RSS {peak_rss_mb():.0f} MB.", "",
              "| row | bpw lin | disk MB | RAM MB (params+buffers) | + kernel layouts MB | decode tok/s | "
              "speed-up vs fp32 | prefill ms | ppl (fake-quant / model) | ppl packed fp32 | agree | ppl packed bf16 | kernels |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    if args.interleave:
        lines[-4] += (f" Then {args.interleave} rounds of one decode of every row in turn (order rotated each round; "
                      "bench/decode_rounds.py): the `interleaved` columns, speed-up = median over rounds of the row's "
                      "speed over fp32's in the same round.")
        lines[-2] += " interleaved tok/s | interleaved speed-up |"
        lines[-1] += "---:|---:|"
        if hf32 is not None:
            lines[-4] += (f" The rounds also decode fp32 through transformers' own forward ({hf32['tok_s']:.1f} "
                          "tok/s): the last column is each row's speed over that, round by round.")
            lines[-2] += " vs fp32 (transformers) |"
            lines[-1] += "---:|"
    for r in rows:
        kern = "—" if not r.get("kernels") else ", ".join(f"{k} {n}" for k, n in sorted(r["kernels"].items()))
        lines.append(
            f"| {r['spec']} | {r['bpw_linears']:.3f} | {_mb(r['disk_bytes'])} | {_mb(r['ram_params_buffers'])} | "
            f"{_mb(r['ram_kernel_state'])} | {r['decode_tok_s']:.1f} | {r['decode_tok_s'] / fp32['decode_tok_s']:.2f}x | "
            f"{r['prefill_ms']:.0f} | {_f(r.get('ppl_fake') or r.get('ppl'), '.3f')} | {_f(r['ppl_packed_fp32'], '.3f')} | "
            f"{'—' if r['agree'] is None else ('yes' if r['agree'] else '**no**')} | {_f(r['ppl_packed_bf16'], '.3f')} | "
            f"{kern} |" + (f" {r['interleaved']['tok_s']:.1f} | {r['interleaved']['ratio']:.2f}x |" if args.interleave
                          else "")
            + (f" {r['interleaved']['ratio_fp32_transformers']:.2f}x |" if hf32 is not None else ""))
    qrows = [r for r in rows if r["agree"] is not None]
    lines += ["", "Sizes of the quantized rows: `disk` is the directory with bf16 rest (fp32 rest as `mixq quantize` "
              "writes it in the second column); the quantized tensors' bytes on disk against the spec accounting "
              "(Σ cost/8; the difference is the last-byte padding of each tensor).", "",
              "| row | disk MB (fp32 rest) | quantized tensors B | accounted B | RAM at load MB | max |Δlogit| packed fp32 vs fake |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in qrows:
        lines.append(f"| {r['spec']} | {_mb(r['disk_bytes_fp32_rest'])} | {r['bytes_quantized_on_disk']} | "
                     f"{r['bytes_quantized_spec']:.0f} | {_mb(r['ram_params_buffers_at_load'])} | "
                     f"{r['max_logit_diff_packed_fp32']:.2e} |")
    if has_gguf:
        lines += ["", "GGUF export (`mixq.export.gguf.export_gguf`), loaded back with transformers (dequantized to "
                  "fp32) and scored on the same windows:", "",
                  "| row | GGUF MB | ppl | ggml types | fallbacks | error |", "|---|---:|---:|---|---:|---|"]
        for r in qrows:
            if r.get("source_dir"):
                lines.append(f"| {r['spec']} | — | — | — | — | not exported (`--dirs` row) |")
                continue
            types = ", ".join(f"{k} {v}" for k, v in sorted((r.get("gguf_types") or {}).items()))
            lines.append(f"| {r['spec']} | {_mb(r.get('gguf_bytes'))} | {_f(r.get('gguf_ppl'), '.3f')} | {types or '—'} | "
                         f"{_f(r.get('gguf_fallbacks'), 'd')} | {r.get('gguf_error') or ''} |")
    else:
        lines += ["", "GGUF: `mixq.export.gguf` is not installed in this checkout; no GGUF rows."]
    lines += ["", NOTES]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.results}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{args.results}.json").write_text(json.dumps({"command": cmd, "protocol": p.to_dict(),
                                                     "threads": torch.get_num_threads(), "rows": rows,
                                                     "fp32_transformers": hf32}, indent=2))
    print("\n".join(lines))


NOTES = """Notes
- **RAM** is what the model's tensors hold: parameters + buffers (each tensor once) — for a packed model the
  bit-packed codes and stored params of every quantized layer plus the bf16 embeddings and norms — and, next to it,
  the kernel layouts built on first use. The `cpu-int4` kernel keeps torch's int4pack copy of the codes
  (4 bits/weight) and a bf16 scale/zero pair per kernel group; once it exists the layer frees its own packed code
  stream (rebuilt on demand for `state_dict()` or the reference kernel), so the codes are in RAM once. The trellis
  kernel (`tcq-cpu`, where the CPU has AVX2 or AVX-512) keeps a lane-interleaved copy of the code stream (whole symbols
  per 32-bit word: up to 8/7 of the codes' bytes), float32 scales and its table; the layer's own codes stay
  (`state_dict()` and the reference kernel read them), so trellis codes are in RAM twice.
- **Group size.** W4-g128 on SmolLM2 means g96 on the 576-wide rows (`--group-fallback shrink`). The int4 kernel
  needs a power-of-two kernel group (32..256) inside each quantization group: g96 runs with kernel group 32
  (the fp16 scale repeated three times, exact), g64 with 64 and g128 with 128. Smaller kernel groups cost more
  kernel-layout RAM (32 bits per kernel group) — compare the W4-g128 and W4-g64 rows.
- **Exactness.** `cpu-int4` rounds each layer's fp16 scale once to bf16 (and the rare non-zero zero term), the
  rounding a bf16 model applies to every weight anyway; `cpu-int4-exact` splits them into exact bf16 pieces at
  1-3 GEMMs per call. Both are checked against the reference kernel in tests/test_qlinear.py.
- **Prefill** of more than 32 tokens (and the perplexity windows) runs the reference kernel: dequantize + dense
  GEMM beats the int4 GEMV kernel there. Trellis layers run their GEMV up to 16 tokens and above that decode the
  weight natively from the kernel's layout for a dense GEMM."""

if __name__ == "__main__":
    main()
