"""Triton kernel for VQ weights (:mod:`mixq.formats.composite.vq_storage`): fused codebook decode + GEMM,
``y = x Ŵᵀ``.

One program computes a ``BLOCK_M x BLOCK_N`` tile of ``y [M, N]``, looping over ``K`` in steps of ``BLOCK_K``::

    code[n, k]  = codes[n, k // d]                        uint8 [N, K/d]   (the codes unpacked once)
    Ŵ[n, k]     = scale[n, k // GROUP] · B[code[n, k], k % d]   B [2^bits, d] float32 (L1/L2-resident)
    acc        += x[m, k-tile] · Ŵ[n, k-tile]ᵀ             tl.dot, fp32 accumulation

``Ŵ`` is formed tile by tile in registers and never written out; rows past ``M``/``N`` and columns past ``K``
are masked.  fp32 inputs use IEEE products (``input_precision="ieee"``), fp16 / bf16 inputs decode ``Ŵ`` to
their dtype.  Untuned on hardware (this project's machine has no GPU): ``tests/test_vq.py`` runs it in
triton's CPU interpreter (``TRITON_INTERPRET=1`` set before triton is imported) against the reference, and on
CUDA when one is present.  Without triton this module imports and :func:`available` is False.
"""
from __future__ import annotations


import torch

from .splitk import split_launch, split_result
from .triton_jit import interpreting, jitted

try:  # optional dependency: pip install 'mixq[gpu]'
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001
    triton = tl = None


def available() -> bool:
    """triton is importable and can run here (CUDA, or the interpreter for CPU tensors)."""
    return triton is not None and (torch.cuda.is_available() or interpreting())


def _vq_mm_kernel(x_ptr, c_ptr, s_ptr, b_ptr, y_ptr, M, N, K, P, NG, K_SPLIT, stride_xm,
                  D: tl.constexpr, GROUP: tl.constexpr, IEEE: tl.constexpr, TILE_SCALE: tl.constexpr,
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
    for k0 in range(k_lo, tl.minimum(k_lo + K_SPLIT, K), BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        v = k0 // D + tl.arange(0, BLOCK_K // D)  # each code loaded once, its D entries gathered together
        cmask = n_ok[:, None] & (v < P)[None, :]
        code = tl.load(c_ptr + rn[:, None] * P + v[None, :], mask=cmask, other=0).to(tl.int32)
        ent = tl.load(b_ptr + (code * D)[:, :, None] + tl.arange(0, D)[None, None, :], mask=cmask[:, :, None],
                      other=0.0)
        w = tl.reshape(ent, (BLOCK_N, BLOCK_K))
        if TILE_SCALE:  # one group spans the tile: scale the partial product per output column
            s = tl.load(s_ptr + rn * NG + k0 // GROUP, mask=n_ok, other=0.0)
            if IEEE:
                part = tl.dot(x, tl.trans(w.to(x.dtype)), input_precision="ieee")
            else:
                part = tl.dot(x, tl.trans(w.to(x.dtype)))
            acc += part * s[None, :]
        else:
            s = tl.load(s_ptr + rn[:, None] * NG + (rk // GROUP)[None, :], mask=n_ok[:, None] & k_ok[None, :],
                        other=0.0)
            w = (w * s).to(x.dtype)
            if IEEE:
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
    out = y_ptr + pid_k * M * N + rm[:, None] * N + rn[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def vq_linear_triton(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, B: torch.Tensor,
                     glen: int, split_k: int | None = None) -> torch.Tensor:
    """``y [M, N] = x [M, K] Ŵᵀ`` in ``x.dtype``; ``codes`` uint8 ``[N, K/d]``, ``scale`` ``[N, K/glen]``, ``B [2^b, d]``."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the VQ Triton kernel takes fp16 / bf16 / fp32 inputs, not {x.dtype}")
    M, K = x.shape
    N, P = codes.shape
    d = B.shape[1]
    if d & (d - 1) or d > 32:
        raise ValueError(f"the VQ Triton kernel takes vectors of a power-of-two length <= 32, not d={d}")
    if P * d != K or K % glen:
        raise ValueError(f"codes [{N}, {P}] x d={d} do not cover K={K} in groups of {glen}")
    x = x.contiguous()
    BLOCK_M = 16 if M <= 16 else (32 if M <= 32 else 64)
    BLOCK_N = 32 if M <= 16 else 64
    BLOCK_K = 64 if glen % 64 == 0 or glen >= K else 32
    grid, k_split, y = split_launch(x, N, BLOCK_M, BLOCK_N, BLOCK_K, split_k, cap=32)
    jitted(_vq_mm_kernel, "VQ")[grid](x, codes.contiguous(), scale.float().contiguous(), B.float().contiguous(), y,
                    M, N, K, P, K // glen, k_split, x.stride(0),
                    D=d, GROUP=glen, IEEE=x.dtype == torch.float32,
                    TILE_SCALE=glen % BLOCK_K == 0,
                    BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return split_result(y, x.dtype)
