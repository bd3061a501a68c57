"""Native CPU kernel of a Kronecker-structured orthogonal transform: ``Q x`` for ``Q = (F₁ ⊗ … ⊗ F_k) diag(s)``.

What ``+ip`` layers apply to their input and output at every call
(:func:`mixq.algorithms.composite.incoherence.rotate`), with the factors of
:func:`mixq.hadamard.random_orthogonal_factors`: a Sylvester factor (a power of two) runs
as in-place fast Walsh–Hadamard butterflies, ``m log₂ m`` additions for ``m`` elements, scaled once at the end;
any other factor (a Paley order such as 36 or 12) as a small dense product along its axis, vectorised over the
axes after it.  A 576-vector (36 · 16) costs ~22 k multiply-adds instead of the 332 k of the dense ``Q``, a
1536-vector (12 · 128) ~29 k instead of 2.4 M -- and reads a few kB of factors instead of the dense ``Q``'s
MB, which is what a decode step paid for in memory traffic (twice the weights' own bytes for a model whose
every layer is ``+ip``).

With AVX2 the dense product runs four output rows by eight columns in registers and the first three butterfly
stages of a last-axis Sylvester factor run in-register (576: 2.5 µs a row at decode, from 8.3; 1536: 3.1 from
6.5, one thread, the ctypes call included).  Rows of ``x`` are independent: up to 15 run on the calling thread
with a stack buffer, more are split over OpenMP threads.  Compiled on first use
(:func:`mixq.runtime.kernels.cbuild.load`); :func:`available` is False without a working compiler and the caller
keeps its torch path.
"""
from __future__ import annotations

import ctypes
from functools import lru_cache

import torch

from .cbuild import BF16_C, INT, VOID_P, load

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

/* One factor on axis [pre, m, post] of a row: y[p, a, q] = sum_b F[a, b] x[p, b, q] (F row-major m x m).
   With AVX2: four output rows a at a time over eight columns q, four independent accumulator registers per
   loaded x chunk (so the multiply-adds are not bound by one chain's latency); other columns scalar. */
static void dense_axis(float* restrict x, float* restrict w, const float* restrict F, int m, int pre, int post) {
  const int blk = m * post;
#if defined(__AVX2__) && defined(__FMA__)
  const int q8 = post & ~7, a4 = m & ~3;
#else
  const int q8 = 0, a4 = 0;
#endif
  for (int p = 0; p < pre; p++) {
    float* xp = x + (size_t)p * blk;
#if defined(__AVX2__) && defined(__FMA__)
    for (int q0 = 0; q0 < q8; q0 += 8) {
      for (int a = 0; a < a4; a += 4) {
        const float* F0 = F + (size_t)a * m;
        __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
        for (int b = 0; b < m; b++) {
          const __m256 xv = _mm256_loadu_ps(xp + (size_t)b * post + q0);
          c0 = _mm256_fmadd_ps(_mm256_set1_ps(F0[b]), xv, c0);
          c1 = _mm256_fmadd_ps(_mm256_set1_ps(F0[m + b]), xv, c1);
          c2 = _mm256_fmadd_ps(_mm256_set1_ps(F0[2 * m + b]), xv, c2);
          c3 = _mm256_fmadd_ps(_mm256_set1_ps(F0[3 * m + b]), xv, c3);
        }
        float* wa = w + (size_t)a * post + q0;
        _mm256_storeu_ps(wa, c0);
        _mm256_storeu_ps(wa + post, c1);
        _mm256_storeu_ps(wa + 2 * post, c2);
        _mm256_storeu_ps(wa + 3 * post, c3);
      }
      for (int a = a4; a < m; a++) {
        const float* Fa = F + (size_t)a * m;
        __m256 c = _mm256_setzero_ps();
        for (int b = 0; b < m; b++)
          c = _mm256_fmadd_ps(_mm256_set1_ps(Fa[b]), _mm256_loadu_ps(xp + (size_t)b * post + q0), c);
        _mm256_storeu_ps(w + (size_t)a * post + q0, c);
      }
    }
#endif
    if (q8 < post)  /* the columns past the last multiple of eight (all of them without AVX2) */
      for (int a = 0; a < m; a++) {
        float* wa = w + (size_t)a * post;
        for (int q = q8; q < post; q++) wa[q] = 0.f;
        for (int b = 0; b < m; b++) {
          const float f = F[(size_t)a * m + b];
          const float* xb = xp + (size_t)b * post;
          for (int q = q8; q < post; q++) wa[q] += f * xb[q];
        }
      }
    memcpy(xp, w, sizeof(float) * blk);
  }
}

