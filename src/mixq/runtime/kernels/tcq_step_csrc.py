"""The C source of a decode step's native calls into the trellis kernels (:mod:`mixq.runtime.kernels.tcq_step`):
``tcq_layers_call`` (the input widened and transformed, then every layer that reads it, from the interleaved layout
in one parallel region or from the byte stream one after the other), ``tcq_gemv_words`` (one layer from the
interleaved layout) and ``tcq_words_isa`` (512 or 256: which kernels of that layout this build has; 0: none, and
the layout's functions are empty).  Compiled last, after the texts of :mod:`mixq.runtime.kernels.tcq_csrc`,
:mod:`~mixq.runtime.kernels.tcq_gemv_csrc`, :mod:`~mixq.runtime.kernels.tcq_words_csrc` and
:mod:`~mixq.runtime.kernels.tcq_words_avx2_csrc`, whose functions it calls."""

SOURCE = r"""
#ifdef TCQ_WORDS
int tcq_words_isa(void) {
  #ifdef __AVX512F__
  return 512;
  #else
  return 256;
  #endif
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
int tcq_words_isa(void) { return 0; }
void tcq_decode_words(const uint32_t* words, const float* scale, const float* lut, float* W, int R, int C, int P,
                  int wbits, int k1, int L, int glen) {}
void tcq_words(const uint8_t* stream, uint32_t* words, int R, int C, int P, int wbits) {}
void tcq_gemv_words(const float* x, const uint32_t* words, const float* scale, const float* lut, void* y,
               int M, int R, int C, int P, int wbits, int k1, int L, int glen, int bf16) {}
#endif

/* ys[l] [M, R_l] for the float32 xf [M, C] through each of the nl layers ls in turn: from the byte stream
   (tcq_gemv, its own parallel region) or from the interleaved layout.  3: no memory. */
static int tcq_layers_each(const tcq_layer* const* ls, int nl, const float* xf, void* const* ys, int M, int bf16) {
  for (int l = 0; l < nl; l++) {
    const tcq_layer* a = ls[l];
    #ifdef TCQ_WORDS
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
   all in the interleaved layout share one parallel region (tcq_words_layers), others run in turn.
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
    int words = 0;
    #ifdef TCQ_WORDS
    words = 1;
    for (int l = 0; l < nl; l++) words = words && ls[l]->words;
    if (words) rc = tcq_words_layers(ls, nl, xf, ys, M, ybf16);
    #endif
    if (!words) rc = tcq_layers_each(ls, nl, xf, ys, M, ybf16);
  }
  free(xf);
  return rc;
}

"""
