/* The opt-in BF16-activation matmul (AVX512-BF16 dot products) against a double-precision
 * reference over the same bf16-rounded activations, on random non-zero inputs, odd sizes, padded
 * row strides, with and without bias; a token's result must not depend on the batch around it.
 * On CPUs without AVX512-BF16 the mode must refuse to switch on. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "backend/cpu/cpu_backend.h"
#include "test_util.h"

static test_rng rng = {0x7f4a7c15d1b54a32ull};

static int rand_int(int lo, int hi) {
  return lo + (int)(test_rng_next(&rng) % (uint64_t)(hi - lo + 1));
}

static float nonzero(void) {
  float v = test_rng_float(&rng);
  return v == 0 ? 0.375f : v;
}

static void test_matmul(backend *be, int threads) {
  for (int trial = 0; trial < 40; trial++) {
    int k = rand_int(1, 200), m = rand_int(1, 70), n = trial < 3 ? 1 : rand_int(2, 15);
    int stride = k + (trial % 2 ? rand_int(1, 9) : 0), with_bias = trial % 3 != 0;
    uint16_t *w = malloc(sizeof(uint16_t) * m * stride + 2);
    float *wf = malloc(sizeof(float) * m * k), *bias = malloc(sizeof(float) * m);
    for (int r = 0; r < m; r++)
      for (int c = 0; c < stride; c++) {
        uint16_t h = ts_f32_to_bf16(nonzero());
        w[1 + r * stride + c] = h; /* +1: rows need not be aligned */
        if (c < k) wf[r * k + c] = ts_bf16_to_f32(h);
      }
    for (int r = 0; r < m; r++) bias[r] = nonzero();
    ts_tensor wt = {.data = w + 1, .dtype = TS_BF16, .ndim = 2, .shape = {m, k},
                    .row_stride = stride};
    ts_tensor bt = {.data = bias, .dtype = TS_F32, .ndim = 1, .shape = {m}};
    float *x = malloc(sizeof(float) * n * k), *y = malloc(sizeof(float) * n * m);
    float *y1 = malloc(sizeof(float) * m);
    for (int i = 0; i < n * k; i++) x[i] = nonzero() * 4.0f;
    be->ops->matmul(be->ctx, x, &wt, with_bias ? &bt : NULL, n, y);
    for (int t = 0; t < n; t++)
      for (int r = 0; r < m; r++) {
        double want = with_bias ? bias[r] : 0, mag = 0;
        for (int i = 0; i < k; i++) {
          double p = (double)ts_bf16_to_f32(ts_f32_to_bf16(x[t * k + i])) * wf[r * k + i];
          want += p;
          mag += fabs(p);
        }
        double got = y[t * m + r];
        CHECK_MSG(fabs(got - want) <= 1e-5 * (mag + 1),
                  "bf16 act threads %d n=%d m=%d k=%d t=%d r=%d: %.9g vs %.9g", threads, n, m, k,
                  t, r, got, want);
      }
    be->ops->matmul(be->ctx, x + (size_t)(n - 1) * k, &wt, with_bias ? &bt : NULL, 1, y1);
    CHECK_MSG(memcmp(y1, y + (size_t)(n - 1) * m, sizeof(float) * m) == 0,
              "bf16 act n=%d k=%d: token depends on its batch", n, k);
    free(w);
    free(wf);
    free(bias);
    free(x);
    free(y);
    free(y1);
  }
}

int main(void) {
  ts_err err = {0};
  for (int threads = 1; threads <= 3; threads += 2) {
    backend *be = NULL;
    CHECK(backend_create(&be, "cpu", threads, &err) == 0);
    cpu_ctx *c = be->ctx;
    int on = cpu_backend_set_bf16_act(be, 1);
    CHECK(on == c->has_bf16);
    if (on) test_matmul(be, threads);
    CHECK(cpu_backend_set_bf16_act(be, 0) == 0 && c->bf16_act == 0);
    backend_destroy(be);
  }
  return test_finish("test_cpu_bf16");
}
