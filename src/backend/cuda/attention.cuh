/* Causal paged attention over the KV cache (GQA-aware tiles, KV split for long contexts). */
#ifndef TESSERA_CUDA_ATTENTION_CUH
#define TESSERA_CUDA_ATTENTION_CUH

#include "cuda_common.cuh"

/* q, out [n_tokens][n_head_l][hd] */
void cuda_op_attention(void *ctx, const kv_cache *kv, int layer, const float *q, int n_head_l,
                       float scale, float *out);

#endif
