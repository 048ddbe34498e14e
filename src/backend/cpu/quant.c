/* Quantized matmul for GGUF Q8_0 and Q4_0 weights, read in place: the activations are quantized
 * on the fly to blocks of 32 int8 with one float scale (d = max|x| / 127, q = round-to-even of
 * x / d), and each block pair contributes d_w * d_x * sum(q_w * q_x) with an exact integer sum.
 * Kernels: portable C, AVX2 (maddubs on |w| and sign-transferred x), AVX-512 VNNI (vpdpbusd on
 * two blocks per 512-bit register, offsets folded into the dot product's start), NEON (widening
 * multiplies). A register tile of 4 weight rows x up to 4 tokens
 * unpacks each weight block once for every token of the tile; every (row, token) sum runs over
 * the blocks in the same order whatever the tile, so a token's result does not depend on the
 * batch around it. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/cpu_backend.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define Q_X86 1
#else
#define Q_X86 0
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#endif

#define QR 4 /* weight rows of a tile */
#define QT 4 /* tokens of a tile */

static float f16_le(const uint8_t *p) { return ts_f16_to_f32((uint16_t)(p[0] | (p[1] << 8))); }

int cpu_quant_supported(ts_dtype dt) { return dt == TS_Q8_0 || dt == TS_Q4_0; }

void cpu_quantize_act(const float *x, int64_t k, int8_t *q, float *d) {
  for (int64_t b = 0; b < k / 32; b++) {
    const float *xb = x + b * 32;
    float amax = 0;
    for (int j = 0; j < 32; j++) amax = fabsf(xb[j]) > amax ? fabsf(xb[j]) : amax;
    float db = amax / 127.0f, id = db != 0 ? 1.0f / db : 0.0f;
    d[b] = db;
    for (int j = 0; j < 32; j++) q[b * 32 + j] = (int8_t)nearbyintf(xb[j] * id);
  }
}

/* The 32 signed weights of block b of a row, and its scale. */
static float block_weights(ts_dtype dt, const uint8_t *row, int64_t b, int8_t w[32]) {
  if (dt == TS_Q8_0) {
    const uint8_t *p = row + b * 34;
    memcpy(w, p + 2, 32);
    return f16_le(p);
  }
  const uint8_t *p = row + b * 18;
  for (int j = 0; j < 16; j++) {
    w[j] = (int8_t)((p[2 + j] & 15) - 8);
    w[j + 16] = (int8_t)((p[2 + j] >> 4) - 8);
  }
  return f16_le(p);
}

/* ---- tiles: out[t][r] = sum over blocks of d_w[r] * d_x[t] * (q_w[r] . q_x[t]) ------------- */

typedef struct {
  ts_dtype dt;
  const uint8_t *w[QR]; /* weight rows */
  const int8_t *xq;     /* [T][k] */
  const float *xd;      /* [T][k/32] */
  int64_t k;
  int T;
} qtile;

static void tile_scalar(const qtile *a, float out[QT][QR]) {
  const int64_t nb = a->k / 32;
  for (int r = 0; r < QR; r++)
    for (int t = 0; t < a->T; t++) out[t][r] = 0;
  for (int64_t b = 0; b < nb; b++) {
    for (int r = 0; r < QR; r++) {
      int8_t w[32];
      float dw = block_weights(a->dt, a->w[r], b, w);
      for (int t = 0; t < a->T; t++) {
        const int8_t *x = a->xq + t * a->k + b * 32;
        int32_t s = 0;
        for (int j = 0; j < 32; j++) s += (int32_t)w[j] * x[j];
        out[t][r] += dw * a->xd[t * nb + b] * (float)s;
      }
    }
  }
}

#if Q_X86
#define INL static inline __attribute__((always_inline))

