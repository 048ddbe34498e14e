/* Writes a step's K and V rows into the paged cache at the staged slots. */
#ifndef TESSERA_CUDA_KV_WRITE_CUH
#define TESSERA_CUDA_KV_WRITE_CUH

#include "cuda_common.cuh"

/* k, v [n_tokens][n_kv_l][hd] -> cache rows slot[t] of layer */
void cuda_op_kv_write(void *ctx, const kv_cache *kv, int layer, const float *k, const float *v);

#endif
