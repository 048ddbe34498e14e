/* Decode attention split over the keys (flash-decoding): one query token per sequence. */
#ifndef TESSERA_CUDA_ATTENTION_DECODE_CUH
#define TESSERA_CUDA_ATTENTION_DECODE_CUH

#include "cuda_common.cuh"

/* Runs a decode step's attention (every sequence one query token) when the split kernel covers
 * it (head_dim 64 or 128, a GQA group of at most 8, an F32/BF16/F16 cache,
 * TESSERA_CUDA_DECODE_ATTN not "0") and returns 1; returns 0, having done nothing, otherwise.
 * TESSERA_CUDA_DECODE_SPLITS=N forces N key splits and TESSERA_CUDA_DECODE_UNROLL=8 keeps 8 rows
 * a thread in flight for groups of up to 2 (tests, tuning). The caller has checked the shapes
 * and that the step was staged for kv. q, out [n_seqs][n_head_l][hd] */
int cuda_attention_decode(cuda_ctx *c, const kv_cache *kv, int layer, const float *q,
                          int n_head_l, float scale, float *out);

#endif
