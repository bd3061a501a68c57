"""The C source of the trellis kernels' interleaved layout (:func:`mixq.runtime.kernels.tcq_cpu.words`): the
lane-interleaved copy of the code stream (built where the CPU has AVX2 or AVX-512) and its AVX-512 kernels: the GEMV
of up to four tokens a pass from it, the dense decode from it and the sum of the threads' partial results.  The
AVX2 kernels of the same layout are :mod:`mixq.runtime.kernels.tcq_words_avx2_csrc`; what calls them,
:mod:`mixq.runtime.kernels.tcq_step_csrc`.  Compiled after :mod:`mixq.runtime.kernels.tcq_csrc`'s and
:mod:`mixq.runtime.kernels.tcq_gemv_csrc`'s texts (whose ``tcq_sym`` and includes it uses) as one library."""

SOURCE = r"""
/* float32 -> bfloat16, rounded to nearest even as torch rounds; a NaN stays a quiet NaN */
static inline uint16_t tcq_bf16(float v) {
  uint32_t u;
  memcpy(&u, &v, 4);
  return (u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0 : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* One layer's fixed arguments (a decode step makes ~200 layer calls: each passes a few): the interleaved layout
   (words) or the byte stream (stream, with vec: tcq_gemv's path argument), and the input transform (rot on
   rot_plan, or none) */
typedef int (*tcq_rot_fn)(const void* plan, const void* in, void* out, int M, int bf16);
typedef struct { const uint32_t* words; const uint8_t* stream; const float* scale; const float* lut;
                 int R, C, P, wbits, k1, L, glen, vec; tcq_rot_fn rot; const void* rot_plan; } tcq_layer;

#if defined(__AVX512F__) || defined(__AVX2__)
#define TCQ_WORDS 1
#define TCQ_MT4 4
/* tcq_words' layout: for each group of 16 columns, word k of every column side by side (16 x 32 bits), word k of
   a column holding its symbols k K .. k K + K - 1 (K = 32 / wbits, LSB-first) */
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

#endif

#ifdef __AVX512F__
/* The AVX-512 kernels of tcq_words' layout.  A 64-byte load refills 16 lanes' symbols where the
   byte stream needs a gather, and the words of a pass come in sequence, which the hardware prefetchers follow.  A
   pass walks 64 columns (four 16-lane state chains) down the rows; each row's four table gathers are summed in
   registers and added to that row's slot of A [MT][R][16] once, a quarter of the accumulator traffic of a pass
   per 16 columns, and up to four tokens share each gather.  One token on one Sapphire Rapids thread: 0.14-0.18 ns
   a weight against 0.16-0.22 for the byte stream's 32-column passes (SmolLM2's four shapes, rates 2-4, operands
   hot; the bare gather 0.14). */

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
/* One pass: NV x 16 columns from group g0 on, MT tokens (rows of x, stride C) sharing every table gather; each
   row's sums per token added to A [MT][R][16]. */
static inline __attribute__((always_inline)) void tcq_pass16(const int NV, const int MT, const float* x, int C,
    const uint32_t* words, const float* lut, float* A, int R, int NS, int NW, int P, int wbits, int k1, int L, int g0,
    const int first) {
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
          _mm512_store_ps(q, first ? acc[a] : _mm512_add_ps(acc[a], _mm512_load_ps(q)));
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
        _mm512_store_ps(q, first ? acc[a] : _mm512_add_ps(acc[a], _mm512_load_ps(q)));
      }
    }
  }
}

#define TCQ_PASS(nv, mt) tcq_pass16(nv, mt, x + j, C, words, lut, A, R, NS, NW, P, wbits, k1, L, j / 16, first)

/* The sums of 16 rows of A (16 floats each, 64-byte aligned) as one vector, lane i row i: a transpose-add tree
   (45 shuffles and adds where 16 horizontal reductions take ~130) */
static inline __m512 tcq_hsum16(const float* A) {
  __m512 u[8], w[4];
  for (int k = 0; k < 8; k++) {  /* per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] of rows a = 2k, b = 2k + 1 */
    const __m512 a = _mm512_load_ps(A + 32 * k), b = _mm512_load_ps(A + 32 * k + 16);
    u[k] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  }
  for (int k = 0; k < 4; k++) {  /* per 128-bit lane: that lane's sums of rows 4k .. 4k + 3 */
    const __m512d p = _mm512_castps_pd(u[2 * k]), q = _mm512_castps_pd(u[2 * k + 1]);
    w[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(p, q)), _mm512_castpd_ps(_mm512_unpackhi_pd(p, q)));
  }
  const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xDD));
  const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(w[2], w[3], 0x88), _mm512_shuffle_f32x4(w[2], w[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD));
}
/* Columns c0 .. c1 (multiples of 16) of mt <= 4 tokens into yt [mt][R] */
static void tcq_words_range(const float* x, const uint32_t* words, const float* scale, const float* lut, float* yt,
                            int mt, int R, int C, int P, int wbits, int k1, int L, int glen, int c0, int c1) {
  const int NS = R / P, G = C / glen, NW = (NS + 32 / wbits - 1) / (32 / wbits);
  float* A = (float*)aligned_alloc(64, sizeof(float) * (size_t)mt * R * 16);
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int first = 1;  /* a scale group's first pass stores into A, the others add */
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
    first = j == gend;
    if (j == gend) {  /* a scale group (or this thread's columns) ends: 16 rows' sums a vector */
      const int g = (j - 1) / glen;
      for (int a = 0; a < mt; a++) {
        float* ya = yt + (size_t)a * R;
        int r = 0;
        for (; r + 16 <= R; r += 16) {
          const __m512 sc = G == 1 ? _mm512_loadu_ps(scale + r) : _mm512_i32gather_ps(
              _mm512_add_epi32(_mm512_mullo_epi32(_mm512_add_epi32(iota, _mm512_set1_epi32(r)), _mm512_set1_epi32(G)),
                               _mm512_set1_epi32(g)), scale, 4);
          _mm512_storeu_ps(ya + r, _mm512_fmadd_ps(tcq_hsum16(A + ((size_t)a * R + r) * 16), sc, _mm512_loadu_ps(ya + r)));
        }
        for (; r < R; r++) ya[r] += _mm512_reduce_add_ps(_mm512_load_ps(A + ((size_t)a * R + r) * 16)) * scale[(size_t)r * G + g];
      }
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

/* q0 .. q1 of y [M R] = the sum of the nt partial results (float32, or bfloat16 when bf16: rounded to nearest even,
   as torch rounds; a NaN stays a quiet NaN) */
static void tcq_words_finish(const float* part, int nt, size_t n, void* y, int bf16, size_t q0, size_t q1) {
  const __m512i lsb = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7fff), absm = _mm512_set1_epi32(0x7fffffff),
                inf = _mm512_set1_epi32(0x7f800000), qnan = _mm512_set1_epi32(0x7fc0);
  size_t q = q0;
  for (; q + 16 <= q1; q += 16) {
    __m512 v = _mm512_loadu_ps(part + q);
    for (int t = 1; t < nt; t++) v = _mm512_add_ps(v, _mm512_loadu_ps(part + (size_t)t * n + q));
    if (bf16) {
      const __m512i u = _mm512_castps_si512(v);
      __m512i h = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(half, _mm512_and_si512(_mm512_srli_epi32(u, 16), lsb))), 16);
      h = _mm512_mask_mov_epi32(h, _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, absm), inf), qnan);
      _mm256_storeu_si256((__m256i*)((uint16_t*)y + q), _mm512_cvtepi32_epi16(h));
    } else {
      _mm512_storeu_ps((float*)y + q, v);
    }
  }
  for (; q < q1; q++) {
    float v = part[q];
    for (int t = 1; t < nt; t++) v += part[(size_t)t * n + q];
    if (bf16) ((uint16_t*)y)[q] = tcq_bf16(v);
    else ((float*)y)[q] = v;
  }
}

#endif
"""
