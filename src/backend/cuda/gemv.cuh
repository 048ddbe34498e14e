/* Skinny matrix products (a few rows of activations) against 16-bit weights, read once at full
 * bandwidth with no narrowing pass: the decode-step matmul. */
#ifndef TESSERA_CUDA_GEMV_CUH
#define TESSERA_CUDA_GEMV_CUH

#include "cuda_common.cuh"

/* Most activation rows the kernel takes; above this cuBLAS is faster. */
#define CUDA_GEMV_MAX_N 8

/* Whether cuda_gemv can run this product (16-bit weight, k a multiple of 8, aligned rows). */
int cuda_gemv_fits(const ts_tensor *w, int n);
/* y [n][m] = x [n][k] @ w [m][k]^T (+ bias [m]); returns 0 or records the failure. */
int cuda_gemv(cuda_ctx *c, const float *x, const ts_tensor *w, const ts_tensor *bias, int n,
              float *y);

#endif
