/* Quantized matmul for GGUF Q8_0 and Q4_0 weights: the activations are quantized on the fly to
 * blocks of 32 int8 with one float scale (d = max|x| / 127, q = round-to-even of x / d), and each
 * block pair contributes d_w * d_x * sum(q_w * q_x) with an exact integer sum.
 * Weights in the file's layout: portable C, AVX2 (maddubs on |w| and sign-transferred x),
 * AVX-512 VNNI (vpdpbusd on two blocks per 512-bit register), NEON (widening multiplies); a
 * register tile of 4 weight rows x up to 4 tokens unpacks each weight block once for every token.
 * Weights repacked at load (cpu_quant_prepare, on CPUs with AVX-512 VNNI): 16 rows interleaved
 * per block so that one vpdpbusd of a broadcast 4-byte group of x gives 16 rows' partial sums;
 * the lower kernel levels unpack such a weight back to the file's blocks a group at a time;
 * with AMX-INT8, Q8_0 products of 16 tokens or more take whole 16-token tiles through tdpbsud
 * with the same exact sums and float epilogue (the VNNI kernels' bits).
 * Every (row, token) sum runs over the blocks in the same order whatever the tile, so a token's
 * result does not depend on the batch around it. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/cpu_backend.h"

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#include <pthread.h>
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

/* ---- repacked weights ------------------------------------------------------------------
 * A Q8_0/Q4_0 weight [m][k] becomes ceil(m/16) groups of 16 rows (the last padded with zero
 * rows), each group its k/32 blocks in order; one group-block is 16 file blocks' bytes:
 *   [16] f16 scales of the group's rows (kept f16: the same bytes as the file, converted 16 at a
 *        time by one vcvtph2ps)
 *   Q8_0: [8][16][4] u8: chunk c, row r, byte i = w[r][4c + i] + 128
 *   Q4_0: [4][16][4] u8: chunk c, row r, byte i = the file's quant byte 4c + i of row r (low
 *        nibble: element 4c + i, high: 16 + 4c + i), so one and / shift of a chunk gives the
 *        unsigned weights of elements 4c.. and 16 + 4c.. for all 16 rows. */

#define QP_ROWS 16 /* rows of a group: the 16 int32 lanes of a zmm */
#define QP_TT 8    /* tokens of a repacked tile (one weight load serves them all) */

typedef struct {
  void *packed;
  void *orig;
  int64_t orig_stride;
} qpack_entry;

struct cpu_qpack {
  qpack_entry *e;
  int n, cap;
};

/* Bytes of one group-block: 16 of the dtype's blocks. */
static size_t qp_gblock(ts_dtype dt) { return (size_t)QP_ROWS * ts_dtype_table[dt].block_bytes; }

static const qpack_entry *qp_find(const cpu_ctx *c, const void *data) {
  if (!c->qpack || !data) return NULL;
  for (int i = 0; i < c->qpack->n; i++)
    if (c->qpack->e[i].packed == data) return &c->qpack->e[i];
  return NULL;
}

/* File block b of row r (within its group) from group-block gb, and the reverse; the quants
 * move in the 4-byte groups of the layout (Q8_0 flips each byte's top bit: w + 128). */
static void qp_unpack_block(ts_dtype dt, const uint8_t *gb, int r, uint8_t *out) {
  memcpy(out, gb + 2 * r, 2);
  const uint8_t *q = gb + 2 * QP_ROWS;
  const uint32_t flip = dt == TS_Q8_0 ? 0x80808080u : 0;
  for (int ch = 0; ch < (dt == TS_Q8_0 ? 8 : 4); ch++) {
    uint32_t v;
    memcpy(&v, q + ch * 64 + r * 4, 4);
    v ^= flip;
    memcpy(out + 2 + ch * 4, &v, 4);
  }
}

static void qp_pack_block(ts_dtype dt, const uint8_t *blk, int r, uint8_t *gb) {
  memcpy(gb + 2 * r, blk, 2);
  uint8_t *q = gb + 2 * QP_ROWS;
  const uint32_t flip = dt == TS_Q8_0 ? 0x80808080u : 0;
  for (int ch = 0; ch < (dt == TS_Q8_0 ? 8 : 4); ch++) {
    uint32_t v;
    memcpy(&v, blk + 2 + ch * 4, 4);
    v ^= flip;
    memcpy(q + ch * 64 + r * 4, &v, 4);
  }
}

