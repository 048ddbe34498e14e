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
#include "test_util.h"

static test_rng rng = {0x9b1d3e5f7a2c4d61ull};

static int rand_int(int lo, int hi) {
  return lo + (int)(test_rng_next(&rng) % (uint64_t)(hi - lo + 1));
}

static float ref_f16(uint16_t h) {
  int e = (h >> 10) & 31, m = h & 1023;
  double v = e == 0 ? ldexp(m, -24) : ldexp(1024 + m, e - 25);
  return (float)((h & 0x8000) ? -v : v);
}

/* The reference quantizer: d = max|x| / 127, q = x * (1/d) rounded to nearest even. */
static void ref_quantize(const float *x, int k, int8_t *q, float *d) {
  for (int b = 0; b < k / 32; b++) {
    float amax = 0;
    for (int j = 0; j < 32; j++)
      if (fabsf(x[b * 32 + j]) > amax) amax = fabsf(x[b * 32 + j]);
    d[b] = amax / 127.0f;
    float id = d[b] != 0 ? 1.0f / d[b] : 0.0f;
    for (int j = 0; j < 32; j++) {
      float v = x[b * 32 + j] * id, r = floorf(v), f = v - r;
      if (f > 0.5f || (f == 0.5f && fmodf(r, 2.0f) != 0)) r += 1;
      q[b * 32 + j] = (int8_t)r;
    }
  }
}

typedef struct {
  ts_tensor t;
  uint8_t *buf;
  int8_t *q;   /* [rows][cols] integer weights */
  float *d;    /* [rows][cols/32] scales */
} qweight;

static qweight make_qweight(ts_dtype dt, int rows, int cols, int stride) {
  qweight w;
  memset(&w, 0, sizeof w);
  int bb = ts_dtype_table[dt].block_bytes;
  size_t row_bytes = (size_t)bb * (stride / 32);
  w.buf = malloc(row_bytes * rows + 1) ; /* +1: the kernels must not need aligned rows */
  w.q = malloc((size_t)rows * cols);
  w.d = malloc(sizeof(float) * rows * (cols / 32));
  uint8_t *base = w.buf + 1;
  for (int r = 0; r < rows; r++)
    for (int b = 0; b < stride / 32; b++) {
      uint8_t *p = base + row_bytes * r + (size_t)bb * b;
      uint16_t h = ts_f32_to_f16(0.002f + 0.05f * fabsf(test_rng_float(&rng)));
      p[0] = (uint8_t)h;
      p[1] = (uint8_t)(h >> 8);
      for (int j = 2; j < bb; j++) p[j] = (uint8_t)test_rng_next(&rng);
      if (b >= cols / 32) continue;
      w.d[r * (cols / 32) + b] = ref_f16(h);
      for (int j = 0; j < 32; j++) {
        int v = dt == TS_Q8_0 ? (int8_t)p[2 + j]
                              : (j < 16 ? (p[2 + j] & 15) : (p[2 + j - 16] >> 4)) - 8;
        w.q[(size_t)r * cols + b * 32 + j] = (int8_t)v;
      }
    }
  w.t.data = base;
  w.t.dtype = dt;
  w.t.ndim = 2;
  w.t.shape[0] = rows;
  w.t.shape[1] = cols;
  w.t.row_stride = stride;
  return w;
}

static void free_qweight(qweight *w) {
  free(w->buf);
  free(w->q);
  free(w->d);
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
      qweight w = make_qweight(dt, m, k, stride);
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
