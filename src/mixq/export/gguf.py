"""GGUF export: a mixq model as one llama.cpp file.

::

    report = export_gguf("runs/w4", "runs/w4.gguf")             # a native mixq directory
    report = write_gguf(model, tokenizer, specs, "m.gguf", qtensors=res.qtensors)   # in memory

Every quantized layer is written as the llama.cpp block type closest to its mixq spec (:mod:`.ggml_choice`), or,
for a ``--target gguf`` plan (``exact``), as the type that holds its spec exactly (:mod:`.ggml_exact`) from mixq's
own codes and scales: int and MX grids through :mod:`.ggml`, the K-quants and IQ4_NL copied as they are
(:mod:`.ggml_direct`).  The file is read back (:func:`mixq.export.gguf_verify.verify_gguf`): each tensor is
dequantized with ``gguf.quants.dequantize`` and compared with the values mixq means (its dequantized weight).  The
report (a JSON-able dict) lists, per tensor, the mixq spec, the ggml type, its bits per weight, why it was chosen,
any fallback and the read-back error.

Architectures, tensor names, rope row order and metadata: :mod:`.gguf_arch`; mixture-of-experts blocks (Qwen3-MoE,
Mixtral: a block's experts of one projection as one stacked tensor of one ggml type, the router as F32):
:mod:`.gguf_moe`.  Embeddings and an untied ``lm_head``
that mixq kept in floating point are written as F16 (or ``float_type="f32"``); norms and biases as F32.  A tied
``lm_head`` is not written (llama.cpp reuses ``token_embd``).  The tokenizer (:mod:`.gguf_vocab`): byte-level BPE
(GPT-2 style, e.g. SmolLM2, Qwen2) as ``gpt2`` with merges, SentencePiece-style BPE (byte fallback) as ``llama``
with scores; any other tokenizer (or none) is written as ``no_vocab`` with a warning in the report.
"""
from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from torch import nn

from ..config import QuantSpec
from ..formats import QTensor
from ..atomic import atomic_file
from ..moe.experts import expose_experts, refuse_untied_experts
from .ggml import decode_blocks, ggml_bpw, gguf_quantize_support
from .ggml_choice import _Choice, _float_data, layer_choice
from .gguf_arch import _Arch, _arch_of, _hparams, _write_metadata, gguf_tensor_name, rope_row_order
from .gguf_moe import check_moe_config, encode_experts, expert_members, is_router
from .gguf_verify import _Expected, mixq_values, verify_gguf
from .gguf_vocab import _add_tokenizer, _embedded_pre, _tokenizer_fields

log = logging.getLogger(__name__)

FLOAT_TYPES = {"f16": QT.F16, "f32": QT.F32}

_PARAM_FIELDS = ("scale", "zero", "offset", "codebook", "tensor_scale")  # as in mixq.export.native


@dataclass
class _Item:
    """One tensor to write."""

    hf_name: str
    name: str
    fqn: str | None  # module name for 2-D weights
    perm: np.ndarray | None
    members: tuple[str, ...] = ()  # a stack of experts: their HF weight names, expert 0 first (gguf_moe)
    offset: float = 0.0  # added to the values (a Gemma norm weight: +1)

    @property
    def fqns(self) -> list[str]:
        return [m.rsplit(".", 1)[0] for m in self.members] if self.members else [self.fqn] if self.fqn else []


