"""The native mixq directory: what ``mixq quantize`` writes and ``mixq eval`` reads.

Layout::

    DIR/
      mixq.json              format version, base model, method, per-layer specs, size accounting
      quantized.safetensors  per quantized layer: ``<fqn>.codes`` (uint8, one code per weight)
                             and its parameters ``<fqn>.scale|zero|offset|codebook|tensor_scale``
      rest.safetensors       every other tensor (norms, embeddings that were kept, biases)
      config.json, tokenizer files

Codes are stored one per byte here; bit-packing to the accounted size is the runtime's job
(``mixq.runtime``).  Everything is loaded with safetensors — nothing is unpickled — and the
directory is written to a temporary sibling and renamed into place, so an interrupted write
never leaves a half directory behind.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..arch import get_weight, set_weight
from ..config import QuantSpec
from ..formats import QParams, QTensor, dequantize

log = logging.getLogger(__name__)

FORMAT = "mixq-native"
FORMAT_VERSION = 1
_PARAM_FIELDS = ("scale", "zero", "offset", "codebook", "tensor_scale")


class CheckpointError(ValueError):
    pass


def save_quantized(out_dir: str | os.PathLike, model: nn.Module, tokenizer, qtensors: dict[str, QTensor],
                   meta: dict, *, overwrite: bool = False) -> Path:
    """Write the native directory atomically.  Refuses an existing ``out_dir`` unless ``overwrite``."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output directory {out} already exists: choose another --out or pass --force")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        qt_tensors: dict[str, torch.Tensor] = {}
        for fqn, q in qtensors.items():
            qt_tensors[f"{fqn}.codes"] = q.codes.contiguous()
            for f in _PARAM_FIELDS:
                t = getattr(q.params, f)
                if t is not None:
                    qt_tensors[f"{fqn}.{f}"] = t.detach().to(torch.float32).reshape(-1 if f == "tensor_scale" else t.shape).contiguous()
        save_file(qt_tensors, tmp / "quantized.safetensors")
        save_file(_rest_state(model, qtensors), tmp / "rest.safetensors")
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        doc = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **meta,
            "layers": {f: {"spec": q.spec.to_dict(), "shape": list(q.shape)} for f, q in qtensors.items()},
        }
        (tmp / "mixq.json").write_text(json.dumps(doc, indent=2))
        if out.exists():
            backup = out.with_name(out.name + ".old")
            os.replace(out, backup)
            os.replace(tmp, out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _rest_state(model: nn.Module, qtensors: dict[str, QTensor]) -> dict[str, torch.Tensor]:
    skip = {f"{fqn}.weight" for fqn in qtensors}
    out, seen = {}, {}
    for name, t in model.state_dict(keep_vars=False).items():
        if name in skip:
            continue
        key = (t.data_ptr(), t.shape, t.dtype)
        if t.data_ptr() and key in seen:  # tied tensor: stored once
            continue
        seen[key] = name
        out[name] = t.detach().contiguous().clone()
    return out


def read_info(path: str | os.PathLike) -> dict:
    p = Path(path) / "mixq.json"
    if not p.is_file():
        raise CheckpointError(f"{path} is not a mixq directory (no mixq.json): write one with `mixq quantize`")
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p} is not valid JSON ({e}): the directory is damaged; quantize again") from None
    if doc.get("format") != FORMAT or doc.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{p}: unsupported format {doc.get('format')!r} v{doc.get('format_version')}")
    return doc


def is_quantized_dir(path) -> bool:
    return (Path(path) / "mixq.json").is_file()


@torch.no_grad()
def load_quantized(path: str | os.PathLike, *, dtype=torch.float32):
    """Load a native directory as a fake-quant model.  Returns ``(model, tokenizer, info)``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    info = read_info(path)
    try:
        qt = load_file(path / "quantized.safetensors")
        rest = load_file(path / "rest.safetensors")
    except Exception as e:  # safetensors raises its own error types for truncated headers/data
        raise CheckpointError(f"cannot read tensors in {path}: {e}; the file is truncated or damaged") from None
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(rest, strict=False)
    if unexpected:
        raise CheckpointError(f"{path}: tensors {unexpected[:3]} do not belong to a {config.model_type} model")
    model.tie_weights()
    mods = dict(model.named_modules())
    for fqn, layer in info["layers"].items():
        if fqn not in mods or f"{fqn}.codes" not in qt:
            raise CheckpointError(f"{path}: layer {fqn} listed in mixq.json is missing from the model or the tensors")
        spec = QuantSpec.from_dict(layer["spec"])
        params = QParams(**{f: qt.get(f"{fqn}.{f}") for f in _PARAM_FIELDS})
        q = QTensor(codes=qt[f"{fqn}.codes"], params=params, spec=spec, shape=tuple(layer["shape"]))
        if tuple(get_weight(mods[fqn]).shape) != q.shape:
            raise CheckpointError(f"{path}: {fqn} has shape {q.shape} in the checkpoint but the model expects "
                                  f"{tuple(get_weight(mods[fqn]).shape)}")
        set_weight(mods[fqn], dequantize(q).to(dtype))
    unresolved = [m for m in missing if m.rsplit(".", 1)[0] not in info["layers"]]
    tied = {n for n in unresolved if n.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    if set(unresolved) - tied:
        raise CheckpointError(f"{path}: tensors missing from the checkpoint: {sorted(set(unresolved) - tied)[:3]}")
    model.eval()
    tok = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None
    return model, tok, info