/* Sylvester factor of order m (a power of two), unnormalised: in-place butterflies on axis [pre, m, post]. */
static void fwht_axis(float* x, int m, int pre, int post) {
  if (post == 1) {  /* the last axis: pairs j, j + h are contiguous runs (vectorised for h >= 8) */
    for (int p = 0; p < pre; p++) {
      float* xp = x + (size_t)p * m;
      int h0 = 1;
#if defined(__AVX2__) && defined(__FMA__)
      if (m >= 8) {  /* the stages h = 1, 2, 4 inside each run of eight, in registers */
        const __m256 s1 = _mm256_setr_ps(1, -1, 1, -1, 1, -1, 1, -1), s2 = _mm256_setr_ps(1, 1, -1, -1, 1, 1, -1, -1),
                     s4 = _mm256_setr_ps(1, 1, 1, 1, -1, -1, -1, -1);
        for (int i = 0; i < m; i += 8) {
          __m256 v = _mm256_loadu_ps(xp + i);
          v = _mm256_fmadd_ps(v, s1, _mm256_permute_ps(v, 0xB1));
          v = _mm256_fmadd_ps(v, s2, _mm256_permute_ps(v, 0x4E));
          v = _mm256_fmadd_ps(v, s4, _mm256_permute2f128_ps(v, v, 0x01));
          _mm256_storeu_ps(xp + i, v);
        }
        h0 = 8;
      }
#endif
      if (h0 == 1)
        for (int i = 0; i < m; i += 2) { const float a = xp[i], b = xp[i + 1]; xp[i] = a + b; xp[i + 1] = a - b; }
      for (int h = h0 == 1 ? 2 : h0; h < m; h <<= 1)
        for (int i = 0; i < m; i += 2 * h) {
          float* restrict u = xp + i;
          float* restrict v = xp + i + h;
          for (int j = 0; j < h; j++) { const float a = u[j], b = v[j]; u[j] = a + b; v[j] = a - b; }
        }
    }
    return;
  }
  for (int p = 0; p < pre; p++) {
    float* xp = x + (size_t)p * m * post;
    for (int h = 1; h < m; h <<= 1)
      for (int i = 0; i < m; i += 2 * h)
        for (int j = i; j < i + h; j++) {
          float* restrict u = xp + (size_t)j * post;
          float* restrict v = xp + (size_t)(j + h) * post;
          for (int q = 0; q < post; q++) { const float a = u[q], b = v[q]; u[q] = a + b; v[q] = a - b; }
        }
  }
}


/* One row r of in transformed into out (w: 2n floats of scratch); see kron_rows. */
static void one_row(const void* in, void* out, int r, int n, int nf, const int* orders, const int* kind,
                    const float* mats, const float* signs, float scale, int after, int bf16, float* w) {
  float* xr = bf16 ? w + n : (float*)out + (size_t)r * n;
  if (bf16) {
    const uint16_t* ir = (const uint16_t*)in + (size_t)r * n;
    for (int i = 0; i < n; i++) xr[i] = bf2f(ir[i]);
  } else memmove(xr, (const float*)in + (size_t)r * n, sizeof(float) * (size_t)n);
  if (!after) for (int i = 0; i < n; i++) xr[i] *= signs[i] * scale;
  const float* F = mats;
  int pre = 1;
  for (int f = 0; f < nf; f++) {
    const int m = orders[f], post = n / (pre * m);
    if (kind[f]) fwht_axis(xr, m, pre, post);
    else { dense_axis(xr, w, F, m, pre, post); F += (size_t)m * m; }
    pre *= m;
  }
  if (after) for (int i = 0; i < n; i++) xr[i] *= signs[i] * scale;
  if (bf16) {
    uint16_t* o = (uint16_t*)out + (size_t)r * n;
    for (int i = 0; i < n; i++) o[i] = f2bf(xr[i]);
  }
}

/* out [M, n] <- each row of in [M, n] transformed: (F_1 (x) ... (x) F_k) diag(s) row (after == 0) or
   diag(s) (F_1 (x) ... ) row (after == 1, the transpose when the mats are passed transposed).  orders[i]: m_i;
   kind[i]: 1 Sylvester (butterflies), 0 dense (its m_i^2 floats next in mats); scale: the product of 1/sqrt(m_i)
   of the Sylvester factors, applied with the signs.  bf16: in and out hold bfloat16 (computed in float32).
   A few rows (decode) run on the calling thread with a stack buffer: no thread team, no allocation. */
