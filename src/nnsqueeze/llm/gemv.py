"""Weight-only matrix-vector kernels that read packed int4 / int8 codes directly (CPU, float32).

Why a kernel of our own: generating one token at a time multiplies every weight matrix by a single
activation row, which is bound by memory traffic, so reading 0.5 byte per weight instead of 4 can
only be faster if nothing unpacks the codes to a float matrix first. torch 2.13 ships
``aten._weight_int4pack_mm_for_cpu`` and ``aten._weight_int8pack_mm``, but on the CPUs measured in
``bench/llm_generate.py`` they run 10-25x slower than the float32 matmul at batch 1 (see
BENCHMARKS.md), and they restrict shapes (N a multiple of 16, K a multiple of the group, groups
32..256, int8 per-row only).

The kernels below are ~240 lines of C (AVX-512 or AVX2/FMA intrinsics where the compiler targets
them, plain loops elsewhere), compiled once with the system C compiler (``cc -O3 -march=native``,
OpenMP over output rows) into ``$NNSQUEEZE_CACHE/kernels/`` (default
``~/.cache/nnsqueeze``), keyed by the source, the flags and the CPU's feature flags, and called
through ``ctypes`` (which releases the GIL). :func:`load_kernel` returns ``None`` with a reason
when no compiler is available; callers then fall back (logged, never silently) to dequantizing.

Math, for activation rows ``x`` (M, K) and codes ``q`` (N, K) with group scales ``s`` and zero
points ``z`` (N, G), ``y = x @ ((q - z) * s).T + b`` is computed as
``y[m, n] = sum_g s[n, g] * (sum_{k in g} x[m, k] q[n, k] - z[n, g] * sum_{k in g} x[m, k]) + b[n]``
(group sums of ``x`` computed once per call). int4 codes are read in the artifact's layout: byte
``i`` of a row holds element ``2i`` (low nibble) and ``2i+1`` (high nibble); the caller passes the
even and odd elements of ``x`` as two contiguous arrays so that the inner loop vectorizes::

    >>> import torch
    >>> from nnsqueeze.llm.gemv import load_kernel
    >>> k, why = load_kernel()
    >>> k is not None or isinstance(why, str)
    True
"""

from __future__ import annotations

import ctypes

import torch

from ..errors import ModelError
from .cbuild import compile_library

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define NSQ_SIMD 1
typedef __m512 vacc;
static inline vacc vzero(void) { return _mm512_setzero_ps(); }
/* acc += 32 int4 codes (16 bytes) times their inputs: low nibbles meet e[0..16), high ones o[0..16). */
static inline void dot_int4_16(const uint8_t* w, const float* e, const float* o, vacc acc[2]) {
  const __m128i m15 = _mm_set1_epi8(15);
  __m128i b = _mm_loadu_si128((const __m128i*)w);
  __m128i l = _mm_and_si128(b, m15), h = _mm_and_si128(_mm_srli_epi16(b, 4), m15);
  acc[0] = _mm512_fmadd_ps(_mm512_loadu_ps(e), _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(l)), acc[0]);
  acc[1] = _mm512_fmadd_ps(_mm512_loadu_ps(o), _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(h)), acc[1]);
}
/* acc += 16 int8 codes times their inputs. */
static inline void dot_int8_16(const uint8_t* w, const float* e, vacc acc[2]) {
  __m128i b = _mm_loadu_si128((const __m128i*)w);
  acc[0] = _mm512_fmadd_ps(_mm512_loadu_ps(e), _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b)), acc[0]);
}
static inline void scale_add(vacc tot[2], const vacc acc[2], float s) {
  __m512 sv = _mm512_set1_ps(s);
  tot[0] = _mm512_fmadd_ps(sv, acc[0], tot[0]);
  tot[1] = _mm512_fmadd_ps(sv, acc[1], tot[1]);
}
static inline float hsum(const vacc tot[2]) { return _mm512_reduce_add_ps(_mm512_add_ps(tot[0], tot[1])); }
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define NSQ_SIMD 1
typedef __m256 vacc;
static inline vacc vzero(void) { return _mm256_setzero_ps(); }
static inline __m256 cvt8(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)); }
/* The 16 bytes at w as 32 int4 codes in float: lo[j] / hi[j] = low / high nibbles of bytes 8j..8j+7. Each byte
   is zero-extended to a 32-bit lane straight from memory, then its nibbles are an and and a shift in that lane:
   fewer shuffles than splitting the nibbles first (1.3-1.4x faster int4 kernels on an AVX2-only AMD EPYC,
   bench/int4_kernel.py), and the same floats. */
