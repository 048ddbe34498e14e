/* Q8_0 / Q4_0 matmul (activations quantized on the fly) at every kernel level this CPU has,
 * against references written here: (1) the activation quantizer bit for bit against its
 * definition; (2) the matmul against a double-precision sum over the same integer blocks;
 * (3) against dequantize-then-float32 with the unquantized activations, within the error the
 * activation rounding allows; (4) a token's output does not depend on the batch around it.
 * Random non-zero inputs, odd sizes, padded row strides, with and without bias. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "backend/cpu/cpu_backend.h"
#include "test_quant_util.h"
#include "test_util.h"

static test_rng rng = {0x9b1d3e5f7a2c4d61ull};

static int rand_int(int lo, int hi) {
  return lo + (int)(test_rng_next(&rng) % (uint64_t)(hi - lo + 1));
}

static void test_quantizer(void) {
  for (int trial = 0; trial < 50; trial++) {
    int k = 32 * rand_int(1, 9);
    float *x = malloc(sizeof(float) * k);
    float scale = ldexpf(1.0f, rand_int(-20, 20));
    for (int i = 0; i < k; i++) x[i] = test_rng_float(&rng) * scale;
    if (trial % 7 == 3)
      for (int i = 0; i < 32; i++) x[i] = 0; /* an all-zero block: scale 0, codes 0 */
    int8_t q[9 * 32], rq[9 * 32];
    float d[9], rd[9];
    cpu_quantize_act(x, k, q, d);
    ref_quantize(x, k, rq, rd);
    CHECK_MSG(memcmp(q, rq, (size_t)k) == 0 && memcmp(d, rd, sizeof(float) * (k / 32)) == 0,
              "quantizer trial %d k=%d", trial, k);
    free(x);
  }
}

static void test_matmul(backend *be, int threads, int level) {
  const ts_dtype dts[] = {TS_Q8_0, TS_Q4_0};
  for (int di = 0; di < 2; di++)
    for (int trial = 0; trial < 8; trial++) {
      ts_dtype dt = dts[di];
      int k = 32 * rand_int(1, 12), m = rand_int(1, 75);
      int n = trial == 0 ? 1 : rand_int(2, 13);
      int stride = k + 32 * (trial % 2);
      int with_bias = trial % 3 != 1;
      qweight w = make_qweight(&rng, dt, m, k, stride, 1, 0);
      float *bias = malloc(sizeof(float) * m);
      for (int r = 0; r < m; r++) bias[r] = test_rng_float(&rng);
      ts_tensor bt = {.data = bias, .dtype = TS_F32, .ndim = 1, .shape = {m}};
      float *x = malloc(sizeof(float) * n * k), *y = malloc(sizeof(float) * n * m);
      float *y1 = malloc(sizeof(float) * m);
      for (int i = 0; i < n * k; i++) {
        float v = test_rng_float(&rng);
        x[i] = (v == 0 ? 0.25f : v) * 3.0f;
      }
      int8_t *xq = malloc((size_t)n * k);
      float *xd = malloc(sizeof(float) * n * (k / 32));
      for (int t = 0; t < n; t++) ref_quantize(x + t * k, k, xq + t * k, xd + t * (k / 32));
      be->ops->matmul(be->ctx, x, &w.t, with_bias ? &bt : NULL, n, y);
      for (int t = 0; t < n; t++)
        for (int r = 0; r < m; r++) {
          double want = with_bias ? bias[r] : 0, mag = 0, deq = want, bound = 0;
          for (int b = 0; b < k / 32; b++) {
            double dw = w.d[r * (k / 32) + b], dx = xd[t * (k / 32) + b];
            long s = 0;
            for (int j = 0; j < 32; j++) {
              int i = b * 32 + j;
              s += (long)w.q[(size_t)r * k + i] * xq[t * k + i];
              mag += fabs(dw * dx * w.q[(size_t)r * k + i] * xq[t * k + i]);
              deq += dw * w.q[(size_t)r * k + i] * x[t * k + i];
              bound += fabs(dw * w.q[(size_t)r * k + i]) * dx * 0.5;
            }
            want += dw * dx * (double)s;
          }
          double got = y[(size_t)t * m + r];
          CHECK_MSG(fabs(got - want) <= 1e-5 * (mag + 1),
                    "%s level %d threads %d n=%d m=%d k=%d t=%d r=%d: %.9g vs %.9g",
                    ts_dtype_table[dt].name, level, threads, n, m, k, t, r, got, want);
          CHECK_MSG(fabs(got - deq) <= bound + 1e-5 * (mag + 1),
                    "%s vs dequantized: level %d n=%d m=%d k=%d t=%d r=%d: %g vs %g (bound %g)",
                    ts_dtype_table[dt].name, level, n, m, k, t, r, got, deq, bound);
        }
      /* Batch invariance: the last token alone gives the same bits. */
      be->ops->matmul(be->ctx, x + (size_t)(n - 1) * k, &w.t, with_bias ? &bt : NULL, 1, y1);
      CHECK_MSG(memcmp(y1, y + (size_t)(n - 1) * m, sizeof(float) * m) == 0,
                "%s level %d n=%d: token depends on its batch", ts_dtype_table[dt].name, level,
                n);
      free(x);
      free(y);
      free(y1);
      free(xq);
      free(xd);
      free(bias);
      free_qweight(&w);
    }
}

int main(void) {
  test_quantizer();
  ts_err err = {0};
  for (int threads = 1; threads <= 3; threads += 2) {
    backend *be = NULL;
    CHECK(backend_create(&be, "cpu", threads, &err) == 0);
    int top = cpu_backend_set_isa(be, 99);
    for (int level = 0; level <= top; level++) {
      CHECK(cpu_backend_set_isa(be, level) == level);
      test_matmul(be, threads, level);
    }
    backend_destroy(be);
  }
  return test_finish("test_quant");
}