__attribute__((target("f16c"))) INL float f16_x86(const uint8_t *p) {
  uint16_t h;
  memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

/* 32 signed weights of block b in one ymm, and the block's scale broadcast. */
#define LOAD_WBLOCK(dt, row, b, wv, dv)                                                         \
  do {                                                                                          \
    if ((dt) == TS_Q8_0) {                                                                      \
      const uint8_t *p_ = (row) + (b) * 34;                                                     \
      wv = _mm256_loadu_si256((const __m256i *)(p_ + 2));                                       \
      dv = f16_x86(p_);                                                                         \
    } else {                                                                                    \
      const uint8_t *p_ = (row) + (b) * 18;                                                     \
      __m128i v_ = _mm_loadu_si128((const __m128i *)(p_ + 2));                                  \
      __m128i lo_ = _mm_and_si128(v_, _mm_set1_epi8(15));                                       \
      __m128i hi_ = _mm_and_si128(_mm_srli_epi16(v_, 4), _mm_set1_epi8(15));                    \
      wv = _mm256_sub_epi8(_mm256_set_m128i(hi_, lo_), _mm256_set1_epi8(8));                    \
      dv = f16_x86(p_);                                                                         \
    }                                                                                           \
  } while (0)

__attribute__((target("avx2,fma"))) INL float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

/* Sum of q_w * q_x over one block as 8 int32 lanes. |w| is unsigned, the sign moves onto x. */
__attribute__((target("avx2,fma"))) INL __m256i dot_avx2(__m256i aw, __m256i sx) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), _mm256_set1_epi16(1));
}

#define TILE_BODY(DOT, T)                                                                       \
  do {                                                                                          \
    const int64_t nb = a->k / 32;                                                               \
    __m256 acc[QR][T];                                                                          \
    _Pragma("GCC unroll 4") for (int r = 0; r < QR; r++)                                        \
        _Pragma("GCC unroll 4") for (int t = 0; t < T; t++) acc[r][t] = _mm256_setzero_ps();    \
    for (int64_t b = 0; b < nb; b++) {                                                          \
      __m256i xv[T];                                                                            \
      __m256 xd[T];                                                                             \
      _Pragma("GCC unroll 4") for (int t = 0; t < T; t++) {                                     \
        xv[t] = _mm256_loadu_si256((const __m256i *)(a->xq + t * a->k + b * 32));               \
        xd[t] = _mm256_set1_ps(a->xd[t * nb + b]);                                              \
      }                                                                                         \
      _Pragma("GCC unroll 4") for (int r = 0; r < QR; r++) {                                    \
        if (T <= 2) /* weight-stream bound: fetch each row ahead */                            \
          _mm_prefetch((const char *)a->w[r] + b * (a->dt == TS_Q8_0 ? 34 : 18) + 512,           \
                       _MM_HINT_T0);                                                            \
        __m256i wv;                                                                             \
        float dw;                                                                               \
        LOAD_WBLOCK(a->dt, a->w[r], b, wv, dw);                                                 \
        __m256i aw = _mm256_sign_epi8(wv, wv);                                                  \
        __m256 dwv = _mm256_set1_ps(dw);                                                        \
        _Pragma("GCC unroll 4") for (int t = 0; t < T; t++) {                                   \
          __m256i s = DOT(aw, _mm256_sign_epi8(xv[t], wv));                                     \
          acc[r][t] =                                                                           \
              _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dwv, xd[t]), acc[r][t]);     \
        }                                                                                       \
      }                                                                                         \
    }                                                                                           \
    _Pragma("GCC unroll 4") for (int r = 0; r < QR; r++)                                        \
        _Pragma("GCC unroll 4") for (int t = 0; t < T; t++) out[t][r] = hsum8(acc[r][t]);       \
  } while (0)

/* AVX2 has 16 ymm registers: tiles of up to 2 tokens. */
__attribute__((target("avx2,fma,f16c"))) static void tile_avx2_1(const qtile *a, float out[QT][QR]) {
  TILE_BODY(dot_avx2, 1);
}
__attribute__((target("avx2,fma,f16c"))) static void tile_avx2_2(const qtile *a, float out[QT][QR]) {
  TILE_BODY(dot_avx2, 2);
}


