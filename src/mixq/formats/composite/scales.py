"""What the codebook and sign bases (VQ, TCQ, BIN) share about their float group scales: the stored dtypes, the
group length along a row, and rounding a fitted scale to what will be stored."""
from __future__ import annotations

import torch

FLOAT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def group_len(spec, cols: int) -> int:
    """Columns of one scale group of ``spec`` in a row of ``cols`` (the whole row for ``channel``)."""
    g = getattr(spec.granularity, "size", None)
    return cols if g is None else g


def round_scale(s: torch.Tensor, spec) -> torch.Tensor:
    """``s`` rounded to the spec's scale dtype (as float32), kept above fp16's smallest normal."""
    return s.to(FLOAT_DTYPES[spec.scale_dtype]).float().clamp_min(torch.finfo(torch.float16).tiny)
