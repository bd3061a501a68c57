"""Hugging Face / vLLM exports of a native mixq directory: compressed-tensors and GPTQ (v1).

Both exports write the *same integer codes* that ``mixq quantize`` chose, with the same scales
and zero points, so the exported weights dequantize to exactly mixq's fake-quant weights.  Only
specs that a format can hold exactly are exported; anything else is refused with one line that
names the layers and the spec to use instead.

::

    report = export_compressed_tensors(src_dir, out_dir)   # config.json quantization_config + model.safetensors
    report = export_gptq(src_dir, out_dir)                 # + quantize_config.json
    w = read_back_compressed(out_dir)                      # {fqn: float32 [out, in]}, plain torch code
    w = read_back_gptq(out_dir)

mixq codes (``mixq.formats.integer``): unsigned ``q`` in ``0 .. 2^b - 1``, ``mid = 2^(b-1)``;
symmetric ``x = scale * (q - mid)``, asymmetric (integer zero) ``x = scale * (q - zero)``.

compressed-tensors ``pack-quantized`` (layout of compressed-tensors 0.20.0)
    ``<fqn>.weight_packed``      int32 ``[out, ceil(in * b / 32)]``: each row is a dense LSB-first bit
                                 stream of ``q_signed + mid`` (element ``j`` at bits ``j*b .. j*b+b-1``,
                                 crossing word boundaries, zero padded).  compressed-tensors stores
                                 signed ``q_signed = q - mid``, so the stored field is mixq's code.
    ``<fqn>.weight_scale``       ``[out, in / g]`` (channel: ``[out, 1]``) in the scale's own dtype
                                 (fp16/bf16/fp32; E8M0 and E4M3 scales in the narrowest float that holds them)
    ``<fqn>.weight_zero_point``  asymmetric only: ``zp_signed = zero - mid`` packed the same way along
                                 the *output* dim: int32 ``[ceil(out * b / 32), in / g]``
    ``<fqn>.weight_shape``       int64 ``[out, in]``
    value: ``(q_signed - zp_signed) * scale`` = mixq's value.  One config group per distinct
    (bits, group size, symmetric), ``targets`` = exact module names, ``ignore`` = every other linear
    (lm_head included when kept).  For 2, 4 and 8 bits the dense stream equals the older
    "32 // b values per int32" layout that vLLM's WNA16 kernels read; 3/5/6/7-bit rows need
    compressed-tensors >= 0.20 (older readers expect another shape for rows of 192+ weights).

GPTQ v1 ("gptq" checkpoint format of AutoGPTQ / GPTQModel, as vLLM and transformers read it)
    ``<fqn>.qweight``  int32 ``[in * b / 32, out]``: each *column* a dense LSB-first stream of ``q``
                       along the input dim (for b = 2, 4, 8 this is 32/b codes per word; for b = 3 it
                       is AutoGPTQ's 10-10-10 + straddle layout, 32 codes in 3 words)
    ``<fqn>.qzeros``   int32 ``[groups, out * b / 32]``: ``zero - 1`` per group and output, packed
                       along the output dim ("v1 stores zeros minus one"); symmetric layers store
                       ``mid - 1``.  A zero point of 0 cannot be stored in v1 and is refused.
    ``<fqn>.scales``   fp16 ``[groups, out]`` (must hold mixq's scales exactly)
    ``<fqn>.g_idx``    int32 ``[in]``, ``i // group_size`` (desc_act is false)
    value: ``scales[g_idx[i], o] * (q[i, o] - (qzeros[g_idx[i], o] + 1))``.  The most common
    (bits, group_size, sym) is the base config; other layers get GPTQModel ``dynamic`` overrides
    ``"+:^<escaped fqn>$": {bits, group_size, sym}``, kept linears ``"-:^<fqn>$": {}``, and, where
    all of a vLLM fused layer's shards agree, the same entry for the fused name (``qkv_proj``,
    ``gate_up_proj``).  Bits other than 2, 3, 4, 8 are refused.

Loaders (transformers 5.23.0, compressed-tensors 0.20.0, CPU; :func:`mixq.export.hf_readback.check_with_transformers`)
    compressed-tensors: ``AutoModelForCausalLM.from_pretrained`` loads symmetric exports, mixed plans
    included, with weights and logits equal to mixq's.  Asymmetric layers do not load there (the
    meta-device compression expects an unpacked ``weight_zero_point``; checkpoints compressed-tensors
    writes itself fail the same way), and ``dequantize=True`` applies one scheme to every dense layer;
    vLLM and compressed-tensors' own decompressor read them.  GPTQ: transformers needs optimum +
    gptqmodel (not installable next to torch 2.13) and its ``GPTQConfig`` drops ``dynamic``, so mixed
    GPTQ plans are for GPTQModel / vLLM.

Everything else (embeddings, norms, biases, a kept lm_head) is copied from ``rest.safetensors``
in its stored dtype (or ``dtype=``), with the tokenizer and generation config.  Output
directories are written to a temporary sibling, verified by the independent readers below (every
layer must equal mixq's dequantized weight bit for bit) and only then renamed into place.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import __version__
from ..formats import QTensor, dequantize
from ..granularity import PerGroup
from ..atomic import atomic_dir
from .hf_pack import ct_tensors, gptq_tensors
from .hf_readback import DTYPE_NAME, read_back_compressed, read_back_gptq, target_dtype
from .hf_source import ExportError, Source, ct_problem, gptq_problem, open_source
from .registry import REPORT_FILE

log = logging.getLogger(__name__)

__all__ = [
    "ExportError", "export_compressed_tensors", "export_gptq", "read_back_compressed", "read_back_gptq",
]

WEIGHTS_FILE = "model.safetensors"
_COPY_GLOBS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt", "*.model",
               "*.tiktoken", "chat_template*", "generation_config.json")
# vLLM fuses these sibling linears into one layer; they must share one scheme there
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


# ---------------------------------------------------------------------- shared writer plumbing
def _dense_tensors(src: Source, dtype: torch.dtype | None) -> tuple[dict[str, torch.Tensor], torch.dtype]:
    """Every non-quantized tensor (cast to ``dtype`` when given) and the model dtype to record."""
    dense = {**src.rest, **{f"{f}.weight": w for f, w in src.keep.items()}}
    if dtype is not None:
        dense = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in dense.items()}
        return dense, dtype
    counts = Counter()
    for v in dense.values():
        if v.is_floating_point():
            counts[v.dtype] += v.numel()
    common = counts.most_common(1)[0][0] if counts else torch.float32
    return dense, (common if common in DTYPE_NAME else torch.float32)


def _write_config(tmp: Path, src: Source, qcfg: dict, model_dtype: torch.dtype) -> None:
    cfg = dict(src.config)
    cfg["quantization_config"] = qcfg
    cfg["dtype"] = DTYPE_NAME[model_dtype]
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = DTYPE_NAME[model_dtype]
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _copy_side_files(src: Path, tmp: Path) -> list[str]:
    copied = []
    for pattern in _COPY_GLOBS:
        for f in sorted(src.glob(pattern)):
            if f.is_file() and not (tmp / f.name).exists():
                shutil.copy2(f, tmp / f.name)
                copied.append(f.name)
    return copied


def _check_out(src_dir, out_dir, overwrite: bool) -> Path:
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output directory {out} already exists: choose another --out or pass --force")
    if out.exists() and out.resolve() == Path(src_dir).resolve():
        raise ValueError(f"{out} is the source directory: write the export somewhere else")
    return out


def _verify(src: Source, got: dict[str, torch.Tensor], fmt: str) -> dict[str, float]:
    """Per layer ``max |read_back - mixq dequantized|``; raises unless every layer is bit-identical."""
    diffs = {}
    for fqn, q in src.layers.items():
        if fqn not in got:
            raise ExportError(f"{fmt} export: the re-read found no weight for {fqn} (internal error)")
        ref = dequantize(q)
        w = got[fqn]
        if w.shape != ref.shape:
            raise ExportError(f"{fmt} export: {fqn} re-reads as {tuple(w.shape)}, expected {tuple(ref.shape)} "
                              "(internal error)")
        diffs[fqn] = float((w - ref).abs().max()) if w.numel() else 0.0
        if not torch.equal(w, ref):
            raise ExportError(f"{fmt} export: {fqn} does not re-read to mixq's weights (max |diff| {diffs[fqn]:.3g}); "
                              "nothing was written (internal error, please report)")
    return diffs


def _fusion_report(src: Source, state: dict[str, object]) -> tuple[list[str], dict[str, object]]:
    """vLLM fuses q/k/v and gate/up: warnings where shards differ, and fused names whose shards agree."""
    warnings, agreed = [], {}
    for fused, shards in _FUSED.items():
        parents = {f.rsplit(".", 1)[0] for f in src.modules if f.rsplit(".", 1)[-1] == shards[0]}
        for parent in sorted(parents):
            names = [f"{parent}.{s}" for s in shards]
            if not all(n in src.modules for n in names) or f"{parent}.{fused}" in src.modules:
                continue
            states = [state.get(n) for n in names]
            if any(s != states[0] for s in states):
                warnings.append(f"{parent}: {', '.join(shards)} use different schemes; vLLM fuses them into {fused} "
                                "and will refuse this checkpoint (transformers loads it)")
            else:
                agreed[f"{parent}.{fused}"] = states[0]
    return warnings, agreed


def _declared_group(q: QTensor) -> int | None:
    """The group size a config names: ``gN`` -> N, per channel -> None."""
    return q.spec.granularity.size if isinstance(q.spec.granularity, PerGroup) else None


def _layer_entry(q: QTensor, diff: float) -> dict:
    g = _declared_group(q)
    return {"spec": q.spec.name, "bits": q.spec.bits, "group_size": -1 if g is None else g,
            "symmetric": q.spec.symmetric, "shape": list(q.shape), "max_abs_diff": diff}


def _finish(tmp: Path, out: Path, src: Source, fmt: str, qcfg: dict, diffs: dict, kept: list[str],
            model_dtype: torch.dtype, warnings: list[str], copied: list[str], n_tensors: int) -> dict:
    files = sorted(p.name for p in tmp.iterdir()) + [REPORT_FILE]
    report = {
        "format": fmt,
        "source": str(src.path),
        "out": str(out),
        "dtype": DTYPE_NAME[model_dtype],
        "quantization_config": qcfg,
        "layers": {f: _layer_entry(q, diffs[f]) for f, q in src.layers.items()},
        "kept": kept,
        "tensors": n_tensors,
        "fallbacks": len(src.info.get("group_fallback") or {}),
        "max_abs_diff": max(diffs.values(), default=0.0),
        "exact": all(d == 0.0 for d in diffs.values()),
        "verified_by": f"{'read_back_compressed' if fmt == 'compressed-tensors' else 'read_back_gptq'} "
                       "vs mixq dequantize (float32, bit-identical)",
        "copied": copied,
        "files": files,
        "bytes": sum(p.stat().st_size for p in tmp.iterdir()),
        "warnings": warnings,
        "mixq_version": __version__,
    }
    (tmp / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    return report


def _scale_warnings(src: Source, model_dtype: torch.dtype) -> list[str]:
    bad = [f for f, q in src.layers.items()
           if not torch.equal(q.params.scale.to(model_dtype).float(), q.params.scale.float())]
    if not bad:
        return []
    return [f"scales of {len(bad)} layer(s) (e.g. {bad[0]}) are not exact in the model dtype "
            f"{DTYPE_NAME[model_dtype]}; a loader that casts scales to it rounds them (export with dtype='fp32')"]


# ---------------------------------------------------------------------- compressed-tensors
def export_compressed_tensors(src_dir, out_dir, overwrite: bool = False, *, dtype=None) -> dict:
    """Write ``src_dir`` (a native mixq directory) as a compressed-tensors ``pack-quantized`` checkpoint.

    ``dtype``: ``None`` keeps every non-quantized tensor in its stored dtype; ``"fp16"|"bf16"|"fp32"``
    casts them (and records it as the model dtype).  Returns the report (also written to
    ``out_dir/export_report.json``).  Raises :class:`ExportError` for specs the format cannot hold
    exactly and ``FileExistsError`` if ``out_dir`` exists and ``overwrite`` is false.
    """
    out = _check_out(src_dir, out_dir, overwrite)
    target = target_dtype(dtype)
    fmt = "compressed-tensors"
    src = open_source(src_dir, fmt, ct_problem)

    keys = {f: (q.spec.bits, _declared_group(q), q.spec.symmetric) for f, q in src.layers.items()}
    order = list(dict.fromkeys(keys[f] for f in src.modules if f in keys))
    config_groups = {}
    for i, (bits, g, sym) in enumerate(order):
        weights = {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": "group" if g else "channel",
                   "group_size": g, "dynamic": False, "actorder": None}
        config_groups[f"group_{i}"] = {"targets": [f for f in src.modules if keys.get(f) == (bits, g, sym)],
                                       "weights": weights, "input_activations": None, "output_activations": None}
    kept = [f for f, kind in src.modules.items() if kind != "embedding" and f not in src.layers]
    qcfg = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": kept, "kv_cache_scheme": None, "global_compression_ratio": None}

    dense, model_dtype = _dense_tensors(src, target)
    tensors = dict(dense)
    for f, q in src.layers.items():
        tensors.pop(f"{f}.weight", None)
        tensors.update(ct_tensors(f, q))
    warnings, _ = _fusion_report(src, {f: keys.get(f, "kept") for f in src.modules})
    warnings += _scale_warnings(src, model_dtype)
    if any(not k[2] for k in keys.values()):
        warnings.append("asymmetric layers: transformers 5.23 with compressed-tensors 0.20 cannot load them (its "
                        "meta-device compression expects an unpacked weight_zero_point; checkpoints written by "
                        "compressed-tensors itself fail the same way); vLLM and compressed-tensors' "
                        "decompressor read them")
    odd = sorted({k[0] for k in keys.values()} - {4, 8})
    if odd:
        warnings.append(f"{'/'.join(map(str, odd))}-bit groups load in transformers with compressed-tensors>=0.20 "
                        "(decompressed to dense); vLLM's WNA16 kernels run 4- and 8-bit weights only")
    with atomic_dir(out) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        _write_config(tmp, src, qcfg, model_dtype)
        copied = _copy_side_files(src.path, tmp)
        diffs = _verify(src, read_back_compressed(tmp), fmt)
        report = _finish(tmp, out, src, fmt, qcfg, diffs, kept, model_dtype, warnings, copied, len(tensors))
    return report


# ---------------------------------------------------------------------- GPTQ
def _rx(name: str) -> str:
    return "^" + re.escape(name) + "$"


def export_gptq(src_dir, out_dir, overwrite: bool = False, *, dtype=None) -> dict:
    """Write ``src_dir`` as a GPTQ v1 checkpoint (``quantize_config.json`` + ``config.json`` quantization_config).

    Mixed plans use GPTQModel's ``dynamic`` per-module overrides around the most common
    (bits, group_size, sym).  ``dtype`` as in :func:`export_compressed_tensors`; GPTQ kernels compute
    in fp16, so a float32 source gets a warning suggesting ``dtype="fp16"``.
    """
    out = _check_out(src_dir, out_dir, overwrite)
    target = target_dtype(dtype)
    fmt = "gptq"
    src = open_source(src_dir, fmt, gptq_problem)

    keys = {f: (q.spec.bits, _declared_group(q) or -1, q.spec.symmetric) for f, q in src.layers.items()}
    counts = Counter(keys.values())
    first = {k: i for i, k in reversed(list(enumerate(keys.values())))}
    base = max(counts, key=lambda k: (counts[k], -first[k]))
    kept = [f for f, kind in src.modules.items() if kind != "embedding" and f not in src.layers]
    state = {f: keys.get(f, "kept") for f in src.modules if src.modules[f] != "embedding"}
    warnings, agreed = _fusion_report(src, state)
    dynamic: dict[str, dict] = {}
    for f in src.modules:
        if f in keys and keys[f] != base:
            b, g, s = keys[f]
            dynamic[f"+:{_rx(f)}"] = {"bits": b, "group_size": g, "sym": s}
        elif f in kept and f != src.lm_head:
            dynamic[f"-:{_rx(f)}"] = {}
    for fused, st in agreed.items():
        if st == "kept":
            dynamic[f"-:{_rx(fused)}"] = {}
        elif st != base:
            dynamic[f"+:{_rx(fused)}"] = {"bits": st[0], "group_size": st[1], "sym": st[2]}
    qcfg = {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": base[0], "group_size": base[1],
            "sym": base[2], "desc_act": False, "static_groups": False, "true_sequential": True,
            "lm_head": src.lm_head in src.layers, "pack_dtype": "int32",
            "meta": {"quantizer": [f"mixq:{__version__}"]}}
    if dynamic:
        qcfg["dynamic"] = dynamic
        warnings.append("mixed plan: per-module `dynamic` overrides are read by GPTQModel (GPTQModel.load) and vLLM; "
                        "transformers 5.23's GPTQConfig drops `dynamic`, so AutoModelForCausalLM can load only "
                        "uniform GPTQ exports")

    dense, model_dtype = _dense_tensors(src, target)
    tensors = dict(dense)
    for f, q in src.layers.items():
        tensors.pop(f"{f}.weight", None)
        tensors.update(gptq_tensors(f, q))
    if model_dtype != torch.float16:
        warnings.append(f"the model dtype is {DTYPE_NAME[model_dtype]}; GPTQ kernels (vLLM, GPTQModel) compute in "
                        "float16: export with dtype='fp16' for them")
    with atomic_dir(out) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        _write_config(tmp, src, qcfg, model_dtype)
        (tmp / "quantize_config.json").write_text(json.dumps(qcfg, indent=2) + "\n")
        copied = _copy_side_files(src.path, tmp)
        diffs = _verify(src, read_back_gptq(tmp), fmt)
        report = _finish(tmp, out, src, fmt, qcfg, diffs, kept, model_dtype, warnings, copied, len(tensors))
    return report