def _items(model: nn.Module, arch: _Arch, hp: dict, specs: Mapping[str, QuantSpec]) -> tuple[list[_Item], bool]:
    sd = model.state_dict()
    embed = sd.get("model.embed_tokens.weight")
    head = sd.get("lm_head.weight")
    tied = head is not None and embed is not None and (
        head.data_ptr() == embed.data_ptr() or (getattr(model.config, "tie_word_embeddings", False)
                                                and "lm_head" not in specs and torch.equal(head, embed)))
    items: list[_Item] = []
    stacks = expert_members(sd) if arch.moe else {}
    stacked = {hf: name for name, members in stacks.items() for hf in members.values()}
    for hf_name, t in sd.items():
        if (hf_name == "lm_head.weight" and tied) or hf_name.endswith("rotary_emb.inv_freq"):
            continue  # a tied head is token_embd; rope frequencies follow from the metadata
        if hf_name in stacked:  # an expert's weight: one item per stack, where its expert 0 comes
            name = stacked[hf_name]
            if stacks[name][0] == hf_name:
                items.append(_Item(f"{hf_name.split('.experts.')[0]}.experts.*", name, None, None,
                                   tuple(stacks[name].values())))
            continue
        try:
            name = gguf_tensor_name(hf_name, arch)
        except KeyError:
            raise ValueError(f"{hf_name} {tuple(t.shape)} has no place in a {arch.gguf_arch} GGUF: the model differs "
                             f"from the Llama layout this exporter writes") from None
        perm = None
        if arch.permute_qk and (".attn_q." in name or ".attn_k." in name):
            heads = hp["head_count"] if ".attn_q." in name else hp["head_count_kv"]
            perm = rope_row_order(t.shape[0], heads)
        fqn = hf_name.rsplit(".", 1)[0] if t.ndim == 2 else None
        offset = arch.norm_offset if t.ndim == 1 and hf_name.endswith("norm.weight") else 0.0
        items.append(_Item(hf_name, name, fqn, perm, offset=offset))
    return items, tied


def _refuse(specs: Mapping[str, QuantSpec]) -> None:
    """One error naming every layer whose spec ggml cannot hold (its family's GGUF mapping says refused)."""
    refused: dict[tuple[str, str], list[str]] = {}
    for fqn, spec in specs.items():
        m = spec.export_to("gguf")
        if m.kind == "refused":
            refused.setdefault((spec.name, m.note), []).append(fqn)
    if refused:
        n = sum(map(len, refused.values()))
        why = "; ".join(f"{name} on {', '.join(f[:4])}{', …' if len(f) > 4 else ''}: {note}"
                        for (name, note), f in refused.items())
        raise ValueError(f"cannot export to GGUF: {n} layer(s) use specs that ggml types cannot hold: {why}")


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise FileExistsError(f"output file {out} already exists: choose another path or pass --force")
    if out.is_dir():
        raise IsADirectoryError(f"output path {out} is a directory: give a file name such as model.gguf")


