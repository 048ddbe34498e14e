/* AVX-512 matmul for F32, F16 and BF16 weights: a register tile of 4 weight rows x up to 6 tokens
 * (24 zmm accumulators). Below 8 tokens the tile reads the weights in place and widens each
 * 16-element slice once for the tokens of the tile (decode: bound by the weight stream, which it
 * prefetches a row tile ahead); from 8 tokens each L2 block of rows is widened to float32 once
 * into thread scratch and every token tile runs on that. Rows are cache-blocked: a block of a
 * thread's rows stays in L2 while every token tile passes over it, so a step reads each weight
 * from memory once whatever the number of tokens (prefill, or B decoded sequences).
 *
 * Every (row, token) sum runs over k in the same 16-lane order with the same final reduction,
 * whatever the tile shape or the batch around it, so a token's output does not depend on its
 * neighbours (prefill = decode, bit for bit). */
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/cpu_backend.h"

#if defined(__x86_64__)
#include <immintrin.h>

#define TGT __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))
#define INL static inline __attribute__((always_inline))
#define TILE_R 4
#define TILE_T 6
/* Software prefetch distance of the weight stream: the same place in the next row tile (rows
 * are contiguous, so that is TILE_R rows on), at most PF_MAX bytes ahead. */
#define PF_MAX (16 << 10)

enum { W_F32, W_F16, W_BF16 };

TGT INL __m512 load_w(int wt, const void *p, int64_t i) {
  if (wt == W_F32) return _mm512_loadu_ps((const float *)p + i);
  __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i));
  if (wt == W_F16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

TGT INL __m512 load_w_mask(int wt, const void *p, int64_t i, __mmask16 m) {
  if (wt == W_F32) return _mm512_maskz_loadu_ps(m, (const float *)p + i);
  __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)p + i);
  if (wt == W_F16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* The horizontal sums of four accumulators into out[0..3], sharing the shuffles. Each sum is
 * added in the same order whatever its position, so a row's result does not depend on which
 * rows share its tile. */
__attribute__((target("avx512f,avx512dq"))) INL void reduce4(__m512 a, __m512 b, __m512 c, __m512 d, float out[4]) {
  __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  __m512d abd = _mm512_castps_pd(ab), cdd = _mm512_castps_pd(cd);
  __m512 abcd = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(abd, cdd)),
                              _mm512_castpd_ps(_mm512_unpackhi_pd(abd, cdd)));
  /* Each 128-bit lane now holds [a b c d] partial sums. */
  __m256 h = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}

INL int64_t pf_distance(const void *const *w) {
  int64_t step = (const char *)w[1] - (const char *)w[0]; /* 0 in a tile of one row */
  int64_t d = step > 0 ? TILE_R * step : 512;
  return d < PF_MAX ? d : PF_MAX;
}

