"""CPU kernels: integer weights of <= 4 bits through torch's int4 weight-only GEMM, bf16 activations.

``torch.ops.aten._weight_int4pack_mm_for_cpu(x, W4, G, sz)`` computes, with fp32 accumulation
and a bf16 output::

    y[m, n] = Σ_k x[m, k] * ((q[n, k] - 8) * sz[k // G, n, 0] + sz[k // G, n, 1])

for 4-bit ``q`` in torch's own blocked layout, ``G`` in {32, 64, 128, 256}, ``sz`` bf16 (the op's
fp32 / fp16 paths are several times slower than dense ``F.linear``, so only bf16 is used).
Every mixq int grid maps onto it (``mid = 2^(bits-1)``, per kernel group)::

    symmetric, bits >= 2:  q' = q + 8 - mid,  s' = s,   z' = 0
    binary (bits == 1):    q' = q + 8,        s' = 2s,  z' = -s          (s (2q - 1))
    asym, int zero:        q' = q + c,        s' = s,   z' = s (8 - c - zero)
    asym, fp16 offset:     q' = q + c,        s' = s,   z' = offset + (8 - c) s

with ``c = clamp(round(8 - zero), 0, 16 - 2^bits)`` per quantization group (``zero = -offset / s`` for
the fp16 offset): the shift that centres the codes, so ``z' = 0`` for 2- and 3-bit int zero points.

Two kernels share this module:

``cpu-int4`` (``exact=False``, the one ``"auto"`` picks)
    ``s'`` and ``z'`` are rounded once to bf16 at prepare time: one GEMM per call.  fp16 / fp32
    scales lose their low mantissa bits (relative error <= 2^-9 per weight for symmetric grids,
    <= 2^-9 of the group's range for asymmetric ones) — the rounding a bf16 model applies to
    every weight anyway.  bf16 and e8m0 scales (and every ``z'`` of a symmetric grid) are exact.
``cpu-int4-exact`` (``exact=True``)
    ``s'`` and ``z'`` are split exactly into bf16 pieces (fp16 scales: 2, fp32: up to 3); piece
    ``p`` is one GEMM call and the calls are summed in fp32, so the only deviation from the
    reference (``x Ŵᵀ`` evaluated exactly) is rounding the result to bf16.  1-3 GEMMs per call.

Memory: :func:`prepare` builds the kernel layout — 4 bits per weight (``w``) plus ``pieces * 32 / G``
bits of ``sz`` per weight (``G`` = the kernel group) — once per layer.  ``w`` holds every code
(``q = q' - shift``), so :class:`~mixq.runtime.QuantLinear` then frees its packed code stream and
rebuilds it from ``w`` on demand (:func:`codes_from_state`): a 4-bit layer stays at ~4.5-5 bits
per weight in RAM, not 4 + 4.25.  Supported: CPU, bf16 activations, ``out % 16 == 0``, a kernel
group ``G`` dividing the quantization group (``PerGroup(g)``: g96 runs with G = 32) or the row
(channel, tensor).
"""
from __future__ import annotations

import torch

from ...granularity import PerGroup

KERNEL_GROUPS = (256, 128, 64, 32)
MAX_PIECES = 3
MAX_TOKENS = 32  # under "auto": beyond this many rows dequantize + dense GEMM (reference) is faster
_BLOCK_N = 64  # rows per block of torch's CPU int4pack layout (checked at run time, see _layout_is_blocked)


def _find_ops():
    aten = torch.ops.aten
    if hasattr(aten, "_weight_int4pack_mm_for_cpu") and hasattr(aten, "_convert_weight_to_int4pack_for_cpu"):
        return aten._convert_weight_to_int4pack_for_cpu.default, aten._weight_int4pack_mm_for_cpu.default
    return None


_OPS = _find_ops()


def _ops():
    return _OPS


def kernel_group(spec, shape) -> int | None:
    """Largest ``G`` in :data:`KERNEL_GROUPS` inside one quantization group and dividing ``in``."""
    cols = shape[1]
    span = spec.granularity.size if isinstance(spec.granularity, PerGroup) else cols
    return next((g for g in KERNEL_GROUPS if span % g == 0 and cols % g == 0), None)


