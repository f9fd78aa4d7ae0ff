"""One whole decode step of a LLaMA-architecture model in C: the numeric part of :mod:`nnsqueeze.llm.fastdecode`.

Generating one token with Hugging Face's eager model makes ~210 packed-Linear calls through Python and
ctypes plus dozens of small torch ops (norms, rotary, attention, cache), which costs more than reading
the weights. ``nsq_step`` below runs every layer, the final norm, ``lm_head`` and the argmax in one call
(the GIL released by ctypes): RMSNorm, rotary embeddings (default RoPE, the model's ``inv_freq``),
grouped-query attention over a float32 KV cache, the SwiGLU MLP and the residuals, in float32 like the
torch model. Linear layers are either packed int4 / int8 codes, multiplied by ``nsq_gemv`` /
``nsq_gemv_a8`` of :mod:`nnsqueeze.llm.gemv` (this source is appended to that one and compiled with
the same flags and cache), or float32 matrices (an OpenMP matrix-vector loop); each may have a bias and
an AWQ input scale (``x / s`` first, as ``PackedLinear`` does). OpenMP threads are passed per call.

This module knows nothing of torch modules: :class:`Lin`, :class:`Layer` and :class:`Model` mirror the
C structs (pointers and sizes) and :func:`load` builds the library. The model walking is in
:mod:`nnsqueeze.llm.fastdecode`::

    >>> from nnsqueeze.llm.decode_c import load
    >>> lib, why = load()
    >>> lib is not None or isinstance(why, str)
    True
"""

from __future__ import annotations

import ctypes

from . import gemv as _gemv
from .cbuild import compile_library