/* out[t][r] = w[r] . x[t] for r < 4, t < T.   x [T][ldx] float; w[4] rows of k elements. */
TGT INL void tile(int wt, int T, const void *const *w, const float *x, int64_t ldx, int64_t k,
                  float out[TILE_T][TILE_R]) {
  __m512 acc[TILE_R][TILE_T];
#pragma GCC unroll 8
  for (int t = 0; t < T; t++)
#pragma GCC unroll 4
    for (int r = 0; r < TILE_R; r++) acc[r][t] = _mm512_setzero_ps();
  int64_t i = 0;
  /* In place (fewer than WIDEN_MIN_TOKENS tokens, or float32 weights) the tile is bound by the
   * weight stream, which the hardware prefetcher alone does not keep busy (four interleaved
   * rows, page ends); fetch the next tile's rows. */
  const int esz = wt == W_F32 ? 4 : 2;
  const int64_t pfd = pf_distance(w);
  for (; i + 16 <= k; i += 16) {
#pragma GCC unroll 4
      for (int r = 0; r < TILE_R; r++)
        _mm_prefetch((const char *)w[r] + i * esz + pfd, _MM_HINT_T0);
    __m512 w0 = load_w(wt, w[0], i), w1 = load_w(wt, w[1], i);
    __m512 w2 = load_w(wt, w[2], i), w3 = load_w(wt, w[3], i);
#pragma GCC unroll 8
    for (int t = 0; t < T; t++) {
      __m512 xv = _mm512_loadu_ps(x + t * ldx + i);
      acc[0][t] = _mm512_fmadd_ps(w0, xv, acc[0][t]);
      acc[1][t] = _mm512_fmadd_ps(w1, xv, acc[1][t]);
      acc[2][t] = _mm512_fmadd_ps(w2, xv, acc[2][t]);
      acc[3][t] = _mm512_fmadd_ps(w3, xv, acc[3][t]);
    }
  }
  if (i < k) {
    __mmask16 m = (__mmask16)((1u << (k - i)) - 1);
    __m512 w0 = load_w_mask(wt, w[0], i, m), w1 = load_w_mask(wt, w[1], i, m);
    __m512 w2 = load_w_mask(wt, w[2], i, m), w3 = load_w_mask(wt, w[3], i, m);
#pragma GCC unroll 8
    for (int t = 0; t < T; t++) {
      __m512 xv = _mm512_maskz_loadu_ps(m, x + t * ldx + i);
      acc[0][t] = _mm512_fmadd_ps(w0, xv, acc[0][t]);
      acc[1][t] = _mm512_fmadd_ps(w1, xv, acc[1][t]);
      acc[2][t] = _mm512_fmadd_ps(w2, xv, acc[2][t]);
      acc[3][t] = _mm512_fmadd_ps(w3, xv, acc[3][t]);
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < T; t++)
    reduce4(acc[0][t], acc[1][t], acc[2][t], acc[3][t], out[t]);
}

/* One instantiation per (weight type, tile width), so the accumulators live in registers. */
#define TILE_FN(name, wt)                                                                     \
  TGT static void name(int T, const void *const *w, const void *xv, int64_t ldx, int64_t k,   \
                       float out[TILE_T][TILE_R]) {                                           \
    const float *x = xv;                                                                      \
    switch (T) {                                                                              \
      case 1: tile(wt, 1, w, x, ldx, k, out); break;                                         \
      case 2: tile(wt, 2, w, x, ldx, k, out); break;                                         \
      case 3: tile(wt, 3, w, x, ldx, k, out); break;                                         \
      case 4: tile(wt, 4, w, x, ldx, k, out); break;                                         \
      case 5: tile(wt, 5, w, x, ldx, k, out); break;                                         \
      default: tile(wt, 6, w, x, ldx, k, out); break;                                        \
    }                                                                                         \
  }
TILE_FN(tile_f32, W_F32)
TILE_FN(tile_f16, W_F16)
TILE_FN(tile_bf16, W_BF16)

/* AVX512-BF16: BF16 weights times activations rounded to BF16 (as llama.cpp computes), 32
 * products per vdpbf16ps instead of 16 per FMA. Opt-in (cpu_backend_set_bf16_act): the rounding
 * of the activations costs about 3 significant digits. x16 [T][ldx] bf16. */
#define BF_TGT __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))
BF_TGT INL void tile_dp(int T, const void *const *w, const uint16_t *x, int64_t ldx, int64_t k,
                        float out[TILE_T][TILE_R]) {
  __m512 acc[TILE_R][TILE_T];
#pragma GCC unroll 8
  for (int t = 0; t < T; t++)
#pragma GCC unroll 4
    for (int r = 0; r < TILE_R; r++) acc[r][t] = _mm512_setzero_ps();
  const uint16_t *w0p = w[0], *w1p = w[1], *w2p = w[2], *w3p = w[3];
  const int64_t pfd = pf_distance(w);
  int64_t i = 0;
  for (; i < k; i += 32) {
    {
      _mm_prefetch((const char *)(w0p + i) + pfd, _MM_HINT_T0);
      _mm_prefetch((const char *)(w1p + i) + pfd, _MM_HINT_T0);
      _mm_prefetch((const char *)(w2p + i) + pfd, _MM_HINT_T0);
      _mm_prefetch((const char *)(w3p + i) + pfd, _MM_HINT_T0);
    }
    __mmask32 m = k - i >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << (k - i)) - 1);
    __m512bh w0 = (__m512bh)_mm512_maskz_loadu_epi16(m, w0p + i);
    __m512bh w1 = (__m512bh)_mm512_maskz_loadu_epi16(m, w1p + i);
    __m512bh w2 = (__m512bh)_mm512_maskz_loadu_epi16(m, w2p + i);
    __m512bh w3 = (__m512bh)_mm512_maskz_loadu_epi16(m, w3p + i);
#pragma GCC unroll 8
    for (int t = 0; t < T; t++) {
      __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, x + t * ldx + i);
      acc[0][t] = _mm512_dpbf16_ps(acc[0][t], w0, xv);
      acc[1][t] = _mm512_dpbf16_ps(acc[1][t], w1, xv);
      acc[2][t] = _mm512_dpbf16_ps(acc[2][t], w2, xv);
      acc[3][t] = _mm512_dpbf16_ps(acc[3][t], w3, xv);
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < T; t++)
    reduce4(acc[0][t], acc[1][t], acc[2][t], acc[3][t], out[t]);
}

