"""Writing the native mixq directory (:mod:`mixq.export.native` describes its layout and reads it).

:func:`save_quantized` packs a quantization's stored parts and writes the directory atomically (a temporary
sibling renamed into place, every file's size and sha256 in ``mixq.json``); :func:`rewrite_native` copies a
directory (v1 or v2) as v2 without re-quantizing.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file
from torch import nn

from .. import stio
from ..algorithms.composite.storage import pack_layer, stored_form
from ..atomic import atomic_dir
from ..formats import QTensor
from ..models import file_sha256
from .native import FORMAT, FORMAT_VERSION, TENSOR_FILES, read_info, read_packed, run_meta
from .registry import REPORT_FILE

REST_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # rest_dtype's, by name


def save_quantized(out_dir: str | os.PathLike, model: nn.Module, tokenizer, qtensors: dict[str, QTensor],
                   meta: dict, *, overwrite: bool = False, rest_dtype: torch.dtype | None = None,
                   side_files: dict[str, bytes] | None = None) -> Path:
    """Write the native directory (v2) atomically.  Refuses an existing ``out_dir`` unless ``overwrite``.

    ``qtensors`` are bit-packed in their spec's stored form (:func:`mixq.algorithms.composite.storage.stored_form`:
    :class:`~mixq.runtime.PackedWeight`, or for intra-tensor composites, e.g. from ``quantize_model`` with a plan that
    chose them, :class:`~mixq.algorithms.composite.storage.PackedComposite`);
    ``rest_dtype`` optionally casts
    the floating-point tensors of ``rest.safetensors`` (e.g. ``torch.bfloat16``; default: as in ``model``).
    ``side_files``: more files (name -> bytes, e.g. a source directory's ``plan.json``) written inside the
    same atomic write.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output directory {out} already exists: choose another --out or pass --force")
    packed = {fqn: q if hasattr(q, "tensor_meta") else pack_layer(q)  # tensor_meta: a calib.checkpoint.StoredLayer
              for fqn, q in qtensors.items()}

    def extra(tmp: Path) -> None:
        model.config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None and getattr(model, "can_generate", lambda: False)():
            with contextlib.suppress(Exception):  # an invalid generation config must not block the save
                gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, data in (side_files or {}).items():
            (tmp / name).write_bytes(data)

    return _write_dir(out, packed, _rest_state(model, qtensors), meta, extra, overwrite=overwrite,
                      rest_dtype=rest_dtype)


def _write_dir(out: Path, packed: dict, rest: dict[str, torch.Tensor], meta: dict,
               write_extra: Callable[[Path], None], *, overwrite: bool, rest_dtype: torch.dtype | None) -> Path:
    if out.exists() and not overwrite:
        raise FileExistsError(f"output directory {out} already exists: choose another --out or pass --force")
    with atomic_dir(out) as tmp:
        layout: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        where: dict[str, tuple[str, str]] = {}
        layers: dict[str, dict] = {}
        on_disk = spec_bits = n_tensors = 0
        for fqn, pw in packed.items():
            entry = {}
            parts = pw.tensor_meta() if hasattr(pw, "tensor_meta") else \
                {k: (t.dtype, tuple(t.shape)) for k, t in pw.tensors().items()}
            for name, (dt, shape) in parts.items():
                layout.append((f"{fqn}.{name}", dt, tuple(shape)))
                where[f"{fqn}.{name}"] = (fqn, name)
                entry[name] = {"dtype": str(dt).removeprefix("torch."), "shape": list(shape)}
            bits = pw.spec.cost(pw.shape).total
            layers[fqn] = {"spec": pw.spec.to_dict(), "shape": list(pw.shape), "tensors": entry,
                           "bytes": pw.nbytes, "bits_spec": bits}
            kind = getattr(stored_form(pw.spec), "kind", None)  # "composite" for a composite family's spec
            if kind:
                layers[fqn]["kind"] = kind
            on_disk += pw.nbytes
            spec_bits += bits
            n_tensors += len(entry)

        def produce(key: str) -> torch.Tensor:  # one layer's tensors at a time (a stored layer is read from disk)
            fqn, name = where[key]
            pw = packed[fqn]
            return pw.tensor(name) if hasattr(pw, "tensor") else pw.tensors()[name].detach()

        stio.write(tmp / "quantized.safetensors", layout, produce,
                   metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        if rest_dtype is not None:
            rest = {k: v.to(rest_dtype) if v.is_floating_point() else v for k, v in rest.items()}
        save_file(rest, tmp / "rest.safetensors")
        write_extra(tmp)
        files = {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)}
                 for p in sorted(tmp.iterdir()) if p.is_file() and p.name != "mixq.json"}
        doc = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **run_meta(meta),
            "layers": layers,
            "storage": {
                "bytes_quantized_on_disk": on_disk,
                "bits_quantized_spec": spec_bits,
                "bytes_quantized_spec": spec_bits / 8,
                "padding_bits": on_disk * 8 - spec_bits,
                "quantized_tensors": n_tensors,
                "bytes_rest": sum(t.numel() * t.element_size() for t in rest.values()),
                "rest_dtype": None if rest_dtype is None else str(rest_dtype).removeprefix("torch."),
                "bytes_files": sum(f["size"] for f in files.values()),
            },
            "files": files,
        }
        (tmp / "mixq.json").write_text(json.dumps(doc, indent=2))
    return out


