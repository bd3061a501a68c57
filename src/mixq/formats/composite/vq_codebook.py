"""Fixed Gaussian-optimal vector codebooks of ``VQ`` bases: the committed tables, read back.

After incoherence processing (``+ip``) a weight group divided by its scale is close to i.i.d. ``N(0, 1)``
(QuIP#, QTIP), so one codebook per ``(d, code bits)`` serves every layer and is never stored with a model:
``codebook(d, k)`` ``[2^k, d]`` float32 is the ``2^k``-entry minimum-MSE quantizer of ``N(0, I_d)``, rounded to fp16
(so that last-bit differences between machines' BLAS cannot change a stored model's decoding), entries sorted
lexicographically, committed in :mod:`mixq.formats.composite.vq_tables`.  How they are made (Lloyd's algorithm, from
their definition), the nearest-entry search the quantizers encode with and the MSE of each:
:mod:`mixq.algorithms.composite.vq_search`.  ``tests/test_vq.py`` pins a checksum of every codebook.
"""
from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=None)
def _codebook(d: int, k: int) -> torch.Tensor:
    from .vq_tables import TABLES

    hexs = TABLES.get((d, k))
    if hexs is None:
        raise ValueError(f"no VQ codebook for d={d} with {k}-bit codes; have {sorted(TABLES)} "
                         "(add one with mixq.algorithms.composite.vq_search.generate and vq_tables.py)")
    raw = bytes.fromhex(hexs)
    C = torch.frombuffer(bytearray(raw), dtype=torch.float16).to(torch.float32)
    return C.reshape(2 ** k, d).contiguous()


def available() -> list[tuple[int, int]]:
    """``(d, code bits)`` of the committed codebooks."""
    from .vq_tables import TABLES

    return sorted(TABLES)


def codebook(d: int, k: int) -> torch.Tensor:
    """The ``[2^k, d]`` float32 codebook (fp16-exact values) of ``k``-bit codes for ``d``-vectors (a copy)."""
    return _codebook(int(d), int(k)).clone()


def to_hex(C: torch.Tensor) -> str:
    """fp16 little-endian hex of a codebook (the form :mod:`mixq.formats.composite.vq_tables` stores)."""
    return C.to(torch.float16).contiguous().view(torch.uint8).numpy().tobytes().hex()