DECODE_SOURCE = r"""
#ifdef _OPENMP
#include <omp.h>
#endif
typedef struct {               /* one Linear: y = (x / in_scale) @ W.T + bias */
  int kind, N, K, G, g;        /* kind 0: W float32 (N, K); 4 / 8: packed codes, scales S (N, G), zeros Z */
  const void* W; const float* S; const uint8_t* Z; const float* bias; const float* in_scale;
} nsq_lin;

typedef struct {
  nsq_lin q, k, v, o, gate, up, down;
  const float* ln1; const float* ln2;   /* input_layernorm, post_attention_layernorm weights */
  float* kc; float* vc;                 /* KV cache, (KVH, T, D) float32 each */
} nsq_layer;

typedef struct {
  int L, H, KVH, D, hidden, inter, vocab, T, act8;
  float eps, scaling, rope_scale;       /* RMSNorm eps, attention scale (D^-0.5), cos/sin factor */
  const float* inv_freq;                /* D/2 rotary inverse frequencies */
  const float* embed;                   /* (vocab, hidden) float32, or NULL: the caller passes x */
  const float* norm;                    /* final RMSNorm weight */
  nsq_lin head;                         /* lm_head */
  const nsq_layer* layers;
  float* work;                          /* nsq_work_floats(m) floats of scratch */
} nsq_model;

static int imax(int a, int b) { return a > b ? a : b; }

long nsq_work_floats(const nsq_model* m) {
  int big = imax(imax(m->hidden, m->inter), m->H * m->D);
  return 3L * m->hidden + 2L * m->H * m->D + 2L * m->KVH * m->D + 2L * m->inter + 2L * big + (long)m->H * m->T + m->D;
}

/* float32 rows: four vector accumulators per row, so the loop runs at the memory's read speed instead of
   one FMA's latency (a single accumulator read the 113 MB fp32 lm_head of SmolLM2 1.5x slower). */
#if defined(__AVX512F__)
#define NSQ_FV 16
typedef __m512 fvec;
static inline fvec fv_zero(void) { return _mm512_setzero_ps(); }
static inline fvec fv_fma(const float* a, const float* b, fvec c) {
  return _mm512_fmadd_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(b), c);
}
static inline float fv_sum(fvec a, fvec b, fvec c, fvec d) {
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a, b), _mm512_add_ps(c, d)));
}
#elif defined(__AVX2__) && defined(__FMA__)
#define NSQ_FV 8
typedef __m256 fvec;
static inline fvec fv_zero(void) { return _mm256_setzero_ps(); }
static inline fvec fv_fma(const float* a, const float* b, fvec c) {
  return _mm256_fmadd_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(b), c);
}
static inline float fv_sum(fvec a, fvec b, fvec c, fvec d) {
  __m256 t = _mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, d));
  __m128 u = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
  u = _mm_add_ps(u, _mm_movehl_ps(u, u));
  return _mm_cvtss_f32(_mm_add_ss(u, _mm_shuffle_ps(u, u, 1)));
}
#else
#define NSQ_FV 0
#endif

static void gemv_f32(int N, int K, const float* W, const float* x, const float* bias, float* y, int threads) {
  #pragma omp parallel for num_threads(threads) schedule(static) if(threads > 1)
  for (int n = 0; n < N; n++) {
    const float* w = W + (size_t)n * K;
    float a = 0.f;
    int k = 0;
#if NSQ_FV
    fvec v0 = fv_zero(), v1 = v0, v2 = v0, v3 = v0;
    for (; k + 4 * NSQ_FV <= K; k += 4 * NSQ_FV) {
      v0 = fv_fma(w + k, x + k, v0);
      v1 = fv_fma(w + k + NSQ_FV, x + k + NSQ_FV, v1);
      v2 = fv_fma(w + k + 2 * NSQ_FV, x + k + 2 * NSQ_FV, v2);
      v3 = fv_fma(w + k + 3 * NSQ_FV, x + k + 3 * NSQ_FV, v3);
    }
    for (; k + NSQ_FV <= K; k += NSQ_FV) v0 = fv_fma(w + k, x + k, v0);
    a = fv_sum(v0, v1, v2, v3);
#endif
    for (; k < K; k++) a += w[k] * x[k];
    y[n] = a + (bias ? bias[n] : 0.f);
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
/* int4 codes, one activation row, AVX-512: per group a 16-entry table lut[c] = (c - z) * s (the torch
   reference's dequantized values), indexed by vpermps with the codes as they come (it reads the low 4
   bits of each lane): no int-to-float conversion, no zero-point term. Needs K % 32 == 0 and groups of a
   multiple of 32 (or one per row): whole 16-byte blocks. eo: scratch of K floats (even, odd inputs). */
#define NSQ_LUT4 1
/* a[0..1] += lut[codes of the 16 bytes at w] times (e, o): 32 weights, low nibbles meet e, high ones o */
static inline void lut_dot16(const uint8_t* w, const float* e, const float* o, __m512 lut, __m512* a) {
  __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)w));
  a[0] = _mm512_fmadd_ps(_mm512_permutexvar_ps(c, lut), _mm512_loadu_ps(e), a[0]);
  a[1] = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(c, 4), lut), _mm512_loadu_ps(o), a[1]);
}
static inline __m512 lut_of(__m512 iota, uint8_t z, float s) {
  return _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps((float)z)), _mm512_set1_ps(s));
}
static void gemv4_lut(int N, int K, int G, int g, const uint8_t* W, const float* S, const uint8_t* Z,
                      const float* x, const float* bias, float* y, float* eo, int threads) {
  int KB = K / 2, gb = g / 2;
  float *e = eo, *o = eo + KB;
  for (int i = 0; i < KB; i++) { e[i] = x[2 * i]; o[i] = x[2 * i + 1]; }
  #pragma omp parallel for num_threads(threads) schedule(static) if(threads > 1)
  for (int n = 0; n < N; n++) {
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const uint8_t* w = W + (size_t)n * KB;
    const float* s = S + (size_t)n * G;
    const uint8_t* z = Z + (size_t)n * G;
    __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    /* Fixed trip counts for the common group sizes: with the general loops below the compiler's code ran
       1.7-1.8x slower at groups of 32 and 64 (bench/smollm2_decode.py). Groups of 32 (16 bytes) go two at
       a time so that four accumulators hide the FMA latency. */
    int gi = 0, full = KB / gb;              /* whole groups; the last one may be shorter */
    if (gb == 16) {
      for (; gi + 2 <= full; gi += 2) {
        lut_dot16(w + gi * 16, e + gi * 16, o + gi * 16, lut_of(iota, z[gi], s[gi]), a);
        lut_dot16(w + gi * 16 + 16, e + gi * 16 + 16, o + gi * 16 + 16, lut_of(iota, z[gi + 1], s[gi + 1]), a + 2);
      }
    } else if (gb == 32) {
      for (; gi < full; gi++) {
        __m512 lut = lut_of(iota, z[gi], s[gi]);
        lut_dot16(w + gi * 32, e + gi * 32, o + gi * 32, lut, a);
        lut_dot16(w + gi * 32 + 16, e + gi * 32 + 16, o + gi * 32 + 16, lut, a + 2);
      }
    }
    for (; gi < G; gi++) {                   /* other sizes, an odd last group of 32, a short last group */
      __m512 lut = lut_of(iota, z[gi], s[gi]);
      int i = gi * gb, b = i + gb < KB ? i + gb : KB;
      for (; i + 32 <= b; i += 32) {
        lut_dot16(w + i, e + i, o + i, lut, a);
        lut_dot16(w + i + 16, e + i + 16, o + i + 16, lut, a + 2);
      }
      for (; i < b; i += 16) lut_dot16(w + i, e + i, o + i, lut, a);
    }
    y[n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]))) +
           (bias ? bias[n] : 0.f);
  }
}
#else
#define NSQ_LUT4 0
#endif

#if !NSQ_LUT4 && defined(__AVX2__) && defined(__FMA__)
/* int4 codes, one activation row, AVX2 + FMA (8 float lanes: no 16-entry table in one register). Per group
   the codes' dot product with the inputs, sum c x, in two (groups of 32) or four independent chains, then
   scaled into two totals; the zero-point term sum_g s z (sum of the group's x) is one scalar sum per row, as in
   nsq_gemv. Same conditions as the AVX-512 kernel. Fixed trip counts for groups of 32 and 64: the general nsq_gemv
   loop takes 1.4-1.6x (g32) / 1.3x (g64) its time on one token's layers (bench/int4_kernel.py, AMD EPYC, AVX2). */
#define NSQ_I4F 1
/* fma_int4_16 is nsq_gemv's, from the AVX2 branch of gemv.py's source this one follows */
/* v[0..3] += the 32 codes of the 16 bytes at w times their inputs: low nibbles meet e, high ones o */
static inline void i4f_dot16(const uint8_t* w, const float* e, const float* o, __m256* v) {
  fma_int4_16(w, e, o, &v[0], &v[1], &v[2], &v[3]);
}
static inline __m256 i4f_sum(const __m256* v) {
  return _mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3]));
}
static int gemv4_avx2(int N, int K, int G, int g, const uint8_t* W, const float* S, const uint8_t* Z,
                       const float* x, const float* bias, float* y, float* eo, int threads) {
  int KB = K / 2, gb = g / 2;
  float *e = eo, *o = eo + KB;
  for (int i = 0; i < KB; i++) { e[i] = x[2 * i]; o[i] = x[2 * i + 1]; }
  float* xs = malloc(sizeof(float) * (size_t)G);   /* group sums of x */
  if (!xs) return 1;
  for (int gi = 0; gi < G; gi++) {
    float t = 0.f; int a = gi * g, b = a + g < K ? a + g : K;
    for (int k = a; k < b; k++) t += x[k];
    xs[gi] = t;
  }
  #pragma omp parallel for num_threads(threads) schedule(static) if(threads > 1)
  for (int n = 0; n < N; n++) {
    const uint8_t* w = W + (size_t)n * KB;
    const float* s = S + (size_t)n * G;
    const uint8_t* z = Z + (size_t)n * G;
    const __m256 zero = _mm256_setzero_ps();
    __m256 t0 = zero, t1 = zero;
    int gi = 0, full = KB / gb;              /* whole groups; the last one may be shorter */
    if (gb == 16) {                          /* groups of 32, two at a time, two chains each (even, odd) */
      /* four chains per group cost three adds to combine, two cost one: 1.12x faster on an AMD EPYC */
      for (; gi + 2 <= full; gi += 2) {
        __m256 a0 = zero, a1 = zero, b0 = zero, b1 = zero;
        fma_int4_16(w + gi * 16, e + gi * 16, o + gi * 16, &a0, &a1, &a0, &a1);
        fma_int4_16(w + gi * 16 + 16, e + gi * 16 + 16, o + gi * 16 + 16, &b0, &b1, &b0, &b1);
        t0 = _mm256_fmadd_ps(_mm256_set1_ps(s[gi]), _mm256_add_ps(a0, a1), t0);
        t1 = _mm256_fmadd_ps(_mm256_set1_ps(s[gi + 1]), _mm256_add_ps(b0, b1), t1);
      }
    } else if (gb == 32) {
      for (; gi < full; gi++) {
        __m256 v[4] = {zero, zero, zero, zero};
        i4f_dot16(w + gi * 32, e + gi * 32, o + gi * 32, v);
        i4f_dot16(w + gi * 32 + 16, e + gi * 32 + 16, o + gi * 32 + 16, v);
        t0 = _mm256_fmadd_ps(_mm256_set1_ps(s[gi]), i4f_sum(v), t0);
      }
    }
    for (; gi < G; gi++) {                   /* other sizes, an odd last group of 32, a short last group */
      __m256 v[4] = {zero, zero, zero, zero};
      int i = gi * gb, b = i + gb < KB ? i + gb : KB;
      for (; i < b; i += 16) i4f_dot16(w + i, e + i, o + i, v);
      t1 = _mm256_fmadd_ps(_mm256_set1_ps(s[gi]), i4f_sum(v), t1);
    }
    float zc = 0.f;
    for (gi = 0; gi < G; gi++) zc += s[gi] * ((float)z[gi] * xs[gi]);
    __m256 t = _mm256_add_ps(t0, t1);
    __m128 u = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    u = _mm_add_ps(u, _mm_movehl_ps(u, u));
    u = _mm_add_ss(u, _mm_shuffle_ps(u, u, 1));
    y[n] = (_mm_cvtss_f32(u) - zc) + (bias ? bias[n] : 0.f);
  }
  free(xs);
  return 0;
}
#else
#define NSQ_I4F 0
#endif

/* y = lin(x); tmp holds x / in_scale when there is one, eo is scratch. Returns 0, or 1 when out of memory. */
static int lin(const nsq_model* m, const nsq_lin* l, const float* x, float* y, float* tmp, float* eo, int threads) {
  if (l->in_scale) {
    for (int k = 0; k < l->K; k++) tmp[k] = x[k] / l->in_scale[k];
    x = tmp;
  }
  if (l->kind == 0) { gemv_f32(l->N, l->K, (const float*)l->W, x, l->bias, y, threads); return 0; }
#if NSQ_LUT4
  if (l->kind == 4 && !m->act8 && l->K % 32 == 0 && (l->G == 1 || l->g % 32 == 0)) {
    gemv4_lut(l->N, l->K, l->G, l->G == 1 ? l->K : l->g, (const uint8_t*)l->W, l->S, l->Z, x, l->bias, y, eo,
              threads);
    return 0;
  }
#endif
#if NSQ_I4F
  if (l->kind == 4 && !m->act8 && l->K % 32 == 0 && (l->G == 1 || l->g % 32 == 0)) {
    return gemv4_avx2(l->N, l->K, l->G, l->G == 1 ? l->K : l->g, (const uint8_t*)l->W, l->S, l->Z, x, l->bias,
                      y, eo, threads);
  }
#endif
  if (m->act8) {
    int rc = nsq_gemv_a8(l->kind, 1, l->N, l->K, l->G, l->g, (const uint8_t*)l->W, l->S, l->Z, x, l->bias, y,
                         threads);
    if (rc != 2) return rc;
  }
  return nsq_gemv(l->kind, 1, l->N, l->K, l->G, l->g, (const uint8_t*)l->W, l->S, l->Z, x, l->bias, y, threads);
}

static void rmsnorm(const float* x, const float* w, float eps, int n, float* y) {
  float ss = 0.f;
  #pragma omp simd reduction(+:ss)
  for (int i = 0; i < n; i++) ss += x[i] * x[i];
  float r = 1.f / sqrtf(ss / (float)n + eps);
  for (int i = 0; i < n; i++) y[i] = w[i] * (x[i] * r);
}

/* q * cos + rotate_half(q) * sin for each of nh heads of D (cos, sin: D/2 each, repeated twice). */
static void rope(float* q, int nh, int D, const float* c, const float* s) {
  int h2 = D / 2;
  for (int h = 0; h < nh; h++) {
    float* v = q + (size_t)h * D;
    for (int i = 0; i < h2; i++) {
      float a = v[i], b = v[i + h2];
      v[i] = a * c[i] - b * s[i];
      v[i + h2] = b * c[i] + a * s[i];
    }
  }
}

/* softmax(q k^T * scaling) v over positions 0..pos, each query head h reading kv head h / (H / KVH). */
static void attention(const nsq_model* m, const nsq_layer* ly, int pos, const float* q, float* out, float* sc,
                      int threads) {
  int D = m->D, T = m->T, grp = m->H / m->KVH;
  #pragma omp parallel for num_threads(threads) schedule(static) if(threads > 1 && pos >= 32)
  for (int h = 0; h < m->H; h++) {
    const float* qh = q + (size_t)h * D;
    const float* kb = ly->kc + (size_t)(h / grp) * T * D;
    const float* vb = ly->vc + (size_t)(h / grp) * T * D;
    float* s = sc + (size_t)h * T;
    float mx = -INFINITY, sum = 0.f;
    for (int t = 0; t <= pos; t++) {
      float a = 0.f;
      const float* kt = kb + (size_t)t * D;
      #pragma omp simd reduction(+:a)
      for (int d = 0; d < D; d++) a += qh[d] * kt[d];
      s[t] = a * m->scaling;
      if (s[t] > mx) mx = s[t];
    }
    for (int t = 0; t <= pos; t++) { s[t] = expf(s[t] - mx); sum += s[t]; }
    float* o = out + (size_t)h * D;
    for (int d = 0; d < D; d++) o[d] = 0.f;
    for (int t = 0; t <= pos; t++) {
      float p = s[t] / sum;
      const float* vt = vb + (size_t)t * D;
      #pragma omp simd
      for (int d = 0; d < D; d++) o[d] += p * vt[d];
    }
  }
}

/* One token at position pos (0-based; the cache holds positions 0..pos-1): writes its K/V into the
   cache, the logits (vocab) into `logits` and returns their argmax (the first maximum). x_in (hidden)
   is the token's embedding when m->embed is NULL. Returns -1 when out of memory, -2 for a bad pos or
   token. */
int nsq_step(const nsq_model* m, int token, const float* x_in, int pos, float* logits, int threads) {
  if (pos < 0 || pos >= m->T) return -2;
  if (m->embed && (token < 0 || token >= m->vocab)) return -2;
  int E = m->hidden, HD = m->H * m->D, KD = m->KVH * m->D, D = m->D;
  float *x = m->work, *xn = x + E, *y = xn + E, *q = y + E, *att = q + HD, *k = att + HD, *v = k + KD;
  float *a = v + KD, *b = a + m->inter, *tmp = b + m->inter;
  int big = imax(imax(E, m->inter), HD);
  float *eo = tmp + big, *sc = eo + big, *cs = sc + (size_t)m->H * m->T, *sn = cs + D / 2;
  memcpy(x, m->embed ? m->embed + (size_t)token * E : x_in, sizeof(float) * E);
  for (int i = 0; i < D / 2; i++) {
    float f = (float)pos * m->inv_freq[i];
    cs[i] = cosf(f) * m->rope_scale;
    sn[i] = sinf(f) * m->rope_scale;
  }
  for (int l = 0; l < m->L; l++) {
    const nsq_layer* ly = m->layers + l;
    rmsnorm(x, ly->ln1, m->eps, E, xn);
    if (lin(m, &ly->q, xn, q, tmp, eo, threads) || lin(m, &ly->k, xn, k, tmp, eo, threads) ||
        lin(m, &ly->v, xn, v, tmp, eo, threads)) return -1;
    rope(q, m->H, D, cs, sn);
    rope(k, m->KVH, D, cs, sn);
    for (int j = 0; j < m->KVH; j++) {
      memcpy(ly->kc + ((size_t)j * m->T + pos) * D, k + (size_t)j * D, sizeof(float) * D);
      memcpy(ly->vc + ((size_t)j * m->T + pos) * D, v + (size_t)j * D, sizeof(float) * D);
    }
    attention(m, ly, pos, q, att, sc, threads);
    if (lin(m, &ly->o, att, y, tmp, eo, threads)) return -1;
    for (int i = 0; i < E; i++) x[i] = x[i] + y[i];
    rmsnorm(x, ly->ln2, m->eps, E, xn);
    if (lin(m, &ly->gate, xn, a, tmp, eo, threads) || lin(m, &ly->up, xn, b, tmp, eo, threads)) return -1;
    for (int i = 0; i < m->inter; i++) a[i] = a[i] / (1.f + expf(-a[i])) * b[i];
    if (lin(m, &ly->down, a, y, tmp, eo, threads)) return -1;
    for (int i = 0; i < E; i++) x[i] = x[i] + y[i];
  }
  rmsnorm(x, m->norm, m->eps, E, xn);
  if (lin(m, &m->head, xn, logits, tmp, eo, threads)) return -1;
  int best = 0;
  for (int i = 1; i < m->vocab; i++) if (logits[i] > logits[best]) best = i;
  return best;
}
"""

