"""The C source of the trellis kernels of :mod:`mixq.runtime.kernels.tcq_cpu`: the Viterbi search and the decode
(the decode-and-dot GEMV is :mod:`mixq.runtime.kernels.tcq_gemv_csrc`).  Both texts, joined, are what
:func:`mixq.runtime.kernels.cbuild.load` compiles and part of the compiled library's cache key, so any edit here
rebuilds it."""

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <stddef.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif
/* the search alone is built with fast-math (a vectorized min; its result is the bits, which decode exactly whatever
   the search's rounding) */
#pragma GCC push_options
#pragma GCC optimize ("fast-math")
/* min and argmin at once: a cost is >= 0, so its float bits order as integers; the low mantissa bits carry h (4 of
   them for steps of up to 4 bits, 6 above) */
static inline __attribute__((always_inline)) void tcq_step(const int k, const int L, const int32_t* restrict c0,
    float* restrict c1, int32_t* restrict mi, float* restrict m, uint8_t* restrict bpt, const float* restrict lut,
    const float xt, const float wt) {
  const int S = 1 << L, U = S >> k, B = 1 << k, sh = L - k;
  const int32_t hm = k <= 4 ? 15 : 63;
  for (int u = 0; u < U; u++) mi[u] = c0[u] & ~hm;
  for (int h = 1; h < B; h++) {
    const int32_t* ch = c0 + ((size_t)h << sh);
    for (int u = 0; u < U; u++) { const int32_t v = (ch[u] & ~hm) | h; mi[u] = v < mi[u] ? v : mi[u]; }
  }
  for (int u = 0; u < U; u++) { bpt[u] = (uint8_t)(mi[u] & hm); mi[u] &= ~hm; }
  memcpy(m, mi, sizeof(float) * U);
#ifdef __AVX2__
  /* c1[s] = m[s >> k] + wt (xt - lut[s])^2, eight states a vector: the states of one vector share 8 >> k
     predecessors' minima (k < 3: spread by a permute), or one (k >= 3: a broadcast) */
  const __m256 vx = _mm256_set1_ps(xt), vw = _mm256_set1_ps(wt);
  if (k >= 3) {
    for (int u = 0; u < U; u++) {
      const __m256 mu = _mm256_set1_ps(m[u]);
      for (int b = 0; b < B; b += 8) {
        const __m256 d = _mm256_sub_ps(vx, _mm256_loadu_ps(lut + ((size_t)u << k) + b));
        _mm256_storeu_ps(c1 + ((size_t)u << k) + b, _mm256_fmadd_ps(_mm256_mul_ps(vw, d), d, mu));
      }
    }
  } else {
    const __m256i idx = _mm256_srli_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), k);
    const int per = 8 >> k;
    for (int s = 0, u = 0; s < S; s += 8, u += per) {
      const __m256 mm = _mm256_permutevar8x32_ps(_mm256_loadu_ps(m + u), idx);
      const __m256 d = _mm256_sub_ps(vx, _mm256_loadu_ps(lut + s));
      _mm256_storeu_ps(c1 + s, _mm256_fmadd_ps(_mm256_mul_ps(vw, d), d, mm));
    }
  }
#else
  for (int u = 0; u < U; u++) {
    const float mu = m[u];
    const float* lu = lut + ((size_t)u << k);
    float* cu = c1 + ((size_t)u << k);
    for (int b = 0; b < B; b++) { const float d = xt - lu[b]; cu[b] = mu + wt * d * d; }
  }
#endif
}

/* one sequence of T targets: its least-cost bits, the table values they decode to, its cost; buffers of S, S, UM,
   UM + 8 and T * UM entries (kept out of line: the fast-math region's code is not inlined into plain callers) */
static __attribute__((noinline)) void tcq_search_one(const float* xn, const float* wn, const uint8_t* ks, int T,
    const float* lut, int L, int UM, float* c0, float* c1, int32_t* mi, float* m, uint8_t* bp, uint8_t* out,
    float* vals, float* cost) {
  const int S = 1 << L;
  for (int s = 0; s < S; s++) c0[s] = 1e30f;
  c0[0] = 0.0f;
  for (int t = 0; t < T; t++) {
    uint8_t* bpt = bp + (size_t)t * UM;
    switch (ks[t] * 16 + L) {
#define TCQ_CASE(K, LL) case K * 16 + LL: tcq_step(K, LL, (const int32_t*)c0, c1, mi, m, bpt, lut, xn[t], wn[t]); break;
      TCQ_CASE(1, 8) TCQ_CASE(2, 8) TCQ_CASE(3, 8) TCQ_CASE(4, 8) TCQ_CASE(5, 8) TCQ_CASE(6, 8)
      TCQ_CASE(1, 10) TCQ_CASE(2, 10) TCQ_CASE(3, 10) TCQ_CASE(4, 10) TCQ_CASE(5, 10) TCQ_CASE(6, 10)
      TCQ_CASE(1, 12) TCQ_CASE(2, 12) TCQ_CASE(3, 12) TCQ_CASE(4, 12) TCQ_CASE(5, 12) TCQ_CASE(6, 12)
      default: break;
    }
    float* tmp = c0; c0 = c1; c1 = tmp;
  }
  int s = 0;
  for (int q = 1; q < S; q++) if (c0[q] < c0[s]) s = q;
  *cost = c0[s];
  for (int t = T - 1; t >= 0; t--) {
    const int k = ks[t];
    out[t] = (uint8_t)(s & ((1 << k) - 1));
    vals[t] = lut[s];
    const int u = s >> k;
    s = ((int)bp[(size_t)t * UM + u] << (L - k)) | u;
  }
}

