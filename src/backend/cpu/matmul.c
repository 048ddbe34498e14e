/* CPU matmul y = x @ w^T (+ bias) and the row-widening / dot-product kernels it is built from.
 * Each thread owns a contiguous range of output rows; it widens a block of MM_ROWS weight rows to
 * float32 once and applies them to every token of the step, so each weight row is read once per
 * step whatever the batch size. AVX2/FMA/F16C kernels are chosen at run time; the scalar ones are
 * written so the compiler can vectorize them too. */
#include <math.h>
#include <pthread.h>
#include <string.h>

#include "backend/cpu/cpu_backend.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_X86 1
#else
#define CPU_X86 0
#endif

#define MM_ROWS 8 /* weight rows widened together (one block of the row loop) */

/* ---- row widening ---------------------------------------------------------------------- */

static float f16_table[65536];
static pthread_once_t f16_once = PTHREAD_ONCE_INIT;
static void f16_table_init(void) {
  for (uint32_t h = 0; h < 65536; h++) f16_table[h] = ts_f16_to_f32((uint16_t)h);
}

int cpu_dtype_supported(ts_dtype dt) {
  return dt == TS_F32 || dt == TS_F16 || dt == TS_BF16 || dt == TS_Q8_0 || dt == TS_Q4_0;
}

#if CPU_X86
__attribute__((target("avx2,f16c"))) static void f16_row_avx2(const uint16_t *s, int64_t n,
                                                               float *d) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
  for (; i < n; i++) d[i] = f16_table[s[i]];
}

__attribute__((target("avx2"))) static void bf16_row_avx2(const uint16_t *s, int64_t n, float *d) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(s + i)));
    _mm256_storeu_ps(d + i, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
  }
  for (; i < n; i++) d[i] = ts_bf16_to_f32(s[i]);
}
#endif

void cpu_row_to_f32(const cpu_ctx *c, ts_dtype dt, const void *src, int64_t n, float *dst) {
  (void)c; /* only the x86 kernels look at the level */
  pthread_once(&f16_once, f16_table_init);
  const uint16_t *h = src;
  const uint8_t *b = src;
  switch (dt) {
    case TS_F32:
      memcpy(dst, src, (size_t)n * sizeof(float));
      return;
    case TS_F16:
#if CPU_X86
      if (c->simd) {
        f16_row_avx2(h, n, dst);
        return;
      }
#endif
      for (int64_t i = 0; i < n; i++) dst[i] = f16_table[h[i]];
      return;
    case TS_BF16:
#if CPU_X86
      if (c->simd) {
        bf16_row_avx2(h, n, dst);
        return;
      }
#endif
      for (int64_t i = 0; i < n; i++) dst[i] = ts_bf16_to_f32(h[i]);
      return;
    case TS_Q8_0: /* blocks of 32: f16 scale, 32 x int8 */
      for (int64_t blk = 0; blk < n / 32; blk++, b += 34) {
        float d = f16_table[(uint16_t)(b[0] | (b[1] << 8))];
        for (int j = 0; j < 32; j++) dst[blk * 32 + j] = d * (float)(int8_t)b[2 + j];
      }
      return;
    case TS_Q4_0: /* blocks of 32: f16 scale, low nibbles = elements 0..15, high = 16..31 */
      for (int64_t blk = 0; blk < n / 32; blk++, b += 18) {
        float d = f16_table[(uint16_t)(b[0] | (b[1] << 8))];
        for (int j = 0; j < 16; j++) {
          dst[blk * 32 + j] = d * (float)((b[2 + j] & 0x0f) - 8);
          dst[blk * 32 + j + 16] = d * (float)((b[2 + j] >> 4) - 8);
        }
      }
      return;
    default:
      memset(dst, 0, (size_t)n * sizeof(float)); /* weight_prepare refuses these dtypes */
      return;
  }
}

/* ---- dot products ---------------------------------------------------------------------- */

