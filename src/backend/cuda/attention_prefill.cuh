/* Prefill attention on the tensor cores (bf16 mma.sync, float32 accumulation, online softmax). */
#ifndef TESSERA_CUDA_ATTENTION_PREFILL_CUH
#define TESSERA_CUDA_ATTENTION_PREFILL_CUH

#include "cuda_common.cuh"

/* Runs the step's causal attention when the tensor-core kernel covers it (head_dim 64 or 128, an
 * F32/BF16/F16 cache, TESSERA_CUDA_PREFILL_ATTN not "0") and returns 1; returns 0, having done
 * nothing, to leave the step to the general kernel. The caller has checked the shapes and that
 * the step was staged for kv. q, out [n_tokens][n_head_l][hd] */
int cuda_attention_prefill(cuda_ctx *c, const kv_cache *kv, int layer, const float *q,
                           int n_head_l, float scale, float *out);

#endif
