"""Native CPU kernels of trellis-coded weights (:mod:`mixq.intra.tcq`): the Viterbi search and decode-and-dot GEMV.

``tcq_viterbi`` finds, for each of ``N`` sequences of ``T`` targets ``x`` with weights ``w``, the bit string of
least ``Σ_t w_t (x_t - lut[s_t])²`` through the bitshift trellis of :mod:`mixq.intra.tcq_codebook` (state
``s_t = ((s_{t-1} << k_t) | b_t) mod 2^L``, ``s_{-1} = 0``).  The survivors of a step are indexed by the state's
low ``L - k_t`` bits shifted up (every state with the same ``s >> k_t`` has the same ``2^{k_t}`` predecessors), so a
step costs ``2^L`` compares and ``2^L`` squared errors; back-pointers take ``T · 2^{L - k_min}`` bytes.  Sequences are
split over OpenMP threads.

``tcq_decode``: ``Ŵ`` from the stream, a column per thread step.  ``tcq_gemv``: ``y[m, r] = Σ_g s[r, g] Σ_{j in g} x[m, j] · lut[state(r, j)]`` from the column-major symbol stream
(``w``-bit symbols, LSB-first packed, one per ``P`` rows of a column), walking each column down a block of rows
with the state in a register; a thread's block starts from the state rebuilt from the symbols above it.

Compiled on first use (:func:`mixq.runtime.kernels.cbuild.load`); :func:`available` is False when no compiler
works, and the callers fall back to torch (:func:`mixq.intra.tcq_codebook.viterbi_torch`, dequantize + dense GEMM).
"""
from __future__ import annotations

import ctypes
from functools import lru_cache

import torch

from ..runtime.kernels.cbuild import load

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <stddef.h>
/* the search alone is built with fast-math: 2-3x faster here (a vectorized min); its result is the bits, which
   decode exactly whatever the search's rounding */
#pragma GCC push_options
#pragma GCC optimize ("fast-math")
static inline __attribute__((always_inline)) void tcq_step(const int k, const int L, const float* restrict c0,
    float* restrict c1, float* restrict m, int32_t* restrict bi, uint8_t* restrict bpt, const float* restrict lut,
    const float xt, const float wt) {
  const int S = 1 << L, U = S >> k, B = 1 << k, sh = L - k;
  for (int u = 0; u < U; u++) { m[u] = c0[u]; bi[u] = 0; }
  for (int h = 1; h < B; h++) {
    const float* ch = c0 + ((size_t)h << sh);
    for (int u = 0; u < U; u++) { const int lt = ch[u] < m[u]; m[u] = lt ? ch[u] : m[u]; bi[u] = lt ? h : bi[u]; }
  }
  for (int u = 0; u < U; u++) bpt[u] = (uint8_t)bi[u];
  for (int s = 0; s < S; s++) { const float d = xt - lut[s]; c1[s] = wt * d * d; }
  for (int u = 0; u < U; u++) for (int b = 0; b < B; b++) c1[(u << k) | b] += m[u];
}

/* x, w: [N, T]; ks: [T] bits per step (1..4); lut: [2^L]; out: [N, T] the bits of each step; vals: [N, T]
   the decoded lut[s_t]; cost: [N] */
int tcq_viterbi(const float* x, const float* w, const uint8_t* ks, int N, int T, const float* lut, int L,
                uint8_t* out, float* vals, float* cost) {
  int kmin = 8;
  for (int t = 0; t < T; t++) { if (ks[t] < 1 || ks[t] > 4 || ks[t] >= L) return 1; if (ks[t] < kmin) kmin = ks[t]; }
  if (L != 8 && L != 10) return 2;
  const int S = 1 << L, UM = S >> kmin;
  #pragma omp parallel
  {
    float* c0 = (float*)malloc(sizeof(float) * S);
    float* c1 = (float*)malloc(sizeof(float) * S);
    float* m = (float*)malloc(sizeof(float) * UM);
    int32_t* bi = (int32_t*)malloc(sizeof(int32_t) * UM);
    uint8_t* bp = (uint8_t*)malloc((size_t)T * UM);
    #pragma omp for schedule(dynamic)
    for (int n = 0; n < N; n++) {
      const float* xn = x + (size_t)n * T;
      const float* wn = w + (size_t)n * T;
      for (int s = 0; s < S; s++) c0[s] = 1e30f;
      c0[0] = 0.0f;
      for (int t = 0; t < T; t++) {
        uint8_t* bpt = bp + (size_t)t * UM;
        switch (ks[t] * 16 + L) {
#define TCQ_CASE(K, LL) case K * 16 + LL: tcq_step(K, LL, c0, c1, m, bi, bpt, lut, xn[t], wn[t]); break;
          TCQ_CASE(1, 8) TCQ_CASE(2, 8) TCQ_CASE(3, 8) TCQ_CASE(4, 8)
          TCQ_CASE(1, 10) TCQ_CASE(2, 10) TCQ_CASE(3, 10) TCQ_CASE(4, 10)
          default: break;
        }
        float* tmp = c0; c0 = c1; c1 = tmp;
      }
      int s = 0;
      for (int q = 1; q < S; q++) if (c0[q] < c0[s]) s = q;
      cost[n] = c0[s];
      for (int t = T - 1; t >= 0; t--) {
        const int k = ks[t];
        out[(size_t)n * T + t] = (uint8_t)(s & ((1 << k) - 1));
        vals[(size_t)n * T + t] = lut[s];
        const int u = s >> k;
        s = ((int)bp[(size_t)t * UM + u] << (L - k)) | u;
      }
    }
    free(c0); free(c1); free(m); free(bi); free(bp);
  }
  return 0;
}