/* the smallest step of a schedule (its back-pointer rows' length is 2^L >> it), or -1: a step outside 1..6 bits or
   not below L, or L not 8, 10 or 12 */
static int tcq_kmin(const uint8_t* ks, int T, int L) {
  int kmin = 8;
  for (int t = 0; t < T; t++) { if (ks[t] < 1 || ks[t] > 6 || ks[t] >= L) return -1; if (ks[t] < kmin) kmin = ks[t]; }
  return (L != 8 && L != 10 && L != 12) ? -1 : kmin;
}

int tcq_viterbi(const float* x, const float* w, const uint8_t* ks, int N, int T, const float* lut, int L,
                uint8_t* out, float* vals, float* cost) {
  const int kmin = tcq_kmin(ks, T, L);
  if (kmin < 0) return 1;
  const int S = 1 << L, UM = S >> kmin;
  #pragma omp parallel
  {
    float* c0 = (float*)malloc(sizeof(float) * S);
    float* c1 = (float*)malloc(sizeof(float) * S);
    int32_t* mi = (int32_t*)malloc(sizeof(int32_t) * UM);
    float* m = (float*)malloc(sizeof(float) * (UM + 8));  /* + 8: the AVX2 step reads a whole vector of minima */
    uint8_t* bp = (uint8_t*)malloc((size_t)T * UM);
    #pragma omp for schedule(dynamic)
    for (int n = 0; n < N; n++)
      tcq_search_one(x + (size_t)n * T, w + (size_t)n * T, ks, T, lut, L, UM, c0, c1, mi, m, bp,
                     out + (size_t)n * T, vals + (size_t)n * T, cost + n);
    free(c0); free(c1); free(mi); free(m); free(bp);
  }
  return 0;
}
#pragma GCC pop_options

/* GPTQ's sweep over columns ja..jb-1 of one block of nb columns, each of R rows (mixq.algorithms.sweep.sweep_runs):
   Wt [nb, R] the block's current columns (updated in place), U its rows of the inverse Hessian's upper Cholesky factor
   (U[j * ldu + c]: column c of block row j), s / ws the row scales and search weights of these columns' group.  Each
   column's targets w[r] / s[r] are searched (tcq_search_one, as tcq_viterbi does), its bits and table values go to
   bits / vals [nb, R], q = lut[state] * s, and sweep_feed (mixq.runtime.kernels.sweep_csrc, put before this text)
   feeds its error forward */
int tcq_sweep(float* Wt, float* Et, const float* U, int ldu, int nb, int ja, int jb, int R, const float* s,
              const float* ws, const uint8_t* ks, const float* lut, int L, uint8_t* bits, float* vals) {
  const int kmin = tcq_kmin(ks, R, L);
  if (kmin < 0) return 1;
  const int S = 1 << L, UM = S >> kmin;
  float* x = (float*)malloc(sizeof(float) * ((size_t)2 * S + UM + 8 + 2 * (size_t)R));
  int32_t* mi = (int32_t*)malloc(sizeof(int32_t) * UM);
  uint8_t* bp = (uint8_t*)malloc((size_t)R * UM);
  float* q = x + R;
  float* c0 = q + R;
  float* c1 = c0 + S;
  float* m = c1 + S;
  float cost;
  for (int j = ja; j < jb; j++) {
    const float* w = Wt + (size_t)j * R;
    for (int r = 0; r < R; r++) x[r] = w[r] / s[r];
    float* v = vals + (size_t)j * R;
    tcq_search_one(x, ws, ks, R, lut, L, UM, c0, c1, mi, m, bp, bits + (size_t)j * R, v, &cost);
    for (int r = 0; r < R; r++) q[r] = v[r] * s[r];
    sweep_feed(Wt, Et, U, ldu, nb, j, R, q);
  }
  free(x); free(mi); free(bp);
  return 0;
}


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
"""
