"""The C source of the trellis kernels' AVX-512 layout (:func:`mixq.runtime.kernels.tcq_cpu.words`): the
lane-interleaved copy of the code stream, the GEMV of up to 16 tokens from it and the dense decode from it;
compiled after :mod:`mixq.runtime.kernels.tcq_csrc`'s and :mod:`mixq.runtime.kernels.tcq_gemv_csrc`'s texts
(whose ``tcq_sym`` and includes it uses) as one library.  Without AVX-512, ``tcq_avx512`` returns 0 and the other
functions are empty: the callers keep the byte stream's paths."""

SOURCE = r"""
#ifdef __AVX512F__
/* For each group of 16 columns, word k of every column side by side (16 x 32 bits), word k of a column holding
   its symbols k K .. k K + K - 1 (K = 32 / wbits, LSB-first).  A 64-byte load refills 16 lanes' symbols where the
   byte stream needs a gather, and the words of a pass come in sequence, which the hardware prefetchers follow.  A
   pass walks 64 columns (four 16-lane state chains) down the rows; each row's four table gathers are summed in
   registers and added to that row's slot of A [MT][R][16] once, a quarter of the accumulator traffic of a pass
   per 16 columns, and up to four tokens share each gather.  One token on one Sapphire Rapids thread: 0.14-0.18 ns
   a weight against 0.16-0.22 for the byte stream's 32-column passes (SmolLM2's four shapes, rates 2-4, operands
   hot; the bare gather 0.14). */
int tcq_avx512(void) { return 1; }

void tcq_words(const uint8_t* stream, uint32_t* words, int R, int C, int P, int wbits) {
  const int NS = R / P, K = 32 / wbits, NW = (NS + K - 1) / K;
  #pragma omp parallel for schedule(static)
  for (int j = 0; j < C; j++)
    for (int k = 0; k < NW; k++) {
      uint32_t w = 0;
      for (int t = 0; t < K && k * K + t < NS; t++) w |= tcq_sym(stream, (size_t)j * NS + k * K + t, wbits) << (t * wbits);
      words[((size_t)(j / 16) * NW + k) * 16 + j % 16] = w;
    }
}

/* The bitshift trellis on 16 lanes: the state after a symbol y, and (half rates) the state the symbol's first k1
   bits end the row before on */
static inline __attribute__((always_inline)) __m512i tcq_next16(__m512i s, __m512i y, __m128i cw, __m512i smask) {
  return _mm512_and_si512(_mm512_or_si512(_mm512_sll_epi32(s, cw), y), smask);
}
static inline __attribute__((always_inline)) __m512i tcq_mid16(__m512i s, __m512i y, __m128i cwk, __m128i ck1,
                                                               __m512i smask) {
  return _mm512_and_si512(_mm512_or_si512(_mm512_sll_epi32(s, cwk), _mm512_srl_epi32(y, ck1)), smask);
}

#define TCQ_NV 4
#define TCQ_MT4 4
/* One pass: NV x 16 columns from group g0 on, MT tokens (rows of x, stride C) sharing every table gather; each
   row's sums per token added to A [MT][R][16]. */
static inline __attribute__((always_inline)) void tcq_pass16(const int NV, const int MT, const float* x, int C,
    const uint32_t* words, const float* lut, float* A, int R, int NS, int NW, int P, int wbits, int k1, int L, int g0) {
  const int K = 32 / wbits;
  const __m512i smask = _mm512_set1_epi32((1 << L) - 1), wmask = _mm512_set1_epi32((1 << wbits) - 1);
  const __m128i cw = _mm_cvtsi32_si128(wbits), ck1 = _mm_cvtsi32_si128(k1), cwk = _mm_cvtsi32_si128(wbits - k1);
  __m512 xv[TCQ_MT4][TCQ_NV];
  __m512i s[TCQ_NV], b[TCQ_NV];
  for (int a = 0; a < MT; a++)
    for (int v = 0; v < NV; v++) xv[a][v] = _mm512_loadu_ps(x + (size_t)a * C + 16 * v);
  for (int v = 0; v < NV; v++) s[v] = _mm512_setzero_si512();
  for (int k = 0; k < NW; k++) {
    for (int v = 0; v < NV; v++) b[v] = _mm512_loadu_si512((const void*)(words + ((size_t)(g0 + v) * NW + k) * 16));
    const int iend = (k + 1) * K < NS ? (k + 1) * K : NS;
    for (int i = k * K; i < iend; i++) {
      __m512 acc[TCQ_MT4];
      if (P == 2) {  /* a half rate: the symbol's first k1 bits end the row before */
        for (int a = 0; a < MT; a++) acc[a] = _mm512_setzero_ps();
        for (int v = 0; v < NV; v++) {
          const __m512 u = _mm512_i32gather_ps(tcq_mid16(s[v], _mm512_and_si512(b[v], wmask), cwk, ck1, smask), lut, 4);
          for (int a = 0; a < MT; a++) acc[a] = _mm512_fmadd_ps(xv[a][v], u, acc[a]);
        }
        for (int a = 0; a < MT; a++) {
          float* q = A + ((size_t)a * R + 2 * i) * 16;
          _mm512_store_ps(q, _mm512_add_ps(acc[a], _mm512_load_ps(q)));
        }
      }
      for (int a = 0; a < MT; a++) acc[a] = _mm512_setzero_ps();
      __m512 acc1 = _mm512_setzero_ps();  /* one token: two chains of sums, not one */
      for (int v = 0; v < NV; v++) {
        s[v] = tcq_next16(s[v], _mm512_and_si512(b[v], wmask), cw, smask);
        b[v] = _mm512_srl_epi32(b[v], cw);
        const __m512 val = _mm512_i32gather_ps(s[v], lut, 4);
        if (MT == 1 && (v & 1)) acc1 = _mm512_fmadd_ps(xv[0][v], val, acc1);
        else for (int a = 0; a < MT; a++) acc[a] = _mm512_fmadd_ps(xv[a][v], val, acc[a]);
      }
      if (MT == 1) acc[0] = _mm512_add_ps(acc[0], acc1);
      for (int a = 0; a < MT; a++) {
        float* q = A + ((size_t)a * R + P * i + P - 1) * 16;
        _mm512_store_ps(q, _mm512_add_ps(acc[a], _mm512_load_ps(q)));
      }
    }
  }
}

#define TCQ_PASS(nv, mt) tcq_pass16(nv, mt, x + j, C, words, lut, A, R, NS, NW, P, wbits, k1, L, j / 16)
/* Columns c0 .. c1 (multiples of 16) of mt <= 4 tokens into yt [mt][R] */
static void tcq_words_range(const float* x, const uint32_t* words, const float* scale, const float* lut, float* yt,
                            int mt, int R, int C, int P, int wbits, int k1, int L, int glen, int c0, int c1) {
  const int NS = R / P, G = C / glen, NW = (NS + 32 / wbits - 1) / (32 / wbits);
  float* A = (float*)aligned_alloc(64, sizeof(float) * (size_t)mt * R * 16);
  memset(A, 0, sizeof(float) * (size_t)mt * R * 16);
  for (int j = c0; j < c1; ) {
    const int gend = (j / glen + 1) * glen < c1 ? (j / glen + 1) * glen : c1;
    int nv = TCQ_NV;
    while (j + 16 * nv > gend) nv >>= 1;
    switch (mt * 8 + nv) {
      case 12: TCQ_PASS(4, 1); break;
      case 10: TCQ_PASS(2, 1); break;
      case 9: TCQ_PASS(1, 1); break;
      case 20: TCQ_PASS(4, 2); break;
      case 18: TCQ_PASS(2, 2); break;
      case 17: TCQ_PASS(1, 2); break;
      case 28: TCQ_PASS(4, 3); break;
      case 26: TCQ_PASS(2, 3); break;
      case 25: TCQ_PASS(1, 3); break;
      case 36: TCQ_PASS(4, 4); break;
      case 34: TCQ_PASS(2, 4); break;
      default: TCQ_PASS(1, 4); break;
    }
    j += 16 * nv;
    if (j == gend) {  /* a scale group (or this thread's columns) ends */
      const int g = (j - 1) / glen;
      for (int a = 0; a < mt; a++)
        for (int r = 0; r < R; r++)
          yt[(size_t)a * R + r] += _mm512_reduce_add_ps(_mm512_load_ps(A + ((size_t)a * R + r) * 16)) * scale[(size_t)r * G + g];
      if (j < c1) memset(A, 0, sizeof(float) * (size_t)mt * R * 16);
    }
  }
  free(A);
}

/* W [R, C] = scale * lut[state] from tcq_words' layout (what tcq_decode gives from the byte stream): 16 columns a
   step, each row's 16 entries one gather and one contiguous store; needs glen % 16 == 0 */
void tcq_decode_words(const uint32_t* words, const float* scale, const float* lut, float* W, int R, int C, int P,
                  int wbits, int k1, int L, int glen) {
  const int NS = R / P, G = C / glen, K = 32 / wbits, NW = (NS + K - 1) / K;
  const __m512i smask = _mm512_set1_epi32((1 << L) - 1), wmask = _mm512_set1_epi32((1 << wbits) - 1);
  const __m128i cw = _mm_cvtsi32_si128(wbits), ck1 = _mm_cvtsi32_si128(k1), cwk = _mm_cvtsi32_si128(wbits - k1);
  #pragma omp parallel for schedule(static)
  for (int q = 0; q < C / 16; q++) {
    const int j = 16 * q, g = j / glen;
    __m512i st = _mm512_setzero_si512();
    for (int k = 0; k < NW; k++) {
      __m512i b = _mm512_loadu_si512((const void*)(words + ((size_t)q * NW + k) * 16));
      const int iend = (k + 1) * K < NS ? (k + 1) * K : NS;
      for (int i = k * K; i < iend; i++) {
        const __m512i y = _mm512_and_si512(b, wmask);
        b = _mm512_srl_epi32(b, cw);
        if (P == 2) {
          const __m512 u = _mm512_i32gather_ps(tcq_mid16(st, y, cwk, ck1, smask), lut, 4);
          const size_t r = (size_t)2 * i;
          _mm512_storeu_ps(W + r * C + j, _mm512_mul_ps(u, _mm512_set1_ps(scale[r * G + g])));
        }
        st = tcq_next16(st, y, cw, smask);
        const size_t r = (size_t)P * i + P - 1;
        _mm512_storeu_ps(W + r * C + j, _mm512_mul_ps(_mm512_i32gather_ps(st, lut, 4), _mm512_set1_ps(scale[r * G + g])));
      }
    }
  }
}

/* y [M, R] for x [M, C] from tcq_words' layout, float32, or bfloat16 when bf16 (rounded to nearest even, as torch
   rounds), tokens four at a time; needs glen % 16 == 0 */
void tcq_gemv_words(const float* x, const uint32_t* words, const float* scale, const float* lut, void* y,
               int M, int R, int C, int P, int wbits, int k1, int L, int glen, int bf16) {
  int nt = 1;
  #ifdef _OPENMP
  nt = omp_get_max_threads();
  if (nt > C / 64) nt = C / 64 > 0 ? C / 64 : 1;
  #endif
  float* part = (float*)calloc((size_t)nt * M * R, sizeof(float));
  for (int m0 = 0; m0 < M; m0 += TCQ_MT4) {
    const int mt = M - m0 < TCQ_MT4 ? M - m0 : TCQ_MT4;
    if (nt == 1) {  /* no parallel region: a decode step makes ~200 of these calls */
      tcq_words_range(x + (size_t)m0 * C, words, scale, lut, part + (size_t)m0 * R, mt, R, C, P, wbits, k1, L, glen, 0, C);
    } else {
      #pragma omp parallel num_threads(nt)
      {
        int t = 0;
        #ifdef _OPENMP
        t = omp_get_thread_num();
        #endif
        const int c0 = 16 * (int)((long)(C / 16) * t / nt), c1 = 16 * (int)((long)(C / 16) * (t + 1) / nt);
        if (c1 > c0) tcq_words_range(x + (size_t)m0 * C, words, scale, lut, part + ((size_t)t * M + m0) * R, mt, R, C, P,
                                     wbits, k1, L, glen, c0, c1);
      }
    }
  }
  for (size_t q = 0; q < (size_t)M * R; q++) {
    float v = 0.0f;
    for (int t = 0; t < nt; t++) v += part[(size_t)t * M * R + q];
    if (bf16) {
      uint32_t u;
      memcpy(&u, &v, 4);
      ((uint16_t*)y)[q] = (u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0 : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    } else {
      ((float*)y)[q] = v;
    }
  }
  free(part);
}
#else
int tcq_avx512(void) { return 0; }
void tcq_decode_words(const uint32_t* words, const float* scale, const float* lut, float* W, int R, int C, int P,
                  int wbits, int k1, int L, int glen) {}
void tcq_words(const uint8_t* stream, uint32_t* words, int R, int C, int P, int wbits) {}
void tcq_gemv_words(const float* x, const uint32_t* words, const float* scale, const float* lut, void* y,
               int M, int R, int C, int P, int wbits, int k1, int L, int glen, int bf16) {}
#endif

"""
