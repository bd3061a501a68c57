"""Mixed-precision compute for the model's forward passes: bfloat16 matrix products where the hardware has them.

``AMP_MODES``: ``auto`` (bf16 autocast where the device multiplies bf16 natively -- a CPU with AMX-BF16 or
AVX512-BF16, a CUDA device that supports bf16 -- float32 elsewhere, where bf16 products are emulated and slower),
``bf16`` (always) and ``off`` (float32 throughout).  Parameters, optimizer state, losses and GPTQ's own
arithmetic stay float32: :func:`autocast` makes the matrix products of the model's forward pass (and so of its
backward) bf16, and the Gram products of the walks' Hessians, which run inside that pass
(:func:`mixq.calib.stats.gram`: bf16 rows and partial sums, accumulated in float64); :func:`full_precision` turns
autocast off again for code inside such a region.

Where it applies: the end-to-end stage's training forward (:mod:`mixq.distill_e2e`; its teacher and held-out KL
stay float32; ``--e2e-amp``, the recipe's ``auto``), and the sensitivity measurement's block walk and gradient pass
(:func:`mixq.measure.measure`) and the GPTQ walk (:func:`mixq.api.quantize_model`; ``--walk-amp``, the recipe's
``auto`` since ``mixq-default-16``: on a 2-core AMD EPYC with AVX512-BF16 the default 3.0-bpw run took 660 s instead of 807 s,
``bench/results/quantize_cost_amp.md``).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

AMP_MODES = ("auto", "bf16", "off")


def native_bf16(device) -> bool:
    """Whether ``device`` multiplies bf16 matrices natively."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        return bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)()
                    or getattr(cpu, "_is_avx512_bf16_supported", lambda: False)())
    return False


def check(mode: str) -> str:
    """``mode``, or ValueError when it is not one of :data:`AMP_MODES`."""
    if mode not in AMP_MODES:
        raise ValueError(f"unknown amp mode {mode!r}: choose one of {', '.join(AMP_MODES)}")
    return mode


def resolve(mode: str, device) -> str:
    """``"bf16"`` or ``"off"``: what ``mode`` means on ``device``."""
    if check(mode) == "auto":
        return "bf16" if native_bf16(device) else "off"
    return mode


def key_entry(mode: str, device) -> dict:
    """``{"amp": "bf16"}`` when ``mode`` resolves to bf16 on ``device``, else ``{}``: the entry a measurement's or a
    walk checkpoint's key carries (float32 keys stay as they were before the mode existed)."""
    return {"amp": "bf16"} if resolve(mode, device) == "bf16" else {}


def full_precision(device="cpu"):
    """A context in which autocast is off on ``device``'s type: float32 products inside an autocast region."""
    return torch.autocast(torch.device(device).type, enabled=False)


def autocast(mode: str, device):
    """The autocast context of ``mode`` (resolved) on ``device``: bf16 autocast, or nothing."""
    device = torch.device(device)
    if resolve(mode, device) == "off":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
