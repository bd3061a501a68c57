"""The ``triton`` GPU kernel: group-wise mixed-bit dequantize + matmul, ``y = x Ŵᵀ + b`` on CUDA.

One Triton kernel for every quantized format whose decode is a per-code lookup or affine map
(:mod:`mixq.formats`): integer grids of 1-8 bits (symmetric, binary, asymmetric with an int zero
point or an fp16 offset), NormalFloat, the minifloats (FP8/FP6/FP4, MX*, NVFP4) and k-means
codebooks, at any granularity (per group of any size dividing ``in``, per channel, per tensor).
Activations fp16 / bf16 / fp32, ``M`` from 1 (decode) up.

Layout (:func:`prepare`, once per layer, on the weight's device)::

    words  int32 [ceil(in / C), out]  C = floor(32 / b) codes per word along ``in`` (b = 1, 2, 4, 8:
                                      32, 16, 8, 4; 3: 10, 5: 6, 6: 5, 7: 4); code k of output row n is
                                      in word k // C of column n, bits [(k % C) b, (k % C + 1) b)
    scale  [groups, out]              per (group, output row); zero / offset likewise (when stored)
    lut    [L] or [groups * out, L]   a value table (NF, minifloat), or per-group k-means codebooks

Params are stored in the narrowest of fp16 / bf16 / fp32 that holds every value exactly, and
``[groups, out]`` (the transpose of ``[out, groups]``) so that a tile's params are one coalesced row.
The kernel dequantizes in fp32 registers with the operations of the format's ``decode``, in the
same order, so each ``Ŵ`` element is bit-identical to :meth:`PackedWeight.dequantize`::

    symmetric int (b >= 2)   (q - 2^(b-1)) * s        binary (b = 1)     (2q - 1) * s
    asym int zero            (q - zero) * s           asym fp16 offset   q * s + offset  (no FMA fusion)
    NF / minifloat           table[q] * s             k-means            codebook[group, n][q]

then casts the tile to ``x.dtype`` (as the reference casts ``Ŵ``) and accumulates ``tl.dot`` in
fp32 (fp32 activations: ``input_precision="ieee"``, not tf32).  Codes: when ``C`` is a power of two
(1, 2, 4, 7, 8 bits) each word is loaded once and split in registers (``[K/C, N] -> [K, N]``); 3, 5 and
6 bits gather their word per code.  Tiles (:func:`_config`, sized from ptxas register counts for
sm_80 / sm_90, untuned on hardware): ``BLOCK_M`` 16/32/64 (rows past ``M`` masked; fp32 16),
``BLOCK_N`` 64/128, ``BLOCK_K`` the largest power of two <= 32..128 dividing the group (params loaded
once per block), else 32 with params gathered per element.  Few output tiles (decode) split ``K`` over
extra programs whose fp32 partial sums are added in a fixed order (deterministic).

Memory: ``words`` holds every code (:func:`codes_from_state` inverts it exactly), so QuantLinear frees
its packed code stream; a layer then holds ``32 / C`` bits per weight (3-bit: 3.2, 5-bit: 5.33,
6-bit: 6.4, 7-bit: 8) plus its params.  Without triton this module still imports; :func:`why_not`
says how to install it.  CPU tensors run only under ``TRITON_INTERPRET=1`` set before triton is
imported (tests), never through ``"auto"``.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from ...config.registry import owner
from ...formats import QParams, decode
from ...granularity import PerGroup, PerTensor
from .splitk import split_k_for
from .triton_jit import interpreting, jitted

try:  # optional dependency: pip install 'mixq[gpu]'
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001  (ImportError, or a broken install)
    triton = tl = None

CODES_PER_WORD = {b: 32 // b for b in range(1, 9)}
_CHUNK = 1 << 24  # elements per transient int64 block when (un)packing words
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
Z_NONE, Z_SUB_CONST, Z_SUB, Z_ADD, Z_BINARY = 0, 1, 2, 3, 4  # how the zero term enters (module docstring)
LUT_NONE, LUT_GLOBAL, LUT_PER_GROUP = 0, 1, 2


# ---------------------------------------------------------------------- the kernel (jitted on first use)
def _qmm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, b_ptr, y_ptr,
                M, N, K, K_SPLIT, stride_xm, stride_xk,
                BITS: tl.constexpr, PER_WORD: tl.constexpr, GROUP: tl.constexpr,
                LUT: tl.constexpr, LUT_LEN: tl.constexpr, HAS_S: tl.constexpr,
                ZMODE: tl.constexpr, ZCONST: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
                PER_BLOCK: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr, UNPACK_2D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            x_mask = m_ok[:, None]
            w_mask = n_ok[None, :]
        else:
            k_ok = rk < K
            x_mask = m_ok[:, None] & k_ok[None, :]
            w_mask = k_ok[:, None] & n_ok[None, :]
        xa = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=x_mask, other=0.0)
        if UNPACK_2D:  # C a power of two dividing BLOCK_K: load each word once, split it in registers
            rw = k0 // PER_WORD + tl.arange(0, BLOCK_K // PER_WORD)
            if EVEN_K:
                ww_mask = n_ok[None, :]
            else:
                ww_mask = (rw * PER_WORD < K)[:, None] & n_ok[None, :]
            words = tl.load(w_ptr + rw[:, None] * N + rn[None, :], mask=ww_mask, other=0)
            sh = tl.arange(0, PER_WORD) * BITS
            q = tl.reshape((words[:, None, :] >> sh[None, :, None]) & ((1 << BITS) - 1), (BLOCK_K, BLOCK_N))
        else:  # gather: every code loads its word (3, 5, 6 bits)
            words = tl.load(w_ptr + (rk // PER_WORD)[:, None] * N + rn[None, :], mask=w_mask, other=0)
            q = (words >> ((rk % PER_WORD) * BITS)[:, None]) & ((1 << BITS) - 1)  # [BLOCK_K, BLOCK_N] codes
        if PER_BLOCK:  # the block lies inside one group: one param row
            prow = (k0 // GROUP) * N + rn[None, :]
            p_mask = n_ok[None, :]
        else:
            prow = (rk // GROUP)[:, None] * N + rn[None, :]
            p_mask = w_mask
        if LUT == 0:
            v = q.to(tl.float32)
        elif LUT == 1:
            v = tl.load(lut_ptr + q).to(tl.float32)
        else:
            v = tl.load(lut_ptr + prow * LUT_LEN + q, mask=w_mask, other=0.0).to(tl.float32)
        if ZMODE == 1:
            v = v - ZCONST
        elif ZMODE == 2:
            v = v - tl.load(z_ptr + prow, mask=p_mask, other=0.0).to(tl.float32)
        elif ZMODE == 4:
            v = v * 2.0 - 1.0
        if HAS_S:
            v = v * tl.load(s_ptr + prow, mask=p_mask, other=0.0).to(tl.float32)
        if ZMODE == 3:
            v = v + tl.load(z_ptr + prow, mask=p_mask, other=0.0).to(tl.float32)
        wt = v.to(xa.dtype)
        if IEEE:
            acc = tl.dot(xa, wt, acc, input_precision="ieee")
        else:
            acc = tl.dot(xa, wt, acc)
    out_mask = m_ok[:, None] & n_ok[None, :]
    if PARTIAL:
        tl.store(y_ptr + pid_k * M * N + rm[:, None] * N + rn[None, :], acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc = acc + tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_mask)


# ---------------------------------------------------------------------- support
def _group(spec, shape) -> int:
    """Kernel group length along ``in``: the group size, or the whole row (channel, token, tensor)."""
    return spec.granularity.size if isinstance(spec.granularity, PerGroup) else shape[1]


def spec_why_not(spec, shape) -> str | None:
    """Why the kernel cannot run a ``shape = (out, in)`` weight of ``spec`` (None: it can); input-independent."""
    if triton is None:
        return "triton is not installed: pip install 'mixq[gpu]'"
    if spec.is_float_keep:
        return f"{spec.name} keeps the weight in floating point (nothing to dequantize)"
    if "triton" not in owner(spec.dtype).kernels:
        return f"it has no dequantization for dtype {spec.dtype!r}"
    if not 1 <= spec.bits <= 8:
        return f"it runs 1-8-bit codes, not {spec.bits}"
    out, cols = shape
    if cols % _group(spec, shape):
        return f"group {spec.granularity} does not divide the row length {cols}"
    if out * cols >= 2**31 or out * (cols // _group(spec, shape)) * 2**spec.bits >= 2**31:
        return f"{out}x{cols} is too large for the kernel's 32-bit offsets"
    return None


def why_not(pw, x: torch.Tensor) -> str | None:
    reason = spec_why_not(pw.spec, pw.shape)
    if reason is not None:
        return reason
    if x.device.type != "cuda":
        return "it runs on CUDA tensors only"
    if x.dtype not in _DTYPES:
        return f"it needs float16, bfloat16 or float32 activations, got {x.dtype}"
    dev = next(iter(pw.params.values())).device
    if dev != x.device:
        return f"the packed weight is on {dev}, the input on {x.device} (move the layer with .to(device))"
    if x.dtype == torch.bfloat16 and _capability(x.device)[0] < 8:
        return "bfloat16 tl.dot needs an Ampere (sm_80) or newer GPU"
    return None


@lru_cache(maxsize=None)
def _device_props(device: torch.device):
    return torch.cuda.get_device_properties(device)


def _capability(device: torch.device) -> tuple[int, int]:
    p = _device_props(torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device()))
    return p.major, p.minor


# ---------------------------------------------------------------------- layout
def _narrowest(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp16 or bf16 if that holds every value exactly (NaN stays NaN), else fp32; contiguous."""
    t = t.float().contiguous()
    for dt in (torch.float16, torch.bfloat16):
        c = t.to(dt)
        back = c.float()
        if bool(((back == t) | (back.isnan() & t.isnan())).all()):
            return c.contiguous()
    return t


