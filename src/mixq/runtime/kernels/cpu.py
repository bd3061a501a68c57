"""CPU kernels: integer weights of 1-8 bits through torch's int4 weight-only GEMM, bf16 activations.

``torch.ops.aten._weight_int4pack_mm_for_cpu(x, W4, G, sz)`` computes, with fp32 accumulation
and a bf16 output::

    y[m, n] = Σ_k x[m, k] * ((q[n, k] - 8) * sz[k // G, n, 0] + sz[k // G, n, 1])

for 4-bit ``q`` in torch's own blocked layout, ``G`` in {32, 64, 128, 256}, ``sz`` bf16 (the op's
fp32 / fp16 paths are several times slower than dense ``F.linear``, so only bf16 is used).
Every mixq int grid is affine in its codes per quantization group, ``Ŵ = a q + t``::

    symmetric, bits >= 2:  a = s,   t = -mid s          binary (bits == 1):  a = 2s,  t = -s
    asym, int zero:        a = s,   t = -s zero         asym, fp16 offset:   a = s,   t = offset

and maps onto one int4 GEMM per *plane*:

    bits <= 4, one plane:   q' = q + c,          s' = a,    z' = t + a (8 - c)
    5..8 bits, two planes:  q = 16 hi + lo
                            high:  q' = hi + c,  s' = 16a,  z' = t + a (136 - 16c)
                            low:   q' = lo,      s' = a,    z' = 0

with the shift ``c`` per quantization group chosen (rounded, clamped to the free code range) so that
``z'`` is small: 0 for symmetric and binary grids and for 2- and 3-bit int zero points, at most a few
steps ``a`` otherwise.  Two planes hold 8 bits per weight in RAM whatever the width (5-bit layers
pay 3 bits over their packed size there) and cost two GEMMs.

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

Memory: :func:`prepare` builds the kernel layout — 4 bits per weight per plane (``w``) plus ``pieces * 32 / G``
bits of ``sz`` per weight and plane (``G`` = the kernel group) — once per layer.  ``w`` holds every code
(``q = q' - shift``), so :class:`~mixq.runtime.QuantLinear` then frees its packed code stream and
rebuilds it from ``w`` on demand (:func:`codes_from_state`): a 4-bit layer stays at ~4.5-5 bits
per weight in RAM, not 4 + 4.25.  Supported: CPU, bf16 activations, ``out % 16 == 0``, a kernel
group ``G`` dividing the quantization group (``PerGroup(g)``: g96 runs with G = 32) or the row
(channel, tensor).
"""
from __future__ import annotations

import torch

from ...config.registry import owner
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
    if "cpu-int4" not in owner(spec.dtype).kernels or spec.bits > 8:
        return "it runs integer grids (1-8 bits) only"
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
    if exact and any(sp is None or zp is None for _, sp, zp in _effective_params(pw, exact=True)[1]):
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


