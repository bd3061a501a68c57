"""GGUF export: a mixq model as one llama.cpp file.

::

    report = export_gguf("runs/w4", "runs/w4.gguf")             # a native mixq directory
    report = write_gguf(model, tokenizer, specs, "m.gguf", qtensors=res.qtensors)   # in memory

Every quantized layer is written as the llama.cpp block type closest to its mixq spec, and the
file is read back (:func:`verify_gguf`): each tensor is dequantized with ``gguf.quants.dequantize``
and compared with the values mixq means (its dequantized weight).  The report (a JSON-able dict)
lists, per tensor, the mixq spec, the ggml type, its bits per weight, why it was chosen, any
fallback and the read-back error.

Which ggml type (per quantized tensor)
--------------------------------------
A spec's element width picks a *class* of same-width ggml types, and a budget::

    bits   class types (bpw)                                     nominal   next class
    8, 7   Q8_0 (8.5)                                            Q8_0      F16
    6      Q6_K (6.5625)                                         Q6_K      8
    5      Q5_K (5.5), Q5_0 (5.5), Q5_1 (6.0)                    Q5_K      6
    4      Q4_K (4.5), Q4_0 (4.5), IQ4_NL (4.5), Q4_1 (5.0)       Q4_K      5
           (+ MXFP4 (4.25) for FP4-E2M1 element specs)
    3      Q3_K (3.4375)                                         Q3_K      4
    2, 1   Q2_K (2.625)                                          Q2_K      3
    keep   fp16 -> F16, bf16 -> BF16, fp32 -> F32 (exact)

The candidates are the class's types whose bits per weight do not exceed
``max(bpw of the mixq spec on this tensor, bpw of the nominal type)`` and whose block fits the
row (K-quants: the row length, i.e. the input dimension, must be a multiple of 256; every other
block type a multiple of 32).  Candidates are encoded and decoded, and the one with the least
squared error against mixq's dequantized weight is written (ties: fewer bits, then table order).
Types that can take mixq's grid directly are tried first; once one reproduces the weight exactly,
the rest are tried only through mixq's grid (refitting on-grid values to an unrelated grid is the
slow part and is not exact in practice), and none with more bits.  Consequences for int specs whose
groups are a multiple of 32 long: ``W4-gN`` symmetric is written as Q4_0, ``W5-gN`` symmetric as
Q5_0, ``W8`` symmetric and MXINT8 as Q8_0, ``W4-g32-asymf`` (fp16 offset) as Q4_1 and
``W5-g32-asymf`` as Q5_1, MXFP4 as MXFP4, and ``W3``/``W2`` symmetric on rows that no K-quant
fits as Q4_0 -- all bit-exact, since each mixq group is one or more whole ggml blocks with the
same scale (and offset), and the codes carry over.  Per-channel int specs (symmetric or with an
int zero point) are exact in their K-quant (every sub-block scale is ``d * 1``), e.g.
``W4-channel`` -> Q4_K, ``W3-channel`` -> Q3_K, ``W6-channel`` -> Q6_K.  Other specs are
approximations: grouped scales re-quantized to the K-quants' 6-bit (4-bit for Q2_K, 8-bit for
Q6_K) sub-block scales, or a refit of non-uniform grids (NF, k-means, FP) onto the ggml grid.

Fallbacks: when no type of the class fits the row (e.g. Q3_K or Q6_K on SmolLM2's 576-wide
rows), the next class up is tried with its own budget (Q3_K -> the 4-bit types, Q6_K -> Q8_0,
...; F16 when nothing fits).  A tensor whose nominal type does not fit its row gets a
``fallback`` entry naming the type, the row length and what was written instead -- also when a
same-width type was exact (W4-g32 on a 576-wide row: nominal Q4_K, written Q4_0, exact).

How the blocks are filled
-------------------------
With the mixq codes and parameters at hand (a native directory, or ``qtensors``) and an int spec
whose groups do not straddle the ggml sub-blocks, each sub-block takes mixq's step and zero
(``x = step * code + zero``); without them, or when that is worse, the sub-block parameters are
refit from the values (absmax / min-max with a short search).  K-quant sub-block scales are then
quantized against one fp16 super-block scale (a search over the largest sub-scale code), and
every value is re-encoded to the nearest point of the final ggml grid, so on-grid values keep
their codes.  The block layouts are written here from the format description and checked
against ``gguf.quants.dequantize`` in the tests.

What the gguf package (0.19.0) can quantize in Python: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1,
Q8_0, TQ1_0, TQ2_0, MXFP4; only dequantize: Q2_K..Q6_K, IQ4_NL, IQ4_XS, the other IQ types and
NVFP4.  Its quantizers choose their own scales (absmax), which would move mixq's grid, so this
module packs every block type itself, K-quants and IQ4_NL included (:func:`gguf_quantize_support`
probes the installed package).

Everything else
---------------
Architectures: ``llama``, ``mistral`` (written as llama, as llama.cpp does) and ``qwen2``; others
raise :class:`UnsupportedArchitectureError`.  For llama/mistral the rows of ``q_proj``/``k_proj``
(and their biases) are permuted to llama.cpp's interleaved rope layout (:func:`rope_row_order`),
which transformers' GGUF loader undoes; qwen2 uses neox rope and is written unpermuted.
Embeddings and an untied ``lm_head`` that mixq kept in floating point are written as F16 (or
``float_type="f32"``); norms and biases as F32.  A tied ``lm_head`` is not written (llama.cpp
reuses ``token_embd``).  The tokenizer: byte-level BPE (GPT-2 style, e.g. SmolLM2, Qwen2) as
``gpt2`` with merges, SentencePiece-style BPE (byte fallback) as ``llama`` with scores; any
other tokenizer (or none) is written as ``no_vocab`` with a warning in the report.
"""
from __future__ import annotations

