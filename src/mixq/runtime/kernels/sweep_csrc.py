"""The C text of GPTQ's feedback step inside a block (:func:`mixq.algorithms.sweep.sweep_runs`), put before the native
sweeps that round a block's columns (:mod:`mixq.runtime.kernels.tcq_csrc`'s trellis, :mod:`mixq.runtime.kernels.grid_sweep`'s
integer grids): column ``j`` rounded to ``q``, its error ``e = (w - q) / U[j][j]`` goes to ``Et`` and the block's
later columns take ``w_c -= e * U[j][c]`` -- the torch loop's arithmetic operation for operation (no contraction into
fused multiply-adds), so a native sweep gives the torch sweep's bits.  :func:`check_block`: the tensors such a sweep
is handed, checked."""
import torch

FEED = r"""
#include <stddef.h>
__attribute__((optimize("fp-contract=off")))
static void sweep_feed(float* Wt, float* Et, const float* U, int ldu, int nb, int j, int R, const float* q) {
  const float* w = Wt + (size_t)j * R;
  float* e = Et + (size_t)j * R;
  const float d = U[(size_t)j * ldu + j];
  for (int r = 0; r < R; r++) e[r] = (w[r] - q[r]) / d;
  for (int c = j + 1; c < nb; c++) {
    const float u = U[(size_t)j * ldu + c];
    float* wc = Wt + (size_t)c * R;
    for (int r = 0; r < R; r++) wc[r] = wc[r] - e[r] * u;
  }
}
"""


def check_block(what: str, R: int, U: torch.Tensor, floats: dict, codes: dict) -> tuple[int, int]:
    """``(nb, R)`` of a block handed to a native sweep: every tensor of ``floats`` (float32, the block ``Wt`` first)
    and ``codes`` (uint8) a contiguous ``[nb, R]``, ``U`` float32 ``[nb, >= nb]`` with unit column stride; else a
    ValueError naming them."""
    nb = next(iter(floats.values())).shape[0]
    ts = {**floats, **codes}
    ok = (all(t.is_contiguous() and tuple(t.shape) == (nb, R) for t in ts.values())
          and all(t.dtype == torch.float32 for t in floats.values())
          and all(t.dtype == torch.uint8 for t in codes.values())
          and U.dtype == torch.float32 and U.shape[0] == nb and U.shape[1] >= nb and U.stride(1) == 1)
    if not ok:
        raise ValueError(f"{what}: {', '.join(floats)} float32 and {', '.join(codes)} uint8, each a contiguous "
                         f"[nb, {R}], and U float32 [nb, >= nb] with unit column stride")
    return nb, R
