"""llama.cpp block layouts: codes and parameters of ``n`` blocks -> ``[n, type_size]`` bytes, one packer per type.

Written from the ggml format description and checked against ``gguf.quants.dequantize`` in
``tests/test_export_gguf.py``; the encoders that feed them live in :mod:`.ggml` (fitting: :mod:`.ggml_fit`),
mixq's own K-quant and IQ4_NL tensors go through :mod:`.ggml_direct`.
"""
from __future__ import annotations

import numpy as np


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    """``[n]`` fp16-representable floats -> ``[n, 2]`` little-endian bytes."""
    return np.ascontiguousarray(x.astype("<f2")).view(np.uint8).reshape(-1, 2)


def _nibbles(c: np.ndarray) -> np.ndarray:
    """``[n, 32]`` 4-bit codes -> ``[n, 16]`` bytes: low nibble element i, high nibble element i + 16."""
    c = c.astype(np.uint8)
    return (c[:, :16] & 15) | ((c[:, 16:] & 15) << 4)


# Each packer takes ``n`` blocks of codes and parameters and returns ``[n, type_size]`` bytes.
# Codes are unsigned (``c - mid`` is the signed value for the ``sym`` kinds).

def pack_q8_0(d: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Q8_0 (34 bytes / 32): fp16 ``d``, then 32 int8 ``c - 128``.  ``x = d * (c - 128)``."""
    q = (c.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
    return np.concatenate([_f16_bytes(d), q], axis=1)


def pack_q4_0(d: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Q4_0 (18 / 32): fp16 ``d``, 16 bytes of nibbles.  ``x = d * (c - 8)``."""
    return np.concatenate([_f16_bytes(d), _nibbles(c)], axis=1)


def pack_q4_1(d: np.ndarray, m: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Q4_1 (20 / 32): fp16 ``d``, fp16 ``m``, nibbles.  ``x = d * c + m``."""
    return np.concatenate([_f16_bytes(d), _f16_bytes(m), _nibbles(c)], axis=1)


def _fifth_bits(c: np.ndarray) -> np.ndarray:
    """Bit 4 of each of 32 codes as one little-endian uint32 (element i -> bit i)."""
    bits = ((c.astype(np.uint32) >> 4) & 1) << np.arange(32, dtype=np.uint32)
    return np.ascontiguousarray(bits.sum(axis=1, dtype=np.uint32).astype("<u4")).view(np.uint8).reshape(-1, 4)


def pack_q5_0(d: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Q5_0 (22 / 32): fp16 ``d``, 4 bytes of fifth bits, nibbles of the low 4 bits.  ``x = d * (c - 16)``."""
    return np.concatenate([_f16_bytes(d), _fifth_bits(c), _nibbles(c & 15)], axis=1)


def pack_q5_1(d: np.ndarray, m: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Q5_1 (24 / 32): fp16 ``d``, fp16 ``m``, fifth bits, nibbles.  ``x = d * c + m``."""
    return np.concatenate([_f16_bytes(d), _f16_bytes(m), _fifth_bits(c), _nibbles(c & 15)], axis=1)


def pack_iq4_nl(d: np.ndarray, c: np.ndarray) -> np.ndarray:
    """IQ4_NL (18 / 32): fp16 ``d``, nibbles indexing :data:`IQ4_NL_LEVELS`.  ``x = d * L[c]``."""
    return np.concatenate([_f16_bytes(d), _nibbles(c)], axis=1)


def pack_mxfp4(e: np.ndarray, c: np.ndarray) -> np.ndarray:
    """MXFP4 (17 / 32): exponent byte ``e``, nibbles indexing :data:`MXFP4_LEVELS`.  ``x = 2^(e-128) * L[c]``."""
    return np.concatenate([e.astype(np.uint8).reshape(-1, 1), _nibbles(c)], axis=1)


def _k_scale_bytes(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and eight 6-bit mins -> the 12 bytes Q4_K/Q5_K store.

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 the same
    for the mins; bytes 8-11 the low nibbles of scales 4-7 (low half) and mins 4-7 (high half).
    """
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    lo_s, hi_s, lo_m, hi_m = sc[:, :4], sc[:, 4:], m[:, :4], m[:, 4:]
    b0 = lo_s | ((hi_s >> 4) << 6)
    b1 = lo_m | ((hi_m >> 4) << 6)
    b2 = (hi_s & 15) | ((hi_m & 15) << 4)
    return np.concatenate([b0, b1, b2], axis=1)


def _k_low_nibbles(c: np.ndarray) -> np.ndarray:
    """256 codes -> 128 bytes: 32-element sub-blocks 2k and 2k+1 share bytes 32k..32k+31 (low, high nibble)."""
    c = (c.astype(np.uint8) & 15).reshape(-1, 4, 2, 32)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(-1, 128)


def _two_bit_planes(c: np.ndarray) -> np.ndarray:
    """256 2-bit codes -> 64 bytes: element ``128h + 32s + t`` in byte ``32h + t``, bits ``2s``."""
    c = (c.astype(np.uint8) & 3).reshape(-1, 2, 4, 32)
    out = c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)
    return out.reshape(-1, 64)


def pack_q4_k(d: np.ndarray, dmin: np.ndarray, sc: np.ndarray, m: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Q4_K (144 / 256): fp16 ``d``, fp16 ``dmin``, 12 scale bytes, 128 bytes of nibbles.

    Eight sub-blocks of 32: ``x = (d * sc_j) * c - dmin * m_j``, ``sc_j, m_j`` in 0..63, ``c`` in 0..15.
    """
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _k_scale_bytes(sc, m), _k_low_nibbles(c)], axis=1)


def pack_q5_k(d: np.ndarray, dmin: np.ndarray, sc: np.ndarray, m: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Q5_K (176 / 256): as Q4_K plus 32 bytes of fifth bits (element ``32j + t``: byte ``t``, bit ``j``)."""
    hi = ((c.astype(np.uint8) >> 4) & 1).reshape(-1, 8, 32)
    qh = (hi << np.arange(8, dtype=np.uint8).reshape(1, 8, 1)).sum(axis=1, dtype=np.uint8)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _k_scale_bytes(sc, m), qh, _k_low_nibbles(c)], axis=1)


def pack_q6_k(d: np.ndarray, sc: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Q6_K (210 / 256): 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 int8 scales, fp16 ``d``.

    Sixteen sub-blocks of 16: ``x = (d * sc_j) * (c - 32)``.  Each half of 128 elements uses 64
    low-nibble bytes (elements ``k`` and ``k + 64`` share byte ``k``) and 32 high-bit bytes
    (elements ``k, k+32, k+64, k+96`` share byte ``k``, bits 0-1, 2-3, 4-5, 6-7).
    """
    c = c.astype(np.uint8).reshape(-1, 2, 128)
    lo, hi = c & 15, c >> 4
    ql = (lo[:, :, :64] | (lo[:, :, 64:] << 4)).reshape(-1, 128)
    hi = hi.reshape(-1, 2, 4, 32)
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(-1, 64)
    scales = sc.astype(np.int8).view(np.uint8).reshape(-1, 16)
    return np.concatenate([ql, qh, scales, _f16_bytes(d)], axis=1)


def pack_q3_k(d: np.ndarray, sc: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Q3_K (110 / 256): 32 bytes high-bit mask, 64 bytes of 2-bit planes, 12 scale bytes, fp16 ``d``.

    Sixteen sub-blocks of 16: ``x = (d * sc_j) * (c - 4)``, ``sc_j`` in -32..31 stored as 6 bits
    ``sc_j + 32``: low nibbles of scales j and j+8 share byte j (0..7), the top 2 bits of scale
    ``4k + i`` sit in byte ``8 + i`` at bits ``2k``.  Code bit 2 of element ``32b + t`` is bit ``b``
    of mask byte ``t`` (set = no -4 offset in ggml's terms).
    """
    c = c.astype(np.uint8)
    hbit = ((c >> 2) & 1).reshape(-1, 8, 32)
    hmask = (hbit << np.arange(8, dtype=np.uint8).reshape(1, 8, 1)).sum(axis=1, dtype=np.uint8)
    u = (sc.astype(np.int16) + 32).astype(np.uint8)
    low, high = u & 15, u >> 4
    sbytes = np.concatenate([low[:, :8] | (low[:, 8:] << 4),
                             high[:, 0:4] | (high[:, 4:8] << 2) | (high[:, 8:12] << 4) | (high[:, 12:16] << 6)], axis=1)
    return np.concatenate([hmask, _two_bit_planes(c), sbytes, _f16_bytes(d)], axis=1)


def pack_q2_k(d: np.ndarray, dmin: np.ndarray, sc: np.ndarray, m: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Q2_K (84 / 256): 16 bytes ``sc_j | m_j << 4``, 64 bytes of 2-bit planes, fp16 ``d``, fp16 ``dmin``.

    Sixteen sub-blocks of 16: ``x = (d * sc_j) * c - dmin * m_j``, ``sc_j, m_j`` in 0..15.
    """
    sbytes = (sc.astype(np.uint8) & 15) | ((m.astype(np.uint8) & 15) << 4)
    return np.concatenate([sbytes, _two_bit_planes(c), _f16_bytes(d), _f16_bytes(dmin)], axis=1)