BF_TGT static void tile_bf16dot(int T, const void *const *w, const void *x, int64_t ldx,
                                int64_t k, float out[TILE_T][TILE_R]) {
  const uint16_t *xb = x; /* bf16 rows */
  switch (T) {
    case 1: tile_dp(1, w, xb, ldx, k, out); break;
    case 2: tile_dp(2, w, xb, ldx, k, out); break;
    case 3: tile_dp(3, w, xb, ldx, k, out); break;
    case 4: tile_dp(4, w, xb, ldx, k, out); break;
    case 5: tile_dp(5, w, xb, ldx, k, out); break;
    default: tile_dp(6, w, xb, ldx, k, out); break;
  }
}

/* x [n][k] float -> bf16, round to nearest even (vcvtneps2bf16). */
BF_TGT static void to_bf16_rows(void *arg, int64_t t0, int64_t t1, int thread) {
  (void)thread;
  const cpu_mm_args *a = arg;
  uint16_t *dst = a->c->act;
  for (int64_t i = t0 * a->k; i < t1 * a->k; i += 16) {
    int64_t left = t1 * a->k - i;
    __mmask16 m = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
    __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, a->x + i));
    _mm256_mask_storeu_epi16(dst + i, m, (__m256i)h);
  }
}

typedef void (*tile_fn)(int, const void *const *, const void *, int64_t, int64_t,
                        float[TILE_T][TILE_R]);

int cpu_matmul_avx512_supports(ts_dtype dt) {
  return dt == TS_F32 || dt == TS_F16 || dt == TS_BF16;
}

static void avx512_rows(void *arg, int64_t r0, int64_t r1, int thread) {
  cpu_matmul_avx512_rows(arg, r0, r1, thread);
}

/* Tokens from which a 16-bit weight block is widened to float32 once into the thread's scratch
 * and every token tile then runs the plain float32 tile on it: the widening (a shuffle that
 * competes with the FMAs for a port) is paid once per block instead of once per token tile.
 * Widening is exact, so the results are the same bits either way. */
#define WIDEN_MIN_TOKENS 8
#define WIDEN_BLOCK_BYTES (512u << 10) /* float32 rows widened at a time (kept in L2) */

/* Widened rows are WIDEN_LD(k) floats apart: not a multiple of 4 KiB, so the four rows of a tile
 * do not all fall into the same L1 sets. */
#define WIDEN_LD(k) ((k) + 16)

static int64_t widen_rows(int64_t k) {
  int64_t rs = (int64_t)(WIDEN_BLOCK_BYTES / ((size_t)k * sizeof(float)));
  return rs < TILE_R ? TILE_R : rs - rs % TILE_R;
}

int cpu_matmul_avx512(cpu_ctx *c, const float *x, const ts_tensor *w, const ts_tensor *bias,
                      int n, float *y) {
  if (c->simd < CPU_ISA_AVX512 || !cpu_matmul_avx512_supports(w->dtype)) return 0;
  cpu_mm_args a = {c, x, w, bias, n, w->shape[1], w->shape[0], y, 0, 0};
  if (w->dtype == TS_BF16 && c->bf16_act && c->has_bf16) {
    size_t need = (size_t)n * (size_t)a.k * 2 + 64;
    if (need > c->cap_act) {
      void *p = NULL;
      if (posix_memalign(&p, 64, need) != 0) return 0; /* fall back to the exact kernels */
      free(c->act);
      c->act = p;
      c->cap_act = need;
    }
    threadpool_parallel_for(c->pool, n, 8, to_bf16_rows, &a);
    a.bf16_x = 1;
  }
  /* Without scratch for the widened rows, the in-place tiles give the same result. */
  a.widen = w->dtype != TS_F32 && !a.bf16_x && n >= WIDEN_MIN_TOKENS &&
            cpu_scratch_reserve(c, (size_t)(widen_rows(a.k) + TILE_T) * (size_t)WIDEN_LD(a.k)) == 0;
  /* 4-row tiles; at least 64 rows a thread so small matrices stay on one core. */
  threadpool_parallel_for(c->pool, a.m, 64, avx512_rows, &a);
  return 1;
}