static inline void nib16(const uint8_t* w, __m256 lo[2], __m256 hi[2]) {
  const __m256i m15 = _mm256_set1_epi32(15);
  __m256i d0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)w));
  __m256i d1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(w + 8)));
  lo[0] = _mm256_cvtepi32_ps(_mm256_and_si256(d0, m15));
  hi[0] = _mm256_cvtepi32_ps(_mm256_srli_epi32(d0, 4));
  lo[1] = _mm256_cvtepi32_ps(_mm256_and_si256(d1, m15));
  hi[1] = _mm256_cvtepi32_ps(_mm256_srli_epi32(d1, 4));
}
/* *a0 += e[0..8) lo[0], *a1 += o[0..8) hi[0], *a2 += e[8..16) lo[1], *a3 += o[8..16) hi[1], in that order (a2, a3
   may be a0, a1): the 32 codes of the 16 bytes at w times their inputs, low nibbles meeting e, high ones o */
static inline void fma_int4_16(const uint8_t* w, const float* e, const float* o, __m256* a0, __m256* a1,
                               __m256* a2, __m256* a3) {
  __m256 lo[2], hi[2];
  nib16(w, lo, hi);
  *a0 = _mm256_fmadd_ps(_mm256_loadu_ps(e), lo[0], *a0);
  *a1 = _mm256_fmadd_ps(_mm256_loadu_ps(o), hi[0], *a1);
  *a2 = _mm256_fmadd_ps(_mm256_loadu_ps(e + 8), lo[1], *a2);
  *a3 = _mm256_fmadd_ps(_mm256_loadu_ps(o + 8), hi[1], *a3);
}
static inline void dot_int4_16(const uint8_t* w, const float* e, const float* o, vacc acc[2]) {
  fma_int4_16(w, e, o, &acc[0], &acc[1], &acc[0], &acc[1]);
}
static inline void dot_int8_16(const uint8_t* w, const float* e, vacc acc[2]) {
  __m128i b = _mm_loadu_si128((const __m128i*)w);
  acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(e), cvt8(b), acc[0]);
  acc[1] = _mm256_fmadd_ps(_mm256_loadu_ps(e + 8), cvt8(_mm_srli_si128(b, 8)), acc[1]);
}
static inline void scale_add(vacc tot[2], const vacc acc[2], float s) {
  __m256 sv = _mm256_set1_ps(s);
  tot[0] = _mm256_fmadd_ps(sv, acc[0], tot[0]);
  tot[1] = _mm256_fmadd_ps(sv, acc[1], tot[1]);
}
static inline float hsum(const vacc tot[2]) {
  __m256 t = _mm256_add_ps(tot[0], tot[1]);
  __m128 u = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
  u = _mm_add_ps(u, _mm_movehl_ps(u, u));
  u = _mm_add_ss(u, _mm_shuffle_ps(u, u, 1));
  return _mm_cvtss_f32(u);
}
#else
#define NSQ_SIMD 0
#endif

/* y (M, N) = x (M, K) @ ((q - z) * s).T + b with groups of g inputs (the last may be shorter).
   bits 4: q is (N, ceil(K/2)) bytes, element 2i in the low nibble of byte i, 2i+1 in the high one;
   bits 8: q is (N, K). s (N, G) float, z (N, G) uint8 codes. Returns 1 when out of memory. */
