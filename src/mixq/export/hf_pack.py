"""Writer-side packing of the Hugging Face exports (:mod:`.hf`): mixq's codes, scales and zero points as
compressed-tensors ``pack-quantized`` and GPTQ v1 tensors (layouts in :mod:`.hf`'s docstring).  The readers in
:mod:`.hf_readback` share none of this code."""
from __future__ import annotations

import torch

from ..formats import QTensor
from ..granularity import PerGroup
from .hf_source import ExportError


def _pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Each row of ``values [R, n]`` (ints in ``0 .. 2^bits - 1``) as a dense LSB-first bit stream in int32 words.

    Element ``j`` occupies stream bits ``j*bits .. j*bits + bits - 1``; word ``k`` holds stream bits
    ``32k .. 32k + 31`` (bit 0 = least significant); the tail is zero padded.  ``-> int32 [R, ceil(n*bits/32)]``.
    """
    v = values.to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 1 << bits):
        raise ValueError(f"values outside 0..{(1 << bits) - 1} cannot be packed in {bits} bits")
    rows, n = v.shape
    words = -(-n * bits // 32)
    out = torch.empty(rows, words, dtype=torch.int32)
    plane_shift = torch.arange(bits, dtype=torch.int64)
    word_shift = torch.arange(32, dtype=torch.int64)
    step = max(1, (1 << 24) // max(1, words * 32))
    for r0 in range(0, rows, step):
        chunk = v[r0:r0 + step]
        stream = ((chunk.unsqueeze(-1) >> plane_shift) & 1).to(torch.uint8).reshape(len(chunk), n * bits)
        stream = torch.nn.functional.pad(stream, (0, words * 32 - n * bits)).reshape(len(chunk), words, 32)
        w = (stream.to(torch.int64) << word_shift).sum(-1)          # 0 .. 2^32 - 1
        out[r0:r0 + len(chunk)] = (w - ((w >> 31) << 32)).to(torch.int32)  # two's complement int32
    return out


def _per_row(t: torch.Tensor, out_f: int) -> torch.Tensor:
    """mixq row params ``[out * gpr, 1]`` (row-major over ``[out, in // g]``) -> ``[out, gpr]``."""
    return t.reshape(out_f, -1)


def _scale_store_dtype(q: QTensor) -> torch.dtype:
    """The float dtype the scales are written in: the spec's own, else the narrowest one holding them exactly."""
    own = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(q.spec.scale_dtype)
    candidates = [own] if own is not None else [torch.float16, torch.bfloat16, torch.float32]
    s = q.params.scale.float()
    for dt in candidates:
        if torch.equal(s.to(dt).float(), s):
            return dt
    raise ExportError(f"scales of {q.spec.name} are not exact in {candidates[-1]}: the directory is damaged")


def _group_size(q: QTensor) -> int:
    return q.spec.granularity.size if isinstance(q.spec.granularity, PerGroup) else q.shape[1]


def ct_tensors(fqn: str, q: QTensor) -> dict[str, torch.Tensor]:
    out_f, in_f = q.shape
    bits = q.spec.bits
    t = {f"{fqn}.weight_packed": _pack_rows(q.codes, bits),
         f"{fqn}.weight_scale": _per_row(q.params.scale, out_f).to(_scale_store_dtype(q)).contiguous(),
         f"{fqn}.weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64)}
    if not q.spec.symmetric:
        zero = _per_row(q.params.zero, out_f)                         # [out, gpr], 0 .. 2^b - 1
        t[f"{fqn}.weight_zero_point"] = _pack_rows(zero.t(), bits).t().contiguous()
    return t


def gptq_tensors(fqn: str, q: QTensor) -> dict[str, torch.Tensor]:
    out_f, in_f = q.shape
    bits = q.spec.bits
    g = _group_size(q)
    if q.spec.symmetric:
        zero = torch.full((out_f, in_f // g), 2 ** (bits - 1), dtype=torch.int64)
    else:
        zero = _per_row(q.params.zero, out_f).to(torch.int64)
    return {f"{fqn}.qweight": _pack_rows(q.codes, bits).t().contiguous(),
            f"{fqn}.qzeros": _pack_rows((zero - 1).t(), bits),        # v1: zeros minus one
            f"{fqn}.scales": _per_row(q.params.scale, out_f).t().to(torch.float16).contiguous(),
            f"{fqn}.g_idx": (torch.arange(in_f, dtype=torch.int32) // g).to(torch.int32)}
