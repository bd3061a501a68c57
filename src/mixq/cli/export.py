"""``mixq export``: a native mixq directory as native v2, GGUF, GPTQ or compressed-tensors.

Reads a native mixq directory (:mod:`mixq.export.native`, checksums verified).  Inputs are checked before
anything heavy runs; errors are one line with exit status 2 (see :mod:`mixq.cli`).
"""
from __future__ import annotations

import importlib
from pathlib import Path

from ..config.protocol import TARGETS  # the export targets every element format answers for
from ..jsonio import write_json_atomic
from .common import UserError, check_free_space, claim_output, human

_EXPORTERS = {  # format -> (module, function), every target but native; imported only when asked for
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
    x.add_argument("--format", required=True, choices=TARGETS, help="output format")
    x.add_argument("--out", required=True, help="output path (a .gguf file for gguf, else a directory)")
    x.add_argument("--force", action="store_true", help="replace --out if it exists")
    x.add_argument("--rest-dtype", default="keep", choices=_REST_DTYPES,
                   help="native only: dtype of the unquantized tensors (embeddings, norms); default keep")
    x.set_defaults(func=cmd_export)


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

    from ..export.native import read_info
    from ..export.native_write import rewrite_native

    src, out = Path(args.dir), Path(args.out)
    info = read_info(src)  # a missing / foreign / damaged directory fails here, before any work
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} already exists: choose another --out or pass --force")
    claim_output(out, args.force)  # before any work
    check_free_space(out, sum(f.stat().st_size for f in src.glob("*.safetensors")))  # about the size of the source
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
    totals = report.get("totals") if isinstance(report.get("totals"), dict) else {}
    tensors = _count(report.get("tensors", totals.get("tensors")))
    fallbacks = _count(report.get("fallbacks", totals.get("fallbacks")))
    parts = [f"{len(info['layers'])} quantized layers"]
    if tensors is not None:
        parts.append(f"{tensors} tensors")
    if fallbacks is not None:
        parts.append(f"{fallbacks} fallbacks")
    parts.append(f"{human(_disk_bytes(out))} on disk")
    if fmt == "native":
        parts.append(f"quantized tensors {report['bytes_quantized_on_disk']} B packed vs "
                     f"{report['bytes_quantized_spec']:.0f} B accounted")
    return f"exported {src} -> {out} ({fmt}): " + ", ".join(parts) + f"; report {rp}"
