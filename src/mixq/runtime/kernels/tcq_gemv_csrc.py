"""The C source of the trellis decode-and-dot GEMV of :mod:`mixq.runtime.kernels.tcq_cpu` from the byte stream
(scalar and AVX2; the AVX-512 paths read their own layout, :mod:`mixq.runtime.kernels.tcq_words_csrc`), compiled
after :mod:`mixq.runtime.kernels.tcq_csrc`'s text (whose ``tcq_sym`` and includes it uses) as one library."""

SOURCE = r"""
/* x [M, C]; stream: column-major symbols of wbits (P rows each; k1 = the second row's bits when P = 2), LSB-first,
   padded by >= 2 bytes; scale [R, G] (groups of glen columns); lut [2^L]; y [M, R].  Each thread walks whole
   columns of its column range, four at a time (four independent state chains), into a private [M, R] partial
   sum per group, scaled into its private y; the threads' y are added at the end. */
#ifdef __AVX2__
/* The stream bytes of columns j .. j + n - 1 (contiguous: the stream is column-major) into L2.  A vector pass
   reads one line per lane at once, a pattern the hardware prefetchers miss: fetched a pass or two ahead, the
   decode of a 3.0-bpw SmolLM2 plan's 210 trellis layers took 26.6 ms a token on one thread instead of 32.2. */
static inline void tcq_prefetch(const uint8_t* stream, int j, int n, int NS, int wbits) {
  const char* p = (const char*)stream + (size_t)j * NS * wbits / 8;
  const size_t len = (size_t)n * NS * wbits / 8 + 64;
  for (size_t b = 0; b < len; b += 64) _mm_prefetch(p + b, _MM_HINT_T1);
}

/* The AVX2 GEMV: eight columns side by side, one per lane, each lane its own state chain (every lane shifts by
   the same widths, so the chains step together).  A lane's symbols come from a 32-bit bit reservoir refilled by
   one gather every K symbols; the table entries by one gather per row; each lane accumulates into its own slot
   of A [MT][R][8], summed across lanes and scaled when a scale group (or the thread's columns) ends.  For one
   token, two octets go together (tcq_avx2_pair).  Needs glen % 8 == 0, the stream padded by >= 4
   bytes and < 2^31 bits. */
#define TCQ_VT 4
static inline void tcq_avx2_octet(const float* x, const uint8_t* stream, const float* lut, float* A, int R, int C,
                                  int P, int NS, int wbits, int k1, int L, int j, int m0, int mm) {
  const int K = 25 / wbits;  /* symbols per refill: a 32-bit load shifted by <= 7 bits keeps 25 */
  const __m256i smask = _mm256_set1_epi32((1 << L) - 1), wmask = _mm256_set1_epi32((1 << wbits) - 1);
  const __m128i cw = _mm_cvtsi32_si128(wbits), ck1 = _mm_cvtsi32_si128(k1), cwk = _mm_cvtsi32_si128(wbits - k1);
  const __m256i seven = _mm256_set1_epi32(7), lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256 xv[TCQ_VT];
  for (int a = 0; a < mm; a++) xv[a] = _mm256_loadu_ps(x + (size_t)(m0 + a) * C + j);
  /* bit position of each lane's first symbol: (j + l) * NS * wbits */
  const __m256i base = _mm256_mullo_epi32(_mm256_add_epi32(_mm256_set1_epi32(j), lanes),
                                          _mm256_set1_epi32(NS * wbits));
  __m256i s = _mm256_setzero_si256();
  for (int i0 = 0; i0 < NS; i0 += K) {
    const __m256i bit = _mm256_add_epi32(base, _mm256_set1_epi32(i0 * wbits));
    __m256i buf = _mm256_i32gather_epi32((const int*)stream, _mm256_srli_epi32(bit, 3), 1);
    buf = _mm256_srlv_epi32(buf, _mm256_and_si256(bit, seven));
    const int iend = i0 + K < NS ? i0 + K : NS;
    for (int i = i0; i < iend; i++) {
      const __m256i sym = _mm256_and_si256(buf, wmask);
      buf = _mm256_srl_epi32(buf, cw);
      if (P == 2) {
        const __m256i mid = _mm256_and_si256(_mm256_or_si256(_mm256_sll_epi32(s, cwk), _mm256_srl_epi32(sym, ck1)), smask);
        const __m256 u = _mm256_i32gather_ps(lut, mid, 4);
        for (int a = 0; a < mm; a++) {
          float* q = A + ((size_t)a * R + 2 * i) * 8;
          _mm256_store_ps(q, _mm256_fmadd_ps(xv[a], u, _mm256_load_ps(q)));
        }
      }
      s = _mm256_and_si256(_mm256_or_si256(_mm256_sll_epi32(s, cw), sym), smask);
      const __m256 v = _mm256_i32gather_ps(lut, s, 4);
      for (int a = 0; a < mm; a++) {
        float* q = A + ((size_t)a * R + P * i + P - 1) * 8;
        _mm256_store_ps(q, _mm256_fmadd_ps(xv[a], v, _mm256_load_ps(q)));
      }
    }
  }
}

/* Two octets j .. j + 15 for one token: each row's two table gathers feed one accumulator update
   (A[i] += x_j v_j + x_{j+8} v_{j+8}), half the accumulator traffic of two octet passes (12-16 % faster on one
   EPYC thread at whole rates). */
static inline void tcq_avx2_pair(const float* x, const uint8_t* stream, const float* lut, float* A, int R, int NS,
                                 int P, int wbits, int k1, int L, int j) {
  const int K = 25 / wbits;
  const __m256i smask = _mm256_set1_epi32((1 << L) - 1), wmask = _mm256_set1_epi32((1 << wbits) - 1);
  const __m128i cw = _mm_cvtsi32_si128(wbits), ck1 = _mm_cvtsi32_si128(k1), cwk = _mm_cvtsi32_si128(wbits - k1);
  const __m256i seven = _mm256_set1_epi32(7), lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 x0 = _mm256_loadu_ps(x), x1 = _mm256_loadu_ps(x + 8);
  const __m256i step = _mm256_set1_epi32(NS * wbits);
  const __m256i base0 = _mm256_mullo_epi32(_mm256_add_epi32(_mm256_set1_epi32(j), lanes), step);
  const __m256i base1 = _mm256_add_epi32(base0, _mm256_slli_epi32(step, 3));
  __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
  for (int i0 = 0; i0 < NS; i0 += K) {
    const __m256i off = _mm256_set1_epi32(i0 * wbits);
    const __m256i bit0 = _mm256_add_epi32(base0, off), bit1 = _mm256_add_epi32(base1, off);
    __m256i b0 = _mm256_i32gather_epi32((const int*)stream, _mm256_srli_epi32(bit0, 3), 1);
    __m256i b1 = _mm256_i32gather_epi32((const int*)stream, _mm256_srli_epi32(bit1, 3), 1);
    b0 = _mm256_srlv_epi32(b0, _mm256_and_si256(bit0, seven));
    b1 = _mm256_srlv_epi32(b1, _mm256_and_si256(bit1, seven));
    const int iend = i0 + K < NS ? i0 + K : NS;
    for (int i = i0; i < iend; i++) {
      const __m256i y0 = _mm256_and_si256(b0, wmask), y1 = _mm256_and_si256(b1, wmask);
      b0 = _mm256_srl_epi32(b0, cw);
      b1 = _mm256_srl_epi32(b1, cw);
      if (P == 2) {  /* a half rate: the symbol's first k1 bits end the row before */
        const __m256i m0 = _mm256_and_si256(_mm256_or_si256(_mm256_sll_epi32(s0, cwk), _mm256_srl_epi32(y0, ck1)), smask);
        const __m256i m1 = _mm256_and_si256(_mm256_or_si256(_mm256_sll_epi32(s1, cwk), _mm256_srl_epi32(y1, ck1)), smask);
        const __m256 u0 = _mm256_i32gather_ps(lut, m0, 4), u1 = _mm256_i32gather_ps(lut, m1, 4);
        float* q = A + (size_t)2 * i * 8;
        _mm256_store_ps(q, _mm256_fmadd_ps(x1, u1, _mm256_fmadd_ps(x0, u0, _mm256_load_ps(q))));
      }
      s0 = _mm256_and_si256(_mm256_or_si256(_mm256_sll_epi32(s0, cw), y0), smask);
      s1 = _mm256_and_si256(_mm256_or_si256(_mm256_sll_epi32(s1, cw), y1), smask);
      const __m256 v0 = _mm256_i32gather_ps(lut, s0, 4), v1 = _mm256_i32gather_ps(lut, s1, 4);
      float* q = A + ((size_t)P * i + P - 1) * 8;
      _mm256_store_ps(q, _mm256_fmadd_ps(x1, v1, _mm256_fmadd_ps(x0, v0, _mm256_load_ps(q))));
    }
  }
}

static void tcq_gemv_avx2(const float* x, const uint8_t* stream, const float* scale, const float* lut, float* yt,
                          int M, int R, int C, int P, int wbits, int k1, int L, int glen, int c0, int c1) {
  const int NS = R / P, G = C / glen;
  float* A = (float*)aligned_alloc(32, sizeof(float) * (size_t)TCQ_VT * R * 8 + 32);
  for (int m0 = 0; m0 < M; m0 += TCQ_VT) {
    const int mm = M - m0 < TCQ_VT ? M - m0 : TCQ_VT;
    memset(A, 0, sizeof(float) * (size_t)mm * R * 8);
    if (mm == 1) tcq_prefetch(stream, c0, (c1 - c0 < 32 ? c1 - c0 : 32), NS, wbits);
    for (int j = c0; j < c1; ) {
      if (mm == 1 && j + 32 < c1) tcq_prefetch(stream, j + 32, 16, NS, wbits);  /* two pairs on, meanwhile */
      if (mm == 1 && j + 16 <= c1 && j % glen + 16 <= glen) {
        /* decode (one token): two octets per pass, one accumulator update for both */
        tcq_avx2_pair(x + (size_t)m0 * C + j, stream, lut, A, R, NS, P, wbits, k1, L, j);
        j += 16;
      } else {
        tcq_avx2_octet(x, stream, lut, A, R, C, P, NS, wbits, k1, L, j, m0, mm);
        j += 8;
      }
      if (j % glen == 0 || j >= c1) {  /* a scale group (or this thread's columns) ends */
        const int g = (j - 1) / glen;
        for (int a = 0; a < mm; a++)
          for (int r = 0; r < R; r++) {
            float* q = A + ((size_t)a * R + r) * 8;
            const __m128 h = _mm_add_ps(_mm_load_ps(q), _mm_load_ps(q + 4));
            const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
            const float sum = _mm_cvtss_f32(_mm_add_ss(h2, _mm_shuffle_ps(h2, h2, 1)));
            yt[(size_t)(m0 + a) * R + r] += sum * scale[(size_t)r * G + g];
          }
        memset(A, 0, sizeof(float) * (size_t)mm * R * 8);
      }
    }
  }
  free(A);
}
#endif

#define TCQ_MT 4
void tcq_gemv(const float* x, const uint8_t* stream, const float* scale, const float* lut, float* y,
              int M, int R, int C, int P, int wbits, int k1, int L, int glen, int vec) {
  const int NS = R / P, G = C / glen;
  const uint32_t mask = (1u << L) - 1u;
  int nt = 1;
  #ifdef _OPENMP
  nt = omp_get_max_threads();
  if (nt > G * glen / 64) nt = G * glen / 64 > 0 ? G * glen / 64 : 1;
  #endif
  float* part = (float*)calloc((size_t)nt * M * R, sizeof(float));
  #pragma omp parallel num_threads(nt)
  {
    int t = 0;
    #ifdef _OPENMP
    t = omp_get_thread_num();
    #endif
    float* yt = part + (size_t)t * M * R;
    #ifdef __AVX2__
    if (vec && glen % 8 == 0) {
      const int c0 = 8 * (int)((long)(C / 8) * t / nt), c1 = 8 * (int)((long)(C / 8) * (t + 1) / nt);
      if (c1 > c0) tcq_gemv_avx2(x, stream, scale, lut, yt, M, R, C, P, wbits, k1, L, glen, c0, c1);
    } else
    #endif
    {
    const int c0 = (int)((long)C * t / nt), c1 = (int)((long)C * (t + 1) / nt);
    float* acc = (float*)malloc(sizeof(float) * (size_t)M * R);
    int j = c0;
    while (j < c1) {
      const int g = j / glen, jend = (g + 1) * glen < c1 ? (g + 1) * glen : c1;
      for (size_t q = 0; q < (size_t)M * R; q++) acc[q] = 0.0f;
      for (int m0 = 0; m0 < M; m0 += TCQ_MT) {
        const int mm = M - m0 < TCQ_MT ? M - m0 : TCQ_MT;
        int jj = j;
        for (; jj + 4 <= jend; jj += 4) {
          const size_t b0 = (size_t)jj * NS, b1 = b0 + NS, b2 = b1 + NS, b3 = b2 + NS;
          float xv[4][TCQ_MT];
          for (int a = 0; a < mm; a++) for (int c = 0; c < 4; c++) xv[c][a] = x[(size_t)(m0 + a) * C + jj + c];
          uint32_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
          for (int i = 0; i < NS; i++) {
            const uint32_t y0 = tcq_sym(stream, b0 + i, wbits), y1 = tcq_sym(stream, b1 + i, wbits);
            const uint32_t y2 = tcq_sym(stream, b2 + i, wbits), y3 = tcq_sym(stream, b3 + i, wbits);
            if (P == 2) {
              const int sh = wbits - k1;
              const float u0 = lut[((s0 << sh) | (y0 >> k1)) & mask], u1 = lut[((s1 << sh) | (y1 >> k1)) & mask];
              const float u2 = lut[((s2 << sh) | (y2 >> k1)) & mask], u3 = lut[((s3 << sh) | (y3 >> k1)) & mask];
              for (int a = 0; a < mm; a++)
                acc[(size_t)(m0 + a) * R + 2 * i] += xv[0][a] * u0 + xv[1][a] * u1 + xv[2][a] * u2 + xv[3][a] * u3;
            }
            s0 = ((s0 << wbits) | y0) & mask; s1 = ((s1 << wbits) | y1) & mask;
            s2 = ((s2 << wbits) | y2) & mask; s3 = ((s3 << wbits) | y3) & mask;
            const float v0 = lut[s0], v1 = lut[s1], v2 = lut[s2], v3 = lut[s3];
            for (int a = 0; a < mm; a++)
              acc[(size_t)(m0 + a) * R + P * i + P - 1] += xv[0][a] * v0 + xv[1][a] * v1 + xv[2][a] * v2 + xv[3][a] * v3;
          }
        }
        for (; jj < jend; jj++) {
          const size_t b0 = (size_t)jj * NS;
          uint32_t s0 = 0;
          for (int i = 0; i < NS; i++) {
            const uint32_t y0 = tcq_sym(stream, b0 + i, wbits);
            if (P == 2) {
              const float u0 = lut[((s0 << (wbits - k1)) | (y0 >> k1)) & mask];
              for (int a = 0; a < mm; a++) acc[(size_t)(m0 + a) * R + 2 * i] += x[(size_t)(m0 + a) * C + jj] * u0;
            }
            s0 = ((s0 << wbits) | y0) & mask;
            const float v0 = lut[s0];
            for (int a = 0; a < mm; a++) acc[(size_t)(m0 + a) * R + P * i + P - 1] += x[(size_t)(m0 + a) * C + jj] * v0;
          }
        }
      }
      for (int a = 0; a < M; a++)
        for (int r = 0; r < R; r++) yt[(size_t)a * R + r] += acc[(size_t)a * R + r] * scale[(size_t)r * G + g];
      j = jend;
    }
    free(acc);
    }
  }
  for (size_t q = 0; q < (size_t)M * R; q++) {
    float v = 0.0f;
    for (int t = 0; t < nt; t++) v += part[(size_t)t * M * R + q];
    y[q] = v;
  }
  free(part);
}
"""