/* 512-bit VNNI: two blocks per register (lanes 0-7 block b, 8-15 block b+1), one vpdpbusd per
 * (row, token, block pair) with no sign juggling. vpdpbusd wants an unsigned first operand, so
 * the weights go in offset to u8: Q8_0 as w + 128, Q4_0 as its raw nibbles (w + 8). The offset
 * adds off * sum(x) per block, which depends on the token only: each token's dot products start
 * from -off * sum(x) (computed once per token and pair, shared by the rows of the tile).
 * Per (row, token, pair): dot, convert, scale product, FMA. */
#define V512_TGT                                                                                \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx512vnni,avx2,fma,f16c")))

/* Lanes 0-7 take v[0], lanes 8-15 v[1]. */
V512_TGT INL __m512 pair_spread(__m128 v) {
  return _mm512_permutexvar_ps(_mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
                               _mm512_castps128_ps512(v));
}

/* Weights of blocks b, b+1 of a row as 64 unsigned bytes (w + 128 for Q8_0, the nibbles for
 * Q4_0, in the element order of x within each block) and their scales as lanes 0-7 / 8-15.
 * two = 0: block b only; the upper half then meets x = 0 and adds nothing. */
V512_TGT INL __m512i load_wpair(ts_dtype dt, const uint8_t *row, int64_t b, int two,
                                __m512 *dv) {
  const int bsz = dt == TS_Q8_0 ? 34 : 18;
  const uint8_t *p = row + b * bsz;
  uint16_t h0, h1 = 0;
  memcpy(&h0, p, 2);
  if (two) memcpy(&h1, p + bsz, 2);
  *dv = pair_spread(_mm_cvtph_ps(_mm_cvtsi32_si128((int)((uint32_t)h0 | ((uint32_t)h1 << 16)))));
  if (dt == TS_Q8_0) {
    __m256i lo = _mm256_loadu_si256((const __m256i *)(p + 2));
    __m256i hi = two ? _mm256_loadu_si256((const __m256i *)(p + 36)) : _mm256_setzero_si256();
    return _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1),
                            _mm512_set1_epi8((char)0x80));
  }
  __m128i v0 = _mm_loadu_si128((const __m128i *)(p + 2));
  __m128i v1 = two ? _mm_loadu_si128((const __m128i *)(p + 20)) : _mm_setzero_si128();
  __m256i v = _mm256_set_m128i(v1, v0); /* [b | b+1] packed nibbles */
  __m256i m = _mm256_set1_epi8(15);
  __m256i lo = _mm256_and_si256(v, m), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
  /* [b: elements 0-15, 16-31 | b+1: 0-15, 16-31] */
  __m256i b0 = _mm256_permute2x128_si256(lo, hi, 0x20);
  __m256i b1 = _mm256_permute2x128_si256(lo, hi, 0x31);
  return _mm512_inserti64x4(_mm512_castsi256_si512(b0), b1, 1);
}

