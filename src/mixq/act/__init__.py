"""Activations and the KV cache: simulated quantization in the forward pass.

``actquant``  the input of chosen linears through quantize → dequantize (dynamic per-token/group or
              static calibrated scales)
``outliers``  LLM.int8() fp columns, Atom/QUIK high-precision channels, SmoothQuant and QuaRot ordering
``kvcache``   KIVI cache for Hugging Face generation (keys per channel, values per token, fp residual
              window, per-layer K/V bits) and its exact byte count
``presets``   W/A preset names → (weight spec, activation spec, rotate)
``kveval``    perplexity with the quantized cache actually used (prefill, then chunked decoding)
"""
from .actquant import (
    ActQuantHandle,
    ActQuantizer,
    apply_act_quant,
    calibrate_act_absmax,
    fake_quant_act,
    parse_act_spec,
)
from .presets import WAPreset, parse_wa_preset
from .kvcache import KIVICache, KIVILayer, kv_cache_bits, kv_cache_bytes, kv_dims, kv_spec, resolve_kv_bits
from .kveval import eval_with_kv_quant
from .outliers import FPOutliers, HiChannels, act_bits_per_feature, prepare_for_act_quant, top_k_channels

__all__ = [
    "ActQuantHandle", "ActQuantizer", "WAPreset", "apply_act_quant", "calibrate_act_absmax", "fake_quant_act",
    "parse_act_spec", "parse_wa_preset",
    "FPOutliers", "HiChannels", "act_bits_per_feature", "prepare_for_act_quant", "top_k_channels",
    "KIVICache", "KIVILayer", "kv_cache_bits", "kv_cache_bytes", "kv_dims", "kv_spec", "resolve_kv_bits",
    "eval_with_kv_quant",
]
