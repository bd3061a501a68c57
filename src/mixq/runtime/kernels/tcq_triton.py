"""Triton kernel for trellis-coded weights (:mod:`mixq.formats.composite.tcq_storage`): fused decode + GEMM,
``y = x Ŵᵀ``.

A bitshift trellis decodes any weight on its own: the state of row ``n`` of column ``k`` is the last ``L`` bits
of that column's stream up to ``n`` (zeros before the column starts), so a tile needs no sequential walk.  With
``w``-bit symbols of ``P`` rows (``i = n // P`` the row's symbol, ``sym(q)`` the ``q``-th symbol of the column)::

    cur, cw  = sym(i) >> k1, k0      the first row of a half-rate pair (k0 + k1 = w)
             = sym(i), w             otherwise
    state    = (cur | Σ_{q>=1} sym(i-q) << (cw + (q-1)·w)) mod 2^L
    Ŵ[n, k]  = scale[n, k // GROUP] · lut[state]

One program computes a ``BLOCK_M x BLOCK_N`` tile of ``y [M, N]`` looping over ``K`` by ``BLOCK_K``, forming
``Ŵ`` in registers (``tl.dot``, fp32 accumulation; IEEE products for fp32 inputs).  Symbols are read from the
packed byte stream (LSB-first, two bytes per symbol; the stream carries two bytes of padding).  Untuned and not
yet run on a GPU: ``tests/test_tcq.py`` runs it in triton's CPU interpreter against the reference.
"""
from __future__ import annotations

import torch

from .splitk import split_launch, split_result
from .triton_jit import jitted

try:  # optional dependency: pip install 'mixq[gpu]'
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001
    triton = tl = None


def _tcq_mm_kernel(x_ptr, st_ptr, s_ptr, lut_ptr, y_ptr, M, N, K, NS, NG, K_SPLIT, stride_xm,
                   W: tl.constexpr, P: tl.constexpr, K1: tl.constexpr, L: tl.constexpr, NPREV: tl.constexpr,
                   GROUP: tl.constexpr, IEEE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    i = rn // P
    if P == 2:
        first = (rn % 2) == 0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * K_SPLIT
    for k0 in range(k_lo, tl.minimum(k_lo + K_SPLIT, K), BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        ok = n_ok[:, None] & k_ok[None, :]
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        base = rk[None, :].to(tl.int64) * NS  # [1, BK]: the column's first symbol
        state = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)
        for q in tl.static_range(NPREV + 1):
            iq = i[:, None] - q
            bit = (base + iq) * W
            byte = bit >> 3
            qok = ok & (iq >= 0)
            lo = tl.load(st_ptr + byte, mask=qok, other=0).to(tl.int32)
            hi = tl.load(st_ptr + byte + 1, mask=qok, other=0).to(tl.int32)
            sym = ((lo | (hi << 8)) >> (bit & 7).to(tl.int32)) & ((1 << W) - 1)
            if q == 0:
                if P == 2:
                    state = tl.where(first[:, None], sym >> K1, sym)
                else:
                    state = sym
            else:
                if P == 2:
                    sh = tl.where(first[:, None], W - K1 + (q - 1) * W, q * W)
                else:
                    sh = q * W
                state = state | tl.where(sh < L, sym << tl.minimum(sh, L), 0)
        state = state & ((1 << L) - 1)
        v = tl.load(lut_ptr + state, mask=ok, other=0.0)
        s = tl.load(s_ptr + rn[:, None] * NG + (rk // GROUP)[None, :], mask=ok, other=0.0)
        w = (v * s).to(x.dtype)
        if IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    out = y_ptr + pid_k * M * N + rm[:, None] * N + rn[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def tcq_linear_triton(x: torch.Tensor, stream: torch.Tensor, scale: torch.Tensor, lut: torch.Tensor, N: int,
                      P: int, wbits: int, k1: int, L: int, glen: int, split_k: int | None = None) -> torch.Tensor:
    """``y [M, N] = x [M, K] Ŵᵀ`` in ``x.dtype`` from the padded column-major symbol ``stream`` (uint8),
    ``scale [N, K/glen]`` and the table ``lut [2^L]``."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the TCQ Triton kernel takes fp16 / bf16 / fp32 inputs, not {x.dtype}")
    M, K = x.shape
    if N % P or K % glen or tuple(scale.shape) != (N, K // glen) or stream.numel() * 8 < (N // P) * K * wbits + 16:
        raise ValueError(f"TCQ stream of {stream.numel()} bytes / scale {tuple(scale.shape)} do not fit [{N}, {K}]")
    x = x.contiguous()
    BLOCK_M = 16 if M <= 16 else (32 if M <= 32 else 64)
    BLOCK_N = 32 if M <= 16 else 64
    BLOCK_K = 32
    grid, k_split, y = split_launch(x, N, BLOCK_M, BLOCK_N, BLOCK_K, split_k, cap=32)
    jitted(_tcq_mm_kernel, "TCQ")[grid](x, stream.contiguous(), scale.float().contiguous(), lut.float().contiguous(), y,
                    M, N, K, N // P, K // glen, k_split, x.stride(0),
                    W=wbits, P=P, K1=k1, L=L, NPREV=-(-L // wbits), GROUP=glen, IEEE=x.dtype == torch.float32,
                    BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return split_result(y, x.dtype)