typedef struct {
  const ts_tensor *src;
  uint8_t *dst;
} qp_pack_job;

static void qp_pack_groups(void *arg, int64_t g0, int64_t g1, int thread) {
  (void)thread;
  qp_pack_job *j = arg;
  const ts_dtype dt = j->src->dtype;
  const int64_t m = j->src->shape[0], nb = j->src->shape[1] / 32;
  const int bb = ts_dtype_table[dt].block_bytes;
  /* Padding rows: scale 0 and weight 0 (stored w + 128 / w + 8). */
  uint8_t zero[34] = {0};
  memset(zero + 2, dt == TS_Q8_0 ? 0 : 0x88, sizeof zero - 2);
  for (int64_t g = g0; g < g1; g++)
    for (int r = 0; r < QP_ROWS; r++) {
      int64_t row = g * QP_ROWS + r;
      const uint8_t *src = row < m ? cpu_weight_row(j->src, row) : NULL;
      for (int64_t b = 0; b < nb; b++)
        qp_pack_block(dt, src ? src + b * bb : zero, r,
                      j->dst + (size_t)(g * nb + b) * qp_gblock(dt));
    }
}

int cpu_quant_prepare(cpu_ctx *c, ts_tensor *t, ts_err *err) {
  if (!cpu_quant_supported(t->dtype) || t->ndim != 2 || c->isa_max < CPU_ISA_VNNI) return 0;
  const char *env = getenv("TESSERA_CPU_QREPACK"); /* 0: keep the file's layout (A/B runs) */
  if (env && strcmp(env, "0") == 0) return 0;
  const int64_t m = t->shape[0], k = t->shape[1];
  if (m <= 0 || k <= 0 || k % 32) return 0;
  if (qp_find(c, t->data)) return 0; /* already ours (a view prepared twice) */
  const int64_t groups = (m + QP_ROWS - 1) / QP_ROWS;
  size_t bytes = (size_t)groups * (size_t)(k / 32) * qp_gblock(t->dtype);
  struct cpu_qpack *set = c->qpack;
  if (!set && !(set = c->qpack = calloc(1, sizeof *set)))
    return ts_errorf(err, TS_ENOMEM, "out of memory repacking a weight");
  if (set->n == set->cap) {
    int cap = set->cap ? set->cap * 2 : 64;
    qpack_entry *e = realloc(set->e, (size_t)cap * sizeof *e);
    if (!e) return ts_errorf(err, TS_ENOMEM, "out of memory repacking a weight");
    set->e = e;
    set->cap = cap;
  }
  void *p = NULL;
  if (posix_memalign(&p, 64, bytes) != 0)
    return ts_errorf(err, TS_ENOMEM, "out of memory repacking a %lld x %lld %s weight (%zu bytes)",
                     (long long)m, (long long)k, ts_dtype_table[t->dtype].name, bytes);
  qp_pack_job j = {t, p};
  threadpool_parallel_for(c->pool, groups, 16, qp_pack_groups, &j);
  set->e[set->n++] = (qpack_entry){p, t->data, t->row_stride};
  t->data = p;
  t->row_stride = k;
  return 0;
}

void cpu_quant_release(cpu_ctx *c, ts_tensor *t) {
  struct cpu_qpack *set = c->qpack;
  if (!set) return;
  for (int i = 0; i < set->n; i++)
    if (set->e[i].packed == t->data) {
      t->data = set->e[i].orig;
      t->row_stride = set->e[i].orig_stride;
      free(set->e[i].packed);
      set->e[i] = set->e[--set->n];
      return;
    }
}

void cpu_quant_free(cpu_ctx *c) {
  struct cpu_qpack *set = c->qpack;
  if (!set) return;
  for (int i = 0; i < set->n; i++) free(set->e[i].packed);
  free(set->e);
  free(set);
  c->qpack = NULL;
}