def _affine(pw) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``(a, t)`` ``[R, 1]`` with ``Ŵ = a·q + t`` for the codes ``q`` of each quantization group."""
    spec, p = pw.spec, pw.qparams()
    s = p.scale.double()
    if spec.symmetric:
        if spec.bits == 1:
            return 2 * s, -s  # s (2q - 1)
        return s, -(2 ** (spec.bits - 1)) * s
    if p.zero is not None:
        return s, -s * p.zero.double()
    return s, p.offset.double()


def n_planes(bits: int) -> int:
    """int4 planes a ``bits``-bit code needs: 1 up to 4 bits, 2 (high and low nibble) up to 8."""
    return 1 if bits <= 4 else 2


def _effective_params(pw, exact: bool):
    """``(kernel group, planes)``: per plane ``(shift, s' pieces, z' pieces)``, the mapping of the module
    docstring (``None`` pieces: more than :data:`MAX_PIECES` bf16 pieces needed).

    ``shift`` (``q'_p - code_p``) is an int when it is the same for every group (symmetric grids), else a
    uint8 ``[out, groups]`` tensor: per quantization group the shift that best centres the codes on the
    kernel's ``q' - 8``, so that ``z'`` is small (0 whenever the zero point fits, e.g. 2- and 3-bit int
    zero points) and rounding ``s'`` / ``z'`` to bf16 costs each weight at most 2^-9 of a few steps.
    """
    spec, kg = pw.spec, kernel_group(pw.spec, pw.shape)
    a, t = _affine(pw)
    out = pw.shape[0]
    if n_planes(spec.bits) == 1:  # q' = q + c:  (q + c - 8) a + t + a (8 - c) = a q + t
        c = (8 + t / a).round().clamp(0, 16 - 2**spec.bits)
        specs = [(c, a, t + a * (8 - c))]
    else:  # q = 16 hi + lo:  (hi + c - 8) 16a + [t + a (136 - 16c)]  +  (lo - 8) a  =  a q + t
        c = ((136 + t / a) / 16).round().clamp(0, 16 - 2 ** (spec.bits - 4))
        specs = [(c, 16 * a, t + a * (136 - 16 * c)), (torch.zeros_like(c), a, torch.zeros_like(t))]
    planes = []
    for c, s_eff, z_eff in specs:
        c = c.to(torch.uint8)
        c = c.expand(out, 1) if c.numel() == 1 else c.reshape(out, -1)  # [out, groups] (per tensor: [out, 1])
        shift = int(c.reshape(-1)[0]) if bool(torch.all(c == c.reshape(-1)[0])) else c
        planes.append((shift, _split_bf16(_per_kernel_group(s_eff, pw, kg), exact),
                       _split_bf16(_per_kernel_group(z_eff, pw, kg), exact)))
    return kg, planes


def _expand_shift(shift, shape) -> torch.Tensor | int:
    """An int, or ``[out, groups]`` -> ``[out, in]`` (int32)."""
    if isinstance(shift, int):
        return shift
    return shift.to(torch.int32).repeat_interleave(shape[1] // shift.shape[1], dim=1)


def plane_codes(codes: torch.Tensor, bits: int, plane: int) -> torch.Tensor:
    """The part of the codes plane ``plane`` holds: all of them (1 plane), else the high / low nibble."""
    if n_planes(bits) == 1:
        return codes
    return codes >> 4 if plane == 0 else codes & 15


@torch.no_grad()
def prepare(pw, *, exact: bool = False) -> dict:
    """Kernel state: ``planes``, each ``{"w"`` uint8 (torch's int4pack layout of ``q'``), ``"sz"`` bf16
    ``[P, in/G, out, 2]``, ``"sz0"`` (``sz[0]`` when ``P == 1``), ``"shift"`` (int or uint8 ``[out, groups]``)``}``;
    ``group`` (G), ``bits``, ``shape`` and ``holds_codes`` (whether :func:`codes_from_state` inverts the planes
    cheaply: ``out`` a multiple of 64 in the layout this torch uses; QuantLinear frees its code stream then)."""
    convert, _ = _ops()
    kg, planes = _effective_params(pw, exact)
    if any(sp is None or zp is None for _, sp, zp in planes):
        raise ValueError(f"{pw.spec.name}: params need more than {MAX_PIECES} bf16 pieces")
    codes = pw.codes_unpacked()
    state_planes = []
    for i, (shift, sp, zp) in enumerate(planes):
        q = plane_codes(codes, pw.spec.bits, i).to(torch.int32) + _expand_shift(shift, pw.shape)  # transient int32
        w = convert(q.contiguous(), 1)
        del q
        n = max(len(sp), len(zp))
        zero = torch.zeros_like(sp[0])
        sp, zp = sp + [zero] * (n - len(sp)), zp + [zero] * (n - len(zp))
        sz = torch.stack([torch.stack([a.t(), b.t()], -1) for a, b in zip(sp, zp)]).contiguous()
        state_planes.append({"w": w, "sz": sz, "sz0": sz[0] if n == 1 else None, "shift": shift})
    out = pw.shape[0]
    return {"planes": state_planes, "group": kg, "bits": pw.spec.bits, "shape": tuple(pw.shape),
            "holds_codes": out % _BLOCK_N == 0 and _layout_is_blocked()}


def state_nbytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for pl in state["planes"] for k, t in pl.items()
               if isinstance(t, torch.Tensor) and k != "sz0")


def linear(x: torch.Tensor, pw, state: dict, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [M, in]`` bf16 -> ``[M, out]`` bf16: Σ over planes and bf16 param pieces, summed in fp32.  ``pw`` is unused."""
    mm = _OPS[1]
    planes, G = state["planes"], state["group"]
    x = x if x.is_contiguous() else x.contiguous()
    if len(planes) == 1 and planes[0]["sz0"] is not None:  # one plane, one piece: a single GEMM
        y = mm(x, planes[0]["w"], G, planes[0]["sz0"])
        return y if bias is None else y + bias.to(y.dtype)
    y = None
    for pl in planes:
        for sz in pl["sz"]:
            part = mm(x, pl["w"], G, sz).float()
            y = part if y is None else y.add_(part)
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)


# ---------------------------------------------------------------------- codes back from the kernel layout
def codes_from_state(state: dict) -> torch.Tensor:
    """The codes ``q`` (uint8 ``[out, in]``) held by ``state["planes"]``: the inverse of :func:`prepare`'s packing.

    ~1 ms per plane for a 576x1536 layer when ``state["holds_codes"]``; other shapes probe the layout (slow, uncached).
    """
    parts = [_plane_from_layout(pl["w"], pl["shift"], state["shape"]) for pl in state["planes"]]
    return parts[0] if len(parts) == 1 else parts[0] << 4 | parts[1]


def _plane_from_layout(w: torch.Tensor, shift, shape) -> torch.Tensor:
    n, k = shape
    w = w.reshape(-1)
    nib = torch.stack([w & 15, w >> 4], -1).reshape(-1)  # kernel nibble slots, low nibble first
    if n % _BLOCK_N == 0 and _layout_is_blocked():
        # blocks of 64 rows: byte [b, k, j] = q[64b + j, k] | q[64b + 32 + j, k] << 4
        q = nib.reshape(n // _BLOCK_N, k, _BLOCK_N // 2, 2).permute(0, 3, 2, 1).reshape(n, k)
    else:
        src = _source_index(n, k)
        q = torch.empty(n * k, dtype=torch.uint8)
        q[src] = nib
        q = q.reshape(n, k)
    shift = _expand_shift(shift, shape)
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
