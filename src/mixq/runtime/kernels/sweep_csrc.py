"""The C text of GPTQ's feedback step inside a block (:func:`mixq.algorithms.sweep.sweep_runs`), put before the native
sweeps that round a block's columns (:mod:`mixq.runtime.kernels.tcq_csrc`'s trellis, :mod:`mixq.runtime.kernels.grid_sweep`'s
integer grids): column ``j`` rounded to ``q``, its error ``e = (w - q) / U[j][j]`` goes to ``Et`` and the block's
later columns take ``w_c -= e * U[j][c]`` -- the torch loop's arithmetic operation for operation (no contraction into
fused multiply-adds), so a native sweep gives the torch sweep's bits."""

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
