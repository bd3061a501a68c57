"""How a Hugging Face Llama-family model maps onto llama.cpp: architecture names, tensor names, the rope row
order of q/k, and the hyperparameters written as GGUF metadata.

Architectures: ``llama``, ``mistral`` (written as llama, as llama.cpp does), ``qwen2`` and ``qwen3`` (its per-head
q/k norms as ``attn_q_norm`` / ``attn_k_norm``), ``phi3`` (Phi-3 and Phi-4-mini: the fused ``qkv_proj`` as
``attn_qkv``, ``gate_up_proj`` as ``ffn_up``, partial RoPE as ``rope.dimension_count``), ``granite`` (its four
multipliers as metadata), ``olmo2`` (norms after attention and MLP only, q/k norms over all heads), ``smollm3``
(every fourth layer without RoPE, as llama.cpp fixes it), ``gemma2`` (as Gemma 3 below, with its logit soft-capping),
Gemma 3's text decoder (``gemma3_text`` as llama.cpp's ``gemma3``:
its four norms a block as ``attn_norm`` / ``post_attention_norm`` / ``ffn_norm`` / ``post_ffw_norm``, every norm
weight stored plus one -- llama.cpp multiplies by the stored weight where transformers' Gemma norm multiplies by
``1 + w`` --, the sliding window with each layer's kind as ``sliding_window_pattern`` and the local RoPE base), and
the mixtures of experts ``qwen3_moe`` (llama.cpp's
``qwen3moe``) and ``mixtral`` (written as ``llama`` with expert tensors, as llama.cpp does; the experts and the
router: :mod:`.gguf_moe`); others raise :class:`UnsupportedArchitectureError`.  For llama/mistral/mixtral the rows
of ``q_proj``/``k_proj`` (and their biases) are permuted to llama.cpp's interleaved rope layout
(:func:`rope_row_order`), which transformers' GGUF loader undoes; qwen2/qwen3/qwen3moe use neox rope and are
written unpermuted (gemma3 too).  MoE metadata: ``{arch}.expert_count``, ``{arch}.expert_used_count`` and, for qwen3moe,
``{arch}.expert_feed_forward_length`` (the experts' width; llama's experts take ``feed_forward_length``).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "granite", "olmo2",
                           "smollm3", "qwen3_moe", "mixtral")


class UnsupportedArchitectureError(ValueError):
    """The model family has no GGUF mapping here."""


@dataclass(frozen=True)
class _Arch:
    gguf_arch: str
    permute_qk: bool
    moe: bool = False
    norm_offset: float = 0.0  # added to every norm weight (Gemma: transformers' 1 + w is llama.cpp's stored w)
    sandwich: bool = False    # norms after attention and MLP too (Gemma 3): their GGUF names differ (_SANDWICH)
    fused: bool = False       # one qkv_proj and one gate_up_proj (Phi-3): attn_qkv, and ffn_up twice as wide


_ARCHS = {"llama": _Arch("llama", True), "mistral": _Arch("llama", True), "qwen2": _Arch("qwen2", False),
          "qwen3": _Arch("qwen3", False), "gemma3_text": _Arch("gemma3", False, norm_offset=1.0, sandwich=True),
          "gemma2": _Arch("gemma2", False, norm_offset=1.0, sandwich=True),
          "phi3": _Arch("phi3", False, fused=True), "granite": _Arch("granite", True),
          "olmo2": _Arch("olmo2", False, sandwich=True), "smollm3": _Arch("smollm3", True),
          "qwen3_moe": _Arch("qwen3moe", False, moe=True), "mixtral": _Arch("llama", True, moe=True)}

_BLOCK_TENSORS = {
    "input_layernorm": gguf.MODEL_TENSOR.ATTN_NORM,
    "post_attention_layernorm": gguf.MODEL_TENSOR.FFN_NORM,
    "self_attn.q_proj": gguf.MODEL_TENSOR.ATTN_Q,
    "self_attn.k_proj": gguf.MODEL_TENSOR.ATTN_K,
    "self_attn.v_proj": gguf.MODEL_TENSOR.ATTN_V,
    "self_attn.o_proj": gguf.MODEL_TENSOR.ATTN_OUT,
    "self_attn.q_norm": gguf.MODEL_TENSOR.ATTN_Q_NORM,  # qwen3
    "self_attn.k_norm": gguf.MODEL_TENSOR.ATTN_K_NORM,
    "mlp.gate_proj": gguf.MODEL_TENSOR.FFN_GATE,
    "mlp.up_proj": gguf.MODEL_TENSOR.FFN_UP,
    "mlp.down_proj": gguf.MODEL_TENSOR.FFN_DOWN,
    "mlp.gate": gguf.MODEL_TENSOR.FFN_GATE_INP,  # a MoE block's router (its experts: gguf_moe.stacked_name)
}

# a block with norms after its branches (Gemma 3): the norm before the MLP is ffn_norm, as llama's post_attention one
_SANDWICH = {
    "post_attention_layernorm": gguf.MODEL_TENSOR.ATTN_POST_NORM,
    "pre_feedforward_layernorm": gguf.MODEL_TENSOR.FFN_NORM,
    "post_feedforward_layernorm": gguf.MODEL_TENSOR.FFN_POST_NORM,
}

# fused projections (Phi-3): llama.cpp's phi3 splits ffn_up into the gate (first half) and the up projection
_FUSED = {"self_attn.qkv_proj": gguf.MODEL_TENSOR.ATTN_QKV, "mlp.gate_up_proj": gguf.MODEL_TENSOR.FFN_UP}

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
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (Llama-family decoders and two of their MoE); export this model as "
            "compressed-tensors or gptq (vLLM, transformers), or keep the native mixq directory")
    return _ARCHS[mt]


def gguf_tensor_name(hf_name: str, arch: _Arch | None = None) -> str:
    """llama.cpp's name of a Llama-family Hugging Face parameter (``model.layers.3.self_attn.q_proj.weight``
    -> ``blk.3.attn_q.weight``; ``arch``: the architecture's own names where it has them, e.g. Gemma 3's norms).
    Raises ``KeyError`` for a tensor with no GGUF counterpart."""
    base, _, leaf = hf_name.rpartition(".")
    if base in _TOP_TENSORS:
        return f"{gguf.TENSOR_NAMES[_TOP_TENSORS[base]]}.{leaf}"
    parts = base.split(".")
    if len(parts) >= 4 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        rel = ".".join(parts[3:])
        table = {**_BLOCK_TENSORS, **(_SANDWICH if arch is not None and arch.sandwich else {}),
                 **(_FUSED if arch is not None and arch.fused else {})}
        if rel in table:
            return f"{gguf.TENSOR_NAMES[table[rel]].format(bid=int(parts[2]))}.{leaf}"
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


def _rope_settings(config, layer_type: str = "full_attention") -> tuple[float, str, dict]:
    params = dict(getattr(config, "rope_parameters", None) or {})
    if isinstance(params.get(layer_type), dict):  # one set per layer type (Gemma 3): that type's
        params = dict(params[layer_type])
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
            "rope_dimension_count": int(head_dim * float(params.get("partial_rotary_factor")
                                                         or getattr(config, "partial_rotary_factor", 1.0) or 1.0)),
            "rope_freq_base": theta, "rope_scaling": kind, "rope_factor": params.get("factor"),
            "rms_eps": float(config.rms_norm_eps), "vocab_size": config.vocab_size, **_moe_hparams(config, arch),
            **_swa_hparams(config, arch), **_family_hparams(config, arch)}


def _family_hparams(config, arch: _Arch) -> dict[str, Any]:
    """Granite's four multipliers (llama.cpp's ``attention.scale``, ``embedding_scale``, ``residual_scale``,
    ``logit_scale``); SmolLM3's layers without RoPE, which llama.cpp fixes at every fourth (others are refused)."""
    if arch.gguf_arch == "granite":
        return {"granite_scales": {k: float(getattr(config, a)) for k, a in (
            ("attention", "attention_multiplier"), ("embedding", "embedding_multiplier"),
            ("residual", "residual_multiplier"), ("logit", "logits_scaling"))}}
    if arch.gguf_arch == "smollm3":
        uses = [bool(u) for u in getattr(config, "no_rope_layers", None) or [1] * config.num_hidden_layers]
        if uses != [(i + 1) % 4 != 0 for i in range(config.num_hidden_layers)]:
            raise ValueError(f"smollm3: RoPE on layers {uses} (no_rope_layers); llama.cpp's smollm3 leaves it out of "
                             "every fourth layer and nothing else: export this model as compressed-tensors or gptq")
    if arch.gguf_arch in ("smollm3", "olmo2") and "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        if arch.gguf_arch == "smollm3" or getattr(config, "sliding_window", None):
            raise ValueError(f"{arch.gguf_arch}: sliding-window layers are not written by the GGUF exporter")
    return {}


