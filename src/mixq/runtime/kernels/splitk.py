"""Split-K for GPU launches with too few output tiles to fill the device (decode): one rule for every kernel."""
from __future__ import annotations

import torch


def split_k_for(device: torch.device, tiles: int, kblocks: int, cap: int = 16) -> int:
    """How many K ranges to split a launch of ``tiles`` output tiles over: enough programs for ~4 per SM, at most
    ``kblocks`` and ``cap`` (1 off CUDA).  The int kernel (:mod:`.triton_gpu`) and the VQ kernel
    (:mod:`mixq.intra.vq_triton`) both use it."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(kblocks, cap, -(-4 * sms // tiles)))
