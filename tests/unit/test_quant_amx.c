/* AMX-INT8 for repacked Q8_0 weights (products of 16 tokens or more): the output must be
 * the same bits as the VNNI kernels' (AMX off) for the same inputs, and each token's row the
 * same bits as that token multiplied alone (n = 1, below the AMX threshold). Random non-zero
 * data, odd m (not a multiple of 16, some below one group), k = 32, 96 and 1024+, padded file
 * rows, n = 15..40 and 300+, with and without bias, one and three threads. On CPUs without
 * AVX-512 VNNI or usable AMX-INT8 the test says so and passes. (Q4_0 stays on VNNI.) */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "backend/cpu/cpu_backend.h"
#include "test_quant_util.h"
#include "test_util.h"

static test_rng rng;

static int rand_int(int lo, int hi) {
  return lo + (int)(test_rng_next(&rng) % (uint64_t)(hi - lo + 1));
}

static void check_one(backend *be, int threads, ts_dtype dt, int m, int k, int n, int with_bias) {
  ts_err err = {0};
  const int stride = k + 32 * rand_int(0, 1);
  qweight qw = make_qweight(&rng, dt, m, stride, stride, 0, 1);
  uint8_t *buf = qw.buf;
  ts_tensor w = {.data = buf, .dtype = dt, .ndim = 2, .shape = {m, k}, .row_stride = stride};
  CHECK(be->ops->weight_prepare(be->ctx, &w, &err) == 0);
  CHECK_MSG(w.data != buf, "%s m=%d k=%d not repacked", ts_dtype_table[dt].name, m, k);

  float *bias = malloc(sizeof(float) * (size_t)m);
  for (int r = 0; r < m; r++) bias[r] = test_rng_float(&rng);
  ts_tensor bt = {.data = bias, .dtype = TS_F32, .ndim = 1, .shape = {m}};
  const ts_tensor *bp = with_bias ? &bt : NULL;
  /* A random scale per token: the sums span several binades. */
  float *x = malloc(sizeof(float) * (size_t)n * k);
  for (int t = 0; t < n; t++) {
    float xs = ldexpf(1.0f, rand_int(-6, 6));
    for (int i = 0; i < k; i++) {
      float v = test_rng_float(&rng);
      x[(size_t)t * k + i] = (v == 0 ? 0.25f : v) * xs;
    }
  }
  float *ya = malloc(sizeof(float) * (size_t)n * m), *yv = malloc(sizeof(float) * (size_t)n * m);
  float *y1 = malloc(sizeof(float) * (size_t)m);

  CHECK(cpu_backend_set_amx(be, 1) == 1 && cpu_quant_amx(be->ctx) == 1);
  be->ops->matmul(be->ctx, x, &w, bp, n, ya);
  CHECK(cpu_backend_set_amx(be, 0) == 0 && cpu_quant_amx(be->ctx) == 0);
  be->ops->matmul(be->ctx, x, &w, bp, n, yv);
  int bad = 0, nan = 0;
  for (size_t i = 0; i < (size_t)n * m; i++) {
    bad += memcmp(&ya[i], &yv[i], sizeof(float)) != 0;
    nan += !isfinite(ya[i]);
  }
  CHECK_MSG(bad == 0 && nan == 0, "%s threads %d n=%d m=%d k=%d bias %d: %d of %d outputs differ "
            "between AMX and VNNI, %d not finite", ts_dtype_table[dt].name, threads, n, m, k,
            with_bias, bad, n * m, nan);

  /* Each token alone (VNNI, n = 1) against its row of the AMX product. */
  CHECK(cpu_backend_set_amx(be, 1) == 1);
  int dep = 0;
  for (int t = 0; t < n; t += n > 40 ? rand_int(1, 29) : 1) {
    be->ops->matmul(be->ctx, x + (size_t)t * k, &w, bp, 1, y1);
    dep += memcmp(y1, ya + (size_t)t * m, sizeof(float) * (size_t)m) != 0;
  }
  CHECK_MSG(dep == 0, "%s threads %d n=%d m=%d k=%d: %d tokens differ from the batch's rows",
            ts_dtype_table[dt].name, threads, n, m, k, dep);

  be->ops->weight_release(be->ctx, &w);
  free_qweight(&qw);
  free(bias);
  free(x);
  free(ya);
  free(yv);
  free(y1);
}

int main(void) {
  rng.s = test_seed(0x3d1f6a9e58c2b047ull);
  ts_err err = {0};
  for (int threads = 1; threads <= 3; threads += 2) {
    backend *be = NULL;
    CHECK(backend_create(&be, "cpu", threads, &err) == 0);
    if (!be) break;
    const char *env = getenv("TESSERA_CPU_QREPACK");
    if (cpu_backend_set_amx(be, 1) != 1 || !cpu_quant_amx(be->ctx) ||
        (env && strcmp(env, "0") == 0)) {
      fprintf(stderr, "test_quant_amx: SKIP: no AVX-512 VNNI, usable AMX-INT8 (CPUID leaf 7 "
                      "EDX bit 25, tile state, permission) or repacking\n");
      backend_destroy(be);
      break;
    }
    for (int pass = 0; pass < 2; pass++) {
      for (int n = 15; n <= 40; n++) {
        int k = (n + pass) % 3 == 0 ? 32 : (n + pass) % 3 == 1 ? 96 : 32 * rand_int(32, 40);
        int m = n % 4 == 0 ? rand_int(1, 15) : 2 * rand_int(8, 60) + 1;
        check_one(be, threads, TS_Q8_0, m, k, n, (n + pass) % 2);
      }
      check_one(be, threads, TS_Q8_0, 2 * rand_int(8, 40) + 1, 32 * rand_int(1, 34),
                rand_int(300, 340), rand_int(0, 1));
    }
    backend_destroy(be);
  }
  return test_finish("test_quant_amx");
}
