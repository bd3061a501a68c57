"""Which mixq specs the Hugging Face exports hold *exactly*: the ``gptq`` and ``compressed-tensors`` runtime targets.

A plan made with ``--target gptq`` / ``--target compressed-tensors`` only chooses, per layer, specs that
``mixq export --format gptq`` / ``compressed-tensors`` writes as they are and that the readers named in
:mod:`mixq.export.hf` load (the exporter still checks every layer's data and re-reads the file):

================== =========================================================================================
gptq               symmetric integer grids (``W<b>-gN`` / ``W<b>-channel``) of 2, 3, 4 or 8 bits with fp16
                   scales, ``N`` dividing the row, in and out features times ``b`` whole 32-bit words; kept
                   layers (``FP16``).  Symmetric only: GPTQ v1 stores zero points minus one, so an asymmetric
                   group whose zero point is 0 (data-dependent) could not be written.
compressed-tensors symmetric integer grids of 2 to 8 bits with fp16 scales (channel or groups dividing the row);
                   kept layers.  Symmetric only: transformers 5.23 does not load asymmetric pack-quantized
                   layers (vLLM and compressed-tensors' decompressor do); vLLM's kernels take 4 and 8 bits.
================== =========================================================================================

Pure: the allocator asks this module per layer.
"""
from __future__ import annotations

from ..granularity import PerChannel, PerGroup

# the candidate sets a ``--target`` measurement uses by default
GPTQ_CANDIDATE_NAMES: tuple[str, ...] = ("W2-g32", "W2-g64", "W3-g32", "W3-g64", "W3-g128", "W4-g32", "W4-g64",
                                         "W4-g128", "W8-g128", "W8-channel", "FP16")
CT_CANDIDATE_NAMES: tuple[str, ...] = ("W2-g32", "W2-g64", "W3-g32", "W3-g64", "W3-g128", "W4-g32", "W4-g64",
                                       "W4-g128", "W5-g64", "W6-g64", "W8-channel", "FP16")


def _symmetric_int(spec, target: str, shape: tuple[int, int]) -> bool:
    """The family's own mapping (``spec.export_to``: element type, zero points, scale levels, GPTQ's bit widths)
    says exact, and the layer-level conditions hold: symmetric, fp16 scales, groups dividing the row."""
    if spec.export_to(target).kind != "exact":
        return False
    if spec.is_float_keep:
        return True
    if not spec.symmetric or spec.bits < 2 or spec.scale_dtype != "fp16":  # 1 bit: no zero level (hf_source)
        return False
    g = spec.granularity
    if isinstance(g, PerGroup):
        return int(shape[1]) % g.size == 0
    return isinstance(g, PerChannel)


def gptq_holds(spec, shape: tuple[int, int]) -> bool:
    """Whether ``mixq export --format gptq`` writes ``spec`` exactly on a ``[out, in]`` weight (module doc)."""
    if not _symmetric_int(spec, "gptq", shape):
        return False
    return spec.is_float_keep or (int(shape[0]) * spec.bits % 32 == 0 and int(shape[1]) * spec.bits % 32 == 0)


def ct_holds(spec, shape: tuple[int, int]) -> bool:
    """Whether ``mixq export --format compressed-tensors`` writes ``spec`` exactly and transformers loads it."""
    return _symmetric_int(spec, "compressed-tensors", shape)
