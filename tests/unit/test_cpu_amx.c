/* The AMX-BF16 matmul against a double-precision reference over the same bf16-rounded
 * activations: random non-zero inputs, odd and unaligned m/k/n with tails of every size, padded
 * and unaligned rows, bias of either dtype, n from 1 to 40 and past 300, one and three threads.
 * A token's output must be the same bits as when it is multiplied alone (batch invariance), and
 * turning AMX off (or a kernel level below AVX-512) must give back the float32 kernels. On CPUs
 * without usable AMX the test says so and passes. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "backend/cpu/cpu_backend.h"
#include "test_util.h"

static test_rng rng;

static int rand_int(int lo, int hi) {
  return lo + (int)(test_rng_next(&rng) % (uint64_t)(hi - lo + 1));
}

static float nonzero(void) {
  float v = test_rng_float(&rng);
  return v == 0 ? 0.375f : v;
}

typedef struct {
  int m, k, n, stride, bias; /* bias: 0 none, 1 F32, 2 BF16 */
} shape;

/* One product through the backend, checked against the reference; returns failures seen. */
static void check_one(backend *be, int threads, shape s) {
  const int m = s.m, k = s.k, n = s.n, stride = s.stride;
  uint16_t *w = malloc(sizeof(uint16_t) * ((size_t)m * stride + 1));
  double *wf = malloc(sizeof(double) * (size_t)m * k);
  float *bf = malloc(sizeof(float) * m);
  uint16_t *bh = malloc(sizeof(uint16_t) * m);
  for (int r = 0; r < m; r++)
    for (int c = 0; c < stride; c++) {
      uint16_t h = ts_f32_to_bf16(nonzero());
      w[1 + (size_t)r * stride + c] = h; /* +1: rows need not be aligned */
      if (c < k) wf[(size_t)r * k + c] = ts_bf16_to_f32(h);
    }
  for (int r = 0; r < m; r++) {
    bh[r] = ts_f32_to_bf16(nonzero());
    bf[r] = s.bias == 2 ? ts_bf16_to_f32(bh[r]) : nonzero();
  }
  ts_tensor wt = {.data = w + 1, .dtype = TS_BF16, .ndim = 2, .shape = {m, k},
                  .row_stride = stride};
  ts_tensor bt = {.data = s.bias == 2 ? (void *)bh : (void *)bf,
                  .dtype = s.bias == 2 ? TS_BF16 : TS_F32, .ndim = 1, .shape = {m}};
  const ts_tensor *bias = s.bias ? &bt : NULL;
  /* Magnitudes around 4 with a random scale per token: the sums span several binades. */
  float *x = calloc((size_t)n * k, sizeof(float));
  for (int t = 0; t < n; t++) {
    float sc = ldexpf(1.0f, rand_int(-6, 6));
    for (int i = 0; i < k; i++) x[(size_t)t * k + i] = nonzero() * 4.0f * sc;
  }
  float *y = malloc(sizeof(float) * (size_t)n * m), *y1 = malloc(sizeof(float) * m);
  be->ops->matmul(be->ctx, x, &wt, bias, n, y);

  /* The tile instruction sums in float32 (round to nearest even), one rounding per product
   * pair added: for k terms the error is at most about (k/2 + 1) * 2^-24 * sum |products|
   * (+ one rounding for the bias). 2^-23 * (k + 4) leaves a factor 2 over that bound, and is
   * still ~100x tighter than what unrounded activations would give (2^-9 per product). */
  int bad = 0;
  for (int t = 0; t < n && bad < 5; t++)
    for (int r = 0; r < m && bad < 5; r++) {
      double want = s.bias ? bf[r] : 0, mag = s.bias ? fabs(bf[r]) : 0;
      for (int i = 0; i < k; i++) {
        double p = (double)ts_bf16_to_f32(ts_f32_to_bf16(x[(size_t)t * k + i])) *
                   wf[(size_t)r * k + i];
        want += p;
        mag += fabs(p);
      }
      double got = y[(size_t)t * m + r];
      int ok = fabs(got - want) <= ldexp(1.0, -23) * (k + 4) * mag;
      bad += !ok;
      CHECK_MSG(ok, "amx threads %d n=%d m=%d k=%d stride=%d bias=%d t=%d r=%d: %.9g vs %.9g",
                threads, n, m, k, stride, s.bias, t, r, got, want);
    }

  /* Batch invariance: every token (a sample of them for long batches) alone, same bits. */
  for (int t = 0; t < n; t += n > 40 ? rand_int(1, 37) : 1) {
    be->ops->matmul(be->ctx, x + (size_t)t * k, &wt, bias, 1, y1);
    CHECK_MSG(!memcmp(y1, y + (size_t)t * m, sizeof(float) * m),
              "amx threads %d n=%d m=%d k=%d: token %d depends on its batch", threads, n, m, k, t);
  }
  /* A window of the batch starting mid-tile gives the same bits too. */
  if (n > 3) {
    int t0 = rand_int(1, n - 2), nn = rand_int(1, n - t0);
    float *yw = malloc(sizeof(float) * (size_t)nn * m);
    be->ops->matmul(be->ctx, x + (size_t)t0 * k, &wt, bias, nn, yw);
    CHECK_MSG(!memcmp(yw, y + (size_t)t0 * m, sizeof(float) * (size_t)nn * m),
              "amx n=%d m=%d k=%d: tokens %d..%d differ in a smaller batch", n, m, k, t0,
              t0 + nn);
    free(yw);
  }
  free(w);
  free(wf);
  free(bf);
  free(bh);
  free(x);
  free(y);
  free(y1);
}