static float dot_scalar(const float *a, const float *b, int64_t n) {
  float acc[8] = {0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; j++) acc[j] += a[i + j] * b[i + j];
  float s = 0;
  for (; i < n; i++) s += a[i] * b[i];
  return s + ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

/* Four dot products sharing x: out[r] = x . w[r]. */
static void dot4_scalar(const float *x, const float *const *w, int64_t k, float *out) {
  for (int r = 0; r < 4; r++) out[r] = dot_scalar(x, w[r], k);
}

#if CPU_X86
__attribute__((target("avx2,fma"))) static inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) static float dot_avx2(const float *a, const float *b,
                                                           int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  float s = hsum256(_mm256_add_ps(s0, s1));
  for (; i < n; i++) s += a[i] * b[i];
  return s;
}

__attribute__((target("avx2,fma"))) static void dot4_avx2(const float *x,
                                                           const float *const *w, int64_t k,
                                                           float *out) {
  const float *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  __m256 s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    __m256 xv = _mm256_loadu_ps(x + i);
    s0 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w0 + i), s0);
    s1 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w1 + i), s1);
    s2 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w2 + i), s2);
    s3 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w3 + i), s3);
  }
  out[0] = hsum256(s0);
  out[1] = hsum256(s1);
  out[2] = hsum256(s2);
  out[3] = hsum256(s3);
  for (; i < k; i++) {
    out[0] += x[i] * w0[i];
    out[1] += x[i] * w1[i];
    out[2] += x[i] * w2[i];
    out[3] += x[i] * w3[i];
  }
}

/* Four rows times two tokens: eight accumulators share each load. Per (row, token) it adds in
 * exactly the order dot4_avx2 does, so a token's result does not depend on its neighbour. */
__attribute__((target("avx2,fma"))) static void dot4x2_avx2(const float *x0, const float *x1,
                                                             const float *const *w, int64_t k,
                                                             float *out0, float *out1) {
  const float *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
         a3 = _mm256_setzero_ps(), b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps(),
         b2 = _mm256_setzero_ps(), b3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    __m256 xa = _mm256_loadu_ps(x0 + i), xb = _mm256_loadu_ps(x1 + i);
    __m256 v = _mm256_loadu_ps(w0 + i);
    a0 = _mm256_fmadd_ps(xa, v, a0);
    b0 = _mm256_fmadd_ps(xb, v, b0);
    v = _mm256_loadu_ps(w1 + i);
    a1 = _mm256_fmadd_ps(xa, v, a1);
    b1 = _mm256_fmadd_ps(xb, v, b1);
    v = _mm256_loadu_ps(w2 + i);
    a2 = _mm256_fmadd_ps(xa, v, a2);
    b2 = _mm256_fmadd_ps(xb, v, b2);
    v = _mm256_loadu_ps(w3 + i);
    a3 = _mm256_fmadd_ps(xa, v, a3);
    b3 = _mm256_fmadd_ps(xb, v, b3);
  }
  out0[0] = hsum256(a0);
  out0[1] = hsum256(a1);
  out0[2] = hsum256(a2);
  out0[3] = hsum256(a3);
  out1[0] = hsum256(b0);
  out1[1] = hsum256(b1);
  out1[2] = hsum256(b2);
  out1[3] = hsum256(b3);
  for (; i < k; i++) {
    out0[0] += x0[i] * w0[i];
    out0[1] += x0[i] * w1[i];
    out0[2] += x0[i] * w2[i];
    out0[3] += x0[i] * w3[i];
    out1[0] += x1[i] * w0[i];
    out1[1] += x1[i] * w1[i];
    out1[2] += x1[i] * w2[i];
    out1[3] += x1[i] * w3[i];
  }
}
#endif

float cpu_dot(const cpu_ctx *c, const float *a, const float *b, int64_t n) {
#if CPU_X86
  if (c->simd) return dot_avx2(a, b, n);
#endif
  (void)c;
  return dot_scalar(a, b, n);
}

static void dot4(const cpu_ctx *c, const float *x, const float *const *w, int64_t k,
                 float *out) {
#if CPU_X86
  if (c->simd) {
    dot4_avx2(x, w, k, out);
    return;
  }
#endif
  (void)c;
  dot4_scalar(x, w, k, out);
}

static void dot4x2(const cpu_ctx *c, const float *x0, const float *x1, const float *const *w,
                   int64_t k, float *out0, float *out1) {
#if CPU_X86
  if (c->simd) {
    dot4x2_avx2(x0, x1, w, k, out0, out1);
    return;
  }
#endif
  dot4(c, x0, w, k, out0);
  dot4(c, x1, w, k, out1);
}

