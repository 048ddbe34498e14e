/* Rotary position embedding at the staged positions (NEOX or interleaved pairs, llama3 scaling). */
#ifndef TESSERA_CUDA_ROPE_CUH
#define TESSERA_CUDA_ROPE_CUH

#include "cuda_common.cuh"

/* x [n_tokens][heads][hd], rotated in place */
void cuda_op_rope(void *ctx, float *x, int heads, int hd, const rope_params *rp);

/* The fused q/k-norm + RoPE + KV write (backend op qk_rope_kv). */
void cuda_op_qk_rope_kv(void *ctx, const kv_cache *kv, int layer, float *q, float *k,
                        const float *v, int nh, const ts_tensor *q_norm, const ts_tensor *k_norm,
                        float eps, const rope_params *rp);

#endif
