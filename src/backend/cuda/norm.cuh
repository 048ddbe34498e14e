/* RMSNorm and the fused residual add + RMSNorm. */
#ifndef TESSERA_CUDA_NORM_CUH
#define TESSERA_CUDA_NORM_CUH

#include "cuda_common.cuh"

/* out = rmsnorm(x) * w   x, out [rows][dim]; w [dim] */
void cuda_op_rmsnorm(void *ctx, const float *x, const ts_tensor *w, float eps, int rows, int dim,
                     float *out);
/* residual += x; out = rmsnorm(residual) * w */
void cuda_op_add_rmsnorm(void *ctx, float *residual, const float *x, const ts_tensor *w, float eps,
                         int rows, int dim, float *out);

/* rmsnorm into a 16-bit buffer (out_dtype BF16 or F16): the input of cuBLAS products, narrowed
 * once for all of them. No graph bookkeeping: for the fused ops' own paths. */
int cuda_rmsnorm_narrow(cuda_ctx *c, const float *x, const ts_tensor *w, float eps, int rows,
                        int dim, void *out, ts_dtype out_dtype);

#endif