BF_TGT static void widen_bf16(const uint16_t *s, int64_t n, float *d) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(d + i, _mm512_castsi512_ps(_mm512_slli_epi32(
                                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(s + i))),
                                16)));
  for (; i < n; i++) d[i] = ts_bf16_to_f32(s[i]);
}

void cpu_matmul_avx512_rows(const cpu_mm_args *a, int64_t r0, int64_t r1, int thread) {
  const ts_tensor *W = a->w;
  tile_fn fn = W->dtype == TS_F32 ? tile_f32 : W->dtype == TS_F16 ? tile_f16 : tile_bf16;
  const int64_t k = a->k, m = a->m;
  const int64_t n = a->n;
  if (a->bf16_x) fn = tile_bf16dot;
  const int widen = a->widen;
  /* Rows in blocks of about 512 KiB of weights, kept in L2 while every token tile passes over
   * them; a token tile (6 x k floats) stays in L1 across the block's row tiles. */
  int64_t rs = (int64_t)((512u << 10) / ts_dtype_bytes(W->dtype, k));
  rs = rs < TILE_R ? TILE_R : rs - rs % TILE_R;
  if (widen) rs = widen_rows(k);
  /* [rs][WIDEN_LD(k)] widened rows, then [TILE_T][WIDEN_LD(k)] the token tile */
  float *wf = widen ? cpu_scratch(a->c, thread) : NULL;
  for (int64_t s0 = r0; s0 < r1; s0 += rs) {
    int64_t s1 = s0 + rs < r1 ? s0 + rs : r1;
    if (widen)
      for (int64_t r = s0; r < s1; r++) {
        if (W->dtype == TS_BF16)
          widen_bf16(cpu_weight_row(W, r), k, wf + (r - s0) * WIDEN_LD(k));
        else
          cpu_row_to_f32(a->c, W->dtype, cpu_weight_row(W, r), k, wf + (r - s0) * WIDEN_LD(k));
      }
    for (int64_t t = 0; t < n; t += TILE_T) {
      int T = (int)(n - t < TILE_T ? n - t : TILE_T);
      /* The token tile, copied WIDEN_LD apart for the same reason as the rows. */
      const float *xt_w = NULL;
      if (widen) {
        float *xp = wf + rs * WIDEN_LD(k);
        for (int q = 0; q < T; q++)
          memcpy(xp + q * WIDEN_LD(k), a->x + (t + q) * k, (size_t)k * sizeof(float));
        xt_w = xp;
      }
      for (int64_t rb = s0; rb < s1; rb += TILE_R) {
        int nr = (int)(s1 - rb < TILE_R ? s1 - rb : TILE_R);
        const void *wr[TILE_R];
        for (int r = 0; r < TILE_R; r++) {
          int64_t row = rb + (r < nr ? r : 0);
          wr[r] = widen ? (const void *)(wf + (row - s0) * WIDEN_LD(k)) : cpu_weight_row(W, row);
        }
        float bias[TILE_R] = {0};
        if (a->bias && ts_tensor_present(a->bias))
          cpu_row_to_f32(a->c, a->bias->dtype,
                         (const char *)a->bias->data + ts_dtype_bytes(a->bias->dtype, rb), nr,
                         bias);
        float out[TILE_T][TILE_R];
        const void *xt = a->bf16_x ? (const void *)((const uint16_t *)a->c->act + t * k)
                                   : (const void *)(a->x + t * k);
        if (widen)
          tile_f32(T, wr, xt_w, WIDEN_LD(k), k, out);
        else
          fn(T, wr, xt, k, k, out);
        for (int q = 0; q < T; q++) {
          float *yq = a->y + (t + q) * m + rb;
          for (int r = 0; r < nr; r++) yq[r] = out[q][r] + bias[r];
        }
      }
    }
  }
}

#else

int cpu_matmul_avx512(cpu_ctx *c, const float *x, const ts_tensor *w, const ts_tensor *bias,
                      int n, float *y) {
  (void)c, (void)x, (void)w, (void)bias, (void)n, (void)y;
  return 0;
}

int cpu_matmul_avx512_supports(ts_dtype dt) {
  (void)dt;
  return 0;
}

void cpu_matmul_avx512_rows(const cpu_mm_args *a, int64_t r0, int64_t r1, int thread) {
  (void)a;
  (void)r0;
  (void)r1;
  (void)thread;
}

#endif
