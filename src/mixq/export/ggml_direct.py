"""mixq's own K-quant and IQ4_NL tensors as ggml blocks: the codes and the two-level scales copied as they are.

A :class:`~mixq.formats.QTensor` of a ``Q2_K`` ... ``Q6_K`` or ``IQ4_NL`` spec (:mod:`mixq.config.ggml_types`)
already holds what the ggml block stores -- the fp16 ``d`` (``dmin``), the sub-block integers and the codes --
so nothing is fitted or re-encoded here; :mod:`.ggml_pack` lays the bytes out.  The exact GGUF export checks
the result against ``gguf.quants.dequantize``.
"""
from __future__ import annotations

import numpy as np

from ..formats import QTensor
from .ggml_pack import pack_iq4_nl, pack_q2_k, pack_q3_k, pack_q4_k, pack_q5_k, pack_q6_k

DIRECT_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL")
_AFFINE = {"Q2_K": pack_q2_k, "Q4_K": pack_q4_k, "Q5_K": pack_q5_k}
_SYM = {"Q3_K": pack_q3_k, "Q6_K": pack_q6_k}


def _per_row(t, rows: int, perm: np.ndarray | None) -> np.ndarray:
    """Group rows ``[rows * g, k]`` (``rows_view`` order) -> ``[rows * g, k]`` with the weight's rows permuted."""
    a = t.detach().float().cpu().numpy()
    a = a.reshape(rows, -1, a.shape[-1])
    if perm is not None:
        a = a[perm]
    return a.reshape(-1, a.shape[-1])


def pack_direct(tname: str, q: QTensor, perm: np.ndarray | None = None) -> np.ndarray:
    """uint8 ``[rows, row bytes]`` of ggml type ``tname`` holding ``q`` (rows reordered by ``perm``)."""
    rows, cols = q.shape
    codes = q.codes.detach().cpu().numpy()
    if perm is not None:
        codes = codes[perm]
    if tname == "IQ4_NL":
        d = _per_row(q.params.scale, rows, perm)[:, 0]
        data = pack_iq4_nl(d, codes.reshape(-1, 32))
    elif tname in _AFFINE:
        s, o = _per_row(q.params.scale, rows, perm), _per_row(q.params.offset, rows, perm)
        data = _AFFINE[tname](s[:, 0], o[:, 0], s[:, 1:].astype(np.int64), o[:, 1:].astype(np.int64),
                              codes.reshape(-1, 256))
    elif tname in _SYM:
        s = _per_row(q.params.scale, rows, perm)
        data = _SYM[tname](s[:, 0], s[:, 1:].astype(np.int64), codes.reshape(-1, 256))
    else:
        raise ValueError(f"{tname} is not one of the directly written types {', '.join(DIRECT_TYPES)}")
    return np.ascontiguousarray(data.reshape(rows, -1))
