"""Native CPU kernels of a decode step's glue: what a Llama-shaped block does between its linears, for one token.

:class:`~mixq.runtime.lean_decode.LeanDecoder` runs a block's non-linear arithmetic through three calls instead of
some thirty ATen ops (on SmolLM2-135M with trellis layers, ATen's glue took about as long as the linears' kernels):

- ``glue_add_rms``: the residual add (``h += o``, rounded to the model's dtype as transformers' ``residual +
  hidden`` is; ``o`` normalised first where the family has a norm there, times Granite's residual multiplier) and
  the next RMSNorm, computed as the family's norm does -- float32 ``h * rsqrt(mean(h²) + eps)``, then
  ``LlamaRMSNorm``'s rounding to the dtype, times the weight, rounded again, or ``Gemma3RMSNorm``'s ``* (1 + w)``
  and ``Olmo2RMSNorm``'s ``* w`` rounded once (no norm: a copy of ``h``);
- ``glue_rope_cache``: RoPE on the token's queries (in place) and keys as ``apply_rotary_pos_emb`` computes them in
  the dtype (each product rounded, then the sum; or, from float32 tables, in float32 rounded once, as OLMo 2's),
  the keys and values written into the cache at the position;
- ``glue_act_mul``: ``silu(gate) * up`` or ``gelu_tanh(gate) * up``, each result rounded as torch rounds it.

float32 or bfloat16 (the ``bf16`` flag); sums are float32 in another order than ATen's, so results may differ from
transformers' in the last float32 bit and, rarely, by one bfloat16 step.  Compiled on first use
(:func:`mixq.runtime.kernels.cbuild.load`); :func:`lib` is None without a compiler and the decoder keeps ATen.
"""
from __future__ import annotations

import ctypes
from functools import lru_cache

from .cbuild import BF16_C, INT, VOID_P, load

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float rd(float f, int bf16) { return bf16 ? bf2f(f2bf(f)) : f; }  /* a value as the dtype holds it */
static inline float ld(const void* p, size_t i, int bf16) {
  return bf16 ? bf2f(((const uint16_t*)p)[i]) : ((const float*)p)[i];
}
static inline void st(void* p, size_t i, float v, int bf16) {
  if (bf16) ((uint16_t*)p)[i] = f2bf(v); else ((float*)p)[i] = v;
}

static float inv_rms(const void* v, int n, float eps, int bf16) {
  float acc[16] = {0};
  for (int i = 0; i < n; i++) { const float a = ld(v, i, bf16); acc[i & 15] += a * a; }
  float s = 0.f;
  for (int j = 0; j < 16; j++) s += acc[j];
  return 1.f / sqrtf(s / (float)n + eps);
}

/* an RMS-normalised value v * r with weight w, rounded as the family's norm rounds (mode): 0 w * round(v * r)
   (Llama), 1 round(v * r * (1 + w)) (offset: Gemma), 2 round(v * r * w) (OLMo 2) */
static inline float normed(float v, float r, float w, int bf16, int mode) {
  return mode == 1 ? rd(v * r * (1.f + w), bf16) : mode == 2 ? rd(v * r * w, bf16) : rd(w * rd(v * r, bf16), bf16);
}

/* h[n] += o[n] * scale -- o first normalised with the weight wo when wo is given (the norms after attention and
   MLP of Gemma 3 and OLMo 2), the product rounded (Granite's residual multiplier; 1: none); o may be NULL -- then
   x[n] = the RMSNorm of h with the weight w, or h itself where w is NULL (OLMo 2: no norm before a branch). */