int cpu_quant_packed_row(const cpu_ctx *c, const ts_tensor *t, int64_t r, void *blocks) {
  if (!qp_find(c, t->data)) return 0;
  const int64_t nb = t->shape[1] / 32;
  const int bb = ts_dtype_table[t->dtype].block_bytes;
  const uint8_t *g = (const uint8_t *)t->data + (size_t)(r / QP_ROWS) * nb * qp_gblock(t->dtype);
  for (int64_t b = 0; b < nb; b++)
    qp_unpack_block(t->dtype, g + (size_t)b * qp_gblock(t->dtype), (int)(r % QP_ROWS),
                    (uint8_t *)blocks + b * bb);
  return 1;
}

int cpu_quant_packed_row_f32(const cpu_ctx *c, const ts_tensor *t, int64_t r, int64_t n,
                             float *dst) {
  if (!qp_find(c, t->data)) return 0;
  const int64_t nb = t->shape[1] / 32;
  const uint8_t *g = (const uint8_t *)t->data + (size_t)(r / QP_ROWS) * nb * qp_gblock(t->dtype);
  for (int64_t b = 0; b < n / 32 && b < nb; b++) {
    uint8_t blk[34];
    qp_unpack_block(t->dtype, g + (size_t)b * qp_gblock(t->dtype), (int)(r % QP_ROWS), blk);
    cpu_row_to_f32(c, t->dtype, blk, 32, dst + b * 32); /* the same values as the file's row */
  }
  return 1;
}

/* ---- the matmul ------------------------------------------------------------------------- */