#pragma GCC pop_options

static inline uint32_t tcq_sym(const uint8_t* bytes, size_t n, int wbits) {
  const size_t bit = n * (size_t)wbits;
  const uint32_t v = (uint32_t)bytes[bit >> 3] | ((uint32_t)bytes[(bit >> 3) + 1] << 8);
  return (v >> (bit & 7)) & ((1u << wbits) - 1u);
}

/* W [R, C] = scale * lut[state], every column walked down from state 0 */
void tcq_decode(const uint8_t* stream, const float* scale, const float* lut, float* W, int R, int C, int P, int wbits,
                int k1, int L, int glen) {
  const int NS = R / P, G = C / glen;
  const uint32_t mask = (1u << L) - 1u;
  #pragma omp parallel for schedule(static)
  for (int j = 0; j < C; j++) {
    const size_t base = (size_t)j * NS;
    const int g = j / glen;
    uint32_t s = 0;
    for (int i = 0; i < NS; i++) {
      const uint32_t sym = tcq_sym(stream, base + i, wbits);
      const int r = i * P;
      if (P == 2) {
        const uint32_t s1 = ((s << (wbits - k1)) | (sym >> k1)) & mask;
        W[(size_t)r * C + j] = lut[s1] * scale[(size_t)r * G + g];
      }
      s = ((s << wbits) | sym) & mask;
      W[(size_t)(r + P - 1) * C + j] = lut[s] * scale[(size_t)(r + P - 1) * G + g];
    }
  }
}

/* x [M, C]; stream: column-major symbols of wbits (P rows each; k0 = the first row's bits when P = 2), LSB-first,
   padded by >= 1 byte; scale [R, G] (group of glen columns); lut [2^L]; y [M, R] */
