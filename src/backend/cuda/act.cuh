/* Gated activations: SiLU(gate) * up. */
#ifndef TESSERA_CUDA_ACT_CUH
#define TESSERA_CUDA_ACT_CUH

#include "cuda_common.cuh"

/* gate, up, out [n][d] */
void cuda_op_silu_mul(void *ctx, const float *gate, const float *up, int n, int d, float *out);

/* The same kernel without graph bookkeeping, for the fused ops' own paths. */
int cuda_silu_mul_launch(cuda_ctx *c, const float *gate, const float *up, int64_t count,
                         float *out);

#endif