def _per_group_rows(t: torch.Tensor, spec, shape) -> torch.Tensor:
    """Row params ``[R, c]`` (``rows_view`` order) -> ``[groups, out, c]``."""
    out, cols = shape
    ng = cols // _group(spec, shape)
    if isinstance(spec.granularity, PerTensor):
        return t.reshape(1, 1, -1).expand(1, out, t.shape[-1])
    return t.reshape(out, ng, t.shape[-1]).transpose(0, 1)


def pack_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[out, in]`` -> int32 ``[ceil(in / C), out]`` (layout in the module docstring)."""
    out, cols = codes.shape
    c = CODES_PER_WORD[bits]
    kw = -(-cols // c)
    shifts = torch.arange(c, device=codes.device, dtype=torch.int64) * bits
    words = torch.empty(kw, out, dtype=torch.int32, device=codes.device)
    step = max(1, _CHUNK // max(kw * c, 1))
    for r in range(0, out, step):
        blk = torch.zeros(min(step, out - r), kw * c, dtype=torch.int64, device=codes.device)
        blk[:, :cols] = codes[r:r + step]
        w = (blk.view(-1, kw, c) << shifts).sum(-1)  # disjoint bit fields, < 2^32
        words[:, r:r + step] = torch.where(w >= 2**31, w - 2**32, w).to(torch.int32).t()
    return words


def unpack_words(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_words`: uint8 ``[out, cols]``."""
    kw, out = words.shape
    c = CODES_PER_WORD[bits]
    shifts = torch.arange(c, device=words.device, dtype=torch.int64) * bits
    codes = torch.empty(out, cols, dtype=torch.uint8, device=words.device)
    step = max(1, _CHUNK // max(kw * c, 1))
    for r in range(0, out, step):
        w = words[:, r:r + step].t().to(torch.int64) & 0xFFFFFFFF
        q = (w[..., None] >> shifts) & (2**bits - 1)
        codes[r:r + step] = q.reshape(w.shape[0], kw * c)[:, :cols].to(torch.uint8)
    return codes


@torch.no_grad()
def prepare(pw) -> dict:
    """Kernel state (module docstring): ``words``, ``scale`` / ``zero`` ``[groups, out]`` (or None), ``lut``
    (or None), the constexpr settings, ``shape``, ``holds_codes`` (True: :func:`codes_from_state` is exact)
    and ``nbytes`` (the bytes its tensors hold)."""
    spec, shape = pw.spec, tuple(pw.shape)
    reason = spec_why_not(spec, shape)
    if reason is not None and not reason.startswith("triton is not installed"):
        raise ValueError(f"{spec.name} {shape}: {reason}")
    p, bits = pw.qparams(), spec.bits
    st = {"words": pack_words(pw.codes_unpacked(), bits), "scale": None, "zero": None, "lut": None,
          "bits": bits, "group": _group(spec, shape), "lut_mode": LUT_NONE, "zmode": Z_NONE, "zconst": 0.0,
          "shape": shape, "holds_codes": True}
    rows = lambda t: _narrowest(_per_group_rows(t, spec, shape)[..., 0])  # noqa: E731  [groups, out]
    if spec.dtype == "int":
        st["scale"] = rows(p.scale)
        if spec.symmetric:
            st["zmode"], st["zconst"] = (Z_BINARY, 0.0) if bits == 1 else (Z_SUB_CONST, float(2 ** (bits - 1)))
        elif p.zero is not None:
            st["zmode"], st["zero"] = Z_SUB, rows(p.zero)
        else:
            st["zmode"], st["zero"] = Z_ADD, rows(p.offset)
    elif spec.dtype == "kmeans":
        if isinstance(spec.granularity, PerTensor):
            st["lut_mode"], st["lut"] = LUT_GLOBAL, _narrowest(p.codebook[0])
        else:
            cb = _per_group_rows(p.codebook, spec, shape)  # [groups, out, L]
            st["lut_mode"], st["lut"] = LUT_PER_GROUP, _narrowest(cb.reshape(-1, cb.shape[-1]))
    else:  # NF, minifloat: x̂ = table[q] * scale, the table decoded with scale 1 (exact)
        dev = p.scale.device
        table = decode(torch.arange(2**bits, device=dev).to(torch.uint8)[None],
                       QParams(scale=torch.ones(1, 1, device=dev), tensor_scale=p.tensor_scale), spec)[0]
        st["lut_mode"], st["lut"], st["scale"] = LUT_GLOBAL, _narrowest(table), rows(p.scale)
    st["nbytes"] = state_nbytes(st)
    return st


def state_nbytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))