_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}  # the 27B models, whose attention scale llama.cpp takes otherwise


def _swa_hparams(config, arch: _Arch) -> dict[str, Any]:
    """Gemma 2's and 3's sliding window: its width, which layers have it, and their own RoPE base (Gemma 2: its
    logit soft-capping too).  Their attention scale is not stored: llama.cpp takes ``1/sqrt(head_dim)``
    (``1/sqrt(hidden/heads)`` for the 27B models), so a config whose ``query_pre_attn_scalar`` says otherwise is
    refused."""
    if arch.gguf_arch not in _GEMMA_27B_LAYERS:
        return {}
    heads, layers = config.num_attention_heads, config.num_hidden_layers
    want = config.hidden_size // heads if layers == _GEMMA_27B_LAYERS[arch.gguf_arch] else (
        getattr(config, "head_dim", None) or config.hidden_size // heads)
    if getattr(config, "query_pre_attn_scalar", want) != want:
        raise ValueError(f"query_pre_attn_scalar={config.query_pre_attn_scalar}: llama.cpp's {arch.gguf_arch} scales "
                         f"attention by 1/sqrt({want}) for this model, so its GGUF would compute another model; export "
                         "it as compressed-tensors or gptq instead")
    caps = {k: float(getattr(config, k)) for k in ("attn_logit_softcapping", "final_logit_softcapping")
            if getattr(config, k, None)}
    if caps and arch.gguf_arch != "gemma2":
        raise ValueError(f"{sorted(caps)} on a {arch.gguf_arch} model: llama.cpp's {arch.gguf_arch} has no such key")
    if not getattr(config, "sliding_window", None):
        if arch.gguf_arch == "gemma2":
            raise ValueError("a Gemma 2 without sliding_window: llama.cpp's gemma2 would window every other layer")
        return caps
    types = list(getattr(config, "layer_types", None) or [])
    if len(types) != config.num_hidden_layers:
        raise ValueError(f"{config.model_type}: layer_types lists {len(types)} layers for "
                         f"{config.num_hidden_layers}; cannot tell llama.cpp which have the sliding window")
    if "sliding_attention" not in types:  # no layer has the window: llama.cpp's gemma3 then runs none (given a
        if arch.gguf_arch == "gemma2":      # pattern with no sliding layer, the build here crashed); its gemma2
            raise ValueError("a Gemma 2 with no sliding-window layer: llama.cpp's gemma2 always windows some")
        return caps
    theta, kind, _ = _rope_settings(config, "sliding_attention")
    if kind != "default":
        raise ValueError(f"rope scaling {kind!r} on the sliding-window layers is not supported by the GGUF exporter")
    return {"sliding_window": int(config.sliding_window), "swa_pattern": [t == "sliding_attention" for t in types],
            "rope_freq_base_swa": theta, **caps}


