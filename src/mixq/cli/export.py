"""``mixq export``: a native mixq directory written as another export target (native v2, GGUF, GPTQ,
compressed-tensors: the table :data:`mixq.export.registry.EXPORTERS`).

Reads a native mixq directory (:mod:`mixq.export.native`, checksums verified).  Inputs are checked before
anything heavy runs; errors are one line with exit status 2 (see :mod:`mixq.cli`).
"""
from __future__ import annotations

from pathlib import Path

from ..export.native_write import REST_DTYPES
from ..export.registry import EXPORTERS, report_path
from ..jsonio import write_json_atomic
from .common import UserError, check_free_space, claim_output, human


def register(sub) -> None:
    names = ", ".join(EXPORTERS)
    rest = [t for t, e in EXPORTERS.items() if "rest_dtype" in e.options]
    x = sub.add_parser("export", help=f"write a mixq directory as another format ({names})",
                       description="Export the native mixq directory DIR.  "
                                   + "; ".join(f"{t}: {e.help}" for t, e in EXPORTERS.items()) + ".  "
                                   "A report is written next to the output (<out>.report.json for a file, "
                                   "<out>/export_report.json for a directory).")
    x.add_argument("dir", help="native mixq directory (from `mixq quantize`)")
    x.add_argument("--format", required=True, choices=tuple(EXPORTERS), help="output format")
    x.add_argument("--out", required=True, help="output path (a .gguf file for gguf, else a directory)")
    x.add_argument("--force", action="store_true", help="replace --out if it exists")
    x.add_argument("--rest-dtype", default="keep", choices=("keep", *REST_DTYPES),
                   help=f"{', '.join(rest)} only: dtype of the unquantized tensors (embeddings, norms); default keep")
    x.set_defaults(func=cmd_export)


def _exporter(fmt: str):
    try:
        return EXPORTERS[fmt].load()
    except ImportError as e:
        raise UserError(f"--format {fmt} is not available in this installation: {e}") from None


def cmd_export(args) -> int:
    from ..export.native import read_info

    src, out = Path(args.dir), Path(args.out)
    info = read_info(src)  # a missing / foreign / damaged directory fails here, before any work
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} already exists: choose another --out or pass --force")
    claim_output(out, args.force)  # before any work
    check_free_space(out, sum(f.stat().st_size for f in src.glob("*.safetensors")))  # about the size of the source
    options = {}
    if args.rest_dtype != "keep":
        if "rest_dtype" not in EXPORTERS[args.format].options:
            takes = ", ".join(t for t, e in EXPORTERS.items() if "rest_dtype" in e.options)
            raise UserError(f"--rest-dtype applies to --format {takes} only (got --format {args.format})")
        options["rest_dtype"] = REST_DTYPES[args.rest_dtype]
    if not EXPORTERS[args.format].in_place and out.resolve() == src.resolve():
        raise UserError(f"--out {out} is the source directory: write the {args.format} export elsewhere")
    report = _exporter(args.format)(src, out, overwrite=args.force, **options)
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
    if "bytes_quantized_on_disk" in report:  # a native directory's
        parts.append(f"quantized tensors {report['bytes_quantized_on_disk']} B packed vs "
                     f"{report['bytes_quantized_spec']:.0f} B accounted")
    return f"exported {src} -> {out} ({fmt}): " + ", ".join(parts) + f"; report {rp}"