#define TILE512_BODY(T, DT)                                                                     \
  do {                                                                                          \
    const int64_t nb = a->k / 32;                                                               \
    const int bsz = (DT) == TS_Q8_0 ? 34 : 18;                                                  \
    const __m512i off = _mm512_set1_epi8((DT) == TS_Q8_0 ? (char)0x80 : 8);                     \
    /* Prefetch distance: the same place in the next row tile (rows are contiguous). */         \
    const int64_t step_ = a->w[1] - a->w[0];                                                    \
    const int64_t pfd = step_ > 0 ? (QR * step_ < 16384 ? QR * step_ : 16384) : 512;            \
    __m512 acc[QR][T];                                                                          \
    _Pragma("GCC unroll 4") for (int r = 0; r < QR; r++)                                        \
        _Pragma("GCC unroll 4") for (int t = 0; t < T; t++) acc[r][t] = _mm512_setzero_ps();    \
    for (int64_t b = 0; b < nb; b += 2) {                                                       \
      const int two = b + 1 < nb;                                                               \
      __m512i wv[QR];                                                                           \
      __m512 dw[QR];                                                                            \
      _Pragma("GCC unroll 4") for (int r = 0; r < QR; r++) {                                    \
        /* the first token tile streams the rows from memory: fetch the next row tile */     \
        _mm_prefetch((const char *)a->w[r] + b * bsz + pfd, _MM_HINT_T0);                       \
        wv[r] = load_wpair(DT, a->w[r], b, two, &dw[r]);                                        \
      }                                                                                         \
      _Pragma("GCC unroll 4") for (int t = 0; t < T; t++) {                                     \
        const int8_t *xp = a->xq + t * a->k + b * 32;                                           \
        __m512i xv = two ? _mm512_loadu_si512((const void *)xp)                                 \
                         : _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)xp));     \
        const float *xdp = a->xd + t * nb + b;                                                  \
        __m512 dx = pair_spread(two ? _mm_castpd_ps(_mm_load_sd((const double *)xdp))          \
                                    : _mm_set1_ps(xdp[0]));                                     \
        __m512i start = _mm512_sub_epi32(                                                       \
            _mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), off, xv));      \
        _Pragma("GCC unroll 4") for (int r = 0; r < QR; r++) {                                  \
          __m512i s = _mm512_dpbusd_epi32(start, wv[r], xv);                                    \
          acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dw[r], dx),          \
                                      acc[r][t]);                                               \
        }                                                                                       \
      }                                                                                         \
    }                                                                                           \
    _Pragma("GCC unroll 4") for (int r = 0; r < QR; r++)                                        \
        _Pragma("GCC unroll 4") for (int t = 0; t < T; t++) out[t][r] =                         \
            _mm512_reduce_add_ps(acc[r][t]);                                                    \
  } while (0)

/* One instantiation per (weight type, tile width), so the accumulators live in registers. */
#define TILE512_FN(name, T, DT)                                                                 \
  V512_TGT static void name(const qtile *a, float out[QT][QR]) { TILE512_BODY(T, DT); }
TILE512_FN(tile_q8_1, 1, TS_Q8_0)
TILE512_FN(tile_q8_2, 2, TS_Q8_0)
TILE512_FN(tile_q8_3, 3, TS_Q8_0)
TILE512_FN(tile_q8_4, 4, TS_Q8_0)
TILE512_FN(tile_q4_1, 1, TS_Q4_0)
TILE512_FN(tile_q4_2, 2, TS_Q4_0)
TILE512_FN(tile_q4_3, 3, TS_Q4_0)
TILE512_FN(tile_q4_4, 4, TS_Q4_0)

#endif

#if defined(__aarch64__)
static void tile_neon(const qtile *a, float out[QT][QR]) {
  const int64_t nb = a->k / 32;
  float32x4_t acc[QR][QT];
  for (int r = 0; r < QR; r++)
    for (int t = 0; t < QT; t++) acc[r][t] = vdupq_n_f32(0);
  for (int64_t b = 0; b < nb; b++) {
    for (int r = 0; r < QR; r++) {
      int8x16_t w0, w1;
      float dw;
      if (a->dt == TS_Q8_0) {
        const uint8_t *p = a->w[r] + b * 34;
        w0 = vld1q_s8((const int8_t *)p + 2);
        w1 = vld1q_s8((const int8_t *)p + 18);
        dw = f16_le(p);
      } else {
        const uint8_t *p = a->w[r] + b * 18;
        uint8x16_t v = vld1q_u8(p + 2);
        w0 = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(15))), vdupq_n_s8(8));
        w1 = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(v, 4)), vdupq_n_s8(8));
        dw = f16_le(p);
      }
      for (int t = 0; t < a->T; t++) {
        const int8_t *x = a->xq + t * a->k + b * 32;
        int8x16_t x0 = vld1q_s8(x), x1 = vld1q_s8(x + 16);
        int16x8_t p0 = vmull_s8(vget_low_s8(w0), vget_low_s8(x0));
        p0 = vmlal_s8(p0, vget_high_s8(w0), vget_high_s8(x0));
        int16x8_t p1 = vmull_s8(vget_low_s8(w1), vget_low_s8(x1));
        p1 = vmlal_s8(p1, vget_high_s8(w1), vget_high_s8(x1));
        int32x4_t s = vaddq_s32(vpaddlq_s16(p0), vpaddlq_s16(p1));
        acc[r][t] = vmlaq_n_f32(acc[r][t], vcvtq_f32_s32(s), dw * a->xd[t * nb + b]);
      }
    }
  }
  for (int r = 0; r < QR; r++)
    for (int t = 0; t < a->T; t++) out[t][r] = vaddvq_f32(acc[r][t]);
}
#endif

