"""Activations and the KV cache: simulated quantization in the forward pass.

``actquant``  the input of chosen linears through quantize → dequantize (dynamic per-token/group or
              static calibrated scales)
``outliers``  LLM.int8() fp columns, Atom/QUIK high-precision channels, SmoothQuant and QuaRot ordering
``kvcodec``   how cache tokens are quantized: KIVI grids, important tokens at high precision (MiKV),
              pre-RoPE keys (KVQuant), Hadamard rotation (QuaRot) — shared by the cache and the simulation
``kvcost``    the cache's exact bit / byte count; per-layer K/V bits
``kvcache``   KIVI cache for Hugging Face generation (keys per channel, values per token, fp residual
              window, per-layer K/V bits, the options above)
``kvfeed``    ``kv_cache_feed``: hands the cache attention probabilities / rotary tables during forwards
``kvsettings`` ``KVSettings`` (the KIVI layout and options) and exact per-layer K/V costs
``kvsim``     an exact one-forward decode simulation of the KIVI cache
``presets``   W/A preset names → (weight spec, activation spec, rotate)
``kveval``    perplexity with the quantized cache actually used (prefill, then chunked decoding), KV
              evaluation with KL
``kvtable``   the KV measurement document (``KVSensitivityTable``)
``kvsens``    per-layer K/V sensitivity (KL to fp, nats/token)
``joint``     one memory budget for weights + KV cache, solved as one multiple-choice knapsack
``resq``      ResQ: PCA subspace of each linear's input at 8 bits, the rest at 4, rotated inside
"""
from ..runtime.act_quant import ActQuantHandle, ActQuantizer, apply_act_quant, calibrate_act_absmax
from ..formats.act import fake_quant_act, parse_act_spec
from ..formats.act import WAPreset, parse_wa_preset
from ..runtime.kv_settings import parse_kv_preset
from ..runtime.kv_cache import KIVICache, KIVILayer
from ..runtime.kv_codec import kv_spec
from ..runtime.kv_cost import kv_cache_bits, kv_cache_bytes, kv_dims, resolve_kv_bits
from ..eval.kv import eval_with_kv_quant, kv_compare
from ..runtime.kv_feed import kv_cache_feed
from ..runtime.act_outliers import FPOutliers, HiChannels, act_bits_per_feature, prepare_for_act_quant, top_k_channels
from ..measure.kv import measure_kv
from ..runtime.kv_settings import KVSettings, kv_part_bits
from ..runtime.kv_sim import simulate_kivi
from ..allocate.kv_table import KVEntry, KVSensitivityTable
from ..allocate.joint import (InfeasibleMemory, JointPlan, allocate_joint, allocate_kv, allocate_separately,
                              load_kv_plan, min_memory_bytes, uniform_kv)
from ..algorithms.resq import ResQQuantizer, apply_resq, fit_resq, fold_resq, resq_basis

__all__ = [
    "ActQuantHandle", "ActQuantizer", "WAPreset", "apply_act_quant", "calibrate_act_absmax", "fake_quant_act",
    "parse_act_spec", "parse_kv_preset", "parse_wa_preset",
    "FPOutliers", "HiChannels", "act_bits_per_feature", "prepare_for_act_quant", "top_k_channels",
    "KIVICache", "KIVILayer", "kv_cache_bits", "kv_cache_bytes", "kv_cache_feed", "kv_dims", "kv_spec",
    "resolve_kv_bits",
    "eval_with_kv_quant",
    "KVEntry", "KVSensitivityTable", "KVSettings", "kv_compare", "kv_part_bits", "measure_kv", "simulate_kivi",
    "InfeasibleMemory", "JointPlan", "allocate_joint", "allocate_kv", "allocate_separately", "load_kv_plan",
    "min_memory_bytes", "uniform_kv",
    "ResQQuantizer", "apply_resq", "fit_resq", "fold_resq", "resq_basis",
]