int nsq_gemv(int bits, int M, int N, int K, int G, int g, const uint8_t* W, const float* S,
             const uint8_t* Z, const float* x, const float* bias, float* y, int threads) {
  int KB = bits == 4 ? (K + 1) / 2 : K;          /* bytes per row */
  int gb = bits == 4 ? (g + 1) / 2 : g;          /* bytes per group (g even, or one group per row) */
  /* per activation row: the inputs of each byte's low / high code, and the group sums of x */
  float* lo = malloc(sizeof(float) * (size_t)M * KB);
  float* hi = bits == 4 ? malloc(sizeof(float) * (size_t)M * KB) : NULL;
  float* xs = malloc(sizeof(float) * (size_t)M * G);
  if (!lo || !xs || (bits == 4 && !hi)) { free(lo); free(hi); free(xs); return 1; }
  for (int m = 0; m < M; m++) {
    const float* xr = x + (size_t)m * K;
    float* l = lo + (size_t)m * KB;
    if (bits == 4) {
      float* h = hi + (size_t)m * KB;
      for (int i = 0; i < KB; i++) { l[i] = xr[2 * i]; h[i] = 2 * i + 1 < K ? xr[2 * i + 1] : 0.f; }
    } else memcpy(l, xr, sizeof(float) * K);
    for (int gi = 0; gi < G; gi++) {
      float t = 0.f; int a = gi * g, b = a + g < K ? a + g : K;
      for (int k = a; k < b; k++) t += xr[k];
      xs[(size_t)m * G + gi] = t;
    }
  }
  #pragma omp parallel for num_threads(threads) schedule(static) if(threads > 1)
  for (int n = 0; n < N; n++) {
    const uint8_t* w = W + (size_t)n * KB;
    const float* sr = S + (size_t)n * G;
    const uint8_t* zr = Z + (size_t)n * G;
    for (int m = 0; m < M; m++) {
      const float* e = lo + (size_t)m * KB;
      const float* o = bits == 4 ? hi + (size_t)m * KB : NULL;
      /* SIMD lanes hold s * partial dot products, summed across lanes once per output; the
         zero-point term and any tail shorter than 16 bytes go through the scalar `rest`. */
      float rest = 0.f;
#if NSQ_SIMD
      vacc tot[2] = {vzero(), vzero()};
#endif
      for (int gi = 0; gi < G; gi++) {
        int a = gi * gb, b = a + gb < KB ? a + gb : KB, i = a;
        float tail = 0.f;
#if NSQ_SIMD
        if (b - a >= 16) {
          vacc v[2] = {vzero(), vzero()};
          if (bits == 4) for (; i + 16 <= b; i += 16) dot_int4_16(w + i, e + i, o + i, v);
          else for (; i + 16 <= b; i += 16) dot_int8_16(w + i, e + i, v);
          scale_add(tot, v, sr[gi]);
        }
#endif
        if (bits == 4) for (; i < b; i++) tail += e[i] * (float)(w[i] & 15) + o[i] * (float)(w[i] >> 4);
        else for (; i < b; i++) tail += e[i] * (float)w[i];
        rest += sr[gi] * (tail - (float)zr[gi] * xs[(size_t)m * G + gi]);
      }
#if NSQ_SIMD
      rest += hsum(tot);
#endif
      float tot_ = rest;
      y[(size_t)m * N + n] = tot_ + (bias ? bias[n] : 0.f);
    }
  }
  free(lo); free(hi); free(xs);
  return 0;
}

/* ---- int8 activations (opt-in): x rounded to int8 per group, integer dot products (as llama.cpp's Q8 x Q4) ----
   Per group of the activation row: d = absmax / 127, xq = round(x / d) in [-127, 127]. Then
   y[m, n] = sum_g s[n, g] d[m, g] (sum_{k in g} q[n, k] xq[k] - z[n, g] sum_{k in g} xq[k]) + b[n].
   u8 x s8 products: AVX512-VNNI / AVX-VNNI vpdpbusd, or AVX2 vpmaddubsw + vpmaddwd (int4 codes only:
   255 x 127 x 2 would saturate its 16-bit pair sums). */
