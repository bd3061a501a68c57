"""Which mixq specs a ggml block type holds *exactly*, codes, scales and size: the ``gguf`` runtime target.

A plan made with ``target="gguf"`` (``mixq plan|quantize --target gguf``) only chooses, per layer, specs
listed here for that layer's row length; the GGUF exporter then writes each layer as its type, copying
mixq's codes and scales into the blocks (no re-quantization, no fallback) and checks the file decodes
to mixq's dequantized weight bit for bit (``mixq.export.gguf.write_gguf(exact=True)``).

=============  ==========================  ===================================  ======  ======
ggml type      mixq spec                   element value (``c`` the stored code)  block   bpw
=============  ==========================  ===================================  ======  ======
Q8_0           ``W8-g32``                  ``d * (c - 128)``, fp16 ``d``          32      8.5
Q5_0           ``W5-g32``                  ``d * (c - 16)``, fp16 ``d``           32      5.5
Q4_0           ``W4-g32``                  ``d * (c - 8)``, fp16 ``d``            32      4.5
Q5_1           ``W5-g32-asymf``            ``d * c + m``, fp16 ``d`` and ``m``    32      6.0
Q4_1           ``W4-g32-asymf``            ``d * c + m``, fp16 ``d`` and ``m``    32      5.0
MXFP4          ``MXFP4``                   ``2^(e-127) * E2M1[c]``, byte ``e``    32      4.25
IQ4_NL         ``IQ4_NL``                  ``d * KVALUES_IQ4NL[c]``, fp16 ``d``   32      4.5
Q6_K           ``Q6_K``                    ``(d * sc_j) * (c - 32)``              256     6.5625
Q5_K           ``Q5_K``                    ``(d * sc_j) * c - dmin * m_j``        256     5.5
Q4_K           ``Q4_K``                    ``(d * sc_j) * c - dmin * m_j``        256     4.5
Q3_K           ``Q3_K``                    ``(d * sc_j) * (c - 4)``               256     3.4375
Q2_K           ``Q2_K``                    ``(d * sc_j) * c - dmin * m_j``        256     2.625
F16 / BF16     ``FP16`` / ``BF16``         the value                              1       16
F32            ``FP32``                    the value                              1       32
=============  ==========================  ===================================  ======  ======

Each mixq spec's exact bit cost (``spec.cost``) equals the ggml type's size (block bytes * 8 / block), so a
plan's budget is the file's size of those tensors.  The ``-mse`` variants (another way to choose the same
scales) qualify too.  A group of 64 would also decode exactly in Q4_0 (two blocks repeating one scale) but
costs mixq 4.25 bpw and the file 4.5: not listed, so a plan's size is the size it runs at.  The K-quants
and IQ4_NL are mixq specs of their own name (:mod:`mixq.config.ggml_types`: mixq fits their two-level scales,
``d`` and ``dmin`` fp16 per 256, integer ``sc_j`` / ``m_j`` per sub-block, and chooses the codes inside them);
the K-quants need rows of a multiple of 256 (on SmolLM2 only ``down_proj``, 1536 wide), which brings the
minimum budget under the target below MXFP4's 4.25 bpw.

Pure: no ``gguf`` import (the allocator asks this module per layer); the exporter maps names to ``gguf`` types.
"""
from __future__ import annotations

from ..config import QuantSpec, parse_spec

# spec name (clip="minmax") -> ggml type name
_EXACT: dict[str, str] = {
    "W8-g32": "Q8_0", "W5-g32": "Q5_0", "W4-g32": "Q4_0",
    "W5-g32-asymf": "Q5_1", "W4-g32-asymf": "Q4_1",
    "MXFP4": "MXFP4", "IQ4_NL": "IQ4_NL",
    "Q6_K": "Q6_K", "Q5_K": "Q5_K", "Q4_K": "Q4_K", "Q3_K": "Q3_K", "Q2_K": "Q2_K",
    "FP16": "F16", "BF16": "BF16", "FP32": "F32",
}
_BLOCK = {"Q8_0": 32, "Q5_0": 32, "Q4_0": 32, "Q5_1": 32, "Q4_1": 32, "MXFP4": 32, "IQ4_NL": 32,
          "Q6_K": 256, "Q5_K": 256, "Q4_K": 256, "Q3_K": 256, "Q2_K": 256, "F16": 1, "BF16": 1, "F32": 1}
_BY_SPEC: dict[QuantSpec, str] = {parse_spec(n): t for n, t in _EXACT.items()}

# the candidate set a ``--target gguf`` measurement uses by default: every exact spec, fp16 for "keep"
GGUF_CANDIDATE_NAMES: tuple[str, ...] = ("Q2_K", "Q3_K", "MXFP4", "W4-g32", "IQ4_NL", "Q4_K", "W4-g32-asymf",
                                         "W5-g32", "Q5_K", "W5-g32-asymf", "Q6_K", "W8-g32", "FP16")


def _base(spec) -> QuantSpec | None:
    """The spec with ``clip`` reset (``-mse`` chooses scales differently, stores the same grid); None for
    composites (outliers, +ip, ...), which no ggml type holds."""
    if not isinstance(spec, QuantSpec):
        return None
    if spec.clip == "minmax":
        return spec
    from dataclasses import replace

    return replace(spec, clip="minmax")


def ggml_exact_type(spec, shape: tuple[int, int]) -> str | None:
    """The ggml type name that holds ``spec`` exactly on a ``[rows, cols]`` weight (``cols``: the row length, the
    input dimension), or None: no such type, or ``cols`` is not a multiple of its block."""
    base = _base(spec)
    t = _BY_SPEC.get(base) if base is not None else None
    if t is None or int(shape[1]) % _BLOCK[t]:
        return None
    return t


def exact_specs_table() -> list[tuple[str, str]]:
    """``[(mixq spec name, ggml type name)]`` of the table above."""
    return list(_EXACT.items())