void glue_add_rms(void* h, const void* o, const void* wo, float eps_o, const void* w, float eps, void* x, int n,
                  int bf16, int mode, float scale) {
  if (o) {
    const float ro = wo ? inv_rms(o, n, eps_o, bf16) : 0.f;
    for (int i = 0; i < n; i++) {
      float a = ld(o, i, bf16);
      if (wo) a = normed(a, ro, ld(wo, i, bf16), bf16, mode);
      if (scale != 1.f) a = rd(a * scale, bf16);
      st(h, i, rd(ld(h, i, bf16) + a, bf16), bf16);
    }
  }
  if (!w) {
    memcpy(x, h, (size_t)n * (bf16 ? 2 : 4));
    return;
  }
  const float r = inv_rms(h, n, eps, bf16);
  for (int i = 0; i < n; i++) st(x, i, normed(ld(h, i, bf16), r, ld(w, i, bf16), bf16, mode), bf16);
}

/* rope32: cos and sin are float32 and the rotation is computed in float32, rounded once (OLMo 2's RoPE); else they
   are in the dtype and each product is rounded, then the sum */
static void rope_row(const void* src, void* dst, const void* cos, const void* sin, int d, int rot, int bf16,
                     int rope32) {
  float t[512];
  const int half = rot / 2;  /* RoPE on the first rot channels (partial RoPE: rot < d), the rest copied */
  for (int j = rot; j < d; j++) t[j] = ld(src, j, bf16);
  for (int j = 0; j < rot; j++) {
    /* x's rotate_half partner; sin carries its sign */
    const float x = ld(src, j, bf16), pair = ld(src, j < half ? j + half : j - half, bf16);
    const float c = rope32 ? ((const float*)cos)[j] : ld(cos, j, bf16);
    const float s = rope32 ? ((const float*)sin)[j] : ld(sin, j, bf16);
    t[j] = rope32 ? rd(x * c + pair * s, bf16) : rd(rd(x * c, bf16) + rd(pair * s, bf16), bf16);
  }
  for (int j = 0; j < d; j++) st(dst, j, t[j], bf16);
}

/* q [H, d] rotated in place; k, v [KV, d] -> K, V [KV, cap, d] at row pos (k rotated; the first rot channels of
   each head).  d <= 512. */
void glue_rope_cache(void* q, const void* k, const void* v, const void* cos, const void* sin, void* K, void* V,
                     int pos, int H, int KV, int d, int rot, int cap, int bf16, int rope32) {
  const size_t es = bf16 ? 2 : 4;
  for (int h = 0; h < H; h++)
    rope_row((char*)q + es * h * d, (char*)q + es * h * d, cos, sin, d, rot, bf16, rope32);
  for (int h = 0; h < KV; h++) {
    const size_t at = es * ((size_t)h * cap + pos) * d;
    rope_row((const char*)k + es * h * d, (char*)K + at, cos, sin, d, rot, bf16, rope32);
    memcpy((char*)V + at, (const char*)v + es * h * d, es * d);
  }
}

/* out[n] = act(g) * u, act's result rounded to the dtype first, as torch's two ops are; act 0: silu, 1: GELU with
   the tanh approximation. */
void glue_act_mul(const void* g, const void* u, void* out, int n, int bf16, int act) {
  for (int i = 0; i < n; i++) {
    const float a = ld(g, i, bf16);
    const float y = act ? 0.5f * a * (1.f + tanhf(0.7978845608028654f * (a + 0.044715f * a * a * a)))
                        : a / (1.f + expf(-a));
    st(out, i, rd(y, bf16) * ld(u, i, bf16), bf16);
  }
}
"""

SIGNATURES = {
    "glue_add_rms": (None, [VOID_P, VOID_P, VOID_P, ctypes.c_float, VOID_P, ctypes.c_float, VOID_P, INT, INT, INT,
                            ctypes.c_float]),
    "glue_rope_cache": (None, [VOID_P] * 7 + [INT] * 8),
    "glue_act_mul": (None, [VOID_P, VOID_P, VOID_P, INT, INT, INT]),
}


@lru_cache(maxsize=None)
def lib():
    """The compiled glue kernels (None without a working compiler: the decoder's ATen ops are used)."""
    return load("glue_cpu", BF16_C + SOURCE, "ATen ops for the decode step's glue", SIGNATURES)