typedef struct {
  cpu_ctx *c;
  const ts_tensor *w, *bias;
  const int8_t *xq; /* [n][k] */
  const float *xd;  /* [n][k/32] */
  const float *x;   /* [n][k] float activations (quantized by the first parallel pass) */
  int64_t n, k, m;
  float *y;         /* [n][m] */
  int32_t *xc;      /* [n][k/32] -off * sum(q) per block for the repacked kernels, or NULL */
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
  const int64_t nb = j->k / 32;
  const int32_t off = j->w->dtype == TS_Q8_0 ? 128 : 8;
  for (int64_t t = t0; t < t1; t++) {
    const float *x = j->x + t * j->k;
    int8_t *q = (int8_t *)j->xq + t * j->k;
    float *d = (float *)j->xd + t * nb;
#if Q_X86
    if (j->c->simd >= CPU_ISA_AVX512)
      quantize_act_avx512(x, j->k, q, d);
    else
#endif
      cpu_quantize_act(x, j->k, q, d);
    if (!j->xc) continue;
    for (int64_t b = 0; b < nb; b++) {
      int32_t s = 0;
      for (int i = 0; i < 32; i++) s += q[b * 32 + i];
      j->xc[t * nb + b] = -off * s;
    }
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

/* A repacked weight below the VNNI level: each group back to the file's blocks in thread
 * scratch, then the layout-free kernels on that view. */
static void qp_rows_unpacked(void *arg, int64_t g0, int64_t g1, int thread) {
  qmm_job *j = arg;
  const ts_dtype dt = j->w->dtype;
  const size_t row_bytes = ts_dtype_bytes(dt, j->k);
  uint8_t *buf = (uint8_t *)cpu_scratch(j->c, thread); /* [16][row_bytes] */
  for (int64_t g = g0; g < g1; g++) {
    int64_t r0 = g * QP_ROWS;
    int nr = (int)(j->m - r0 < QP_ROWS ? j->m - r0 : QP_ROWS);
    for (int r = 0; r < nr; r++) cpu_quant_packed_row(j->c, j->w, r0 + r, buf + r * row_bytes);
    ts_tensor v = {.data = buf, .dtype = dt, .ndim = 2, .shape = {nr, j->k}, .row_stride = j->k};
    ts_tensor bv;
    qmm_job jj = *j;
    jj.w = &v;
    jj.y = j->y + r0;
    if (j->bias && ts_tensor_present(j->bias)) {
      bv = *j->bias;
      bv.data = (char *)bv.data + ts_dtype_bytes(bv.dtype, r0);
      jj.bias = &bv;
    }
    qmm_rows(&jj, 0, nr, thread);
  }
}

#if Q_X86
/* Software prefetch of the weight stream of a repacked tile (the group-blocks of a thread's
 * groups are one contiguous stream), 8 KiB ahead into L2: lm_head 151936x1024 n=1 on 2 threads
 * ran faster this way than into L1 or without (bench/RESULTS.md). */
#define QP_PFD 8192

/* A 4-byte group of quantized x read in place (broadcast straight from memory). */
typedef uint32_t qp_u32 __attribute__((may_alias, aligned(1)));

/* One group of 16 rows x T tokens over all k/32 blocks, per block and token: 8 vpdpbusd of the
 * 16 rows' chunks against broadcast 4-byte groups of x, starting from -off * sum(x) (two chains
 * of exact int32 sums, added), then one convert, one scale product (16 row scales x the token's
 * scale) and one FMA into the token's 16 row accumulators. */
#define QP_BODY(T, DT)                                                                          \
  do {                                                                                          \
    const size_t gbb = (DT) == TS_Q8_0 ? 544 : 288;                                             \
    __m512 acc[T];                                                                              \
    _Pragma("GCC unroll 8") for (int t = 0; t < T; t++) acc[t] = _mm512_setzero_ps();           \
    for (int64_t b = 0; b < nb; b++) {                                                          \
      const uint8_t *p = wg + (size_t)b * gbb;                                                  \
      if (pf)                                                                                   \
        _Pragma("GCC unroll 9") for (size_t l = 0; l < (gbb + 63) / 64; l++)                    \
            _mm_prefetch((const char *)p + QP_PFD + 64 * l, _MM_HINT_T1);                      \
      const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));               \
      __m512i wv[8];                                                                            \
      if ((DT) == TS_Q8_0) {                                                                    \
        _Pragma("GCC unroll 8") for (int ch = 0; ch < 8; ch++) wv[ch] =                         \
            _mm512_loadu_si512((const void *)(p + 32 + 64 * ch));                               \
      } else {                                                                                  \
        const __m512i m4 = _mm512_set1_epi8(15);                                                \
        _Pragma("GCC unroll 4") for (int ch = 0; ch < 4; ch++) {                                \
          __m512i v = _mm512_loadu_si512((const void *)(p + 32 + 64 * ch));                     \
          wv[ch] = _mm512_and_si512(v, m4);                                                     \
          wv[ch + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);                           \
        }                                                                                       \
      }                                                                                         \
      _Pragma("GCC unroll 8") for (int t = 0; t < T; t++) {                                     \
        const qp_u32 *xw = (const qp_u32 *)(xq + t * k + b * 32);                               \
        __m512i s0 = _mm512_set1_epi32(xc[t * nb + b]), s1 = _mm512_setzero_si512();            \
        /* Q4_0 chunk order: elements 0-3, 4-7, 8-11, 12-15 (low nibbles), then 16-19 ... */    \
        _Pragma("GCC unroll 4") for (int ch = 0; ch < 8; ch += 2) {                             \
          s0 = _mm512_dpbusd_epi32(s0, wv[ch], _mm512_set1_epi32((int)xw[ch]));                 \
          s1 = _mm512_dpbusd_epi32(s1, wv[ch + 1], _mm512_set1_epi32((int)xw[ch + 1]));         \
        }                                                                                       \
        __m512 sc = _mm512_mul_ps(dw, _mm512_set1_ps(xd[t * nb + b]));                          \
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), sc, acc[t]);     \
      }                                                                                         \
    }                                                                                           \
    const __m512 bv = _mm512_loadu_ps(bias);                                                    \
    const __mmask16 keep = (__mmask16)((1u << nr) - 1);                                         \
    _Pragma("GCC unroll 8") for (int t = 0; t < T; t++)                                         \
        _mm512_mask_storeu_ps(y + t * m, keep, _mm512_add_ps(acc[t], bv));                      \
  } while (0)

typedef void (*qp_fn)(const uint8_t *wg, int64_t nb, const int8_t *xq, int64_t k, const float *xd,
                      const int32_t *xc, float *y, int64_t m, int nr, const float *bias, int pf);

