/* Matrix products through cuBLAS: y = x @ w^T (+ bias), float32 activations. */
#ifndef TESSERA_CUDA_MATMUL_CUH
#define TESSERA_CUDA_MATMUL_CUH

#include "cuda_common.cuh"

/* x [n][k]; w [m][k] (F32, BF16 or F16, on the device); bias [m] or NULL; y [n][m] */
void cuda_op_matmul(void *ctx, const float *x, const ts_tensor *w, const ts_tensor *bias, int n,
                    float *y);

/* y += x @ w^T (backend op matmul_add): the skinny kernel's add epilogue for decode-sized
 * products, else cuBLAS with beta = 1. */
void cuda_op_matmul_add(void *ctx, const float *x, const ts_tensor *w, int n, float *y);

/* y = x16 @ w^T (+ bias) for an input already narrowed to the weight's 16-bit dtype (BF16 or
 * F16). No graph bookkeeping: for the fused ops' own paths. */
int cuda_matmul_narrowed(cuda_ctx *c, const void *x16, const ts_tensor *w, const ts_tensor *bias,
                         int n, float *y);

#endif
