"""GPTQ's column sweep with lazy batch updates, shared by every quantizer that feeds rounding error forward.

The quantizers differ only in how one column (or one run of ``width`` columns, for vector codebooks) is rounded:
a scalar grid (:mod:`mixq.algorithms.gptq`), a composite's dense part (:mod:`mixq.algorithms.composite.dense`),
sign planes (:mod:`mixq.algorithms.composite.binary`), a codebook (:mod:`mixq.algorithms.composite.vq`).
:func:`sweep` owns the rest: the blocks of ``block_size`` columns, the error ``(w - q) / U_ii`` (``(w - q) U_vv⁻¹`` for
a run of columns) spread over the block's later columns at once, and the block's error pushed to the columns after it in
one matrix product (GPTQ, Frantar et al. 2022, eq. 3 and the lazy batch of section 3).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch

# round(i, w, ahead) -> q: ``i`` the first column of the step, ``w`` its current values ([R] for width 1, else
# [R, width]), ``ahead(n)`` the current values of columns i .. i + n (fewer at the right edge); q like w
RoundStep = Callable[[int, torch.Tensor, Callable[[int], torch.Tensor]], torch.Tensor]


class one_thread:
    """Run a block of tiny tensor ops on one thread: thread synchronisation costs more than it saves there."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


def sweep(Wk: torch.Tensor, U: torch.Tensor, round_step: RoundStep, *, block_size: int = 128, width: int = 1,
          single_thread: bool = True) -> None:
    """Quantize the columns of ``Wk [R, C]`` left to right by ``round_step``, feeding each step's error forward.

    ``U`` is the upper Cholesky factor of ``H⁻¹`` in the column order of ``Wk``; ``Wk`` is updated in place (its
    columns after each block hold the compensated weights).  ``round_step`` stores what it rounds (codes,
    parameters, ``Ŵ``) itself; ``width`` columns are rounded together (``C`` a multiple of it).  ``single_thread``:
    the step loop runs on one thread (scalar grids; a codebook search may want more).
    """
    C = Wk.shape[1]
    bs = max(width, block_size - block_size % width)
    for i1 in range(0, C, bs):
        i2 = min(i1 + bs, C)
        W1 = Wk[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)

        def ahead(n: int, i: int = 0) -> torch.Tensor:
            j = i - i1
            if i + n <= i2:
                return W1[:, j:j + n]
            return torch.cat([W1[:, j:], Wk[:, i2:i + n]], 1)

        with one_thread() if single_thread else nullcontext():
            for i in range(i1, i2, width):
                j = i - i1
                if width == 1:
                    w = W1[:, j]
                    q = round_step(i, w, lambda n, i=i: ahead(n, i))
                    err = (w - q) / U[i, i]
                    W1[:, j:].addr_(err, U[i, i:i2], alpha=-1.0)
                    E1[:, j] = err
                else:
                    w = W1[:, j:j + width]
                    q = round_step(i, w, lambda n, i=i: ahead(n, i))
                    eye = torch.eye(width, dtype=U.dtype, device=U.device)
                    Vinv = torch.linalg.solve_triangular(U[i:i + width, i:i + width], eye, upper=True)
                    E = (w - q) @ Vinv
                    E1[:, j:j + width] = E
                    W1[:, j + width:] -= E @ U[i:i + width, i + width:i2]
        Wk[:, i2:] -= E1 @ U[i1:i2, i2:]


# run(Wt, Et, U, j, jb, i1): columns j .. jb - 1 of the block starting at column i1, held column by column
# (``Wt [nb, R]``), rounded with their errors fed forward inside the block, errors into ``Et [nb, R]``; ``U`` the
# block's rows of the factor from column i1 on.  start(i, w): a group of columns begins at i, ``w [R, glen]`` its
# current values.
RunStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int, int], None]


def sweep_runs(Wk: torch.Tensor, U: torch.Tensor, run: RunStep, start: Callable[[int, torch.Tensor], None], *,
               group_len: int, block_size: int = 128) -> None:
    """:func:`sweep` for a quantizer that rounds a run of columns at once (a native trellis search and its feedback,
    :class:`mixq.runtime.kernels.tcq_cpu.SweepSearch`): the same blocks and lazy batch update, ``run`` called for each
    stretch of a block inside one group of ``group_len`` columns, ``start`` where a group begins."""
    C = Wk.shape[1]
    Uc = U.contiguous()  # run's rows; the batch update keeps U's own layout (sweep's products to the bit)
    for i1 in range(0, C, block_size):
        i2 = min(i1 + block_size, C)
        Wt = Wk[:, i1:i2].T.contiguous()
        Et = torch.empty_like(Wt)
        j = 0
        while j < i2 - i1:
            i = i1 + j
            if i % group_len == 0:
                n = group_len
                w = Wt[j:j + n].T if i + n <= i2 else torch.cat([Wt[j:].T, Wk[:, i2:i + n]], 1)
                start(i, w.contiguous())
            jb = min(i2, (i // group_len + 1) * group_len) - i1
            run(Wt, Et, Uc[i1:i2, i1:], j, jb, i1)
            j = jb
        Wk[:, i2:] -= Et.T.contiguous() @ U[i1:i2, i2:]