def spec_why_not(spec, shape) -> str | None:
    """Why the int4 kernels cannot run a ``shape = (out, in)`` weight of ``spec`` (None: they can).

    Input-independent part of :func:`why_not` (bf16 activations on CPU are needed on top).
    """
    if _ops() is None:
        return "this torch build has no _weight_int4pack_mm_for_cpu"
    if spec.dtype != "int" or spec.bits > 4:
        return "it runs integer grids of at most 4 bits only"
    if shape[0] % 16:
        return f"out_features {shape[0]} is not a multiple of 16"
    if kernel_group(spec, shape) is None:
        return f"no kernel group in {KERNEL_GROUPS} divides the {spec.granularity} groups of a row of {shape[1]}"
    return None


def why_not(pw, x: torch.Tensor, *, exact: bool = False) -> str | None:
    reason = spec_why_not(pw.spec, pw.shape)
    if reason is not None:
        return reason
    if x.device.type != "cpu":
        return "it runs on CPU only"
    if x.dtype != torch.bfloat16:
        return "it needs bfloat16 activations (cast the model with .to(torch.bfloat16))"
    if exact and _effective_params(pw, exact=True)[2] is None:
        return f"its params need more than {MAX_PIECES} bf16 pieces"
    return None


def _split_bf16(v: torch.Tensor, exact: bool) -> list[torch.Tensor] | None:
    """bf16 tensors summing exactly to float64 ``v`` (at most :data:`MAX_PIECES`), or None.

    ``exact=False``: one piece, ``v`` rounded to the nearest bf16.
    """
    if not exact:
        return [v.float().to(torch.bfloat16)]
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


def _effective_params(pw, exact: bool):
    """``(shift, kernel group, s' pieces, z' pieces)`` of the mapping in the module docstring.

    ``shift`` (``q' - q``) is an int, or for asymmetric grids a uint8 ``[out, groups]`` tensor: per
    quantization group the shift ``c`` that best centres the codes on the kernel's ``q' - 8``
    (``c = clamp(round(8 - zero), 0, 16 - 2^bits)``), so that ``z' = s (8 - c - zero)`` is 0 whenever the
    zero point fits (2- and 3-bit grids) and rounding ``s'`` to bf16 costs each weight at most 2^-9 of
    its own magnitude.
    """
    spec, p, kg = pw.spec, pw.qparams(), kernel_group(pw.spec, pw.shape)
    s = _per_kernel_group(p.scale, pw, kg)
    if spec.symmetric:
        shift = 8 if spec.bits == 1 else 8 - 2 ** (spec.bits - 1)
        s_eff, z_eff = (2 * s, -s) if spec.bits == 1 else (s, torch.zeros_like(s))
    else:
        scale = p.scale.double()
        zero = p.zero.double() if p.zero is not None else -p.offset.double() / scale  # [R, 1] in code units
        c = (8 - zero).round().clamp(0, 16 - 2**spec.bits)
        if p.zero is not None:
            z_rows = scale * (8 - c - zero)
        else:
            z_rows = p.offset.double() + (8 - c) * scale
        shift = c.to(torch.uint8).reshape(pw.shape[0], -1)  # [out, groups]
        s_eff, z_eff = s, _per_kernel_group(z_rows, pw, kg)
    sp, zp = _split_bf16(s_eff, exact), _split_bf16(z_eff, exact)
    if sp is None or zp is None:
        return shift, kg, None, None
    return shift, kg, sp, zp


def _expand_shift(shift, shape) -> torch.Tensor | int:
    """An int, or ``[out, groups]`` -> ``[out, in]`` (int32)."""
    if isinstance(shift, int):
        return shift
    return shift.to(torch.int32).repeat_interleave(shape[1] // shift.shape[1], dim=1)


@torch.no_grad()
def prepare(pw, *, exact: bool = False) -> dict:
    """Kernel state: ``w`` uint8 (torch's int4pack layout of ``q'``), ``sz`` bf16 ``[P, in/G, out, 2]``,
    ``group`` (G), ``shift`` (int, or uint8 ``[out, groups]``), ``shape`` and ``holds_codes`` (whether
    :func:`codes_from_state` inverts ``w`` cheaply: ``out`` a multiple of 64 in the layout this torch
    uses; QuantLinear frees its code stream then)."""
    convert, _ = _ops()
    shift, kg, sp, zp = _effective_params(pw, exact)
    if sp is None:
        raise ValueError(f"{pw.spec.name}: params need more than {MAX_PIECES} bf16 pieces")
    codes = pw.codes_unpacked().to(torch.int32) + _expand_shift(shift, pw.shape)  # transient [out, in] int32
    w = convert(codes.contiguous(), 1)
    del codes
    n = max(len(sp), len(zp))
    zero = torch.zeros_like(sp[0])
    sp, zp = sp + [zero] * (n - len(sp)), zp + [zero] * (n - len(zp))
    sz = torch.stack([torch.stack([a.t(), b.t()], -1) for a, b in zip(sp, zp)]).contiguous()
    out = pw.shape[0]
    return {"w": w, "sz": sz, "sz0": sz[0] if n == 1 else None, "group": kg, "shift": shift,
            "shape": tuple(pw.shape), "holds_codes": out % _BLOCK_N == 0 and _layout_is_blocked()}


def state_nbytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for k, t in state.items() if isinstance(t, torch.Tensor) and k != "sz0")


