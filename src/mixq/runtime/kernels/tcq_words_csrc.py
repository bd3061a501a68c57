"""The C source of the trellis kernels' AVX-512 layout (:func:`mixq.runtime.kernels.tcq_cpu.words`): the
lane-interleaved copy of the code stream, the GEMV of up to 16 tokens from it and the dense decode from it; and
``tcq_layers_call``, a decode step's one native call for layers in that layout or in the byte stream (the AVX2 and
scalar GEMV of :mod:`mixq.runtime.kernels.tcq_gemv_csrc`); compiled after :mod:`mixq.runtime.kernels.tcq_csrc`'s
and :mod:`mixq.runtime.kernels.tcq_gemv_csrc`'s texts (whose ``tcq_sym``, ``tcq_gemv`` and includes it uses) as one
library.  Without AVX-512, ``tcq_avx512`` returns 0 and the layout's functions are empty: the callers keep the byte
stream."""

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

/* ys[l] [M, R_l] for the float32 xf [M, C] through each of the nl layers ls (one C; float32, or bfloat16 when
   bf16), tokens four at a time; needs glen % 16 == 0.  One parallel region for all of them: threads split every
   layer's columns into partial sums, then (after one barrier) every layer's outputs to add them.  3: no memory. */
static int tcq_words_layers(const tcq_layer* const* ls, int nl, const float* xf, void* const* ys, int M, int bf16) {
  const int C = ls[0]->C;
  int nt = 1;
  #ifdef _OPENMP
  nt = omp_get_max_threads();
  if (nt > C / 64) nt = C / 64 > 0 ? C / 64 : 1;
  #endif
  size_t off[17], tot = 0;
  for (int l = 0; l < nl; l++) { off[l] = tot; tot += (size_t)nt * M * ls[l]->R; }
  float* part = (float*)calloc(tot, sizeof(float));
  if (!part) return 3;
  #pragma omp parallel num_threads(nt) if (nt > 1)
  {
    int t = 0;
    #ifdef _OPENMP
    t = omp_get_thread_num();
    #endif
    const int c0 = 16 * (int)((long)(C / 16) * t / nt), c1 = 16 * (int)((long)(C / 16) * (t + 1) / nt);
    for (int l = 0; l < nl; l++) {
      const tcq_layer* a = ls[l];
      const size_t n = (size_t)M * a->R;
      for (int m0 = 0; m0 < M && c1 > c0; m0 += TCQ_MT4)
        tcq_words_range(xf + (size_t)m0 * C, a->words, a->scale, a->lut, part + off[l] + (size_t)t * n + (size_t)m0 * a->R,
                        M - m0 < TCQ_MT4 ? M - m0 : TCQ_MT4, a->R, C, a->P, a->wbits, a->k1, a->L, a->glen, c0, c1);
    }
    #pragma omp barrier
    for (int l = 0; l < nl; l++) {
      const size_t n = (size_t)M * ls[l]->R;
      tcq_words_finish(part + off[l], nt, n, ys[l], bf16, n * t / nt / 16 * 16,
                       t + 1 == nt ? n : n * (t + 1) / nt / 16 * 16);
    }
  }
  free(part);
  return 0;
}

/* y [M, R] for x [M, C] from tcq_words' layout (tcq_words_layers of one layer) */
void tcq_gemv_words(const float* x, const uint32_t* words, const float* scale, const float* lut, void* y,
               int M, int R, int C, int P, int wbits, int k1, int L, int glen, int bf16) {
  const tcq_layer a = {words, NULL, scale, lut, R, C, P, wbits, k1, L, glen, 1, NULL, NULL};
  const tcq_layer* ls[1] = {&a};
  void* ys[1] = {y};
  tcq_words_layers(ls, 1, x, ys, M, bf16);
}

#else
int tcq_avx512(void) { return 0; }
void tcq_decode_words(const uint32_t* words, const float* scale, const float* lut, float* W, int R, int C, int P,
                  int wbits, int k1, int L, int glen) {}
void tcq_words(const uint8_t* stream, uint32_t* words, int R, int C, int P, int wbits) {}
void tcq_gemv_words(const float* x, const uint32_t* words, const float* scale, const float* lut, void* y,
               int M, int R, int C, int P, int wbits, int k1, int L, int glen, int bf16) {}
#endif

/* ys[l] [M, R_l] for the float32 xf [M, C] through each of the nl layers ls in turn: from the byte stream
   (tcq_gemv, its own parallel region) or, with AVX-512, from the interleaved layout.  3: no memory. */
static int tcq_layers_each(const tcq_layer* const* ls, int nl, const float* xf, void* const* ys, int M, int bf16) {
  for (int l = 0; l < nl; l++) {
    const tcq_layer* a = ls[l];
    #ifdef __AVX512F__
    if (a->words) {
      const int rc = tcq_words_layers(&ls[l], 1, xf, &ys[l], M, bf16);
      if (rc) return rc;
      continue;
    }
    #endif
    const size_t n = (size_t)M * a->R;
    float* yf = bf16 ? (float*)malloc(sizeof(float) * n) : (float*)ys[l];
    if (!yf) return 3;
    tcq_gemv(xf, a->stream, a->scale, a->lut, yf, M, a->R, a->C, a->P, a->wbits, a->k1, a->L, a->glen, a->vec);
    if (bf16) {
      for (size_t q = 0; q < n; q++) ((uint16_t*)ys[l])[q] = tcq_bf16(yf[q]);
      free(yf);
    }
  }
  return 0;
}

/* ys[l] [M, R_l] (bfloat16 when ybf16, else float32) for one x [M, C] (bfloat16 when xbf16, else float32) through
   nl <= 16 layers that read it (one C, one input transform: the first layer's rot, kron_cpu's kron_apply on its
   plan, in place on a float32 copy of x; none when NULL): what the transform and each layer's GEMV give.  Layers
   all in the AVX-512 layout share one parallel region (tcq_words_layers), others run in turn.
   Nonzero: the transform failed (its code), 3: no memory, 5: more than 16 layers. */
int tcq_layers_call(const tcq_layer* const* ls, int nl, const void* x, void* const* ys, int M, int xbf16, int ybf16) {
  if (nl < 1 || nl > 16) return 5;
  const size_t n = (size_t)M * ls[0]->C;
  float* xf = (float*)malloc(sizeof(float) * n);
  if (!xf) return 3;
  if (xbf16)
    for (size_t i = 0; i < n; i++) { const uint32_t u = (uint32_t)((const uint16_t*)x)[i] << 16; memcpy(xf + i, &u, 4); }
  else
    memcpy(xf, x, sizeof(float) * n);
  int rc = ls[0]->rot ? ls[0]->rot(ls[0]->rot_plan, xf, xf, M, 0) : 0;
  if (!rc) {
    int words = 1;
    for (int l = 0; l < nl; l++) words = words && ls[l]->words;
    #ifdef __AVX512F__
    if (words) rc = tcq_words_layers(ls, nl, xf, ys, M, ybf16);
    else
    #endif
    rc = tcq_layers_each(ls, nl, xf, ys, M, ybf16);
    (void)words;
  }
  free(xf);
  return rc;
}

"""