def codes_from_state(state: dict) -> torch.Tensor:
    """The codes ``q`` (uint8 ``[out, in]``) held by ``state["words"]``."""
    return unpack_words(state["words"], state["bits"], state["shape"][1])


# ---------------------------------------------------------------------- launch
def _config(m: int, n: int, k: int, group: int, bits: int, dtype: torch.dtype, device: torch.device,
            split_k: int | None, tiles: tuple[int, int, int] | None = None):
    """``(BLOCK_M, BLOCK_N, BLOCK_K, per_block, even_k, split, k_per_split, num_warps)``.

    Sized from sm_80 / sm_90 register counts (ptxas, no spills): the per-code word gather (3, 5, 6 bits)
    and fp32's FMA-based ``ieee`` dot need smaller K blocks than the load-once unpack.  ``tiles``:
    ``(BLOCK_M, BLOCK_N, largest BLOCK_K)`` instead (tests: fewer interpreted programs)."""
    fp32, big = dtype == torch.float32, m > 32 and dtype != torch.float32
    bm = 16 if m <= 16 or fp32 else 32 if m <= 32 else 64
    bn = 128 if big else 64
    c = CODES_PER_WORD[bits]
    kmax = 32 if fp32 else (64 if big else 128) if c & (c - 1) == 0 else (32 if big else 64)
    bk = next((b for b in (128, 64, 32, 16) if b <= kmax and group % b == 0), None)
    per_block = bk is not None
    bk = bk or min(32, kmax)
    if tiles is not None:
        bm, bn, kmax = tiles
        bk = next((b for b in (128, 64, 32, 16) if b <= kmax and group % b == 0), None)
        per_block = bk is not None
        bk = bk or min(32, kmax)
    kblocks = -(-k // bk)
    if split_k is None:
        split_k = 1
        if m <= 64:  # too few output tiles to fill the GPU: split K
            split_k = split_k_for(device, -(-m // bm) * -(-n // bn), kblocks)
    per = -(-kblocks // max(1, min(split_k, kblocks)))
    return bm, bn, bk, per_block, k % bk == 0, -(-kblocks // per), per * bk, 8 if big else 4


def launch_args(x: torch.Tensor, state: dict, bias: torch.Tensor | None, split_k: int | None = None,
                tiles: tuple[int, int, int] | None = None):
    """``(grid, args, constexprs, options)`` of one launch for ``x [M, in]`` (``M >= 1``); ``grid[2]`` is the number
    of K splits and ``args[6]`` the output (``[M, out]`` in ``x.dtype``, or fp32 partial sums ``[split, M, out]``)."""
    n, k = state["shape"]
    m = x.shape[0]
    b = None if bias is None else bias.to(device=x.device, dtype=x.dtype)
    dev = x.device if x.device.type != "cuda" or x.device.index is not None else \
        torch.device("cuda", torch.cuda.current_device())
    bm, bn, bk, per_block, even_k, split, k_split, warps = _config(m, n, k, state["group"], state["bits"],
                                                                   x.dtype, dev, split_k, tiles)
    words, lut = state["words"], state["lut"]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device) if split == 1 else \
        torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    args = (x, words, _or(state["scale"], words), _or(state["zero"], words), _or(lut, words),
            _or(b if split == 1 else None, words), y, m, n, k, k_split, x.stride(0), x.stride(1))
    constexprs = dict(
        BITS=state["bits"], PER_WORD=CODES_PER_WORD[state["bits"]], GROUP=state["group"],
        LUT=state["lut_mode"], LUT_LEN=1 if lut is None else lut.shape[-1], HAS_S=state["scale"] is not None,
        ZMODE=state["zmode"], ZCONST=state["zconst"], HAS_BIAS=b is not None and split == 1, PARTIAL=split > 1,
        PER_BLOCK=per_block, EVEN_K=even_k, IEEE=x.dtype == torch.float32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        UNPACK_2D=_unpack_2d(state["bits"], bk))
    # no FMA contraction: q*s + offset rounds twice, as the reference does (the other modes have no a*b+c)
    options = dict(num_warps=warps, enable_fp_fusion=False)
    return (-(-n // bn), -(-m // bm), split), args, constexprs, options


def _unpack_2d(bits: int, block_k: int) -> bool:
    """Whether a K block holds whole words of a power-of-two number of codes (1, 2, 4, 7, 8 bits)."""
    c = CODES_PER_WORD[bits]
    return c & (c - 1) == 0 and block_k % c == 0


def linear(x: torch.Tensor, pw, state: dict, bias: torch.Tensor | None, *, split_k: int | None = None,
           tiles: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``x [M, in]`` -> ``[M, out]`` in ``x.dtype``.  ``pw`` is unused (the state holds everything);
    ``split_k`` and ``tiles`` override the number of K splits and the tile sizes (tests)."""
    n, k = state["shape"]
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"expected x [M, {k}], got {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"the triton kernel needs fp16 / bf16 / fp32 activations, got {x.dtype}")
    if x.device.type != "cuda" and not interpreting():
        raise ValueError("the triton kernel runs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)")
    if x.shape[0] == 0:
        return x.new_empty(0, n)
    grid, args, constexprs, options = launch_args(x, state, bias, split_k, tiles)
    jitted(_qmm_kernel, "int / lookup-table")[grid](*args, **constexprs, **options)
    y = args[6]  # the output (or partial sums)
    if grid[2] == 1:
        return y
    y = y.sum(0)  # fixed order: deterministic
    if bias is not None:
        y += bias.to(device=x.device, dtype=x.dtype).float()
    return y.to(x.dtype)


def _or(t: torch.Tensor | None, dummy: torch.Tensor) -> torch.Tensor:
    """A pointer argument for an unused (constexpr-disabled) operand."""
    return dummy if t is None else t
