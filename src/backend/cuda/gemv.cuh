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

/* Fused forms: mode CUDA_GEMV_STORE writes y[i] (+ bias) for up to three weights sharing x
 * (rows of w[0], then w[1], w[2]); CUDA_GEMV_ADD adds into y[0]; CUDA_GEMV_SILU writes
 * silu(x w[0]^T) * (x w[1]^T) into y[0]. With norm_w, x is RMS-normalised (eps) and scaled by
 * norm_w first, inside the kernel. */
enum { CUDA_GEMV_STORE = 0, CUDA_GEMV_ADD, CUDA_GEMV_SILU };
int cuda_gemv_fused_fits(const float *x, int n, int nw, const ts_tensor *const *w,
                         const ts_tensor *const *bias, const ts_tensor *norm_w);
int cuda_gemv_fused(cuda_ctx *c, const float *x, int n, const ts_tensor *norm_w, float eps,
                    int nw, const ts_tensor *const *w, const ts_tensor *const *bias,
                    float *const *y, int mode);

#endif
