"""The C source of the AVX2 kernels of the trellis layers' interleaved layout (``tcq_words`` in
:mod:`mixq.runtime.kernels.tcq_words_csrc`), for CPUs without AVX-512: each group of 16 columns is two eight-lane
halves, so the layout is the AVX-512 kernels' own.  A 32-byte load refills eight lanes' symbols (the byte stream's
AVX2 GEMV gathers them); a pass walks 32 columns (four eight-lane state chains) down the rows, each row's four table
gathers summed in registers before one update of that row's slot of ``A [MT][R][8]``; up to four tokens share each
gather (two halves a pass from three tokens on, as sixteen registers hold no more).  Compiled where the CPU has
AVX2 and not AVX-512, after :mod:`mixq.runtime.kernels.tcq_words_csrc`'s text."""

SOURCE = r"""
#if defined(__AVX2__) && !defined(__AVX512F__)
/* The bitshift trellis on 8 lanes: the state after a symbol y, and (half rates) the state the symbol's first k1
   bits end the row before on */
static inline __attribute__((always_inline)) __m256i tcq_next8(__m256i s, __m256i y, __m128i cw, __m256i smask) {
  return _mm256_and_si256(_mm256_or_si256(_mm256_sll_epi32(s, cw), y), smask);
}
static inline __attribute__((always_inline)) __m256i tcq_mid8(__m256i s, __m256i y, __m128i cwk, __m128i ck1,
                                                              __m256i smask) {
  return _mm256_and_si256(_mm256_or_si256(_mm256_sll_epi32(s, cwk), _mm256_srl_epi32(y, ck1)), smask);
}

#define TCQ_NV8 4
/* One pass: NV eight-column halves from group g0 on (half v: group g0 + v / 2, columns 8 (v % 2) ..), MT tokens
   (rows of x, stride C) sharing every table gather; each row's sums per token added to A [MT][R][8]. */
static inline __attribute__((always_inline)) void tcq_pass8(const int NV, const int MT, const float* x, int C,
    const uint32_t* words, const float* lut, float* A, int R, int NS, int NW, int P, int wbits, int k1, int L, int g0,
    const int first) {
  const int K = 32 / wbits;
  const __m256i smask = _mm256_set1_epi32((1 << L) - 1), wmask = _mm256_set1_epi32((1 << wbits) - 1);
  const __m128i cw = _mm_cvtsi32_si128(wbits), ck1 = _mm_cvtsi32_si128(k1), cwk = _mm_cvtsi32_si128(wbits - k1);
  __m256 xv[TCQ_MT4][TCQ_NV8];
  __m256i s[TCQ_NV8], b[TCQ_NV8];
  for (int a = 0; a < MT; a++)
    for (int v = 0; v < NV; v++) xv[a][v] = _mm256_loadu_ps(x + (size_t)a * C + 8 * v);
  for (int v = 0; v < NV; v++) s[v] = _mm256_setzero_si256();
  for (int k = 0; k < NW; k++) {
    for (int v = 0; v < NV; v++)
      b[v] = _mm256_loadu_si256((const __m256i*)(words + ((size_t)(g0 + v / 2) * NW + k) * 16 + 8 * (v & 1)));
    const int iend = (k + 1) * K < NS ? (k + 1) * K : NS;
    for (int i = k * K; i < iend; i++) {
      __m256 acc[TCQ_MT4];
      if (P == 2) {  /* a half rate: the symbol's first k1 bits end the row before */
        for (int a = 0; a < MT; a++) acc[a] = _mm256_setzero_ps();
        for (int v = 0; v < NV; v++) {
          const __m256 u = _mm256_i32gather_ps(lut, tcq_mid8(s[v], _mm256_and_si256(b[v], wmask), cwk, ck1, smask), 4);
          for (int a = 0; a < MT; a++) acc[a] = _mm256_fmadd_ps(xv[a][v], u, acc[a]);
        }
        for (int a = 0; a < MT; a++) {
          float* q = A + ((size_t)a * R + 2 * i) * 8;
          _mm256_store_ps(q, first ? acc[a] : _mm256_add_ps(acc[a], _mm256_load_ps(q)));
        }
      }
      for (int a = 0; a < MT; a++) acc[a] = _mm256_setzero_ps();
      __m256 acc1 = _mm256_setzero_ps();  /* one token: two chains of sums, not one */
      for (int v = 0; v < NV; v++) {
        s[v] = tcq_next8(s[v], _mm256_and_si256(b[v], wmask), cw, smask);
        b[v] = _mm256_srl_epi32(b[v], cw);
        const __m256 val = _mm256_i32gather_ps(lut, s[v], 4);
        if (MT == 1 && (v & 1)) acc1 = _mm256_fmadd_ps(xv[0][v], val, acc1);
        else for (int a = 0; a < MT; a++) acc[a] = _mm256_fmadd_ps(xv[a][v], val, acc[a]);
      }
      if (MT == 1) acc[0] = _mm256_add_ps(acc[0], acc1);
      for (int a = 0; a < MT; a++) {
        float* q = A + ((size_t)a * R + P * i + P - 1) * 8;
        _mm256_store_ps(q, first ? acc[a] : _mm256_add_ps(acc[a], _mm256_load_ps(q)));
      }
    }
  }
}

#define TCQ_PASS8(nv, mt) tcq_pass8(nv, mt, x + j, C, words, lut, A, R, NS, NW, P, wbits, k1, L, j / 16, first)

/* The sums of 8 rows of A (8 floats each, 32-byte aligned) as one vector, lane i row i */
static inline __m256 tcq_hsum8(const float* A) {
  const __m256 t0 = _mm256_hadd_ps(_mm256_load_ps(A), _mm256_load_ps(A + 8));
  const __m256 t1 = _mm256_hadd_ps(_mm256_load_ps(A + 16), _mm256_load_ps(A + 24));
  const __m256 t2 = _mm256_hadd_ps(_mm256_load_ps(A + 32), _mm256_load_ps(A + 40));
  const __m256 t3 = _mm256_hadd_ps(_mm256_load_ps(A + 48), _mm256_load_ps(A + 56));
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  /* per 128-bit half: rows' partial sums */
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* Columns c0 .. c1 (multiples of 16) of mt <= 4 tokens into yt [mt][R] */
static void tcq_words_range(const float* x, const uint32_t* words, const float* scale, const float* lut, float* yt,
                            int mt, int R, int C, int P, int wbits, int k1, int L, int glen, int c0, int c1) {
  const int NS = R / P, G = C / glen, NW = (NS + 32 / wbits - 1) / (32 / wbits);
  float* A = (float*)aligned_alloc(32, sizeof(float) * (size_t)mt * R * 8);
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int first = 1;  /* a scale group's first pass stores into A, the others add */
  for (int j = c0; j < c1; ) {
    const int gend = (j / glen + 1) * glen < c1 ? (j / glen + 1) * glen : c1;
    int ng = mt > 2 ? 1 : 2;  /* 16-column groups a pass */
    while (j + 16 * ng > gend) ng >>= 1;
    switch (mt * 8 + 2 * ng) {
      case 12: TCQ_PASS8(4, 1); break;
      case 10: TCQ_PASS8(2, 1); break;
      case 20: TCQ_PASS8(4, 2); break;
      case 18: TCQ_PASS8(2, 2); break;
      case 26: TCQ_PASS8(2, 3); break;
      default: TCQ_PASS8(2, 4); break;
    }
    j += 16 * ng;
    first = j == gend;
    if (j == gend) {  /* a scale group (or this thread's columns) ends: 8 rows' sums a vector */
      const int g = (j - 1) / glen;
      for (int a = 0; a < mt; a++) {
        float* ya = yt + (size_t)a * R;
        int r = 0;
        for (; r + 8 <= R; r += 8) {
          const __m256 sc = G == 1 ? _mm256_loadu_ps(scale + r) : _mm256_i32gather_ps(scale,
              _mm256_add_epi32(_mm256_mullo_epi32(_mm256_add_epi32(iota, _mm256_set1_epi32(r)), _mm256_set1_epi32(G)),
                               _mm256_set1_epi32(g)), 4);
          _mm256_storeu_ps(ya + r, _mm256_fmadd_ps(tcq_hsum8(A + ((size_t)a * R + r) * 8), sc, _mm256_loadu_ps(ya + r)));
        }
        for (; r < R; r++) {
          const float* q = A + ((size_t)a * R + r) * 8;
          ya[r] += (((q[0] + q[1]) + (q[2] + q[3])) + ((q[4] + q[5]) + (q[6] + q[7]))) * scale[(size_t)r * G + g];
        }
      }
    }
  }
  free(A);
}

/* W [R, C] = scale * lut[state] from tcq_words' layout: 8 columns a step, each row's 8 entries one gather and one
   contiguous store; needs glen % 16 == 0 */
void tcq_decode_words(const uint32_t* words, const float* scale, const float* lut, float* W, int R, int C, int P,
                  int wbits, int k1, int L, int glen) {
  const int NS = R / P, G = C / glen, K = 32 / wbits, NW = (NS + K - 1) / K;
  const __m256i smask = _mm256_set1_epi32((1 << L) - 1), wmask = _mm256_set1_epi32((1 << wbits) - 1);
  const __m128i cw = _mm_cvtsi32_si128(wbits), ck1 = _mm_cvtsi32_si128(k1), cwk = _mm_cvtsi32_si128(wbits - k1);
  #pragma omp parallel for schedule(static)
  for (int q = 0; q < C / 8; q++) {
    const int j = 8 * q, g = j / glen;
    const uint32_t* wq = words + (size_t)(q / 2) * NW * 16 + 8 * (q & 1);
    __m256i st = _mm256_setzero_si256();
    for (int k = 0; k < NW; k++) {
      __m256i b = _mm256_loadu_si256((const __m256i*)(wq + (size_t)k * 16));
      const int iend = (k + 1) * K < NS ? (k + 1) * K : NS;
      for (int i = k * K; i < iend; i++) {
        const __m256i y = _mm256_and_si256(b, wmask);
        b = _mm256_srl_epi32(b, cw);
        if (P == 2) {
          const __m256 u = _mm256_i32gather_ps(lut, tcq_mid8(st, y, cwk, ck1, smask), 4);
          const size_t r = (size_t)2 * i;
          _mm256_storeu_ps(W + r * C + j, _mm256_mul_ps(u, _mm256_set1_ps(scale[r * G + g])));
        }
        st = tcq_next8(st, y, cw, smask);
        const size_t r = (size_t)P * i + P - 1;
        _mm256_storeu_ps(W + r * C + j, _mm256_mul_ps(_mm256_i32gather_ps(lut, st, 4), _mm256_set1_ps(scale[r * G + g])));
      }
    }
  }
}

/* q0 .. q1 of y [M R] = the sum of the nt partial results (float32, or bfloat16 when bf16) */
static void tcq_words_finish(const float* part, int nt, size_t n, void* y, int bf16, size_t q0, size_t q1) {
  for (size_t q = q0; q < q1; q++) {
    float v = part[q];
    for (int t = 1; t < nt; t++) v += part[(size_t)t * n + q];
    if (bf16) ((uint16_t*)y)[q] = tcq_bf16(v);
    else ((float*)y)[q] = v;
  }
}
#endif
"""