SOURCE = _gemv.SOURCE + DECODE_SOURCE

_i, _f, _p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p


class Lin(ctypes.Structure):
    """``nsq_lin``: kind 0 (float32 ``W`` (N, K)), 4 or 8 (packed codes, ``S`` (N, G), ``Z`` (N, G))."""
    _fields_ = [("kind", _i), ("N", _i), ("K", _i), ("G", _i), ("g", _i),
                ("W", _p), ("S", _p), ("Z", _p), ("bias", _p), ("in_scale", _p)]


class Layer(ctypes.Structure):
    """``nsq_layer``: seven Linears, two norm weights and this layer's K / V cache (KVH, T, D)."""
    _fields_ = [(n, Lin) for n in ("q", "k", "v", "o", "gate", "up", "down")] + [
        ("ln1", _p), ("ln2", _p), ("kc", _p), ("vc", _p)]


class Model(ctypes.Structure):
    """``nsq_model``: sizes, RMSNorm eps, attention / rotary scales, weights, layers and scratch."""
    _fields_ = [(n, _i) for n in ("L", "H", "KVH", "D", "hidden", "inter", "vocab", "T", "act8")] + [
        ("eps", _f), ("scaling", _f), ("rope_scale", _f), ("inv_freq", _p), ("embed", _p), ("norm", _p),
        ("head", Lin), ("layers", ctypes.POINTER(Layer)), ("work", _p)]


def _declare(lib) -> None:
    _gemv.declare_gemv(lib)
    lib.nsq_work_floats.argtypes = [ctypes.POINTER(Model)]
    lib.nsq_work_floats.restype = ctypes.c_long
    lib.nsq_step.argtypes = [ctypes.POINTER(Model), _i, _p, _i, _p, _i]
    lib.nsq_step.restype = ctypes.c_int


def load() -> tuple[object | None, str]:
    """``(library, "")`` or ``(None, reason)``: the decode-step library, built once and cached like
    :func:`nnsqueeze.llm.gemv.load_kernel` (same flags, same ``NNSQUEEZE_PACKED_KERNEL=0`` switch)."""
    return compile_library("nsq_decode", SOURCE, _declare)