import logging
import os
import tempfile
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
from ..formats import dequantize as mixq_dequantize
from ..fsmode import publish
from .atomic import remove_stale, temp_prefix
from .gguf_vocab import _add_tokenizer, _embedded_pre, _tokenizer_fields
from .ggml import (  # noqa: F401  (encode/decode re-exported: part of this module's API; block packers: .ggml_pack)
    _Choice,
    _choose_type,
    _float_data,
    _grid_of,
    _rel,
    decode_blocks,
    encode_blocks,
    ggml_bpw,
    gguf_quantize_support,
)
from .ggml_exact import ggml_exact_type

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
FLOAT_TYPES = {"f16": QT.F16, "f32": QT.F32}
_PARAM_FIELDS = ("scale", "zero", "offset", "codebook", "tensor_scale")  # as in mixq.export.native


class UnsupportedArchitectureError(ValueError):
    """The model family has no GGUF mapping here."""


# ============================================================================ architecture
@dataclass(frozen=True)
class _Arch:
    gguf_arch: str
    permute_qk: bool


_ARCHS = {"llama": _Arch("llama", True), "mistral": _Arch("llama", True), "qwen2": _Arch("qwen2", False)}

_BLOCK_TENSORS = {
    "input_layernorm": gguf.MODEL_TENSOR.ATTN_NORM,
    "post_attention_layernorm": gguf.MODEL_TENSOR.FFN_NORM,
    "self_attn.q_proj": gguf.MODEL_TENSOR.ATTN_Q,
    "self_attn.k_proj": gguf.MODEL_TENSOR.ATTN_K,
    "self_attn.v_proj": gguf.MODEL_TENSOR.ATTN_V,
    "self_attn.o_proj": gguf.MODEL_TENSOR.ATTN_OUT,
    "mlp.gate_proj": gguf.MODEL_TENSOR.FFN_GATE,
    "mlp.up_proj": gguf.MODEL_TENSOR.FFN_UP,
    "mlp.down_proj": gguf.MODEL_TENSOR.FFN_DOWN,
}
_TOP_TENSORS = {
    "model.embed_tokens": gguf.MODEL_TENSOR.TOKEN_EMBD,
    "model.norm": gguf.MODEL_TENSOR.OUTPUT_NORM,
    "lm_head": gguf.MODEL_TENSOR.OUTPUT,
}