void tcq_gemv(const float* x, const uint8_t* stream, const float* scale, const float* lut, float* y,
              int M, int R, int C, int P, int wbits, int k1, int L, int glen) {
  const int NS = R / P, G = C / glen, RB = 64;
  const uint32_t mask = (1u << L) - 1u;
  const int back = (L + wbits - 1) / wbits;
  const int nblk = (NS + RB - 1) / RB;
  #pragma omp parallel
  {
    float acc[8 * 128];
    float tot[8 * 128];
    #pragma omp for schedule(static)
    for (int blk = 0; blk < nblk; blk++) {
      const int i0 = blk * RB, i1 = i0 + RB < NS ? i0 + RB : NS, rows = (i1 - i0) * P;
      for (int m0 = 0; m0 < M; m0 += 8) {
        const int mm = M - m0 < 8 ? M - m0 : 8;
        for (int q = 0; q < mm * rows; q++) tot[q] = 0.0f;
        for (int g = 0; g < G; g++) {
          for (int q = 0; q < mm * rows; q++) acc[q] = 0.0f;
          for (int j = g * glen; j < (g + 1) * glen; j++) {
            const size_t base = (size_t)j * NS;
            uint32_t s = 0;
            for (int i = i0 - back < 0 ? 0 : i0 - back; i < i0; i++) s = ((s << wbits) | tcq_sym(stream, base + i, wbits)) & mask;
            float xv[8];
            for (int a = 0; a < mm; a++) xv[a] = x[(size_t)(m0 + a) * C + j];
            for (int i = i0; i < i1; i++) {
              const uint32_t sym = tcq_sym(stream, base + i, wbits);
              const int r = (i - i0) * P;
              if (P == 2) {
                const uint32_t s1 = ((s << (wbits - k1)) | (sym >> k1)) & mask;
                const float v1 = lut[s1];
                for (int a = 0; a < mm; a++) acc[a * rows + r] += xv[a] * v1;
              }
              s = ((s << wbits) | sym) & mask;
              const float v = lut[s];
              for (int a = 0; a < mm; a++) acc[a * rows + r + P - 1] += xv[a] * v;
            }
          }
          for (int a = 0; a < mm; a++)
            for (int r = 0; r < rows; r++) tot[a * rows + r] += acc[a * rows + r] * scale[(size_t)(i0 * P + r) * G + g];
        }
        for (int a = 0; a < mm; a++)
          for (int r = 0; r < rows; r++) y[(size_t)(m0 + a) * R + i0 * P + r] = tot[a * rows + r];
      }
    }
  }
}
"""


@lru_cache(maxsize=1)
def _lib():
    lib = load("tcq_cpu", SOURCE, "trellis layers search and decode in torch (slow)")
    if lib is None:
        return None
    lib.tcq_viterbi.restype = ctypes.c_int
    lib.tcq_viterbi.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 2 + [ctypes.c_void_p, ctypes.c_int] + \
        [ctypes.c_void_p] * 3
    lib.tcq_decode.restype = None
    lib.tcq_decode.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 7
    lib.tcq_gemv.restype = None
    lib.tcq_gemv.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 8
    return lib


def available() -> bool:
    try:
        return _lib() is not None
    except OSError:
        return False


def viterbi(x: torch.Tensor, w: torch.Tensor, ks: torch.Tensor, lut: torch.Tensor, L: int):
    """``(bits uint8 [N, T], values float32 [N, T], cost float32 [N])`` from the native search (``values``: the
    table entry each step decodes to), or None when it is not available."""
    lib = _lib()
    if lib is None:
        return None
    x, w = x.detach().float().contiguous(), w.detach().float().contiguous()
    ks, lut = ks.to(torch.uint8).contiguous(), lut.float().contiguous()
    N, T = x.shape
    out = torch.empty(N, T, dtype=torch.uint8)
    vals = torch.empty(N, T, dtype=torch.float32)
    cost = torch.empty(N, dtype=torch.float32)
    rc = lib.tcq_viterbi(x.data_ptr(), w.data_ptr(), ks.data_ptr(), N, T, lut.data_ptr(), L, out.data_ptr(),
                         vals.data_ptr(), cost.data_ptr())
    if rc:
        raise ValueError(f"tcq_viterbi: unsupported trellis (L={L}, step bits {sorted(set(ks.tolist()))}): "
                         "L must be 8 or 10 and every step 1..4 bits")
    return out, vals, cost


def gemv(x: torch.Tensor, stream: torch.Tensor, scale: torch.Tensor, lut: torch.Tensor, R: int, P: int,
         wbits: int, k1: int, L: int, glen: int) -> torch.Tensor:
    """``y [M, R]`` float32 for ``x [M, C]`` from a column-major symbol ``stream`` (uint8, padded by a byte)."""
    lib = _lib()
    if lib is None:
        raise RuntimeError("the tcq-cpu kernel is not available (no working C compiler)")
    x = x.detach().float().contiguous()
    M, C = x.shape
    scale, lut = scale.float().contiguous(), lut.float().contiguous()
    if R % P or C % glen or scale.shape != (R, C // glen) or stream.numel() * 8 < (R // P) * C * wbits + 8:
        raise ValueError(f"tcq gemv: stream {stream.numel()} bytes, scale {tuple(scale.shape)} do not fit "
                         f"[{R}, {C}] at {wbits} bits per {P} rows")
    y = torch.empty(M, R, dtype=torch.float32)
    lib.tcq_gemv(x.data_ptr(), stream.contiguous().data_ptr(), scale.data_ptr(), lut.data_ptr(), y.data_ptr(),
                 M, R, C, P, wbits, k1, L, glen)
    return y


def decode(stream: torch.Tensor, scale: torch.Tensor, lut: torch.Tensor, R: int, C: int, P: int, wbits: int, k1: int,
           L: int, glen: int) -> torch.Tensor | None:
    """``Ŵ [R, C]`` float32 from a padded column-major symbol ``stream``, or None without the kernel."""
    lib = _lib()
    if lib is None:
        return None
    scale, lut = scale.float().contiguous(), lut.float().contiguous()
    if R % P or C % glen or scale.shape != (R, C // glen) or stream.numel() * 8 < (R // P) * C * wbits + 8:
        raise ValueError(f"tcq decode: stream {stream.numel()} bytes, scale {tuple(scale.shape)} do not fit "
                         f"[{R}, {C}] at {wbits} bits per {P} rows")
    W = torch.empty(R, C, dtype=torch.float32)
    lib.tcq_decode(stream.contiguous().data_ptr(), scale.data_ptr(), lut.data_ptr(), W.data_ptr(), R, C, P, wbits,
                   k1, L, glen)
    return W