int kron_rows(const void* in, void* out, int M, int n, int nf, const int* orders, const int* kind,
              const float* mats, const float* signs, float scale, int after, int bf16) {
  int prod = 1;
  for (int i = 0; i < nf; i++) prod *= orders[i];
  if (prod != n || nf < 1 || nf > 8) return 1;
  if (M < 16 && n <= 8192) {
    float w[2 * 8192];
    for (int r = 0; r < M; r++) one_row(in, out, r, n, nf, orders, kind, mats, signs, scale, after, bf16, w);
    return 0;
  }
  int fail = 0;
  #pragma omp parallel
  {
    float* w = (float*)malloc(sizeof(float) * 2 * (size_t)n);
    if (!w) {
      #pragma omp atomic write
      fail = 2;
    }
    #pragma omp for schedule(static)
    for (int r = 0; r < M; r++)
      if (w) one_row(in, out, r, n, nf, orders, kind, mats, signs, scale, after, bf16, w);
    free(w);
  }
  return fail;
}

/* One transform's fixed arguments, so that a call passes five (the per-call cost of a decode step's ~400 calls). */
typedef struct { int n, nf, after; float scale; const int* orders; const int* kind; const float* mats;
                 const float* signs; } kron_plan;

int kron_apply(const kron_plan* p, const void* in, void* out, int M, int bf16) {
  return kron_rows(in, out, M, p->n, p->nf, p->orders, p->kind, p->mats, p->signs, p->scale, p->after, bf16);
}
"""


class _Plan(ctypes.Structure):
    _fields_ = [("n", ctypes.c_int), ("nf", ctypes.c_int), ("after", ctypes.c_int), ("scale", ctypes.c_float),
                ("orders", VOID_P), ("kind", VOID_P), ("mats", VOID_P), ("signs", VOID_P)]


@lru_cache(maxsize=1)
def _lib():
    return load("kron_cpu", BF16_C + SOURCE, "+ip transforms run per factor in torch", {
        "kron_apply": (ctypes.c_int, [VOID_P, VOID_P, VOID_P, INT, INT])})


def available() -> bool:
    return _lib() is not None


class KronPlan:
    """The factors of one ``Q`` laid out for the kernel: ``factors`` (orthonormal, float), ``signs`` (±1)."""

    def __init__(self, factors, signs: torch.Tensor, *, transpose: bool):
        orders, kinds, mats, scale = [], [], [], 1.0
        for f in factors:
            m = f.shape[0]
            orders.append(m)
            sylvester = m & (m - 1) == 0 and _is_sylvester(f)
            kinds.append(int(sylvester))
            if sylvester:
                scale /= m ** 0.5
            else:
                mats.append((f.T if transpose else f).reshape(-1))
        self.n = int(torch.tensor(orders).prod())
        self.orders = torch.tensor(orders, dtype=torch.int32)
        self.kinds = torch.tensor(kinds, dtype=torch.int32)
        self.mats = (torch.cat(mats) if mats else torch.zeros(1)).to(torch.float32).contiguous()
        self.signs = signs.to(torch.float32).contiguous()
        self.scale = scale
        self.after = int(transpose)
        self._plan = _Plan(self.n, len(orders), self.after, scale, self.orders.data_ptr(), self.kinds.data_ptr(),
                           self.mats.data_ptr(), self.signs.data_ptr())
        self._addr = ctypes.addressof(self._plan)
        self._apply = _lib().kron_apply

    @property
    def address(self) -> int:
        """Where this plan's ``kron_plan`` lies (for native callers of :attr:`function`; valid while this object
        lives)."""
        return self._addr

    @property
    def function(self) -> int:
        """The address of ``kron_apply(plan, in, out, M, bf16)`` (returns nonzero on failure), for native
        callers."""
        return ctypes.cast(self._apply, ctypes.c_void_p).value

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The rows of the float32 or bfloat16 CPU ``x [..., n]`` transformed, as a new tensor of ``x``'s shape and
        dtype (bfloat16 rows are computed in float32 and rounded once, as ``rotate(x.float()).bfloat16()``)."""
        if x.dtype not in (torch.float32, torch.bfloat16) or x.shape[-1] != self.n:
            raise ValueError(f"kron_rows needs float32 or bfloat16 [..., {self.n}] rows, got {x.dtype} "
                             f"{tuple(x.shape)}")
        x = x.contiguous()
        y = torch.empty_like(x)
        rc = self._apply(self._addr, x.data_ptr(), y.data_ptr(), x.numel() // self.n, x.dtype == torch.bfloat16)
        if rc:
            raise RuntimeError(f"kron_rows failed ({rc}): orders {self.orders.tolist()}, n {self.n}")
        return y


def _is_sylvester(f: torch.Tensor) -> bool:
    """Whether the orthonormal factor ``f`` is the normalised Sylvester matrix of its order (butterflies apply)."""
    from ...hadamard import sylvester

    m = f.shape[0]
    return bool(torch.allclose(f.double() * m ** 0.5, sylvester(m), atol=1e-6))