def _arch_of(config) -> _Arch:
    mt = getattr(config, "model_type", None)
    if mt not in _ARCHS:
        raise UnsupportedArchitectureError(
            f"GGUF export does not support model_type {mt!r}: supported architectures are "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (Llama-family decoders)")
    return _ARCHS[mt]


def gguf_tensor_name(hf_name: str) -> str:
    """llama.cpp's name of a Llama-family Hugging Face parameter (``model.layers.3.self_attn.q_proj.weight``
    -> ``blk.3.attn_q.weight``).  Raises ``KeyError`` for a tensor with no GGUF counterpart."""
    base, _, leaf = hf_name.rpartition(".")
    if base in _TOP_TENSORS:
        return f"{gguf.TENSOR_NAMES[_TOP_TENSORS[base]]}.{leaf}"
    parts = base.split(".")
    if len(parts) >= 4 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        rel = ".".join(parts[3:])
        if rel in _BLOCK_TENSORS:
            return f"{gguf.TENSOR_NAMES[_BLOCK_TENSORS[rel]].format(bid=int(parts[2]))}.{leaf}"
    raise KeyError(hf_name)


def rope_row_order(n_rows: int, n_heads: int) -> np.ndarray:
    """Row order llama.cpp expects for a llama ``q_proj``/``k_proj`` (weight or bias).

    Hugging Face keeps each head's rotary pairs half a head apart (``rotate_half``: row ``i`` pairs
    with ``i + d/2``); llama.cpp's rope pairs adjacent rows.  So GGUF row ``2i + t`` of a head is
    HF row ``i + t * d/2`` of that head: ``gguf_w = hf_w[rope_row_order(rows, heads)]``.
    """
    if n_rows % n_heads or (n_rows // n_heads) % 2:
        raise ValueError(f"cannot split {n_rows} rows into {n_heads} heads of even size")
    d = n_rows // n_heads
    return np.arange(n_rows).reshape(n_heads, 2, d // 2).transpose(0, 2, 1).reshape(-1)


def _rope_settings(config) -> tuple[float, str, dict]:
    params = dict(getattr(config, "rope_parameters", None) or {})
    legacy = getattr(config, "rope_scaling", None)
    if isinstance(legacy, dict):
        params = {**legacy, **params}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    kind = params.get("rope_type") or params.get("type") or "default"
    return float(theta if theta is not None else 10000.0), kind, params


def _hparams(config, arch: _Arch) -> dict[str, Any]:
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    theta, kind, params = _rope_settings(config)
    if kind not in ("default", "linear"):
        raise ValueError(f"rope scaling {kind!r} is not supported by the GGUF exporter (only default and linear)")
    return {"context_length": config.max_position_embeddings, "embedding_length": config.hidden_size,
            "block_count": config.num_hidden_layers, "feed_forward_length": config.intermediate_size,
            "head_count": heads, "head_count_kv": kv, "head_dim": head_dim,
            "rope_dimension_count": int(head_dim * float(getattr(config, "partial_rotary_factor", 1.0) or 1.0)),
            "rope_freq_base": theta, "rope_scaling": kind, "rope_factor": params.get("factor"),
            "rms_eps": float(config.rms_norm_eps), "vocab_size": config.vocab_size}


# ============================================================================ writing
@dataclass
class _Item:
    """One tensor to write."""

    hf_name: str
    name: str
    fqn: str | None  # module name for 2-D weights
    perm: np.ndarray | None


def _items(model: nn.Module, arch: _Arch, hp: dict, specs: Mapping[str, QuantSpec]) -> tuple[list[_Item], bool]:
    sd = model.state_dict()
    embed = sd.get("model.embed_tokens.weight")
    head = sd.get("lm_head.weight")
    tied = head is not None and embed is not None and (
        head.data_ptr() == embed.data_ptr() or (getattr(model.config, "tie_word_embeddings", False)
                                                and "lm_head" not in specs and torch.equal(head, embed)))
    items: list[_Item] = []
    for hf_name, t in sd.items():
        if (hf_name == "lm_head.weight" and tied) or hf_name.endswith("rotary_emb.inv_freq"):
            continue  # a tied head is token_embd; rope frequencies follow from the metadata
        try:
            name = gguf_tensor_name(hf_name)
        except KeyError:
            raise ValueError(f"{hf_name} {tuple(t.shape)} has no place in a {arch.gguf_arch} GGUF: the model differs "
                             f"from the Llama layout this exporter writes") from None
        perm = None
        if arch.permute_qk and (".attn_q." in name or ".attn_k." in name):
            heads = hp["head_count"] if ".attn_q." in name else hp["head_count_kv"]
            perm = rope_row_order(t.shape[0], heads)
        fqn = hf_name.rsplit(".", 1)[0] if t.ndim == 2 else None
        items.append(_Item(hf_name, name, fqn, perm))
    return items, tied


class _Expected(Mapping):
    """What each tensor of the file should decode to, computed on demand (``verify_gguf``'s ``expected``)."""

    def __init__(self, values: dict[str, Any]):
        self._values = values  # name -> zero-argument callable returning float32 ndarray

    def __getitem__(self, name: str) -> np.ndarray:
        return self._values[name]()

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


_FILE_TYPE = {QT.F32: "ALL_F32", QT.F16: "MOSTLY_F16", QT.BF16: "MOSTLY_BF16", QT.Q4_0: "MOSTLY_Q4_0",
              QT.Q4_1: "MOSTLY_Q4_1", QT.Q5_0: "MOSTLY_Q5_0", QT.Q5_1: "MOSTLY_Q5_1", QT.Q8_0: "MOSTLY_Q8_0",
              QT.Q2_K: "MOSTLY_Q2_K", QT.Q3_K: "MOSTLY_Q3_K_M", QT.Q4_K: "MOSTLY_Q4_K_M",
              QT.Q5_K: "MOSTLY_Q5_K_M", QT.Q6_K: "MOSTLY_Q6_K", QT.IQ4_NL: "MOSTLY_IQ4_NL",
              QT.MXFP4: "MOSTLY_MXFP4_MOE"}


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


def _refuse_experts(layers) -> None:
    """MoE expert layers (mixq.moe): refused, naming them, before anything is written."""
    from ..moe.experts import refuse_experts

    refuse_experts(layers, "GGUF", "llama.cpp holds a block's experts as stacked ffn_{gate,up,down}_exps tensors of "
                   "one ggml type, which this exporter does not write; export them with --format native or "
                   "compressed-tensors")


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
    weight bit for bit; anything else raises (no type choice, no re-quantization, no fallback).
    """
    out = Path(out)
    _check_out(out, overwrite)
    if float_type not in FLOAT_TYPES:
        raise ValueError(f"float_type must be one of {', '.join(FLOAT_TYPES)}, got {float_type!r}")
    config = model.config
    _refuse_experts(specs)
    arch = _arch_of(config)
    hp = _hparams(config, arch)
    specs = {k: (v if isinstance(v, QuantSpec) else QuantSpec.from_dict(v)) for k, v in specs.items()}
    _refuse(specs)
    qtensors = dict(qtensors or {})
    warnings: list[str] = []
    if config.model_type == "mistral" and getattr(config, "sliding_window", None):
        warnings.append(f"sliding_window={config.sliding_window} is not stored (llama.cpp's llama architecture "
                        "attends to the whole context)")
    if config.model_type == "qwen2" and getattr(config, "use_sliding_window", False):
        warnings.append("use_sliding_window=True is not stored in the GGUF")
    tok_fields, tok_warn = _tokenizer_fields(tokenizer, hp["vocab_size"], config.model_type, tokenizer_pre)
    warnings += tok_warn
    items, tied = _items(model, arch, hp, specs)
    unknown = set(specs) - {it.fqn for it in items if it.fqn} - ({"lm_head"} if tied else set())
    if unknown:
        raise ValueError(f"specs name layers that are not 2-D weights of this model: {sorted(unknown)[:3]}")
    sd = model.state_dict()
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)  # what a killed run left
    fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(out), dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, arch.gguf_arch)
        rows_report: list[dict] = []
        expected: dict[str, Any] = {}
        errors: dict[str, float] = {}
        iterator = items
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(items, desc="encoding GGUF tensors", unit="tensor")
        for it in iterator:
            t = sd[it.hf_name]
            spec_key = it.fqn if it.fqn in specs else ("lm_head" if tied and it.name == "token_embd.weight"
                                                       and "lm_head" in specs else None)
            spec = specs.get(spec_key) if spec_key else None
            qt = qtensors.get(spec_key) if spec_key else None
            x = (mixq_dequantize(qt) if qt is not None else t.detach()).float().cpu().numpy()
            if it.perm is not None:
                x = x[it.perm]
            x = np.ascontiguousarray(x, np.float32)
            entry: dict[str, Any] = {"name": it.name, "source": it.hf_name, "shape": list(x.shape),
                                     "spec": spec.name if spec else None, "permuted_for_rope": it.perm is not None}
            if t.ndim == 1:
                choice = _Choice(QT.F32, x, None, None, "1-D tensors (norms, biases) are F32", False, {}, {})
            elif spec is None:
                qt_float = FLOAT_TYPES[float_type]
                choice = _Choice(qt_float, _float_data(x, qt_float), None, None,
                                 "not quantized by mixq: written as " + qt_float.name, False, {}, {})
            else:
                grid = _grid_of(qt, it.perm) if qt is not None else None
                choice = _exact_choice(x, spec, grid, it.name) if exact else _choose_type(x, spec, grid)
                entry["mixq_bpw"] = spec.bpw(tuple(x.shape))
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
                          "is_block_linear": it.fqn is not None and it.name.startswith("blk.")})
            rows_report.append(entry)
            expected[it.name] = _expected_fn(sd, it, spec_key, qtensors)
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
        publish(tmp)  # mkstemp makes the file private; the result is an ordinary file
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return _report(out, config, arch, rows_report, tok_report, verification, warnings, float_type, tied)


def _exact_choice(x: np.ndarray, spec: QuantSpec, grid, name: str) -> _Choice:
    """The ggml type holding ``spec`` exactly, filled with mixq's own step/zero (``grid``), or ValueError."""
    tname = ggml_exact_type(spec, x.shape)
    if tname is None:
        raise ValueError(f"{name}: no ggml type holds {spec.name} exactly on rows of {x.shape[1]} elements (the "
                         f"exact export takes only the specs of a --target gguf plan; see mixq.export.ggml_exact)")
    qt = QT[tname]
    if qt in (QT.F16, QT.BF16, QT.F32):
        return _Choice(qt, _float_data(x, qt), qt, None, "exact: kept in floating point", False, {}, {})
    if grid is None:
        raise ValueError(f"{name}: the exact export needs mixq's codes and scales (qtensors) for {spec.name}")
    data = encode_blocks(qt, x, grid, spec.bits if spec.dtype == "int" else None)
    return _Choice(qt, data, qt, None, "exact: mixq's codes and scales as they are", True, {}, {})


def _expected_fn(sd: dict, it: _Item, spec_key: str | None, qtensors: Mapping[str, QTensor]):
    def get() -> np.ndarray:
        qt = qtensors.get(spec_key) if spec_key else None
        x = (mixq_dequantize(qt) if qt is not None else sd[it.hf_name].detach()).float().cpu().numpy()
        return x[it.perm] if it.perm is not None else x
    return get


def _write_metadata(w: gguf.GGUFWriter, config, arch: _Arch, hp: dict, name: str | None, rows: list[dict]) -> None:
    w.add_type("model")
    w.add_name(name or getattr(config, "_name_or_path", None) or f"{config.model_type} (mixq)")
    w.add_quantized_by("mixq")
    w.add_context_length(hp["context_length"])
    w.add_embedding_length(hp["embedding_length"])
    w.add_block_count(hp["block_count"])
    w.add_feed_forward_length(hp["feed_forward_length"])
    w.add_head_count(hp["head_count"])
    w.add_head_count_kv(hp["head_count_kv"])
    if hp["head_dim"] != hp["embedding_length"] // hp["head_count"]:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    w.add_rope_dimension_count(hp["rope_dimension_count"])
    w.add_rope_freq_base(hp["rope_freq_base"])
    if hp["rope_scaling"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(hp["rope_factor"]))
    w.add_layer_norm_rms_eps(hp["rms_eps"])
    w.add_vocab_size(hp["vocab_size"])
    linear = Counter(QT[r["ggml_type"]] for r in rows if r["is_block_linear"])
    if linear:
        common = linear.most_common(1)[0][0]
        if common in _FILE_TYPE:
            w.add_file_type(int(gguf.LlamaFileType[_FILE_TYPE[common]]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _report(out: Path, config, arch: _Arch, rows: list[dict], tok: dict, verification: dict | None,
            warnings: list[str], float_type: str, tied: bool) -> dict:
    lin = [r for r in rows if r["is_block_linear"]]
    n_lin = sum(r["shape"][0] * r["shape"][1] for r in lin)
    q = [r for r in lin if r.get("mixq_bpw") is not None]
    n_q = sum(r["shape"][0] * r["shape"][1] for r in q)
    fallbacks = [{"name": r["name"], "spec": r["spec"], "nominal_type": r["nominal_type"],
                  "ggml_type": r["ggml_type"], "reason": r["fallback"]} for r in rows if r["fallback"]]
    totals = {
        "file_bytes": out.stat().st_size,
        "tensors": len(rows),
        "types": dict(Counter(r["ggml_type"] for r in rows)),
        "block_linear_weights": n_lin,
        "block_linear_bpw": sum(r["ggml_bpw"] * r["shape"][0] * r["shape"][1] for r in lin) / n_lin if n_lin else None,
        "mixq_block_linear_bpw": sum(r["mixq_bpw"] * r["shape"][0] * r["shape"][1] for r in q) / n_q if n_q else None,
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


# ============================================================================ native directories
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
    _refuse_experts(read_info(src).get("layers", {}))
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


# ============================================================================ verification
def verify_gguf(path: str | os.PathLike, expected: Mapping[str, torch.Tensor | np.ndarray]) -> dict:
    """Read a GGUF file back and compare every tensor with what it should hold.

    Each tensor is dequantized with ``gguf.quants.dequantize`` and compared with
    ``expected[name]`` (its intended values, in the file's row order: q/k rows permuted for rope).
    Returns ``{"tensors": {name: {ggml_type, shape, max_abs_err, rel_err, exact}}, "max_abs_err",
    "max_rel_err", "n_exact", "missing", "unexpected", "shape_mismatch", "ok"}`` with ``rel_err``
    the relative L2 error ``||got - want|| / ||want||``; ``ok`` means every expected tensor is
    present with its shape (errors are reported, not judged).
    """
    reader = gguf.GGUFReader(path)
    in_file = {t.name: t for t in reader.tensors}
    tensors: dict[str, dict] = {}
    missing, mismatch = [], []
    for name in expected:
        t = in_file.get(name)
        if t is None:
            missing.append(name)
            continue
        want = expected[name]
        want = want.detach().float().cpu().numpy() if isinstance(want, torch.Tensor) else np.asarray(want, np.float32)
        got = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        if got.size != want.size:
            mismatch.append(name)
            continue
        got = got.reshape(want.shape)
        diff = got.astype(np.float64) - want.astype(np.float64)
        max_abs = float(np.abs(diff).max()) if diff.size else 0.0
        ref = float(np.linalg.norm(want.astype(np.float64)))
        tensors[name] = {"ggml_type": t.tensor_type.name, "shape": list(want.shape), "max_abs_err": max_abs,
                         "rel_err": _rel(float(np.square(diff).sum()), ref * ref), "exact": max_abs == 0.0}
    return {"path": str(path), "tensors": tensors,
            "max_abs_err": max((r["max_abs_err"] for r in tensors.values()), default=0.0),
            "max_rel_err": max((r["rel_err"] for r in tensors.values()), default=0.0),
            "n_exact": sum(r["exact"] for r in tensors.values()),
            "missing": missing, "unexpected": sorted(set(in_file) - set(expected)), "shape_mismatch": mismatch,
            "ok": not missing and not mismatch}
