/* Element types and tensor views. A ts_tensor never owns its data: weights point into mmapped
 * files, activations into backend buffers. Shapes are in PyTorch order (outermost first),
 * row-major; a weight is [out_features][in_features]. */
#ifndef TESSERA_TENSOR_H
#define TESSERA_TENSOR_H

#include <assert.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef enum {
  TS_F32 = 0,
  TS_F16,
  TS_BF16,
  TS_Q8_0, /* GGUF block of 32: f16 scale + 32 x int8 */
  TS_Q4_0, /* GGUF block of 32: f16 scale + 16 bytes of nibbles */
  TS_Q4_K, /* GGUF super-block of 256 */
  TS_Q6_K, /* GGUF super-block of 256 */
  TS_I32,
  TS_DTYPE_COUNT
} ts_dtype;

typedef struct {
  const char *name;
  int block_elems; /* elements per block (1 for plain types) */
  int block_bytes; /* bytes per block */
} ts_dtype_info;

extern const ts_dtype_info ts_dtype_table[TS_DTYPE_COUNT];
static_assert(TS_DTYPE_COUNT == 8, "update ts_dtype_table when adding a dtype");

/* Bytes taken by n elements of dtype (n must be a multiple of the block size). */
static inline size_t ts_dtype_bytes(ts_dtype t, int64_t n) {
  return (size_t)(n / ts_dtype_table[t].block_elems) * (size_t)ts_dtype_table[t].block_bytes;
}

#define TS_MAX_DIMS 4

typedef struct {
  void *data;               /* NULL when the tensor is absent (optional weights) */
  ts_dtype dtype;
  int ndim;                 /* 0 when absent */
  int64_t shape[TS_MAX_DIMS];
  /* Elements between consecutive rows of a 2-D view (>= shape[1]). A column shard of a
   * row-major weight (the o_proj / down_proj split of tensor parallelism) keeps the file's row
   * stride so it can stay a view into the mapping. */
  int64_t row_stride;
} ts_tensor;

static inline int ts_tensor_present(const ts_tensor *t) { return t->data != NULL; }

static inline int64_t ts_tensor_nelem(const ts_tensor *t) {
  int64_t n = 1;
  for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
  return t->ndim ? n : 0;
}

/* Half-precision conversions (round to nearest even), shared by every backend's host code. */
static inline float ts_bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static inline uint16_t ts_f32_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

float ts_f16_to_f32(uint16_t h);
uint16_t ts_f32_to_f16(float f);

#endif
