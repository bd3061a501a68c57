"""Native CPU kernel for VQ weights (``vq-cpu``): decode-and-dot GEMV in C, compiled on first use; and the
nearest-codeword search the VQ quantizers run (``nearest``: 10-20x torch's ``[N, K]`` product and argmin at d = 2).

For each output row ``r`` and input row ``m``::

    y[m, r] = Σ_g s[r, g] Σ_{v in g} B[code[r, v]] · x[m, v·d : (v+1)·d]

reading one uint8 code per ``d`` weights (4 bits per weight at d = 2: the codes unpacked once), the codebook
``B [2^k, d]`` (at most 2 KiB: L1-resident) and ``x``; no ``Ŵ`` and no lookup table is formed.  Rows are split
over OpenMP threads (``OMP_NUM_THREADS``).  torch's own gathers cost ~10 ns per element on this CPU (40x a
dense GEMV's multiply-add), so the torch-only ``vq-lut`` path is the fallback, not the fast one.

``vq_lut_gemv`` is the table form (QuIP#/AQLM-style): ``T[m, v, k] = B[k] · x[m, v]`` once per call, then one
table load and add per code; used when the table is small next to the weight (``4 · 2^k <= R``).

The C source below is compiled on first use (:func:`mixq.runtime.kernels.cbuild.load`); :func:`available` is False
(and the caller falls back) when no compiler works.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from .cbuild import INT, VOID_P, load

SOURCE = r"""
#include <stdint.h>
#include <stddef.h>
void vq_gemv(const float* x, const uint8_t* codes, const float* scale, const float* B, float* y,
             int M, int R, int P, int D, int VPG, int G) {
  #pragma omp parallel for schedule(static)
  for (int r = 0; r < R; r++) {
    const uint8_t* c = codes + (size_t)r * P;
    const float* s = scale + (size_t)r * G;
    for (int m = 0; m < M; m++) {
      const float* xm = x + (size_t)m * P * D;
      float acc = 0.0f;
      if (D == 2) {
        for (int g = 0; g < G; g++) {
          float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
          const int v0 = g * VPG;
          int v = v0;
          for (; v + 2 <= v0 + VPG; v += 2) {
            const float* b = B + 2 * (int)c[v];
            const float* e = B + 2 * (int)c[v + 1];
            a0 += b[0] * xm[2 * v];
            a1 += b[1] * xm[2 * v + 1];
            a2 += e[0] * xm[2 * v + 2];
            a3 += e[1] * xm[2 * v + 3];
          }
          for (; v < v0 + VPG; v++) {
            const float* b = B + 2 * (int)c[v];
            a0 += b[0] * xm[2 * v];
            a1 += b[1] * xm[2 * v + 1];
          }
          acc += ((a0 + a1) + (a2 + a3)) * s[g];
        }
      } else {
        for (int g = 0; g < G; g++) {
          float a = 0.0f;
          const int v0 = g * VPG;
          for (int v = v0; v < v0 + VPG; v++) {
            const float* b = B + (size_t)D * c[v];
            const float* xv = xm + (size_t)D * v;
            for (int j = 0; j < D; j++) a += b[j] * xv[j];
          }
          acc += a * s[g];
        }
      }
      y[(size_t)m * R + r] = acc;
    }
  }
}

/* nearest codebook row for each of N points: argmin_k |c_k|^2 - 2 x.c_k (the first k on ties), as
   vq_search.nearest computes it in torch */
void vq_nearest(const float* x, const float* C, const float* cn, int64_t* out, int N, int K, int D) {
  #pragma omp parallel for schedule(static) if (N >= 4096)
  for (int n = 0; n < N; n++) {
    const float* xn = x + (size_t)n * D;
    float best = 0.0f;
    int arg = 0;
    if (D == 2) {
      const float a = -2.0f * xn[0], b = -2.0f * xn[1];
      best = cn[0] + a * C[0] + b * C[1];
      for (int k = 1; k < K; k++) {
        const float v = cn[k] + a * C[2 * k] + b * C[2 * k + 1];
        if (v < best) { best = v; arg = k; }
      }
    } else {
      for (int k = 0; k < K; k++) {
        float v = cn[k];
        for (int j = 0; j < D; j++) v -= 2.0f * xn[j] * C[(size_t)k * D + j];
        if (k == 0 || v < best) { best = v; arg = k; }
      }
    }
    out[n] = arg;
  }
}

