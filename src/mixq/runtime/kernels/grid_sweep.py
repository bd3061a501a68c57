"""GPTQ's column sweep on an integer grid, natively (:func:`mixq.algorithms.sweep.sweep_runs`; used by
:func:`mixq.algorithms.gptq.gptq_quantize`).

Each column of a block is rounded as :mod:`mixq.formats.integer` encodes and decodes it -- ``c = clamp(round(w / s) +
z, 0, 2^b - 1)``, ``q = s (c - z)`` (a symmetric grid: ``z = 2^(b-1)``), or with an fp16 offset ``o``: ``c =
clamp(round((w - o) / s), 0, 2^b - 1)``, ``q = s c + o`` -- with its group's per-row parameters, and its error fed to the
block's later columns (:mod:`mixq.runtime.kernels.sweep_csrc`), operation for operation what the torch loop computes,
so the codes are the same to the last one.  The torch loop's tensor operations around each column had cost a column
of a few hundred rows several times its arithmetic.  Compiled on first use (:func:`mixq.runtime.kernels.cbuild.load`);
:meth:`GridSweep.make` is None without a compiler (the torch loop runs).
"""
from __future__ import annotations

from functools import lru_cache

import torch

from .cbuild import INT, VOID_P, load
from .sweep_csrc import FEED, check_block

SOURCE = FEED + r"""
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
/* mode 0: zero point z (codes round(w / s) + z); mode 1: offset o (codes round((w - o) / s)) */
__attribute__((optimize("fp-contract=off")))
void grid_sweep(float* Wt, float* Et, const float* U, int ldu, int nb, int ja, int jb, int R, const float* s,
                const float* z, int mode, int n, uint8_t* codes, float* Q) {
  const float top = (float)n;
  for (int j = ja; j < jb; j++) {
    const float* w = Wt + (size_t)j * R;
    uint8_t* c = codes + (size_t)j * R;
    float* q = Q + (size_t)j * R;
    for (int r = 0; r < R; r++) {
      float v = mode == 0 ? nearbyintf(w[r] / s[r]) + z[r] : nearbyintf((w[r] - z[r]) / s[r]);
      v = v < 0.0f ? 0.0f : (v > top ? top : v);
      c[r] = (uint8_t)v;
      const float cf = (float)c[r];
      q[r] = mode == 0 ? s[r] * (cf - z[r]) : s[r] * cf + z[r];
    }
    sweep_feed(Wt, Et, U, ldu, nb, j, R, q);
  }
}
"""


@lru_cache(maxsize=1)
def _lib():
    return load("grid_sweep", SOURCE, "GPTQ's column loop in torch (slower)",
                {"grid_sweep": (None, [VOID_P] * 3 + [INT] * 5 + [VOID_P] * 2 + [INT] * 2 + [VOID_P] * 2)})


class GridSweep:
    """One layer's native sweep on an integer grid of ``bits`` bits (2-8), ``R`` rows: :meth:`params` sets the
    group's per-row parameters, :meth:`run` rounds a stretch of a block's columns."""

    def __init__(self, lib, bits: int, symmetric: bool, R: int):
        self._fn, self.n, self.symmetric, self.R = lib.grid_sweep, 2**bits - 1, symmetric, R
        self.bits = bits
        self._s = self._z = None
        self._mode = 0

    @classmethod
    def make(cls, bits: int, symmetric: bool, R: int) -> "GridSweep | None":
        if not 2 <= bits <= 8:
            return None
        lib = _lib()
        return None if lib is None else cls(lib, bits, symmetric, R)

    def params(self, p) -> None:
        """The group's :class:`~mixq.formats.params.QParams` (``scale`` and ``zero`` or ``offset``, each ``[R, 1]``;
        a symmetric grid's zero point is ``2^(bits-1)``)."""
        self._s = p.scale.reshape(-1).float().contiguous()
        if self.symmetric:
            self._z, self._mode = torch.full((self.R,), float(2 ** (self.bits - 1))), 0
        elif p.zero is not None:
            self._z, self._mode = p.zero.reshape(-1).float().contiguous(), 0
        else:
            self._z, self._mode = p.offset.reshape(-1).float().contiguous(), 1
        if self._s.numel() != self.R or self._z.numel() != self.R:
            raise ValueError(f"grid sweep: parameters must have {self.R} rows")

    def run(self, Wt: torch.Tensor, Et: torch.Tensor, U: torch.Tensor, ja: int, jb: int, codes: torch.Tensor,
            Q: torch.Tensor) -> None:
        """Columns ``ja .. jb - 1`` of the block ``Wt [nb, R]`` (updated in place): errors into ``Et``, codes into
        ``codes [nb, R]`` (uint8), values into ``Q [nb, R]``; ``U`` the block's rows of the factor, unit column
        stride."""
        nb, R = check_block("grid sweep", self.R, U, {"Wt": Wt, "Et": Et, "Q": Q}, {"codes": codes})
        self._fn(Wt.data_ptr(), Et.data_ptr(), U.data_ptr(), U.stride(0), nb, ja, jb, R, self._s.data_ptr(),
                 self._z.data_ptr(), self._mode, self.n, codes.data_ptr(), Q.data_ptr())
