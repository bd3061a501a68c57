"""CPU kernel: integer weights of <= 4 bits through torch's int4 weight-only GEMM, bf16 activations.

``torch.ops.aten._weight_int4pack_mm_for_cpu(x, W4, G, sz)`` computes, with fp32 accumulation
and a bf16 output::

    y[m, n] = Σ_k x[m, k] * ((q[n, k] - 8) * sz[k // G, n, 0] + sz[k // G, n, 1])

for 4-bit ``q`` in torch's own blocked layout, ``G`` in {32, 64, 128, 256}, ``sz`` bf16.
Every mixq int grid maps onto it exactly (``mid = 2^(bits-1)``, per kernel group)::

    symmetric, bits >= 2:  q' = q + 8 - mid,  s' = s,   z' = 0
    binary (bits == 1):    q' = q + 8,        s' = 2s,  z' = -s          (s (2q - 1))
    asym, int zero:        q' = q,            s' = s,   z' = s (8 - zero)
    asym, fp16 offset:     q' = q,            s' = s,   z' = offset + 8s

``s'`` and ``z'`` are split exactly into bf16 pieces (fp16 scales: 2, fp32: up to 3);
piece ``p`` is one GEMM call and the calls are summed in fp32, so the only deviation from the
reference (``x Ŵᵀ`` evaluated exactly) is rounding the result to bf16.

Memory: :func:`prepare` keeps a kernel-layout copy, 4 bits per weight + ``pieces * 32 / G`` bits of
``sz`` per weight (``G`` = the kernel group), built once per layer.  Supported: CPU, bf16
activations (the op's fp32 and fp16 paths are slower than dense ``F.linear``), ``out % 16 == 0``,
a kernel group ``G`` dividing the quantization group (``PerGroup(g)``) or the row (channel, tensor).
"""
from __future__ import annotations

import torch

from ...granularity import PerGroup

KERNEL_GROUPS = (256, 128, 64, 32)
MAX_PIECES = 3
MAX_TOKENS = 32  # under "auto": beyond this many rows dequantize + dense GEMM (reference) is as fast


def _ops():
    aten = torch.ops.aten
    if hasattr(aten, "_weight_int4pack_mm_for_cpu") and hasattr(aten, "_convert_weight_to_int4pack_for_cpu"):
        return aten._convert_weight_to_int4pack_for_cpu, aten._weight_int4pack_mm_for_cpu
    return None


def kernel_group(pw) -> int | None:
    """Largest ``G`` in :data:`KERNEL_GROUPS` inside one quantization group and dividing ``in``."""
    cols = pw.shape[1]
    span = pw.spec.granularity.size if isinstance(pw.spec.granularity, PerGroup) else cols
    return next((g for g in KERNEL_GROUPS if span % g == 0 and cols % g == 0), None)


def why_not(pw, x: torch.Tensor) -> str | None:
    spec = pw.spec
    if _ops() is None:
        return "this torch build has no _weight_int4pack_mm_for_cpu"
    if x.device.type != "cpu":
        return "it runs on CPU only"
    if x.dtype != torch.bfloat16:
        return "it needs bfloat16 activations (cast the model with .to(torch.bfloat16))"
    if spec.dtype != "int" or spec.bits > 4:
        return "it runs integer grids of at most 4 bits only"
    if pw.shape[0] % 16:
        return f"out_features {pw.shape[0]} is not a multiple of 16"
    if kernel_group(pw) is None:
        return f"no kernel group in {KERNEL_GROUPS} divides the {spec.granularity} groups of a row of {pw.shape[1]}"
    if _effective_params(pw)[3] is None:
        return f"its params need more than {MAX_PIECES} bf16 pieces"
    return None


def _split_bf16(v: torch.Tensor) -> list[torch.Tensor] | None:
    """bf16 tensors summing exactly to float64 ``v`` (at most :data:`MAX_PIECES`), or None."""
    pieces, rest = [], v
    for _ in range(MAX_PIECES):
        h = rest.to(torch.bfloat16)
        pieces.append(h)
        rest = rest - h.double()
        if not torch.any(rest != 0):
            return pieces
    return None


def _per_kernel_group(t: torch.Tensor, pw, kg: int) -> torch.Tensor:
    """Row params ``[R, 1]`` -> float64 ``[out, in // kg]`` (one value per kernel group)."""
    out, cols = pw.shape
    g = pw.spec.granularity
    t = t.double()
    if isinstance(g, PerGroup):
        return t.reshape(out, cols // g.size).repeat_interleave(g.size // kg, dim=1)
    return t.reshape(-1, 1).expand(out, cols // kg)  # channel: [out, 1]; tensor: [1, 1]


def _effective_params(pw):
    """``(shift, kernel group, s' pieces, z' pieces)`` of the mapping in the module docstring."""
    spec, p, kg = pw.spec, pw.qparams(), kernel_group(pw)
    s = _per_kernel_group(p.scale, pw, kg)
    mid = 2 ** (spec.bits - 1)
    if spec.symmetric and spec.bits == 1:
        shift, s_eff, z_eff = 8, 2 * s, -s
    elif spec.symmetric:
        shift, s_eff, z_eff = 8 - mid, s, torch.zeros_like(s)
    elif p.zero is not None:
        shift, s_eff, z_eff = 0, s, s * (8 - _per_kernel_group(p.zero, pw, kg))
    else:
        shift, s_eff, z_eff = 0, s, _per_kernel_group(p.offset, pw, kg) + 8 * s
    sp, zp = _split_bf16(s_eff), _split_bf16(z_eff)
    if sp is None or zp is None:
        return shift, kg, None, None
    return shift, kg, sp, zp


@torch.no_grad()
def prepare(pw) -> dict:
    """Kernel state: ``w`` uint8 ``[out, in/2]`` (torch's int4pack layout), ``sz`` bf16 ``[P, in/G, out, 2]``, ``G``."""
    convert, _ = _ops()
    shift, kg, sp, zp = _effective_params(pw)
    codes = pw.codes_unpacked().to(torch.int32) + shift  # transient [out, in] int32, one layer at a time
    w = convert(codes.contiguous(), 1)
    n = max(len(sp), len(zp))
    zero = torch.zeros_like(sp[0])
    sp, zp = sp + [zero] * (n - len(sp)), zp + [zero] * (n - len(zp))
    sz = torch.stack([torch.stack([a.t(), b.t()], -1) for a, b in zip(sp, zp)]).contiguous()
    return {"w": w, "sz": sz, "group": kg}


def state_nbytes(state: dict) -> int:
    return state["w"].numel() * state["w"].element_size() + state["sz"].numel() * state["sz"].element_size()


def linear(x: torch.Tensor, pw, state: dict, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [M, in]`` bf16 -> ``[M, out]`` bf16: Σ over bf16 param pieces, summed in fp32."""
    _, mm = _ops()
    x = x.contiguous()
    sz = state["sz"]
    if sz.shape[0] == 1 and bias is None:
        return mm(x, state["w"], state["group"], sz[0])
    y = mm(x, state["w"], state["group"], sz[0]).float()
    for p in range(1, sz.shape[0]):
        y += mm(x, state["w"], state["group"], sz[p]).float()
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)
