"""What llama.cpp's CPU matrix products do to a layer's *input*, so mixq can evaluate a GGUF plan as llama.cpp runs it.

A GGUF file from ``mixq export --format gguf`` holds mixq's weights bit for bit (:mod:`mixq.export.ggml_exact`), but
llama.cpp does not multiply them by the activations mixq's evaluator uses: each quantized weight type has a
``vec_dot_type`` (``type_traits_cpu`` in ggml-cpu.c) and the activations are first rounded to it --

    Q4_0 Q5_0 Q8_0 MXFP4 IQ4_NL     q8_0: blocks of 32, d = amax / 127 stored fp16, q = round(x · 127 / amax)
    Q4_1 Q5_1                       q8_1: the same values (plus a block sum; its fp16 rounding is not modelled)
    Q2_K .. Q6_K, IQ2-IQ3, IQ4_XS   q8_K: blocks of 256, iscale = -127 / max (the signed value of largest |x|),
                                    q = min(127, round(iscale · x)), d = 1 / iscale kept in float32
    F16                             the activations converted to fp16

(x86 rounding: ``_mm256_round_ps`` to nearest even for q8_0 / q8_1, ``nearest_int`` -- also to even -- for q8_K.)
:func:`simulate` hooks a model's linear layers so that each sees its input rounded like that; the rest of
llama.cpp's arithmetic (fp16 KV cache, its attention and norms) stays mixq's fp32.  On SmolLM2 this rounding alone
moves llama.cpp's perplexity of a file whose weights equal the F16 file's by about half a percent
(bench/results/gguf_vs_llamacpp.md), so an evaluation that ignores it cannot agree with llama.cpp closer than that.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

# ggml weight type -> the activation type its CPU dot product multiplies with (ggml-cpu.c, type_traits_cpu)
VEC_DOT = {
    "F32": "f32", "F16": "f16", "BF16": "bf16",
    "Q4_0": "q8_0", "Q5_0": "q8_0", "Q8_0": "q8_0", "MXFP4": "q8_0", "IQ4_NL": "q8_0",
    "Q4_1": "q8_1", "Q5_1": "q8_1",
    "Q2_K": "q8_K", "Q3_K": "q8_K", "Q4_K": "q8_K", "Q5_K": "q8_K", "Q6_K": "q8_K",
    "IQ2_XXS": "q8_K", "IQ2_XS": "q8_K", "IQ2_S": "q8_K", "IQ3_XXS": "q8_K", "IQ3_S": "q8_K",
    "IQ1_S": "q8_K", "IQ1_M": "q8_K", "IQ4_XS": "q8_K",
}
BLOCK = {"q8_0": 32, "q8_1": 32, "q8_K": 256}


def round_activations(x: torch.Tensor, kind: str) -> torch.Tensor:
    """``x`` (any shape, the last dimension a multiple of the block) as the dot product sees it, float32."""
    x = x.float()
    if kind == "f32":
        return x
    if kind == "f16":
        return x.half().float()
    if kind == "bf16":
        return x.bfloat16().float()
    if kind not in BLOCK:
        raise ValueError(f"unknown activation type {kind!r}; known: f32, f16, bf16, {', '.join(BLOCK)}")
    b = BLOCK[kind]
    if x.shape[-1] % b:
        raise ValueError(f"{kind} rounds blocks of {b}: the last dimension {x.shape[-1]} is not a multiple of it")
    xb = x.reshape(*x.shape[:-1], -1, b)
    if kind == "q8_K":
        i = xb.abs().argmax(-1, keepdim=True)
        mx = xb.gather(-1, i)
        zero = mx == 0
        iscale = torch.where(zero, torch.zeros_like(mx), -127.0 / torch.where(zero, torch.ones_like(mx), mx))
        q = torch.round(iscale * xb).clamp_max(127)
        d = torch.where(zero, torch.zeros_like(mx), 1.0 / torch.where(zero, torch.ones_like(iscale), iscale))
        return (q * d).reshape(x.shape)
    amax = xb.abs().amax(-1, keepdim=True)
    d = (amax / 127.0).half().float()
    idm = torch.where(amax > 0, 127.0 / torch.where(amax > 0, amax, torch.ones_like(amax)), torch.zeros_like(amax))
    return (torch.round(xb * idm) * d).reshape(x.shape)


def types_of_directory(model: torch.nn.Module, info: dict, float_type: str = "F16") -> dict[str, str]:
    """Module name -> ggml type of a mixq directory's model as ``mixq export --format gguf`` writes it: each quantized
    layer's exact type (:func:`mixq.export.ggml_exact.ggml_exact_type`), every other linear layer (the output head)
    ``float_type`` (``info={}``: a full-precision model, every linear layer ``float_type``, as in an F16 file).  A
    layer no ggml type holds exactly is an error: llama.cpp would run a re-quantized weight."""
    from ..config import QuantSpec
    from .ggml_exact import ggml_exact_type

    out = {}
    for fqn, layer in (info.get("layers") or {}).items():
        spec = QuantSpec.from_dict(layer["spec"])
        t = ggml_exact_type(spec, tuple(layer["shape"]))
        if t is None:
            raise ValueError(f"{fqn}: {spec.name} on a {tuple(layer['shape'])} weight has no exact ggml type, so "
                             "llama.cpp would run a re-quantized layer; quantize with --target gguf to evaluate "
                             "the file llama.cpp runs")
        out[fqn] = t
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            out.setdefault(name, float_type)
    return out


@contextmanager
def simulate(model: torch.nn.Module, types: dict[str, str]):
    """Within the block, every ``nn.Linear`` named in ``types`` (module name -> ggml type) sees its input rounded to
    that type's ``vec_dot_type`` (:func:`round_activations`); other modules are untouched."""
    unknown = sorted({t for t in types.values() if t not in VEC_DOT})
    if unknown:
        raise ValueError(f"no llama.cpp activation type known for ggml type(s) {unknown}")
    hooks = []
    try:
        for name, mod in model.named_modules():
            if name in types and isinstance(mod, torch.nn.Linear):
                kind = VEC_DOT[types[name]]
                hooks.append(mod.register_forward_pre_hook(
                    lambda m, args, kind=kind: (round_activations(args[0], kind).to(args[0].dtype), *args[1:])))
        if not hooks:
            raise ValueError("none of the named layers is an nn.Linear of this model")
        yield len(hooks)
    finally:
        for h in hooks:
            h.remove()