/* ---- the matmul ------------------------------------------------------------------------- */

typedef struct {
  cpu_ctx *c;
  const ts_tensor *w, *bias;
  const int8_t *xq; /* [n][k] */
  const float *xd;  /* [n][k/32] */
  const float *x;   /* [n][k] float activations (quantized by the first parallel pass) */
  int64_t n, k, m;
  float *y; /* [n][m] */
} qmm_job;

#if Q_X86
/* cpu_quantize_act with AVX-512, bit for bit: the same float scale and reciprocal, and
 * vcvtps2dq rounds to nearest even as nearbyintf does in the default rounding mode. */
V512_TGT static void quantize_act_avx512(const float *x, int64_t k, int8_t *q, float *d) {
  const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  for (int64_t b = 0; b < k / 32; b++) {
    __m512 x0 = _mm512_loadu_ps(x + b * 32), x1 = _mm512_loadu_ps(x + b * 32 + 16);
    float amax = _mm512_reduce_max_ps(
        _mm512_max_ps(_mm512_and_ps(x0, sign), _mm512_and_ps(x1, sign)));
    float db = amax / 127.0f, id = db != 0 ? 1.0f / db : 0.0f;
    d[b] = db;
    __m512 iv = _mm512_set1_ps(id);
    __m128i q0 = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(x0, iv)));
    __m128i q1 = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(x1, iv)));
    _mm_storeu_si128((__m128i *)(q + b * 32), q0);
    _mm_storeu_si128((__m128i *)(q + b * 32 + 16), q1);
  }
}
#endif

static void quantize_rows(void *arg, int64_t t0, int64_t t1, int thread) {
  (void)thread;
  qmm_job *j = arg;
  for (int64_t t = t0; t < t1; t++) {
    const float *x = j->x + t * j->k;
    int8_t *q = (int8_t *)j->xq + t * j->k;
    float *d = (float *)j->xd + t * (j->k / 32);
#if Q_X86
    if (j->c->simd >= CPU_ISA_AVX512) {
      quantize_act_avx512(x, j->k, q, d);
      continue;
    }
#endif
    cpu_quantize_act(x, j->k, q, d);
  }
}