#if defined(__AVX2__) && ((defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__))
#include <immintrin.h>
#define NSQ_A8 1
#define NSQ_A8_INT8 1
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
static inline __m256i dp32(__m256i a, __m256i u, __m256i s) { return _mm256_dpbusd_epi32(a, u, s); }
static inline __m128i dp16(__m128i a, __m128i u, __m128i s) { return _mm_dpbusd_epi32(a, u, s); }
#else
static inline __m256i dp32(__m256i a, __m256i u, __m256i s) { return _mm256_dpbusd_avx_epi32(a, u, s); }
static inline __m128i dp16(__m128i a, __m128i u, __m128i s) { return _mm_dpbusd_avx_epi32(a, u, s); }
#endif
#elif defined(__AVX2__)
#include <immintrin.h>
#define NSQ_A8 1
#define NSQ_A8_INT8 0
static inline __m256i dp32(__m256i a, __m256i u, __m256i s) {
  return _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
static inline __m128i dp16(__m128i a, __m128i u, __m128i s) {
  return _mm_add_epi32(a, _mm_madd_epi16(_mm_maddubs_epi16(u, s), _mm_set1_epi16(1)));
}
#else
#define NSQ_A8 0
#define NSQ_A8_INT8 0
#endif
#define LD32(p) _mm256_loadu_si256((const __m256i*)(p))
#define LD16(p) _mm_loadu_si128((const __m128i*)(p))

/* Same arguments as nsq_gemv. Returns 1 when out of memory, 2 when this build has no integer path
   for these codes (no AVX2; int8 codes without VNNI): the caller then uses nsq_gemv. */
int nsq_gemv_a8(int bits, int M, int N, int K, int G, int g, const uint8_t* W, const float* S,
                const uint8_t* Z, const float* x, const float* bias, float* y, int threads) {
#if !NSQ_A8
  (void)bits; (void)M; (void)N; (void)K; (void)G; (void)g; (void)W; (void)S; (void)Z; (void)x; (void)bias;
  (void)y; (void)threads;
  return 2;
#else
  if (bits == 8 && !NSQ_A8_INT8) return 2;
  int KB = bits == 4 ? (K + 1) / 2 : K, gb = bits == 4 ? (g + 1) / 2 : g;
  int8_t* xe = calloc((size_t)M * KB, 1);                    /* int8 inputs of low nibbles (or all, bits 8) */
  int8_t* xo = bits == 4 ? calloc((size_t)M * KB, 1) : NULL; /* inputs of high nibbles (0 past K) */
  /* bits 4: the same inputs per 16-byte block of codes as 16 even then 16 odd ones, so that one 256-bit
     product covers a block whose low and high nibbles sit in the two 128-bit halves (groups of 32) */
  int XS = ((KB + 15) & ~15) * 2;                              /* bytes per row of xb */
  int8_t* xb = bits == 4 ? calloc((size_t)M * XS, 1) : NULL;
  float* dx = malloc(sizeof(float) * (size_t)M * G);
  float* zx = malloc(sizeof(float) * (size_t)M * G);          /* d * sum(xq) per group: the zero-point term */
  if (!xe || !dx || !zx || (bits == 4 && (!xo || !xb))) {
    free(xe); free(xo); free(xb); free(dx); free(zx); return 1;
  }
  for (int m = 0; m < M; m++) {
    const float* xr = x + (size_t)m * K;
    for (int gi = 0; gi < G; gi++) {
      int a = gi * g, b = a + g < K ? a + g : K, t = 0;
      float amax = 0.f;
      for (int k = a; k < b; k++) { float v = xr[k] < 0 ? -xr[k] : xr[k]; if (v > amax) amax = v; }
      float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
      for (int k = a; k < b; k++) {
        float r = nearbyintf(xr[k] * inv);
        int q = r > 127.f ? 127 : (r < -127.f ? -127 : (int)r);
        t += q;
        if (bits == 8) xe[(size_t)m * KB + k] = (int8_t)q;
        else if (k & 1) xo[(size_t)m * KB + k / 2] = (int8_t)q;
        else xe[(size_t)m * KB + k / 2] = (int8_t)q;
      }
      dx[(size_t)m * G + gi] = d;
      zx[(size_t)m * G + gi] = d * (float)t;
    }
    if (bits == 4)
      for (int i = 0; i < KB; i++) {
        xb[(size_t)m * XS + (i & ~15) * 2 + (i & 15)] = xe[(size_t)m * KB + i];
        xb[(size_t)m * XS + (i & ~15) * 2 + 16 + (i & 15)] = xo[(size_t)m * KB + i];
      }
  }
  #pragma omp parallel for num_threads(threads) schedule(static) if(threads > 1)
  for (int n = 0; n < N; n++) {
    const uint8_t* w = W + (size_t)n * KB;
    const float* sr = S + (size_t)n * G;
    const uint8_t* zr = Z + (size_t)n * G;
    const __m256i m15 = _mm256_set1_epi8(15);
    for (int m = 0; m < M; m++) {
      const int8_t* e = xe + (size_t)m * KB;
      const int8_t* o = bits == 4 ? xo + (size_t)m * KB : NULL;
      const int8_t* eo = bits == 4 ? xb + (size_t)m * XS : NULL;
      const float* dm = dx + (size_t)m * G;
      __m256 tot = _mm256_setzero_ps();
      float rest = 0.f;
      int gi = 0;
      if (bits == 4 && gb % 16 == 0) {           /* groups of a multiple of 32: whole 16-byte blocks */
        /* Two groups per step into two chains: one chain waits on the FMA's latency every group, which
           at groups of 32 costs as much as the products (2x slower on an AMD EPYC, bench/int4_kernel.py) */
        int full = KB / gb;
        __m256 t1 = _mm256_setzero_ps();
        for (; gi + 2 <= full; gi += 2) {
          __m256i c0 = _mm256_setzero_si256(), c1 = c0;
          for (int i = gi * gb, j = i + gb; i < j; i += 16) {
            __m128i v0 = LD16(w + i), v1 = LD16(w + i + gb);
            c0 = dp32(c0, _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v0, 4), v0), m15), LD32(eo + 2 * i));
            c1 = dp32(c1, _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v1, 4), v1), m15),
                      LD32(eo + 2 * (i + gb)));
          }
          tot = _mm256_fmadd_ps(_mm256_cvtepi32_ps(c0), _mm256_set1_ps(sr[gi] * dm[gi]), tot);
          t1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(c1), _mm256_set1_ps(sr[gi + 1] * dm[gi + 1]), t1);
        }
        tot = _mm256_add_ps(tot, t1);
      }
      for (; gi < G; gi++) {                      /* other sizes, the last groups */
        int a = gi * gb, b = a + gb < KB ? a + gb : KB, i = a;
        __m256i acc = _mm256_setzero_si256();
        int32_t tail = 0;
        for (; i + 32 <= b; i += 32) {
          __m256i v = LD32(w + i);
          if (bits == 4) {
            acc = dp32(acc, _mm256_and_si256(v, m15), LD32(e + i));
            acc = dp32(acc, _mm256_and_si256(_mm256_srli_epi16(v, 4), m15), LD32(o + i));
          } else acc = dp32(acc, v, LD32(e + i));
        }
        if (bits == 4 && i + 16 <= b && !(i & 15)) {  /* a 16-byte block: both nibbles in one product */
          __m128i v = LD16(w + i);
          acc = dp32(acc, _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), m15), LD32(eo + 2 * i));
          i += 16;
        }
        if (i + 16 <= b) {
          __m128i acc16 = _mm_setzero_si128(), m15h = _mm256_castsi256_si128(m15);
          for (; i + 16 <= b; i += 16) {
            __m128i v = LD16(w + i);
            if (bits == 4) {
              acc16 = dp16(acc16, _mm_and_si128(v, m15h), LD16(e + i));
              acc16 = dp16(acc16, _mm_and_si128(_mm_srli_epi16(v, 4), m15h), LD16(o + i));
            } else acc16 = dp16(acc16, v, LD16(e + i));
          }
          acc = _mm256_add_epi32(acc, _mm256_zextsi128_si256(acc16));
        }
        if (i < b) {
          if (bits == 4) for (; i < b; i++) tail += (int32_t)(w[i] & 15) * e[i] + (int32_t)(w[i] >> 4) * o[i];
          else for (; i < b; i++) tail += (int32_t)w[i] * e[i];
          rest += sr[gi] * dm[gi] * (float)tail;
        }
        tot = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(sr[gi] * dm[gi]), tot);
      }
      /* the zero-point term sum_g s z d sum(xq), eight groups at a time */
      const float* zm = zx + (size_t)m * G;
      __m256 zt = _mm256_setzero_ps();
      gi = 0;
      for (; gi + 8 <= G; gi += 8) {
        __m256 zf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(zr + gi))));
        zt = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(sr + gi), zf), _mm256_loadu_ps(zm + gi), zt);
      }
      for (; gi < G; gi++) rest -= sr[gi] * (float)zr[gi] * zm[gi];
      tot = _mm256_sub_ps(tot, zt);
      __m128 u = _mm_add_ps(_mm256_castps256_ps128(tot), _mm256_extractf128_ps(tot, 1));
      u = _mm_add_ps(u, _mm_movehl_ps(u, u));
      u = _mm_add_ss(u, _mm_shuffle_ps(u, u, 1));
      y[(size_t)m * N + n] = _mm_cvtss_f32(u) + rest + (bias ? bias[n] : 0.f);
    }
  }
  free(xe); free(xo); free(xb); free(dx); free(zx);
  return 0;