def write_gguf(model: nn.Module, tokenizer, specs: Mapping[str, QuantSpec], out: str | os.PathLike, *,
               qtensors: Mapping[str, QTensor] | None = None, overwrite: bool = False, float_type: str = "f16",
               name: str | None = None, tokenizer_pre: str | None = None, verify: bool = True,
               progress: bool = False, exact: bool = False) -> dict:
    """Write ``model`` (fake-quant weights) as one GGUF file; returns the report (JSON-able dict).

    ``specs``: fqn -> :class:`QuantSpec` of every layer mixq quantized (a ``"keep"`` dtype counts);
    their weights in ``model`` are mixq's dequantized values.  ``qtensors``: the stored codes and
    parameters of those layers (``QuantResult.qtensors``), which let int and MX grids carry over
    exactly; without them the blocks are fit to the weights.  ``float_type``: ``"f16"`` or ``"f32"``
    for 2-D tensors mixq did not quantize (embeddings, an untied lm_head).  ``tokenizer_pre``:
    overrides the guessed llama.cpp pre-tokenizer name.  ``verify``: read the file back and compare
    every tensor (:func:`verify_gguf`).  Written to a temporary sibling and renamed into place;
    an existing ``out`` is refused unless ``overwrite``.  ``exact`` (a ``--target gguf`` plan): every
    quantized layer is written as the ggml type that holds its spec exactly
    (:func:`mixq.export.ggml_exact.ggml_exact_type`) from mixq's codes and scales, and must decode to mixq's
    weight bit for bit; anything else raises (no type choice, no re-quantization, no fallback).  MoE models
    (qwen3_moe, mixtral; :mod:`.gguf_moe`): stacked experts are exposed in place first
    (:func:`mixq.moe.expose_experts`, the same function), and every block's experts of one projection must carry
    one spec (a ``--target gguf`` plan ties them), else ``ValueError`` naming them before anything is written.
    """
    out = Path(out)
    _check_out(out, overwrite)
    if float_type not in FLOAT_TYPES:
        raise ValueError(f"float_type must be one of {', '.join(FLOAT_TYPES)}, got {float_type!r}")
    config = model.config
    arch = _arch_of(config)
    if arch.moe:
        check_moe_config(config)
        expose_experts(model)  # stacked 3-D experts as the per-expert linears the specs name (same function)
    hp = _hparams(config, arch)
    specs = {k: (v if isinstance(v, QuantSpec) else QuantSpec.from_dict(v)) for k, v in specs.items()}
    _refuse(specs)
    qtensors = dict(qtensors or {})
    warnings: list[str] = []
    if config.model_type in ("mistral", "mixtral", "phi3") and getattr(config, "sliding_window", None):
        warnings.append(f"sliding_window={config.sliding_window} is not stored (llama.cpp's {arch.gguf_arch} "
                        "architecture attends to the whole context)")
    if config.model_type == "qwen2" and getattr(config, "use_sliding_window", False):
        warnings.append("use_sliding_window=True is not stored in the GGUF")
    tok_fields, tok_warn = _tokenizer_fields(tokenizer, hp["vocab_size"], config.model_type, tokenizer_pre)
    warnings += tok_warn
    items, tied = _items(model, arch, hp, specs)
    refuse_untied_experts(specs, layers=[f for it in items if it.members for f in it.fqns])
    unknown = set(specs) - {f for it in items for f in it.fqns} - ({"lm_head"} if tied else set())
    if unknown:
        raise ValueError(f"specs name layers that are not 2-D weights of this model: {sorted(unknown)[:3]}")
    sd = model.state_dict()
    with atomic_file(out) as tmp:  # a temporary sibling renamed over out when whole; stale ones removed first
        writer = gguf.GGUFWriter(tmp, arch.gguf_arch)
        rows_report: list[dict] = []
        expected: dict[str, Any] = {}
        errors: dict[str, float] = {}
        iterator = items
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(items, desc="encoding GGUF tensors", unit="tensor")
        for it in iterator:
            keys = _spec_keys(it, specs, tied)
            spec = specs.get(keys[0]) if keys[0] else None
            qts = [qtensors.get(k) if k else None for k in keys]
            xs = [mixq_values(sd[h], q, it.perm) for h, q in zip(it.members or (it.hf_name,), qts)]
            x = _offset(np.stack(xs) if it.members else xs[0], it.offset)
            entry: dict[str, Any] = {"name": it.name, "source": it.hf_name, "shape": list(x.shape),
                                     "spec": spec.name if spec else None, "permuted_for_rope": it.perm is not None,
                                     **({"experts": len(it.members)} if it.members else {})}
            if it.members:
                choice = encode_experts(it.name, xs, spec, qts, exact, FLOAT_TYPES[float_type])
            elif x.ndim == 1 or is_router(it.name):
                choice = _Choice(QT.F32, x, None, None, "the MoE router is F32" if x.ndim == 2 else
                                 "1-D tensors (norms, biases) are F32", False, {}, {})
            elif spec is None:
                qt_float = FLOAT_TYPES[float_type]
                choice = _Choice(qt_float, _float_data(x, qt_float), None, None,
                                 "not quantized by mixq: written as " + qt_float.name, False, {}, {})
            else:
                choice = layer_choice(x, spec, qts[0], it.perm, it.name, exact)
            if spec is not None:
                entry["mixq_bpw"] = spec.bpw(tuple(x.shape[-2:]))
                entry["grid"] = "mixq codes and scales" if choice.grid_used else "fit to the values"
            raw = choice.qtype not in (QT.F16, QT.F32)
            writer.add_tensor(it.name, choice.data, raw_dtype=choice.qtype if raw else None)
            decoded = decode_blocks(choice.qtype, choice.data).reshape(x.shape) if raw else \
                choice.data.astype(np.float32).reshape(x.shape)
            diff = decoded.astype(np.float64) - x.astype(np.float64)
            errors[it.name] = float(np.abs(diff).max()) if diff.size else 0.0
            if exact and spec is not None and not np.array_equal(decoded, x):
                raise RuntimeError(f"{it.name} ({spec.name} as {choice.qtype.name}) does not decode to mixq's weight "
                                   f"exactly (max |error| {errors[it.name]:.3g}): the exact GGUF export refuses it")
            entry.update({"ggml_type": choice.qtype.name, "ggml_bpw": ggml_bpw(choice.qtype),
                          "nominal_type": choice.nominal.name if choice.nominal else None,
                          "fallback": choice.fallback, "choice": choice.how,
                          "candidates_rel_err": choice.candidates, "excluded": choice.excluded,
                          "is_block_linear": bool(it.fqns) and it.name.startswith("blk.") and not is_router(it.name)})
            rows_report.append(entry)
            expected[it.name] = _expected_fn(sd, it, keys, qtensors)
        _write_metadata(writer, config, arch, hp, name, rows_report)
        tok_report = _add_tokenizer(writer, tok_fields)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
        verification = None
        if verify:
            verification = verify_gguf(tmp, _Expected(expected))
            bad = [n for n, r in verification["tensors"].items() if r["max_abs_err"] != errors.get(n)]
            if bad or verification["missing"] or verification["shape_mismatch"]:
                raise RuntimeError(f"{out}: the written file does not read back as encoded "
                                   f"(tensors {bad[:3]}, missing {verification['missing'][:3]}, "
                                   f"shapes {verification['shape_mismatch'][:3]})")
            for entry in rows_report:
                checked = verification["tensors"][entry["name"]]
                entry.update({k: checked[k] for k in ("max_abs_err", "rel_err", "exact")})
    return _report(out, config, arch, rows_report, tok_report, verification, warnings, float_type, tied)