/* ---- matmul ---------------------------------------------------------------------------- */

typedef struct {
  cpu_ctx *c;
  const float *x; /* [n][k] */
  const ts_tensor *w;
  const ts_tensor *bias;
  int n;
  int64_t k, m;
  float *y; /* [n][m] */
} matmul_job;

static void matmul_rows(void *arg, int64_t r0, int64_t r1, int thread) {
  matmul_job *j = arg;
  const int64_t k = j->k, m = j->m;
  float *wbuf = cpu_scratch(j->c, thread); /* [MM_ROWS][k] widened rows */
  float *bbuf = wbuf + MM_ROWS * k;        /* [MM_ROWS] bias */
  for (int64_t rb = r0; rb < r1; rb += MM_ROWS) {
    int nr = (int)(r1 - rb < MM_ROWS ? r1 - rb : MM_ROWS);
    const float *wr[MM_ROWS];
    for (int r = 0; r < nr; r++) {
      const void *src = cpu_weight_row(j->w, rb + r);
      if (j->w->dtype == TS_F32) {
        wr[r] = src;
      } else {
        cpu_row_to_f32(j->c, j->w->dtype, src, k, wbuf + r * k);
        wr[r] = wbuf + r * k;
      }
    }
    for (int r = 0; r < nr; r++) bbuf[r] = 0;
    if (j->bias && ts_tensor_present(j->bias)) {
      const ts_tensor *b = j->bias;
      size_t off = ts_dtype_bytes(b->dtype, rb);
      cpu_row_to_f32(j->c, b->dtype, (const char *)b->data + off, nr, bbuf);
    }
    int t = 0;
    for (; t + 2 <= j->n; t += 2) { /* token pairs through the 4x2 kernel */
      const float *x0 = j->x + (size_t)t * k, *x1 = x0 + k;
      float *y0 = j->y + (size_t)t * m + rb, *y1 = y0 + m;
      int r = 0;
      for (; r + 4 <= nr; r += 4) {
        float o0[4], o1[4];
        dot4x2(j->c, x0, x1, wr + r, k, o0, o1);
        for (int q = 0; q < 4; q++) {
          y0[r + q] = o0[q] + bbuf[r + q];
          y1[r + q] = o1[q] + bbuf[r + q];
        }
      }
      for (; r < nr; r++) {
        y0[r] = cpu_dot(j->c, x0, wr[r], k) + bbuf[r];
        y1[r] = cpu_dot(j->c, x1, wr[r], k) + bbuf[r];
      }
    }
    for (; t < j->n; t++) {
      const float *xt = j->x + (size_t)t * k;
      float *yt = j->y + (size_t)t * m + rb;
      int r = 0;
      for (; r + 4 <= nr; r += 4) {
        float o[4];
        dot4(j->c, xt, wr + r, k, o);
        for (int q = 0; q < 4; q++) yt[r + q] = o[q] + bbuf[r + q];
      }
      for (; r < nr; r++) yt[r] = cpu_dot(j->c, xt, wr[r], k) + bbuf[r];
    }
  }
}

void cpu_matmul(void *ctx, const float *x, const ts_tensor *w, const ts_tensor *bias, int n,
                float *y) {
  cpu_ctx *c = ctx;
  matmul_job j = {c, x, w, bias, n, w->shape[1], w->shape[0], y};
  if (n <= 0 || cpu_matmul_amx(c, x, w, bias, n, y) || cpu_matmul_avx512(c, x, w, bias, n, y) ||
      cpu_matmul_neon(c, x, w, bias, n, y) || cpu_matmul_quant(c, x, w, bias, n, y))
    return;
  if (cpu_scratch_reserve(c, (size_t)MM_ROWS * (size_t)j.k + MM_ROWS) < 0) {
    /* Out of memory for a few rows of scratch: nothing sane to compute; poison the output so
     * the failure is visible instead of silently stale. */
    for (size_t i = 0; i < (size_t)n * (size_t)j.m; i++) y[i] = NAN;
    return;
  }
  threadpool_parallel_for(c->pool, j.m, MM_ROWS * 4, matmul_rows, &j);
}
