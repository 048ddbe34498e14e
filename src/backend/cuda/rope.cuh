/* Rotary position embedding at the staged positions (NEOX or interleaved pairs, llama3 scaling). */
#ifndef TESSERA_CUDA_ROPE_CUH
#define TESSERA_CUDA_ROPE_CUH

#include "cuda_common.cuh"

/* x [n_tokens][heads][hd], rotated in place */
void cuda_op_rope(void *ctx, float *x, int heads, int hd, const rope_params *rp);

#endif