/* With AMX off (or below AVX-512) the float32 kernels run: unrounded activations, so the
 * result is far closer to the exact product than bf16 rounding allows. */
static void check_off(backend *be, const char *why) {
  int m = rand_int(1, 40), k = rand_int(33, 300), n = rand_int(1, 9);
  uint16_t *w = malloc(sizeof(uint16_t) * (size_t)m * k);
  float *x = malloc(sizeof(float) * (size_t)n * k), *y = malloc(sizeof(float) * (size_t)n * m);
  for (int i = 0; i < m * k; i++) w[i] = ts_f32_to_bf16(nonzero());
  for (int i = 0; i < n * k; i++) x[i] = nonzero();
  ts_tensor wt = {.data = w, .dtype = TS_BF16, .ndim = 2, .shape = {m, k}};
  be->ops->matmul(be->ctx, x, &wt, NULL, n, y);
  double worst = 0;
  for (int t = 0; t < n; t++)
    for (int r = 0; r < m; r++) {
      double want = 0, mag = 0;
      for (int i = 0; i < k; i++) {
        double p = (double)x[t * k + i] * ts_bf16_to_f32(w[r * k + i]);
        want += p;
        mag += fabs(p);
      }
      double e = fabs(y[t * m + r] - want) / mag;
      if (e > worst) worst = e;
    }
  CHECK_MSG(worst < 1e-5, "%s: relative error %g, AMX still in use?", why, worst);
  free(w);
  free(x);
  free(y);
}

int main(void) {
  rng.s = test_seed(0xa3c5);
  ts_err err = {0};
  for (int threads = 1; threads <= 3; threads += 2) {
    backend *be = NULL;
    CHECK(backend_create(&be, "cpu", threads, &err) == 0);
    cpu_ctx *c = be->ctx;
    CHECK(c->has_amx == (cpu_amx_available() && c->isa_max >= CPU_ISA_AVX512));
    if (!cpu_backend_set_amx(be, 1)) {
      CHECK(c->amx == 0);
      fprintf(stderr, "test_cpu_amx: SKIP: this CPU/OS has no usable AMX-BF16 (CPUID AMX-TILE/"
                      "AMX-BF16, XCR0 tile state, or the kernel's permission is missing)\n");
      backend_destroy(be);
      return test_finish("test_cpu_amx");
    }
    /* Short batches: every n from 1 to 40 once, odd sizes, tails of rows, k and tokens. */
    for (int n = 1; n <= 40; n++) {
      shape s = {rand_int(1, 100), rand_int(1, 300), n, 0, n % 3};
      if (n % 5 == 0) s.m = 16 * rand_int(1, 6);  /* whole row tiles */
      if (n % 7 == 0) s.k = 32 * rand_int(1, 8);  /* whole k steps */
      s.stride = s.k + (n % 2 ? rand_int(1, 9) : 0);
      check_one(be, threads, s);
    }
    /* Long batches (prefill): many 32-token blocks, with a token tail. */
    for (int trial = 0; trial < 2; trial++) {
      shape s = {rand_int(60, 90), rand_int(100, 200), rand_int(300, 340), 0, trial + 1};
      s.stride = s.k + trial;
      check_one(be, threads, s);
    }
    /* The switches that turn it off. */
    CHECK(cpu_backend_set_amx(be, 0) == 0);
    check_off(be, "set_amx(0)");
    CHECK(cpu_backend_set_amx(be, 1) == 1);
    cpu_backend_set_isa(be, CPU_ISA_AVX2);
    check_off(be, "kernel level avx2");
    cpu_backend_force_scalar(be, 1);
    check_off(be, "force_scalar");
    cpu_backend_force_scalar(be, 0);
    backend_destroy(be);
  }
  return test_finish("test_cpu_amx");
}