#define QP_FN(name, T, DT)                                                                      \
  V512_TGT static void name(const uint8_t *wg, int64_t nb, const int8_t *xq, int64_t k,         \
                            const float *xd, const int32_t *xc, float *y, int64_t m, int nr,    \
                            const float *bias, int pf) {                                        \
    QP_BODY(T, DT);                                                                             \
  }
QP_FN(qp_q8_1, 1, TS_Q8_0)
QP_FN(qp_q8_2, 2, TS_Q8_0)
QP_FN(qp_q8_3, 3, TS_Q8_0)
QP_FN(qp_q8_4, 4, TS_Q8_0)
QP_FN(qp_q8_5, 5, TS_Q8_0)
QP_FN(qp_q8_6, 6, TS_Q8_0)
QP_FN(qp_q8_7, 7, TS_Q8_0)
QP_FN(qp_q8_8, 8, TS_Q8_0)
QP_FN(qp_q4_1, 1, TS_Q4_0)
QP_FN(qp_q4_2, 2, TS_Q4_0)
QP_FN(qp_q4_3, 3, TS_Q4_0)
QP_FN(qp_q4_4, 4, TS_Q4_0)
QP_FN(qp_q4_5, 5, TS_Q4_0)
QP_FN(qp_q4_6, 6, TS_Q4_0)
QP_FN(qp_q4_7, 7, TS_Q4_0)
QP_FN(qp_q4_8, 8, TS_Q4_0)

static const qp_fn qp_fns[2][QP_TT] = {
    {qp_q8_1, qp_q8_2, qp_q8_3, qp_q8_4, qp_q8_5, qp_q8_6, qp_q8_7, qp_q8_8},
    {qp_q4_1, qp_q4_2, qp_q4_3, qp_q4_4, qp_q4_5, qp_q4_6, qp_q4_7, qp_q4_8}};

/* AMX-INT8 for Q8_0, 16 tokens at a time (n >= QA_MIN_N): the block's quants (w + 128) are
 * already a B tile for K = 32 ([k/4][16 rows][4 bytes]), x is the A tile (16 tokens x 32 bytes,
 * stride k), and one tdpbsud gives the 16 x 16 sums of (w + 128) . x. Adding xc (-128 * sum(x))
 * gives the exact int32 sum QP_BODY gets with vpdpbusd, and the float epilogue is QP_BODY's
 * (same ops, same order), so the outputs are bit for bit those of the VNNI kernels and a
 * token's result still ignores its batch. Q4_0 stays on VNNI: splitting its nibbles into a B
 * tile per token tile made it 0.8-0.86x the VNNI kernel (bench/RESULTS.md). */
#define QA_TGT                                                                                  \
  __attribute__((target("amx-tile,amx-int8,avx512f,avx512vl,avx512bw,avx512dq,avx512vnni,"   \
                        "avx2,fma,f16c")))
#define QA_TT 16    /* tokens of an AMX tile */
#define QA_MIN_N 16 /* smaller products stay on the VNNI kernels */

static int qa_int8;
static pthread_once_t qa_once = PTHREAD_ONCE_INIT;
static void qa_detect(void) {
  unsigned a, b, c, d;
  qa_int8 = __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d & (1u << 25)); /* AMX-INT8 */
}

int cpu_quant_amx(const cpu_ctx *c) {
  if (!c->amx || !c->has_amx || c->simd < CPU_ISA_VNNI) return 0;
  pthread_once(&qa_once, qa_detect);
  return qa_int8;
}

typedef struct {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} qa_cfg;

/* Tiles 0, 1: C [16 tokens][16 rows] int32; 2, 3: A [16 tokens][32] int8; 4, 5: B [8][64] u8.
 * A constant in memory: GCC may drop stores to a local that only ldtilecfg reads. */
static const qa_cfg qa_tiles = {.palette = 1,
                                .colsb = {64, 64, 32, 32, 64, 64},
                                .rows = {16, 16, 16, 16, 8, 8}};
QA_TGT static void qa_config(void) { _tile_loadconfig(&qa_tiles); }