def linear(x: torch.Tensor, pw, state: dict, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [M, in]`` bf16 -> ``[M, out]`` bf16: Σ over bf16 param pieces, summed in fp32.  ``pw`` is unused."""
    mm = _OPS[1]
    sz0 = state["sz0"]
    if sz0 is not None:  # one piece: a single GEMM
        y = mm(x if x.is_contiguous() else x.contiguous(), state["w"], state["group"], sz0)
        return y if bias is None else y + bias.to(y.dtype)
    x = x.contiguous()
    sz = state["sz"]
    y = mm(x, state["w"], state["group"], sz[0]).float()
    for p in range(1, sz.shape[0]):
        y += mm(x, state["w"], state["group"], sz[p]).float()
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)


# ---------------------------------------------------------------------- codes back from the kernel layout
def codes_from_state(state: dict) -> torch.Tensor:
    """The codes ``q`` (uint8 ``[out, in]``) held by ``state["w"]``: the inverse of :func:`prepare`'s packing.

    ~1 ms for a 576x1536 layer when ``state["holds_codes"]``; other shapes probe the layout (slow, uncached).
    """
    n, k = state["shape"]
    w = state["w"].reshape(-1)
    nib = torch.stack([w & 15, w >> 4], -1).reshape(-1)  # kernel nibble slots, low nibble first
    if n % _BLOCK_N == 0 and _layout_is_blocked():
        # blocks of 64 rows: byte [b, k, j] = q[64b + j, k] | q[64b + 32 + j, k] << 4
        q = nib.reshape(n // _BLOCK_N, k, _BLOCK_N // 2, 2).permute(0, 3, 2, 1).reshape(n, k)
    else:
        src = _source_index(n, k)
        q = torch.empty(n * k, dtype=torch.uint8)
        q[src] = nib
        q = q.reshape(n, k)
    shift = _expand_shift(state["shift"], state["shape"])
    if isinstance(shift, int):
        return q - shift if shift else q.clone()
    return (q.to(torch.int32) - shift).to(torch.uint8)


def _source_index(n: int, k: int) -> torch.Tensor:
    """int64 ``[n*k]``: for each nibble slot of the int4pack layout, the row-major index it came from.

    Found by packing the index's base-16 digits one at a time (works for any layout the op uses).
    """
    convert, _ = _ops()
    idx = torch.arange(n * k, dtype=torch.int64)
    src = torch.zeros(n * k, dtype=torch.int64)
    d = 0
    while d == 0 or 16**d < n * k:
        digit = ((idx >> (4 * d)) & 15).to(torch.int32).reshape(n, k)
        w = convert(digit, 1).reshape(-1)
        src |= torch.stack([w & 15, w >> 4], -1).reshape(-1).to(torch.int64) << (4 * d)
        d += 1
    return src


_BLOCKED: bool | None = None


def _layout_is_blocked() -> bool:
    """Whether this torch's int4pack layout is the 64-row blocked one :func:`codes_from_state` inverts directly."""
    global _BLOCKED
    if _BLOCKED is None:
        n, k = 2 * _BLOCK_N, 64
        src = _source_index(n, k)
        want = torch.arange(n * k).reshape(n // _BLOCK_N, 2, _BLOCK_N // 2, k).permute(0, 3, 2, 1).reshape(-1)
        _BLOCKED = bool(torch.equal(src, want))
    return _BLOCKED
