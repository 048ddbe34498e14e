/* Q8_0 / Q4_0 test weights and references shared by the quantized-kernel tests: random weights in
 * the file's block layout with their integer values and scales, an independent f16 decoder and
 * the reference activation quantizer. */
#ifndef TESSERA_TEST_QUANT_UTIL_H
#define TESSERA_TEST_QUANT_UTIL_H

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "test_util.h"
#include "util/tensor.h"

/* IEEE half to float, written out here rather than taken from the library. */
static inline float ref_f16(uint16_t h) {
  int e = (h >> 10) & 31, m = h & 1023;
  double v = e == 0 ? ldexp(m, -24) : ldexp(1024 + m, e - 25);
  return (float)((h & 0x8000) ? -v : v);
}

/* The reference quantizer: d = max|x| / 127, q = x * (1/d) rounded to nearest even. */
static inline void ref_quantize(const float *x, int k, int8_t *q, float *d) {
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
  ts_tensor t;      /* the view handed to the kernels (t.data == buf) */
  uint8_t *alloc;   /* what to free */
  uint8_t *buf;     /* the file's bytes: [rows][stride/32] blocks */
  size_t row_bytes;
  int8_t *q;        /* [rows][cols] integer weights */
  double *d;        /* [rows][cols/32] scales */
} qweight;

/* A rows x cols weight with row stride `stride` (a multiple of 32, >= cols): random quants and
 * random non-zero f16 scales (of either sign when signed_scales), the rows starting `misalign`
 * bytes into their allocation (the kernels must not need aligned rows). */
static inline qweight make_qweight(test_rng *rng, ts_dtype dt, int rows, int cols, int stride,
                                   int misalign, int signed_scales) {
  qweight w;
  memset(&w, 0, sizeof w);
  int bb = ts_dtype_table[dt].block_bytes;
  w.row_bytes = (size_t)bb * (size_t)(stride / 32);
  w.alloc = malloc(w.row_bytes * (size_t)rows + (size_t)misalign);
  w.buf = w.alloc + misalign;
  w.q = malloc((size_t)rows * (size_t)cols);
  w.d = malloc(sizeof(double) * (size_t)rows * (size_t)(cols / 32));
  for (int r = 0; r < rows; r++)
    for (int b = 0; b < stride / 32; b++) {
      uint8_t *p = w.buf + w.row_bytes * (size_t)r + (size_t)bb * (size_t)b;
      float s = 0.002f + 0.05f * fabsf(test_rng_float(rng));
      uint16_t h = ts_f32_to_f16(signed_scales && (test_rng_next(rng) & 1) ? -s : s);
      p[0] = (uint8_t)h;
      p[1] = (uint8_t)(h >> 8);
      for (int j = 2; j < bb; j++) p[j] = (uint8_t)test_rng_next(rng);
      if (b >= cols / 32) continue;
      w.d[r * (cols / 32) + b] = ref_f16(h);
      for (int j = 0; j < 32; j++) {
        int v = dt == TS_Q8_0 ? (int8_t)p[2 + j]
                              : (j < 16 ? (p[2 + j] & 15) : (p[2 + j - 16] >> 4)) - 8;
        w.q[(size_t)r * cols + b * 32 + j] = (int8_t)v;
      }
    }
  w.t.data = w.buf;
  w.t.dtype = dt;
  w.t.ndim = 2;
  w.t.shape[0] = rows;
  w.t.shape[1] = cols;
  w.t.row_stride = stride;
  return w;
}

static inline void free_qweight(qweight *w) {
  free(w->alloc);
  free(w->q);
  free(w->d);
}

#endif