def _moe_hparams(config, arch: _Arch) -> dict[str, Any]:
    if not arch.moe:
        return {}
    out = {"expert_count": getattr(config, "num_local_experts", None) or config.num_experts,
           "expert_used_count": config.num_experts_per_tok}
    if arch.gguf_arch == "qwen3moe":
        out["expert_feed_forward_length"] = config.moe_intermediate_size
    return out


_FILE_TYPE = {QT.F32: "ALL_F32", QT.F16: "MOSTLY_F16", QT.BF16: "MOSTLY_BF16", QT.Q4_0: "MOSTLY_Q4_0",
              QT.Q4_1: "MOSTLY_Q4_1", QT.Q5_0: "MOSTLY_Q5_0", QT.Q5_1: "MOSTLY_Q5_1", QT.Q8_0: "MOSTLY_Q8_0",
              QT.Q2_K: "MOSTLY_Q2_K", QT.Q3_K: "MOSTLY_Q3_K_M", QT.Q4_K: "MOSTLY_Q4_K_M",
              QT.Q5_K: "MOSTLY_Q5_K_M", QT.Q6_K: "MOSTLY_Q6_K", QT.IQ4_NL: "MOSTLY_IQ4_NL",
              QT.MXFP4: "MOSTLY_MXFP4_MOE"}


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
    if "sliding_window" in hp:
        w.add_sliding_window(hp["sliding_window"])
        w.add_sliding_window_pattern(hp["swa_pattern"])
        w.add_rope_freq_base_swa(hp["rope_freq_base_swa"])
    if "attn_logit_softcapping" in hp:
        w.add_attn_logit_softcapping(hp["attn_logit_softcapping"])
    if "final_logit_softcapping" in hp:
        w.add_final_logit_softcapping(hp["final_logit_softcapping"])
    w.add_vocab_size(hp["vocab_size"])
    if "granite_scales" in hp:
        g = hp["granite_scales"]
        w.add_attention_scale(g["attention"])
        w.add_embedding_scale(g["embedding"])
        w.add_residual_scale(g["residual"])
        w.add_logit_scale(g["logit"])
    if "expert_count" in hp:
        w.add_expert_count(hp["expert_count"])
        w.add_expert_used_count(hp["expert_used_count"])
    if "expert_feed_forward_length" in hp:
        w.add_expert_feed_forward_length(hp["expert_feed_forward_length"])
    linear = Counter(QT[r["ggml_type"]] for r in rows if r["is_block_linear"])
    if linear:
        common = linear.most_common(1)[0][0]
        if common in _FILE_TYPE:
            w.add_file_type(int(gguf.LlamaFileType[_FILE_TYPE[common]]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
