"""Deployment subcommands: ``mixq export`` (native v2, GGUF, GPTQ, compressed-tensors) and ``mixq generate``.

Both read a native mixq directory (:mod:`mixq.export.native`, checksums verified).  Inputs are
checked before anything heavy runs; errors are one line with exit status 2 (see :mod:`mixq.cli`).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from .cli import UserError, write_json_atomic

FORMATS = ("native", "gguf", "gptq", "compressed-tensors")
_EXPORTERS = {  # format -> (module, function); imported only when asked for
    "gguf": ("mixq.export.gguf", "export_gguf"),
    "gptq": ("mixq.export.hf", "export_gptq"),
    "compressed-tensors": ("mixq.export.hf", "export_compressed_tensors"),
}
_REST_DTYPES = ("keep", "fp32", "bf16", "fp16")


def register(sub) -> None:
    x = sub.add_parser("export", help="write a mixq directory as native v2, GGUF, GPTQ or compressed-tensors",
                       description="Export the native mixq directory DIR.  native: re-write it in the current "
                                   "format (e.g. upgrade a v1 directory); gguf: one .gguf file for llama.cpp; "
                                   "gptq / compressed-tensors: a Hugging Face directory for transformers / vLLM.  "
                                   "A report is written next to the output (<out>.report.json for a file, "
                                   "<out>/export_report.json for a directory).")
    x.add_argument("dir", help="native mixq directory (from `mixq quantize`)")
    x.add_argument("--format", required=True, choices=FORMATS, help="output format")
    x.add_argument("--out", required=True, help="output path (a .gguf file for gguf, else a directory)")
    x.add_argument("--force", action="store_true", help="replace --out if it exists")
    x.add_argument("--rest-dtype", default="keep", choices=_REST_DTYPES,
                   help="native only: dtype of the unquantized tensors (embeddings, norms); default keep")
    x.set_defaults(func=cmd_export)

    g = sub.add_parser("generate", help="greedy-decode a prompt with a mixq directory and report tokens/s",
                       description="Load DIR (packed QuantLinear layers by default) and greedily decode after "
                                   "--prompt.  The text goes to stdout, the timing line to stderr.")
    g.add_argument("dir", help="native mixq directory")
    g.add_argument("--prompt", required=True, help="prompt text (plain; --chat applies the chat template)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    g.add_argument("--packed", action=argparse.BooleanOptionalAction, default=True,
                   help="packed QuantLinear layers (default) or --no-packed: the dequantized fake-quant model")
    g.add_argument("--dtype", default=None, choices=["bf16", "fp32"],
                   help="activation / model dtype (default: bf16 with --packed, where the CPU int4 kernel "
                        "needs it; fp32 otherwise)")
    g.add_argument("--kernel", default="auto",
                   help="QuantLinear kernel: auto (default: cpu-int4 where it applies, else reference), reference, "
                        "cpu-int4 (bf16, params rounded to bf16), cpu-int4-exact (bf16, exact params)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-sequence token")
    g.set_defaults(func=cmd_generate)


# ---------------------------------------------------------------------------- export
def _exporter(fmt: str):
    mod_name, fn_name = _EXPORTERS[fmt]
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise UserError(f"--format {fmt} is not available in this installation: cannot import {mod_name} ({e})") from None
    fn = getattr(mod, fn_name, None)
    if fn is None:
        raise UserError(f"--format {fmt} is not available in this installation: {mod_name} has no {fn_name}()")
    return fn


def report_path(out: Path) -> Path:
    """Where the export report goes: inside an output directory, next to an output file."""
    return out / "export_report.json" if out.is_dir() else out.with_name(out.name + ".report.json")


def cmd_export(args) -> int:
    import torch

    from .export.native import read_info, rewrite_native

    src, out = Path(args.dir), Path(args.out)
    info = read_info(src)  # a missing / foreign / damaged directory fails here, before any work
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} already exists: choose another --out or pass --force")
    if args.rest_dtype != "keep" and args.format != "native":
        raise UserError(f"--rest-dtype applies to --format native only (got --format {args.format})")
    if args.format != "native" and out.resolve() == src.resolve():
        raise UserError(f"--out {out} is the source directory: write the {args.format} export elsewhere")
    if args.format == "native":
        rest_dtype = {"keep": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.rest_dtype]
        report = rewrite_native(src, out, overwrite=args.force, rest_dtype=rest_dtype)
    else:
        report = _exporter(args.format)(src, out, overwrite=args.force)
    if not isinstance(report, dict):
        report = {"result": report}
    rp = report_path(out)
    write_json_atomic(rp, report, overwrite=True)
    print(_summary(src, out, args.format, info, report, rp))
    return 0


def _count(v) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, (list, dict, tuple)):
        return len(v)
    return None


def _disk_bytes(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _summary(src: Path, out: Path, fmt: str, info: dict, report: dict, rp: Path) -> str:
    from .commands import _human

    totals = report.get("totals") if isinstance(report.get("totals"), dict) else {}
    tensors = _count(report.get("tensors", totals.get("tensors")))
    fallbacks = _count(report.get("fallbacks", totals.get("fallbacks")))
    parts = [f"{len(info['layers'])} quantized layers"]
    if tensors is not None:
        parts.append(f"{tensors} tensors")
    if fallbacks is not None:
        parts.append(f"{fallbacks} fallbacks")
    parts.append(f"{_human(_disk_bytes(out))} on disk")
    if fmt == "native":
        parts.append(f"quantized tensors {report['bytes_quantized_on_disk']} B packed vs "
                     f"{report['bytes_quantized_spec']:.0f} B accounted")
    return f"exported {src} -> {out} ({fmt}): " + ", ".join(parts) + f"; report {rp}"


# ---------------------------------------------------------------------------- generate
def cmd_generate(args) -> int:
    import torch

    from .export.native import read_info
    from .runtime import canonical_name, greedy_generate, kernel_usage
    from .runtime.generate import max_positions

    if args.max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if not args.prompt:
        raise UserError("--prompt is empty: give some text to continue")
    if args.kernel != "auto" and not args.packed:
        raise UserError(f"--kernel {args.kernel} needs --packed (the fake-quant model has no QuantLinear layers)")
    canonical_name(args.kernel)
    read_info(args.dir)
    dtype_name = args.dtype or ("bf16" if args.packed else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    from .export.native import load_quantized

    model, tok, info = load_quantized(args.dir, dtype=dtype, packed=args.packed, kernel=args.kernel)
    if tok is None:
        raise UserError(f"{args.dir} has no tokenizer files: re-quantize it with this mixq version")
    if args.chat:
        if not getattr(tok, "chat_template", None):
            raise UserError(f"the tokenizer of {args.dir} has no chat template: drop --chat")
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(args.prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise UserError("the prompt encodes to no tokens")
    limit = max_positions(model)
    if limit is not None and ids.shape[1] + args.max_new_tokens > limit:
        raise UserError(f"prompt ({ids.shape[1]} tokens) + --max-new-tokens {args.max_new_tokens} exceeds the "
                        f"model's {limit} positions")
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tok.eos_token_id
    res = greedy_generate(model, ids, args.max_new_tokens, eos_token_id=eos, stop_at_eos=not args.no_stop)
    print(tok.decode(res.new_ids, skip_special_tokens=True))
    speed = res.decode_tokens_per_s
    kernels = ", ".join(f"{k} x{n}" for k, n in sorted(kernel_usage(model).items())) if args.packed else "fake-quant"
    print(f"{len(res.new_ids)} new tokens after {res.prompt_tokens}: decode "
          f"{'-' if speed is None else f'{speed:.1f}'} tokens/s, prefill {res.prefill_s * 1000:.0f} ms "
          f"({dtype_name}, {'packed' if args.packed else 'fake-quant'}, kernels: {kernels}, "
          f"{torch.get_num_threads()} threads)", file=sys.stderr)
    return 0
