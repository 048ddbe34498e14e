/* aarch64 NEON matmul for F32, F16 and BF16 weights used in place: a register tile of 4 weight
 * rows x up to 4 tokens (16 q-register accumulators); each 4-element slice of a weight row is
 * widened once for every token of the tile. As on x86, each (row, token) sum runs in one fixed
 * order, so a token's output does not depend on the batch around it. */
#include "backend/cpu/cpu_backend.h"

#if defined(__aarch64__)
#include <arm_neon.h>

#define NR 4
#define NT 4

static inline float32x4_t load4(ts_dtype dt, const void *p, int64_t i) {
  if (dt == TS_F32) return vld1q_f32((const float *)p + i);
  uint16x4_t h = vld1_u16((const uint16_t *)p + i);
  if (dt == TS_BF16) return vreinterpretq_f32_u32(vshll_n_u16(h, 16));
  return vcvt_f32_f16(vreinterpret_f16_u16(h));
}

static inline float elem(ts_dtype dt, const void *p, int64_t i) {
  if (dt == TS_F32) return ((const float *)p)[i];
  uint16_t h = ((const uint16_t *)p)[i];
  return dt == TS_BF16 ? ts_bf16_to_f32(h) : ts_f16_to_f32(h);
}

/* out[t][r] = w[r] . x[t] for r < 4, t < T. */
static void tile(ts_dtype dt, int T, const void *const *w, const float *x, int64_t k,
                 float out[NT][NR]) {
  float32x4_t acc[NR][NT];
  for (int r = 0; r < NR; r++)
    for (int t = 0; t < NT; t++) acc[r][t] = vdupq_n_f32(0);
  int64_t i = 0;
  for (; i + 4 <= k; i += 4) {
    float32x4_t wv[NR];
    for (int r = 0; r < NR; r++) wv[r] = load4(dt, w[r], i);
    for (int t = 0; t < T; t++) {
      float32x4_t xv = vld1q_f32(x + t * k + i);
      for (int r = 0; r < NR; r++) acc[r][t] = vfmaq_f32(acc[r][t], wv[r], xv);
    }
  }
  for (int t = 0; t < T; t++)
    for (int r = 0; r < NR; r++) {
      float s = vaddvq_f32(acc[r][t]);
      for (int64_t j = i; j < k; j++) s += elem(dt, w[r], j) * x[t * k + j];
      out[t][r] = s;
    }
}

static void neon_rows(void *arg, int64_t r0, int64_t r1, int thread) {
  (void)thread;
  const cpu_mm_args *a = arg;
  const int64_t k = a->k, m = a->m;
  int64_t tb = (256 << 10) / (int64_t)(k * sizeof(float));
  tb = tb < NT ? NT : tb - tb % NT;
  for (int64_t t0 = 0; t0 < a->n; t0 += tb) {
    int64_t t1 = t0 + tb < a->n ? t0 + tb : a->n;
    for (int64_t rb = r0; rb < r1; rb += NR) {
      int nr = (int)(r1 - rb < NR ? r1 - rb : NR);
      const void *wr[NR];
      for (int r = 0; r < NR; r++) wr[r] = cpu_weight_row(a->w, rb + (r < nr ? r : 0));
      float bias[NR] = {0};
      if (a->bias && ts_tensor_present(a->bias))
        cpu_row_to_f32(a->c, a->bias->dtype,
                       (const char *)a->bias->data + ts_dtype_bytes(a->bias->dtype, rb), nr, bias);
      for (int64_t t = t0; t < t1; t += NT) {
        int T = (int)(t1 - t < NT ? t1 - t : NT);
        float out[NT][NR];
        tile(a->w->dtype, T, wr, a->x + t * k, k, out);
        for (int q = 0; q < T; q++)
          for (int r = 0; r < nr; r++) a->y[(t + q) * m + rb + r] = out[q][r] + bias[r];
      }
    }
  }
}

int cpu_matmul_neon(cpu_ctx *c, const float *x, const ts_tensor *w, const ts_tensor *bias, int n,
                    float *y) {
  ts_dtype dt = w->dtype;
  if (c->simd < CPU_ISA_AVX2 || !(dt == TS_F32 || dt == TS_F16 || dt == TS_BF16)) return 0;
  cpu_mm_args a = {c, x, w, bias, n, w->shape[1], w->shape[0], y, 0, 0};
  threadpool_parallel_for(c->pool, a.m, 64, neon_rows, &a);
  return 1;
}

#else

int cpu_matmul_neon(cpu_ctx *c, const float *x, const ts_tensor *w, const ts_tensor *bias, int n,
                    float *y) {
  (void)c, (void)x, (void)w, (void)bias, (void)n, (void)y;
  return 0;
}

#endif