def _rest_state(model: nn.Module, qtensors: dict) -> dict[str, torch.Tensor]:
    """The model's tensors other than the quantized weights, on the CPU; an entry accelerate offloaded (on
    ``meta``) is read from its offload store."""
    from ..calib.dispatch import stored_tensor

    skip = {f"{fqn}.weight" for fqn in qtensors}
    out, seen = {}, {}
    for name, t in model.state_dict(keep_vars=False).items():
        if name in skip:
            continue
        if t.is_meta:
            t = stored_tensor(model, name)
            if t is None:
                raise ValueError(f"{name} is on the meta device and no offload store holds it: load the model "
                                 "with its weights (or through accelerate's offloading) before saving")
        key = (t.data_ptr(), t.shape, t.dtype)
        if t.data_ptr() and key in seen:  # tied tensor: stored once
            continue
        seen[key] = name
        out[name] = t.detach().to("cpu", copy=True).contiguous()
    return out


def rewrite_native(src: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                   rest_dtype: torch.dtype | None = None, verify: bool = True) -> dict:
    """Re-write the native directory ``src`` (v1 or v2) as v2 at ``out`` (may be ``src`` itself with
    ``overwrite``).  Tensors are copied, not re-quantized; other files (config, tokenizer, plan) too.
    Returns a report dict."""
    src, out = Path(src), Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output {out} already exists: choose another --out or pass --force")
    info, packed, rest = read_packed(src, verify=verify)
    # read every side file now: ``out`` may be ``src``
    side = {p.name: p.read_bytes() for p in sorted(src.iterdir())
            if p.is_file() and p.name not in ("mixq.json", REPORT_FILE, *TENSOR_FILES)}
    meta = run_meta(info)
    meta["rewritten_from"] = {"path": str(src), "format_version": info["format_version"]}

    def extra(tmp: Path) -> None:
        for name, data in side.items():
            (tmp / name).write_bytes(data)

    _write_dir(out, packed, rest, meta, extra, overwrite=overwrite, rest_dtype=rest_dtype)
    doc = read_info(out)
    st = doc["storage"]
    return {"format": "native", "format_version": FORMAT_VERSION, "source": str(src),
            "source_format_version": info["format_version"], "out": str(out),
            "layers": len(packed), "tensors": st["quantized_tensors"] + len(rest),
            "fallbacks": len(info.get("group_fallback") or {}), **{k: st[k] for k in
            ("bytes_quantized_on_disk", "bytes_quantized_spec", "padding_bits", "bytes_rest", "bytes_files")}}