static void run_tile(const cpu_ctx *c, qtile *a, float out[QT][QR]) {
#if Q_X86
  if (c->simd >= CPU_ISA_VNNI) {
    int q8 = a->dt == TS_Q8_0;
    switch (a->T) {
      case 1: (q8 ? tile_q8_1 : tile_q4_1)(a, out); return;
      case 2: (q8 ? tile_q8_2 : tile_q4_2)(a, out); return;
      case 3: (q8 ? tile_q8_3 : tile_q4_3)(a, out); return;
      default: (q8 ? tile_q8_4 : tile_q4_4)(a, out); return;
    }
  }
  if (c->simd >= CPU_ISA_AVX2) {
    if (a->T <= 2) {
      (a->T == 1 ? tile_avx2_1 : tile_avx2_2)(a, out);
      return;
    }
    /* Two passes of two tokens; each (row, token) still sums in the same order. */
    float o2[QT][QR];
    qtile b = *a;
    b.T = 2;
    tile_avx2_2(&b, out);
    b.T = a->T - 2;
    b.xq = a->xq + 2 * a->k;
    b.xd = a->xd + 2 * (a->k / 32);
    (b.T == 1 ? tile_avx2_1 : tile_avx2_2)(&b, o2);
    for (int t = 0; t < b.T; t++) memcpy(out[2 + t], o2[t], sizeof o2[t]);
    return;
  }
#elif defined(__aarch64__)
  if (c->simd >= CPU_ISA_AVX2) {
    tile_neon(a, out);
    return;
  }
#endif
  (void)c;
  tile_scalar(a, out);
}

static void qmm_rows(void *arg, int64_t r0, int64_t r1, int thread) {
  (void)thread;
  qmm_job *j = arg;
  const int64_t k = j->k, m = j->m, nb = k / 32;
  /* Rows in blocks of about 512 KiB of weights (kept in L2 while every token tile passes over
   * them); within a block, a token tile (a few KiB of int8) stays in L1 across its row tiles. */
  int64_t rs = (int64_t)((512u << 10) / ts_dtype_bytes(j->w->dtype, k));
  rs = rs < QR ? QR : rs - rs % QR;
  for (int64_t s0 = r0; s0 < r1; s0 += rs) {
    int64_t s1 = s0 + rs < r1 ? s0 + rs : r1;
    for (int64_t t = 0; t < j->n; t += QT) {
      qtile a = {.dt = j->w->dtype, .k = k};
      a.T = (int)(j->n - t < QT ? j->n - t : QT);
      a.xq = j->xq + t * k;
      a.xd = j->xd + t * nb;
      for (int64_t rb = s0; rb < s1; rb += QR) {
        int nr = (int)(s1 - rb < QR ? s1 - rb : QR);
        for (int r = 0; r < QR; r++) a.w[r] = cpu_weight_row(j->w, rb + (r < nr ? r : 0));
        float bias[QR] = {0};
        if (j->bias && ts_tensor_present(j->bias))
          cpu_row_to_f32(j->c, j->bias->dtype,
                         (const char *)j->bias->data + ts_dtype_bytes(j->bias->dtype, rb), nr,
                         bias);
        float out[QT][QR];
        run_tile(j->c, &a, out);
        for (int q = 0; q < a.T; q++) {
          float *yq = j->y + (t + q) * m + rb;
          for (int r = 0; r < nr; r++) yq[r] = out[q][r] + bias[r];
        }
      }
    }
  }
}

int cpu_matmul_quant(cpu_ctx *c, const float *x, const ts_tensor *w, const ts_tensor *bias,
                     int n, float *y) {
  if (!cpu_quant_supported(w->dtype)) return 0;
  qmm_job j = {c, w, bias, NULL, NULL, x, n, w->shape[1], w->shape[0], y};
  /* Activations: n*k int8 then n*k/32 scales, in the context's buffer shared by all threads. */
  size_t need = (size_t)n * (size_t)j.k + (size_t)n * (size_t)(j.k / 32) * sizeof(float) + 64;
  if (need > c->cap_act) {
    void *p = NULL;
    if (posix_memalign(&p, 64, need) != 0) {
      for (size_t i = 0; i < (size_t)n * (size_t)j.m; i++) y[i] = NAN;
      return 1;
    }
    free(c->act);
    c->act = p;
    c->cap_act = need;
  }
  j.xq = c->act;
  j.xd = (const float *)((char *)c->act + (((size_t)n * (size_t)j.k + 63) & ~(size_t)63));
  threadpool_parallel_for(c->pool, n, 16, quantize_rows, &j);
  threadpool_parallel_for(c->pool, j.m, 64, qmm_rows, &j);
  return 1;
}
