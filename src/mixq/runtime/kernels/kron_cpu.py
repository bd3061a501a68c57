"""Native CPU kernel of a Kronecker-structured orthogonal transform: ``Q x`` for ``Q = (F₁ ⊗ … ⊗ F_k) diag(s)``.

What ``+ip`` layers apply to their input and output at every call (:func:`mixq.intra.incoherence.rotate`), with
the factors of :func:`mixq.algorithms.hadamard.random_orthogonal_factors`: a Sylvester factor (a power of two) runs
as in-place fast Walsh–Hadamard butterflies, ``m log₂ m`` additions for ``m`` elements, scaled once at the end;
any other factor (a Paley order such as 36 or 12) as a small dense product along its axis, vectorised over the
axes after it.  A 576-vector (36 · 16) costs ~22 k multiply-adds instead of the 332 k of the dense ``Q``, a
1536-vector (12 · 128) ~29 k instead of 2.4 M -- and reads a few kB of factors instead of the dense ``Q``'s
MB, which is what a decode step paid for in memory traffic (twice the weights' own bytes for a model whose
every layer is ``+ip``).

Rows of ``x`` are independent (split over OpenMP threads when there are many).  Compiled on first use
(:func:`mixq.runtime.kernels.cbuild.load`); :func:`available` is False without a working compiler and the caller
keeps its torch path.
"""
from __future__ import annotations

import ctypes
from functools import lru_cache

import torch

from .cbuild import INT, VOID_P, load

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* One factor on axis [pre, m, post] of a row: y[p, a, q] = sum_b F[a, b] x[p, b, q] (F row-major m x m). */
static void dense_axis(float* restrict x, float* restrict w, const float* restrict F, int m, int pre, int post) {
  const int blk = m * post;
  for (int p = 0; p < pre; p++) {
    float* xp = x + (size_t)p * blk;
    memset(w, 0, sizeof(float) * blk);
    for (int a = 0; a < m; a++) {
      float* wa = w + (size_t)a * post;
      const float* Fa = F + (size_t)a * m;
      for (int b = 0; b < m; b++) {
        const float f = Fa[b];
        const float* xb = xp + (size_t)b * post;
        for (int q = 0; q < post; q++) wa[q] += f * xb[q];
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
      for (int i = 0; i < m; i += 2) { const float a = xp[i], b = xp[i + 1]; xp[i] = a + b; xp[i + 1] = a - b; }
      for (int h = 2; h < m; h <<= 1)
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

static inline float bf2f(uint16_t h) { const uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f2bf(float f) {  /* round to nearest even, as torch's bfloat16 conversion */
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays a (quiet) NaN */
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

/* out [M, n] <- each row of in [M, n] transformed: (F_1 (x) ... (x) F_k) diag(s) row (after == 0) or
   diag(s) (F_1 (x) ... ) row (after == 1, the transpose when the mats are passed transposed).  orders[i]: m_i;
   kind[i]: 1 Sylvester (butterflies), 0 dense (its m_i^2 floats next in mats); scale: the product of 1/sqrt(m_i)
   of the Sylvester factors, applied with the signs.  bf16: in and out hold bfloat16 (computed in float32). */
int kron_rows(const void* in, void* out, int M, int n, int nf, const int* orders, const int* kind,
              const float* mats, const float* signs, float scale, int after, int bf16) {
  int prod = 1;
  for (int i = 0; i < nf; i++) prod *= orders[i];
  if (prod != n || nf < 1 || nf > 8) return 1;
  int fail = 0;
  #pragma omp parallel if (M >= 16)
  {
    float* w = (float*)malloc(sizeof(float) * 2 * (size_t)n);
    if (!w) {
      #pragma omp atomic write
      fail = 2;
    }
    #pragma omp for schedule(static)
    for (int r = 0; r < M; r++) {
      if (!w) continue;
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
    return load("kron_cpu", SOURCE, "+ip transforms run per factor in torch", {
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
        self.butterflies_only = all(kinds)
        self._plan = _Plan(self.n, len(orders), self.after, scale, self.orders.data_ptr(), self.kinds.data_ptr(),
                           self.mats.data_ptr(), self.signs.data_ptr())
        self._addr = ctypes.addressof(self._plan)
        self._apply = _lib().kron_apply

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
    from ...algorithms.hadamard import sylvester

    m = f.shape[0]
    return bool(torch.allclose(f.double() * m ** 0.5, sylvester(m), atol=1e-6))
