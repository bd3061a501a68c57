"""Independent re-readers of the HF exports (compressed-tensors, GPTQ) and a transformers load check.

Deliberately shares no packing code with :mod:`.hf`'s writers: a bug in a writer cannot hide behind the
same bug in its reader.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from .native import CheckpointError

DTYPES = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "float32": torch.float32}
DTYPE_NAME = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def target_dtype(dtype) -> torch.dtype | None:
    """``None`` (keep the stored dtypes), a float ``torch.dtype`` or its name (fp16, bf16, fp32, ...) -> the dtype."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAME:
            raise ValueError(f"dtype must be fp16, bf16 or fp32, got {dtype}")
        return dtype
    if str(dtype).lower() not in DTYPES:
        raise ValueError(f"dtype must be fp16, bf16 or fp32, got {dtype!r}")
    return DTYPES[str(dtype).lower()]


# ---------------------------------------------------------------------- independent readers
# These share no code with the writers in .hf: they read the files as a loader would, with a
# gather over 64-bit windows instead of the writers' bit planes, and rebuild float32 weights.

def _rb_bits(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Fields ``0 .. n-1`` of ``bits`` bits from each row of LSB-first int32 words ``[R, W]`` -> int64 ``[R, n]``."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    w = torch.cat([w, torch.zeros_like(w[:, :1])], dim=1)
    start = torch.arange(n, dtype=torch.int64) * bits
    lo, hi = w[:, start // 32], w[:, start // 32 + 1]
    window = lo | (hi << 32)  # bits [32k, 32k + 64) of the stream; only the low 40 are ever needed
    return (window >> (start % 32)) & ((1 << bits) - 1)


def _rb_config(out_dir: Path, key: str) -> dict:
    try:
        cfg = json.loads((out_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {out_dir / 'config.json'}: {e}") from None
    q = cfg.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != key:
        raise CheckpointError(f"{out_dir} has no {key} quantization_config in config.json")
    return q


def _rb_tensors(out_dir: Path):
    files = sorted(out_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{out_dir} holds no .safetensors file")
    where = {}
    for f in files:
        with safe_open(f, framework="pt") as h:
            for k in h.keys():
                where[k] = f

    def get(k):
        with safe_open(where[k], framework="pt") as h:
            return h.get_tensor(k)

    return where, get


def _rb_match(name: str, pattern: str) -> bool:
    return bool(re.match(pattern[3:], name)) if pattern.startswith("re:") else name == pattern


def read_back_compressed(out_dir) -> dict[str, torch.Tensor]:
    """Dequantize every ``pack-quantized`` int layer of a compressed-tensors directory: ``{fqn: float32 [out, in]}``."""
    out_dir = Path(out_dir)
    qcfg = _rb_config(out_dir, "compressed-tensors")
    where, get = _rb_tensors(out_dir)
    ignore = qcfg.get("ignore") or []
    result = {}
    for key in where:
        if not key.endswith(".weight_packed"):
            continue
        fqn = key[: -len(".weight_packed")]
        if any(_rb_match(fqn, p) for p in ignore):
            raise CheckpointError(f"{fqn} is packed but listed in ignore")
        scheme = next((g for g in qcfg["config_groups"].values()
                       if any(_rb_match(fqn, t) for t in g.get("targets", []))), None)
        if scheme is None:
            raise CheckpointError(f"{fqn} is packed but no config group targets it")
        wargs = scheme["weights"]
        if wargs.get("type", "int") != "int" or scheme.get("format", qcfg.get("format")) != "pack-quantized":
            raise CheckpointError(f"{fqn}: only int pack-quantized weights are read back")
        bits = int(wargs["num_bits"])
        out_f, in_f = (int(x) for x in get(f"{fqn}.weight_shape").tolist())
        half = 1 << (bits - 1)
        q = _rb_bits(get(key), bits, in_f) - half                        # signed codes [out, in]
        scale = get(f"{fqn}.weight_scale").float()                       # [out, groups]
        per = in_f // scale.shape[1]
        if wargs.get("symmetric", True):
            zp = torch.zeros_like(scale)
        else:
            zp_words = get(f"{fqn}.weight_zero_point")                   # [ceil(out*b/32), groups]
            zp = (_rb_bits(zp_words.t(), bits, out_f) - half).t().float()
        x = (q.float() - zp.repeat_interleave(per, dim=1)) * scale.repeat_interleave(per, dim=1)
        result[fqn] = x
    return result


def _rb_gptq_settings(qcfg: dict, fqn: str) -> dict | None:
    """bits / group_size / sym for ``fqn``: the first matching ``dynamic`` rule, else the base; None if skipped."""
    base = {"bits": qcfg["bits"], "group_size": qcfg["group_size"], "sym": qcfg.get("sym", True)}
    for pattern, over in (qcfg.get("dynamic") or {}).items():
        neg = pattern.startswith("-:")
        rx = pattern[2:] if pattern[:2] in ("-:", "+:") else pattern
        if re.match(rx, fqn):
            return None if neg else {**base, **over}
    return base


def read_back_gptq(out_dir) -> dict[str, torch.Tensor]:
    """Dequantize every GPTQ v1 layer of a directory: ``{fqn: float32 [out, in]}`` (zeros stored minus one)."""
    out_dir = Path(out_dir)
    qcfg = _rb_config(out_dir, "gptq")
    if qcfg.get("checkpoint_format", "gptq") != "gptq" or qcfg.get("desc_act"):
        raise CheckpointError(f"{out_dir}: only checkpoint_format 'gptq' without desc_act is read back")
    where, get = _rb_tensors(out_dir)
    result = {}
    for key in where:
        if not key.endswith(".qweight"):
            continue
        fqn = key[: -len(".qweight")]
        st = _rb_gptq_settings(qcfg, fqn)
        if st is None:
            raise CheckpointError(f"{fqn} has a qweight but dynamic marks it not quantized")
        bits = int(st["bits"])
        qweight, qzeros = get(key), get(f"{fqn}.qzeros")
        scales, g_idx = get(f"{fqn}.scales").float(), get(f"{fqn}.g_idx").long()
        in_f, out_f = g_idx.numel(), scales.shape[1]
        q = _rb_bits(qweight.t(), bits, in_f).t()                         # [in, out]
        zeros = _rb_bits(qzeros, bits, out_f) + 1                         # [groups, out]
        w = scales[g_idx] * (q.float() - zeros[g_idx].float())            # [in, out]
        result[fqn] = w.t().contiguous()
    return result


# ---------------------------------------------------------------------- loading with transformers
@torch.no_grad()
def check_with_transformers(out_dir, src_dir, *, dtype=torch.float32, n_tokens: int = 16, seed: int = 0) -> dict:
    """Load ``out_dir`` with ``transformers.AutoModelForCausalLM`` (``dtype``, CPU) and compare with mixq.

    Returns ``{"loaded": True, "max_logit_diff", "max_weight_diff", "layers_compared", ...}`` against
    :func:`mixq.export.native.load_quantized` of ``src_dir``; raises ``ImportError`` when the format's
    loader package is not installed (compressed-tensors; GPTQ needs optimum + gptqmodel).
    """
    from transformers import AutoModelForCausalLM

    from .native import load_quantized

    dtype = target_dtype(dtype)
    ref, _, info = load_quantized(src_dir, dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=dtype, use_safetensors=True)  # never unpickle
    model.eval()
    vocab = int(model.config.get_text_config().vocab_size)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, n_tokens), generator=g)
    logits = model(ids).logits
    ref_logits = ref(ids).logits
    mods, ref_mods = dict(model.named_modules()), dict(ref.named_modules())
    wdiff, compared = 0.0, 0
    for fqn in info["layers"]:
        w = getattr(mods.get(fqn), "weight", None)
        if isinstance(w, torch.Tensor) and w.is_floating_point() and w.shape == ref_mods[fqn].weight.shape:
            wdiff = max(wdiff, float((w.float() - ref_mods[fqn].weight.float()).abs().max()))
            compared += 1
    return {"loaded": True, "loader": type(model).__name__, "max_logit_diff": float((logits - ref_logits).abs().max()),
            "max_weight_diff": wdiff if compared else None, "layers_compared": compared, "n_tokens": n_tokens,
            "dtype": DTYPE_NAME[dtype]}