/* The epilogue of one block: per token, exact sum, convert, scale product, FMA (QP_BODY's). */
#define QA_EPI(st, b, p)                                                                        \
  do {                                                                                          \
    const __m512 dw_ = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)));               \
    _Pragma("GCC unroll 16") for (int t = 0; t < QA_TT; t++) {                                  \
      __m512i s_ = _mm512_add_epi32(_mm512_load_si512((const void *)((st) + 16 * t)),          \
                                    _mm512_set1_epi32(xc[t * nb + (b)]));                       \
      __m512 sc_ = _mm512_mul_ps(dw_, _mm512_set1_ps(xd[t * nb + (b)]));                        \
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s_), sc_, acc[t]);                            \
    }                                                                                           \
  } while (0)

/* One group of 16 rows x 16 tokens over all blocks, QA_KB blocks at a time: first their tile
 * products (two in flight, tiles 0/2/4 and 1/3/5) stored to st, then their epilogues, so the
 * vector code does not wait on each tile store. The tile configuration is loaded by the caller. */
#define QA_KB 8
#define QA_DP(C, A, B, bb)                                                                       \
  do {                                                                                          \
    const uint8_t *p_ = wg + (size_t)(bb) * gbb;                                                \
    _tile_loadd(A, xq + (bb) * 32, k);                                                          \
    _tile_loadd(B, p_ + 32, 64);                                                               \
    _tile_zero(C);                                                                              \
    _tile_dpbsud(C, A, B);                                                                      \
    _tile_stored(C, st + ((bb) - b0) * 256, 64);                                                \
  } while (0)
#define QA_BODY()                                                                               \
  do {                                                                                          \
    const size_t gbb = 544;                                                                     \
    _Alignas(64) int32_t st[QA_KB * 256];                                                       \
    __m512 acc[QA_TT];                                                                          \
    _Pragma("GCC unroll 16") for (int t = 0; t < QA_TT; t++) acc[t] = _mm512_setzero_ps();      \
    for (int64_t b0 = 0; b0 < nb; b0 += QA_KB) {                                                \
      const int64_t b1 = b0 + QA_KB < nb ? b0 + QA_KB : nb;                                     \
      if (pf)                                                                                   \
        for (size_t l = 0; l < (size_t)(b1 - b0) * gbb; l += 64)                                \
          _mm_prefetch((const char *)wg + (size_t)b0 * gbb + QP_PFD + l, _MM_HINT_T1);          \
      int64_t b = b0;                                                                           \
      for (; b + 1 < b1; b += 2) {                                                              \
        QA_DP(0, 2, 4, b);                                                 \
        QA_DP(1, 3, 5, b + 1);                                                             \
      }                                                                                         \
      if (b < b1) QA_DP(0, 2, 4, b);                                                       \
      for (b = b0; b < b1; b++) QA_EPI(st + (b - b0) * 256, b, wg + (size_t)b * gbb);           \
    }                                                                                           \
    const __m512 bv = _mm512_loadu_ps(bias);                                                    \
    const __mmask16 keep = (__mmask16)((1u << nr) - 1);                                         \
    _Pragma("GCC unroll 16") for (int t = 0; t < QA_TT; t++)                                    \
        _mm512_mask_storeu_ps(y + t * m, keep, _mm512_add_ps(acc[t], bv));                      \
  } while (0)

QA_TGT static void qa_q8(const uint8_t *wg, int64_t nb, const int8_t *xq, int64_t k,
                         const float *xd, const int32_t *xc, float *y, int64_t m, int nr,
                         const float *bias, int pf) {
  QA_BODY();
}
QA_TGT static void qa_begin(void) { qa_config(); }
QA_TGT static void qa_end(void) { _tile_release(); }