def _spec_keys(it: _Item, specs: Mapping[str, QuantSpec], tied: bool) -> list[str | None]:
    """The spec / qtensor key of each source of ``it`` (its experts, or the one tensor; a tied head's embedding is
    ``lm_head``), None where mixq did not quantize it."""
    if it.members:
        return list(it.fqns)
    if it.fqn in specs:
        return [it.fqn]
    return ["lm_head" if tied and it.name == "token_embd.weight" and "lm_head" in specs else None]


def _expected_fn(sd: dict, it: _Item, keys: list[str | None], qtensors: Mapping[str, QTensor]):
    def get() -> np.ndarray:
        xs = [mixq_values(sd[h], qtensors.get(k) if k else None, it.perm)
              for h, k in zip(it.members or (it.hf_name,), keys)]
        return _offset(np.stack(xs) if it.members else xs[0], it.offset)
    return get


def _offset(x: np.ndarray, offset: float) -> np.ndarray:
    return x if not offset else (x.astype(np.float32) + np.float32(offset))


def _report(out: Path, config, arch: _Arch, rows: list[dict], tok: dict, verification: dict | None,
            warnings: list[str], float_type: str, tied: bool) -> dict:
    lin = [r for r in rows if r["is_block_linear"]]
    n_lin = sum(math.prod(r["shape"]) for r in lin)
    q = [r for r in lin if r.get("mixq_bpw") is not None]
    n_q = sum(math.prod(r["shape"]) for r in q)
    fallbacks = [{"name": r["name"], "spec": r["spec"], "nominal_type": r["nominal_type"],
                  "ggml_type": r["ggml_type"], "reason": r["fallback"]} for r in rows if r["fallback"]]
    totals = {
        "file_bytes": out.stat().st_size,
        "tensors": len(rows),
        "types": dict(Counter(r["ggml_type"] for r in rows)),
        "block_linear_weights": n_lin,
        "block_linear_bpw": sum(r["ggml_bpw"] * math.prod(r["shape"]) for r in lin) / n_lin if n_lin else None,
        "mixq_block_linear_bpw": sum(r["mixq_bpw"] * math.prod(r["shape"]) for r in q) / n_q if n_q else None,
        "fallbacks": len(fallbacks),
        "exact_tensors": sum(1 for r in rows if r.get("exact")),
    }
    if warnings:
        for w in warnings:
            log.warning("GGUF export: %s", w)
    return {
        "format": "gguf", "path": str(out), "architecture": arch.gguf_arch, "model_type": config.model_type,
        "float_type": FLOAT_TYPES[float_type].name, "norms_and_biases": "F32", "tied_output": tied,
        "tensors": rows, "fallbacks": fallbacks, "totals": totals, "tokenizer": tok,
        "verification": None if verification is None else {
            k: verification[k] for k in ("ok", "max_abs_err", "max_rel_err", "n_exact", "missing", "unexpected",
                                         "shape_mismatch")},
        "gguf_quantize_support": gguf_quantize_support(),
        "warnings": warnings,
    }


