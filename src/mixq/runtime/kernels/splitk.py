"""Split-K for GPU launches with too few output tiles to fill the device (decode): one rule for every kernel."""
from __future__ import annotations

import torch


def split_k_for(device: torch.device, tiles: int, kblocks: int, cap: int = 16) -> int:
    """How many K ranges to split a launch of ``tiles`` output tiles over: enough programs for ~4 per SM, at most
    ``kblocks`` and ``cap`` (1 off CUDA).  The int kernel (:mod:`.triton_gpu`), the VQ and the TCQ kernels
    (:mod:`mixq.runtime.kernels.vq_triton`, :mod:`mixq.runtime.kernels.tcq_triton`) all use it."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(kblocks, cap, -(-4 * sms // tiles)))


def split_launch(x: torch.Tensor, N: int, block_m: int, block_n: int, block_k: int, split_k: int | None = None,
                 cap: int = 16):
    """``(grid, k_split, y)`` of a split-K launch of ``y [M, N] = x [M, K] Ŵᵀ``: ``k_split`` columns of K per
    program along grid axis 2; ``y`` the output in ``x.dtype``, or ``[split, M, N]`` fp32 partial sums to add with
    :func:`split_result` when K is split."""
    import triton

    M, K = x.shape
    tiles = triton.cdiv(N, block_n) * triton.cdiv(M, block_m)
    kblocks = triton.cdiv(K, block_k)
    split = split_k or split_k_for(x.device, tiles, kblocks, cap=cap)
    k_split = triton.cdiv(kblocks, split) * block_k
    split = triton.cdiv(K, k_split)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device) if split == 1 else \
        torch.empty(split, M, N, dtype=torch.float32, device=x.device)
    return (triton.cdiv(N, block_n), triton.cdiv(M, block_m), split), k_split, y


def split_result(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The launch's output: ``y`` itself, or its partial sums added in fp32."""
    return y if y.dim() == 2 else y.sum(0).to(dtype)