#endif
}

/* Dequantize to float (N, K): the batched (prefill) path multiplies this with a float matmul.
   Same arithmetic as the torch reference ((float)q - (float)z) * s, so the values are identical. */
#if defined(__AVX2__)
/* (q - z) * s of the 8 codes at w (int8) or the 16 int4 codes of the 8 bytes at w (low nibble first) into r:
   the scalar loop's operations in the same order, so the same floats. */
static inline __m256 dq8(__m256i q, __m256 z, __m256 s) {
  return _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(q), z), s);
}
static inline void dq4_16(const uint8_t* w, __m256 z, __m256 s, float* r) {
  __m256i d = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)w));
  __m256i lo = _mm256_and_si256(d, _mm256_set1_epi32(15)), hi = _mm256_srli_epi32(d, 4);
  __m256i a = _mm256_unpacklo_epi32(lo, hi), b = _mm256_unpackhi_epi32(lo, hi);  /* l0 h0 l1 h1 | l4 h4 l5 h5 */
  _mm256_storeu_ps(r, dq8(_mm256_permute2x128_si256(a, b, 0x20), z, s));
  _mm256_storeu_ps(r + 8, dq8(_mm256_permute2x128_si256(a, b, 0x31), z, s));
}
#endif
void nsq_dequant(int bits, int N, int K, int G, int g, const uint8_t* W, const float* S, const uint8_t* Z,
                 float* out, int threads) {
  int KB = bits == 4 ? (K + 1) / 2 : K;
  #pragma omp parallel for num_threads(threads) schedule(static) if(threads > 1)
  for (int n = 0; n < N; n++) {
    const uint8_t* w = W + (size_t)n * KB;
    float* r = out + (size_t)n * K;
    for (int gi = 0; gi < G; gi++) {
      float s = S[(size_t)n * G + gi], z = (float)Z[(size_t)n * G + gi];
      int a = gi * g, b = a + g < K ? a + g : K, k = a;
#if defined(__AVX2__)
      __m256 vz = _mm256_set1_ps(z), vs = _mm256_set1_ps(s);
      if (bits == 8)
        for (; k + 8 <= b; k += 8)
          _mm256_storeu_ps(r + k, dq8(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(w + k))), vz, vs));
      else
        for (; k + 16 <= b; k += 16) dq4_16(w + (k >> 1), vz, vs, r + k);
#endif
      if (bits == 8) { for (; k < b; k++) r[k] = ((float)w[k] - z) * s; continue; }
      /* groups start at even k (g even, or a single group), so whole bytes belong to one group */
      for (; k + 1 < b; k += 2) {
        uint8_t v = w[k >> 1];
        r[k] = ((float)(v & 15) - z) * s;
        r[k + 1] = ((float)(v >> 4) - z) * s;
      }
      if ((b - a) & 1) r[b - 1] = ((float)(w[(b - 1) >> 1] & 15) - z) * s;
    }
  }
}
/* Which code paths this build compiled: "<simd> <int8-activation path>", e.g. "avx512 vnni", "avx2 maddubs",
   "scalar none" (tests check that a -march override took the path it names). */