static void qp_rows(void *arg, int64_t g0, int64_t g1, int thread) {
  (void)thread;
  qmm_job *j = arg;
  const ts_dtype dt = j->w->dtype;
  const int64_t k = j->k, m = j->m, nb = k / 32;
  const size_t gbytes = (size_t)nb * qp_gblock(dt);
  const uint8_t *base = j->w->data;
  /* Groups in blocks of about 512 KiB of weights (kept in L2 while every token tile passes over
   * them); the first token tile streams them from memory and prefetches ahead. */
  int64_t gs = (int64_t)((512u << 10) / gbytes);
  if (gs < 1) gs = 1;
  /* AMX for whole 16-token tiles of a product of QA_MIN_N tokens or more, VNNI for the rest:
   * the same bits either way. */
  const int amx = dt == TS_Q8_0 && j->n >= QA_MIN_N && cpu_quant_amx(j->c);
  if (amx) qa_begin();
  for (int64_t s0 = g0; s0 < g1; s0 += gs) {
    int64_t s1 = s0 + gs < g1 ? s0 + gs : g1;
    for (int64_t t = 0; t < j->n;) {
      int T = (int)(j->n - t < QP_TT ? j->n - t : QP_TT);
      qp_fn fn = qp_fns[dt == TS_Q8_0 ? 0 : 1][T - 1];
      if (amx && j->n - t >= QA_TT) {
        T = QA_TT;
        fn = qa_q8;
      }
      for (int64_t g = s0; g < s1; g++) {
        int64_t r0 = g * QP_ROWS;
        int nr = (int)(m - r0 < QP_ROWS ? m - r0 : QP_ROWS);
        float bias[QP_ROWS] = {0};
        if (j->bias && ts_tensor_present(j->bias))
          cpu_row_to_f32(j->c, j->bias->dtype,
                         (const char *)j->bias->data + ts_dtype_bytes(j->bias->dtype, r0), nr,
                         bias);
        fn(base + (size_t)g * gbytes, nb, j->xq + t * k, k, j->xd + t * nb, j->xc + t * nb,
           j->y + t * m + r0, m, nr, bias, t == 0);
      }
      t += T;
    }
  }
  if (amx) qa_end();
}
#endif

int cpu_matmul_quant(cpu_ctx *c, const float *x, const ts_tensor *w, const ts_tensor *bias,
                     int n, float *y) {
  if (!cpu_quant_supported(w->dtype)) return 0;
  const int packed = qp_find(c, w->data) != NULL;
  qmm_job j = {c, w, bias, NULL, NULL, x, n, w->shape[1], w->shape[0], y, NULL};
  const int64_t nb = j.k / 32;
  /* Activations: n*k int8, then n*k/32 scales and (repacked) n*k/32 sums, in the context's
   * buffer shared by all threads. */
  size_t qbytes = ((size_t)n * (size_t)j.k + 63) & ~(size_t)63;
  size_t dbytes = ((size_t)n * (size_t)nb * sizeof(float) + 63) & ~(size_t)63;
  size_t need = qbytes + dbytes * (packed ? 2 : 1);
  int bad = 0;
  if (need > c->cap_act) {
    void *p = NULL;
    if (posix_memalign(&p, 64, need) != 0) {
      bad = 1;
    } else {
      free(c->act);
      c->act = p;
      c->cap_act = need;
    }
  }
  const size_t row_bytes = ts_dtype_bytes(w->dtype, j.k);
  if (!bad && packed && c->simd < CPU_ISA_VNNI &&
      cpu_scratch_reserve(c, (QP_ROWS * row_bytes + sizeof(float) - 1) / sizeof(float)) < 0)
    bad = 1;
  if (bad) {
    for (size_t i = 0; i < (size_t)n * (size_t)j.m; i++) y[i] = NAN;
    return 1;
  }
  j.xq = c->act;
  j.xd = (const float *)((char *)c->act + qbytes);
  if (packed) j.xc = (int32_t *)((char *)c->act + qbytes + dbytes);
  threadpool_parallel_for(c->pool, n, 16, quantize_rows, &j);
  if (!packed) {
    threadpool_parallel_for(c->pool, j.m, 64, qmm_rows, &j);
    return 1;
  }
  const int64_t groups = (j.m + QP_ROWS - 1) / QP_ROWS;
#if Q_X86
  if (c->simd >= CPU_ISA_VNNI) {
    threadpool_parallel_for(c->pool, groups, 4, qp_rows, &j);
    return 1;
  }
#endif
  threadpool_parallel_for(c->pool, groups, 4, qp_rows_unpacked, &j);
  return 1;
}

#if !Q_X86
int cpu_quant_amx(const cpu_ctx *c) {
  (void)c;
  return 0;
}
#endif