def _load_qtensors(src: Path, info: dict) -> dict[str, QTensor]:
    """The stored codes and parameters of every quantized layer of a native directory.

    Uses ``mixq.export.native.read_packed`` (format v2, bit-packed) when available, else reads the
    v1 layout (one code per byte, float32 parameters) directly.
    """
    from . import native

    if hasattr(native, "read_packed"):
        try:
            _, packed, _ = native.read_packed(src, verify=False)  # load_quantized has checked the files
        except TypeError:
            _, packed, _ = native.read_packed(src)
        return {fqn: pw.to_qtensor() for fqn, pw in packed.items()}
    from safetensors.torch import load_file

    from ..formats import QParams

    qt = load_file(src / "quantized.safetensors")
    out = {}
    for fqn, layer in info["layers"].items():
        params = QParams(**{f: qt.get(f"{fqn}.{f}") for f in _PARAM_FIELDS})
        out[fqn] = QTensor(codes=qt[f"{fqn}.codes"], params=params, spec=QuantSpec.from_dict(layer["spec"]),
                           shape=tuple(layer["shape"]))
    return out


def export_gguf(src_dir: str | os.PathLike, out_path: str | os.PathLike, *, overwrite: bool = False,
                progress: bool = True, float_type: str = "f16", tokenizer_pre: str | None = None,
                verify: bool = True, exact: bool | None = None) -> dict:
    """Export a native mixq directory (written by ``mixq quantize``) as one GGUF file; returns the report.

    The mixq codes and parameters in ``quantized.safetensors`` are used to fill the ggml blocks, the
    rest (norms, embeddings, config, tokenizer) comes from the directory.  See :func:`write_gguf`.
    ``exact``: default True for a directory quantized with ``--target gguf`` (its ``mixq.json`` says so).
    """
    from .native import load_quantized, read_info, refuse_composites

    src = Path(src_dir)
    out = Path(out_path)
    _check_out(out, overwrite)  # before the (slower) load
    refuse_composites(read_info(src), "GGUF")
    refuse_untied_experts(read_info(src).get("layers", {}))  # before the (slower) load
    model, tokenizer, info = load_quantized(src)
    _arch_of(model.config)
    qtensors = _load_qtensors(src, info)
    specs = {fqn: q.spec for fqn, q in qtensors.items()}
    pre = tokenizer_pre or _embedded_pre(info.get("base_model"))
    if exact is None:
        exact = info.get("target") == "gguf"
    report = write_gguf(model, tokenizer, specs, out, qtensors=qtensors, overwrite=overwrite, float_type=float_type,
                        name=info.get("base_model"), tokenizer_pre=pre, verify=verify, progress=progress,
                        exact=exact)
    report["exact"] = exact
    report["source"] = str(src)
    report["mixq"] = {k: info.get(k) for k in ("base_model", "method", "spec")}
    return report