const char* nsq_isa(void) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  return NSQ_A8_INT8 ? "avx512 vnni" : "avx512 maddubs";
#elif NSQ_SIMD
  return NSQ_A8_INT8 ? "avx2 vnni" : "avx2 maddubs";
#else
  return "scalar none";
#endif
}
"""

def declare_gemv(lib) -> None:
    """ctypes signatures of the functions of :data:`SOURCE` (also part of the decode-loop library)."""
    i, p = ctypes.c_int, ctypes.c_void_p
    lib.nsq_gemv.argtypes = [i, i, i, i, i, i, p, p, p, p, p, p, i]
    lib.nsq_gemv.restype = ctypes.c_int
    lib.nsq_gemv_a8.argtypes = lib.nsq_gemv.argtypes
    lib.nsq_gemv_a8.restype = ctypes.c_int
    lib.nsq_dequant.argtypes = [i, i, i, i, i, p, p, p, p, i]
    lib.nsq_dequant.restype = None
    lib.nsq_isa.argtypes = []
    lib.nsq_isa.restype = ctypes.c_char_p


def load_kernel() -> tuple[object | None, str]:
    """``(library, "")`` or ``(None, reason)``. Built on first use, then reused from the cache.

    ``NNSQUEEZE_PACKED_KERNEL=0`` disables it (the callers' fallback is then used and logged).
    """
    lib, why = compile_library("nsq_gemv", SOURCE, declare_gemv)
    return lib, why.replace("could not build nsq_gemv", "could not build the packed kernel")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def gemv(lib, bits: int, x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
         gsize: int, bias: torch.Tensor | None, threads: int) -> torch.Tensor:
    """``y = x @ ((q - z) * s).T + bias`` for ``x`` (M, K) float32 contiguous; ``codes`` (N, ceil(K/2))
    (bits 4) or (N, K) (bits 8) uint8; ``scale`` (N, G) float32; ``zero`` (N, G) uint8 (unpacked);
    ``gsize`` inputs per group (even, or K: one group per row). All on CPU, contiguous."""
    m, k = x.shape
    n = codes.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    if lib.nsq_gemv(bits, m, n, k, scale.shape[1], gsize, _ptr(codes), _ptr(scale), _ptr(zero), _ptr(x),
                    _ptr(bias), _ptr(y), threads):
        raise MemoryError("nsq_gemv: out of memory for the activation scratch buffers")
    return y


def gemv_a8(lib, bits: int, x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
            gsize: int, bias: torch.Tensor | None, threads: int) -> torch.Tensor | None:
    """:func:`gemv` with ``x`` rounded to int8 per group (scale absmax / 127) and integer dot products,
    as llama.cpp multiplies Q4 weights; ``None`` when this build has no integer path for ``bits``
    (no AVX2; int8 codes without VNNI). Error per output at most ``sum_g (absmax_g / 254) * sum_{k in g}
    |w[n, k]|`` beyond float rounding."""
    m, k = x.shape
    n = codes.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    rc = lib.nsq_gemv_a8(bits, m, n, k, scale.shape[1], gsize, _ptr(codes), _ptr(scale), _ptr(zero), _ptr(x),
                         _ptr(bias), _ptr(y), threads)
    if rc == 1:
        raise MemoryError("nsq_gemv_a8: out of memory for the activation scratch buffers")
    return None if rc == 2 else y


def dequantize(lib, bits: int, k: int, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               gsize: int, threads: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """float32 (N, K) ``(q - z) * s``: the same values as :func:`nnsqueeze.ops.rtn.dequantize_groups`.

    ``codes``/``scale``/``zero`` may be a block of consecutive rows (a row slice stays contiguous);
    ``out``, if given, is a contiguous float32 (N, K) buffer that is written and returned."""
    n = codes.shape[0]
    if out is None:
        out = torch.empty(n, k, dtype=torch.float32)
    elif out.shape != (n, k) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ModelError("gemv.dequantize", f"out is {out.dtype} {tuple(out.shape)}, contiguous={out.is_contiguous()}",
                         fix=f"pass a contiguous float32 ({n}, {k}) tensor, or out=None")
    lib.nsq_dequant(bits, n, k, scale.shape[1], gsize, _ptr(codes), _ptr(scale), _ptr(zero), _ptr(out), threads)
    return out
