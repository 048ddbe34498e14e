/* The paged KV cache of one rank, allocated through the backend (host memory on the CPU, device
 * memory on CUDA): per local layer one K and one V buffer of [n_blocks][block_size][n_kv_l][hd],
 * float32 on the CPU; on CUDA bfloat16 when the weights are 16-bit (half the bytes a decode step
 * streams) and float32 for a float32 model. */
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"

ts_dtype kv_cache_dtype(const backend *be) {
  if (!be || !be->ops->kv_dtype) return TS_F32;
  const char *e = getenv("TESSERA_KV_DTYPE");
  if (e && (!strcmp(e, "f32") || !strcmp(e, "F32"))) return TS_F32;
  return be->ops->kv_dtype(be->ctx);
}

int kv_cache_create(kv_cache *kv, backend *be, int n_layers, int n_blocks, int block_size,
                    int n_kv_l, int head_dim, ts_err *err) {
  memset(kv, 0, sizeof *kv);
  if (n_layers < 0 || n_blocks <= 0 || block_size <= 0 || n_kv_l <= 0 || head_dim <= 0)
    return ts_errorf(err, TS_EINVAL,
                     "bad kv cache shape: %d layers, %d blocks of %d, %d kv heads of %d",
                     n_layers, n_blocks, block_size, n_kv_l, head_dim);
  ts_dtype dt = kv_cache_dtype(be);
  size_t bytes = ts_dtype_bytes(dt, (int64_t)n_blocks * block_size * n_kv_l * head_dim);
  kv->n_layers = n_layers;
  kv->n_blocks = n_blocks;
  kv->block_size = block_size;
  kv->n_kv_l = n_kv_l;
  kv->head_dim = head_dim;
  kv->dtype = dt;
  kv->k = calloc(n_layers ? (size_t)n_layers : 1, sizeof *kv->k);
  kv->v = calloc(n_layers ? (size_t)n_layers : 1, sizeof *kv->v);
  if (!kv->k || !kv->v) {
    kv_cache_free(kv, be);
    return ts_errorf(err, TS_ENOMEM, "out of memory for the kv cache tables");
  }
  for (int l = 0; l < n_layers; l++) {
    kv->k[l] = be->ops->alloc(be->ctx, bytes);
    kv->v[l] = be->ops->alloc(be->ctx, bytes);
    if (!kv->k[l] || !kv->v[l]) {
      kv_cache_free(kv, be);
      return ts_errorf(err, TS_ENOMEM,
                       "out of memory for the kv cache: %d layers x 2 x %zu bytes on %s",
                       n_layers, bytes, be->ops->name);
    }
  }
  return 0;
}

void kv_cache_free(kv_cache *kv, backend *be) {
  if (!kv) return;
  for (int l = 0; l < kv->n_layers; l++) {
    if (kv->k && kv->k[l]) be->ops->free(be->ctx, kv->k[l]);
    if (kv->v && kv->v[l]) be->ops->free(be->ctx, kv->v[l]);
  }
  free(kv->k);
  free(kv->v);
  memset(kv, 0, sizeof *kv);
}