/* table form: T[m][v*K + k] = B[k] . x[m, v*d:(v+1)*d] built once per call (P*K*D multiply-adds per input row),
   then one table load and add per code */
void vq_lut_gemv(const float* T, const uint8_t* codes, const float* scale, float* y,
                 int M, int R, int P, int K, int VPG, int G) {
  #pragma omp parallel for schedule(static)
  for (int r = 0; r < R; r++) {
    const uint8_t* c = codes + (size_t)r * P;
    const float* s = scale + (size_t)r * G;
    for (int m = 0; m < M; m++) {
      const float* Tm = T + (size_t)m * P * K;
      float acc = 0.0f;
      for (int g = 0; g < G; g++) {
        const int v0 = g * VPG;
        float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;  /* four chains: the adds do not wait on each other */
        int v = v0;
        for (; v + 4 <= v0 + VPG; v += 4) {
          a0 += Tm[(size_t)v * K + c[v]];
          a1 += Tm[(size_t)(v + 1) * K + c[v + 1]];
          a2 += Tm[(size_t)(v + 2) * K + c[v + 2]];
          a3 += Tm[(size_t)(v + 3) * K + c[v + 3]];
        }
        for (; v < v0 + VPG; v++) a0 += Tm[(size_t)v * K + c[v]];
        acc += ((a0 + a1) + (a2 + a3)) * s[g];
      }
      y[(size_t)m * R + r] = acc;
    }
  }
}
"""


@lru_cache(maxsize=1)
def _lib():
    return load("vq_cpu", SOURCE, "VQ layers use the torch vq-lut path", {
        "vq_gemv": (None, [VOID_P] * 5 + [INT] * 6),
        "vq_lut_gemv": (None, [VOID_P] * 4 + [INT] * 6),
        "vq_nearest": (None, [VOID_P] * 4 + [INT] * 3)})


def available() -> bool:
    return _lib() is not None


def nearest(x: torch.Tensor, C: torch.Tensor) -> torch.Tensor | None:
    """int64 ``[N]``: the nearest row of ``C [K, d]`` for every row of ``x [N, d]`` (float32, CPU), or None when the
    kernel is not available (:func:`mixq.algorithms.composite.vq_search.nearest` then searches in torch)."""
    lib = _lib()
    if lib is None or x.device.type != "cpu":
        return None
    x = x.detach().float().contiguous()
    C = C.detach().float().contiguous()
    cn = (C * C).sum(1).contiguous()
    out = torch.empty(x.shape[0], dtype=torch.long)
    lib.vq_nearest(x.data_ptr(), C.data_ptr(), cn.data_ptr(), out.data_ptr(), x.shape[0], C.shape[0], C.shape[1])
    return out


def vq_gemv(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, B: torch.Tensor, glen: int,
            lut: bool | None = None) -> torch.Tensor:
    """``y [M, R]`` float32 for ``x [M, C]`` (any float dtype, CPU), ``codes`` uint8 ``[R, C/d]``, ``scale`` float32
    ``[R, C/glen]``, ``B [2^k, d]``; ``lut``: the table form (default: when ``4 · 2^k <= R``)."""
    lib = _lib()
    if lib is None:
        raise RuntimeError("the vq-cpu kernel is not available (no working C compiler)")
    x = x.detach().float().contiguous()
    codes, scale, B = codes.contiguous(), scale.float().contiguous(), B.float().contiguous()
    M, C = x.shape
    R, P = codes.shape
    d = B.shape[1]
    if codes.dtype != torch.uint8 or P * d != C or C % glen or glen % d or scale.shape != (R, C // glen):
        raise ValueError(f"vq_gemv: codes {tuple(codes.shape)} {codes.dtype}, scale {tuple(scale.shape)}, d={d}, "
                         f"group {glen} do not fit x [{M}, {C}]")
    y = torch.empty(M, R, dtype=torch.float32)
    K = B.shape[0]
    if lut if lut is not None else K * 4 <= R:  # the table costs P*K*d multiply-adds: worth it when K << R
        T = (x.reshape(M, P, d) @ B.T).contiguous()  # [M, P, K]
        lib.vq_lut_gemv(T.data_ptr(), codes.data_ptr(), scale.data_ptr(), y.data_ptr(), M, R, P, K, glen // d,
                        C // glen)
        return y
    lib.vq_gemv(x.data_ptr(), codes.data_ptr(), scale.data_ptr(), B.data_ptr(), y.data_ptr(),
                M, R, P, d, glen // d, C // glen)
    return y
