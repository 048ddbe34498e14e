/* RMSNorm and the fused residual add + RMSNorm: one block per row, float32 sum of squares.
 * Each thread reads and writes the same indices in both passes, so out may alias x. */
#include "norm.cuh"
#include "graph.cuh"

#define NORM_THREADS 256

template <typename W, typename O>
__global__ void rmsnorm_kernel(float *residual, const float *x, const W *w, float eps, int dim,
                               O *out) {
  __shared__ float partial[NORM_THREADS / 32];
  cuda_pdl_wait();
  cuda_pdl_trigger();
  size_t base = (size_t)blockIdx.x * dim;
  const float *xr = x + base;
  float *rr = residual ? residual + base : NULL;
  float ss = 0.0f;
  for (int j = threadIdx.x; j < dim; j += blockDim.x) {
    float v = xr[j];
    if (rr) {
      v += rr[j];
      rr[j] = v;
    }
    ss += v * v;
  }
  ss = cuda_warp_sum(ss);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = ss;
  __syncthreads();
  if (threadIdx.x < 32) {
    float v = threadIdx.x < blockDim.x / 32 ? partial[threadIdx.x] : 0.0f;
    v = cuda_warp_sum(v);
    if (threadIdx.x == 0) partial[0] = v;
  }
  __syncthreads();
  float inv = 1.0f / sqrtf(partial[0] / (float)dim + eps);
  const float *src = rr ? rr : xr;
  O *o = out + base;
  for (int j = threadIdx.x; j < dim; j += blockDim.x) cuda_st(o + j, src[j] * inv * cuda_ld(w + j));
}

static void norm_launch(cuda_ctx *c, float *residual, const float *x, const ts_tensor *w,
                        float eps, int rows, int dim, float *out) {
  if (rows <= 0 || dim <= 0) return;
  CUDA_DISPATCH_FLOAT(c, w->dtype, "rmsnorm", W,
                      cuda_launch_pdl(c, rmsnorm_kernel<W, float>, dim3(rows),
                                      dim3(NORM_THREADS), 0, residual, x, (const W *)w->data,
                                      eps, dim, out);
                      CUDA_CHECK_LAUNCH(c, "rmsnorm_kernel"));
}

void cuda_op_rmsnorm(void *ctx, const float *x, const ts_tensor *w, float eps, int rows, int dim,
                     float *out) {
  if (cuda_graph_op((cuda_ctx *)ctx, CUDA_OP_RMSNORM, x, w->data, out, rows, dim)) return;
  norm_launch((cuda_ctx *)ctx, NULL, x, w, eps, rows, dim, out);
}

void cuda_op_add_rmsnorm(void *ctx, float *residual, const float *x, const ts_tensor *w, float eps,
                         int rows, int dim, float *out) {
  if (cuda_graph_op((cuda_ctx *)ctx, CUDA_OP_ADD_RMSNORM, residual, x, out, rows,
                    (int64_t)dim << 20 ^ (int64_t)(intptr_t)w->data))
    return;
  norm_launch((cuda_ctx *)ctx, residual, x, w, eps, rows, dim, out);
}

int cuda_rmsnorm_narrow(cuda_ctx *c, const float *x, const ts_tensor *w, float eps, int rows,
                        int dim, void *out, ts_dtype out_dtype) {
  if (rows <= 0 || dim <= 0) return 0;
  if (out_dtype == TS_BF16)
    CUDA_DISPATCH_FLOAT(c, w->dtype, "rmsnorm", W,
                        cuda_launch_pdl(c, rmsnorm_kernel<W, __nv_bfloat16>, dim3(rows),
                                        dim3(NORM_THREADS), 0, (float *)NULL, x,
                                        (const W *)w->data, eps, dim, (__nv_bfloat16 *)out));
  else
    CUDA_DISPATCH_FLOAT(c, w->dtype, "rmsnorm", W,
                        cuda_launch_pdl(c, rmsnorm_kernel<W, __half>, dim3(rows),
                                        dim3(NORM_THREADS), 0, (float *)NULL, x,
                                        (const W *)w->data, eps, dim, (__half *)out));
  return CUDA_CHECK_LAUNCH(c, "rmsnorm_kernel");
}
