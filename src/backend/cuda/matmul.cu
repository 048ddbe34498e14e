/* Matrix products through cuBLAS: y = x @ w^T (+ bias). Weights are row-major [m][k] on the
 * device, which cuBLAS (column-major) sees as a k x m matrix with leading dimension row_stride, so
 * y^T = op_T(W) * x^T with no transposes in memory. F32 weights: cublasSgemm in full float32
 * (no TF32). BF16/F16 weights: the float32 activations are narrowed to the weight's type and
 * multiplied with float32 accumulation and a float32 result (cublasGemmEx). */
#include "matmul.cuh"
#include "graph.cuh"

#include "gemv.cuh"

template <typename T>
__global__ void narrow_kernel(const float *x, int64_t count, T *out) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < count;
       i += (int64_t)gridDim.x * blockDim.x)
    cuda_st(out + i, x[i]);
}

template <typename B>
__global__ void bias_add_kernel(float *y, const B *bias, int m, int64_t count) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < count;
       i += (int64_t)gridDim.x * blockDim.x)
    y[i] += cuda_ld(bias + i % m);
}

static unsigned grid_for(cuda_ctx *c, int64_t count) {
  unsigned blocks = cuda_blocks(count, 256), cap = (unsigned)c->sm_count * 16;
  return blocks < cap ? blocks : cap;
}

static int matmul_cublas(cuda_ctx *c, const float *x, const ts_tensor *w, int n, float *y,
                         float beta);

void cuda_op_matmul(void *ctx, const float *x, const ts_tensor *w, const ts_tensor *bias, int n,
                    float *y) {
  cuda_ctx *c = (cuda_ctx *)ctx;
  if (cuda_graph_op(c, w->shape[0] > 65536 ? CUDA_OP_MATMUL_HEAD : CUDA_OP_MATMUL, x, w->data, y, n,
                    bias && bias->data ? (int64_t)(intptr_t)bias->data : 0))
    return;
  if (n <= 0) return;
  if (w->ndim != 2) {
    cuda_fail(c, TS_EINVAL, "CUDA matmul: weight must be 2-D, got %d dims", w->ndim);
    return;
  }
  /* Decode-sized products: one pass over the 16-bit weight, no narrowing launch. A bias of
   * another dtype takes the cuBLAS path, which adds it with its own kernel. */
  if (cuda_gemv_fits(w, n) && ((uintptr_t)x & 15) == 0 &&
      (!bias || !bias->data || bias->dtype == w->dtype)) {
    cuda_gemv(c, x, w, bias, n, y);
    return;
  }
  if (matmul_cublas(c, x, w, n, y, 0.0f)) return;
  int m = (int)w->shape[0];
  if (bias && bias->data) {
    int64_t count = (int64_t)n * m;
    CUDA_DISPATCH_FLOAT(c, bias->dtype, "matmul bias", B,
                        bias_add_kernel<B><<<grid_for(c, count), 256, 0, c->stream>>>(
                            y, (const B *)bias->data, m, count);
                        CUDA_CHECK_LAUNCH(c, "bias_add_kernel"));
  }
}

/* y = x @ w^T + beta * y through cuBLAS; 0 or -1 with the failure recorded. */
static int matmul_cublas(cuda_ctx *c, const float *x, const ts_tensor *w, int n, float *y,
                         float beta) {
  int m = (int)w->shape[0], k = (int)w->shape[1];
  int lda = (int)cuda_weight_stride(w);
  const float one = 1.0f;
  if (w->dtype == TS_F32) {
    if (CUBLAS_CHECK(c, cublasSgemm(c->cublas, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &one,
                                    (const float *)w->data, lda, x, k, &beta, y, m)))
      return -1;
  } else if (w->dtype == TS_BF16 || w->dtype == TS_F16) {
    int64_t count = (int64_t)n * k;
    if (cuda_scratch_reserve(c, &c->conv, &c->conv_cap, (size_t)count * 2)) return -1;
    cudaDataType dt;
    if (w->dtype == TS_BF16) {
      narrow_kernel<__nv_bfloat16><<<grid_for(c, count), 256, 0, c->stream>>>(
          x, count, (__nv_bfloat16 *)c->conv);
      dt = CUDA_R_16BF;
    } else {
      narrow_kernel<__half><<<grid_for(c, count), 256, 0, c->stream>>>(x, count,
                                                                        (__half *)c->conv);
      dt = CUDA_R_16F;
    }
    if (CUDA_CHECK_LAUNCH(c, "narrow_kernel")) return -1;
    if (CUBLAS_CHECK(c, cublasGemmEx(c->cublas, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &one, w->data,
                                     dt, lda, c->conv, dt, k, &beta, y, CUDA_R_32F, m,
                                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)))
      return -1;
  } else {
    cuda_fail(c, TS_EUNSUPPORTED, "CUDA matmul: weight dtype %s not supported",
              ts_dtype_table[w->dtype].name);
    return -1;
  }
  return 0;
}

void cuda_op_matmul_add(void *ctx, const float *x, const ts_tensor *w, int n, float *y) {
  cuda_ctx *c = (cuda_ctx *)ctx;
  if (cuda_graph_op(c, CUDA_OP_MATMUL_ADD, x, w->data, y, n, 0)) return;
  if (n <= 0) return;
  if (w->ndim != 2) {
    cuda_fail(c, TS_EINVAL, "CUDA matmul_add: weight must be 2-D, got %d dims", w->ndim);
    return;
  }
  const ts_tensor *ws[1] = {w};
  float *ys[1] = {y};
  if (cuda_gemv_fused_fits(x, n, 1, ws, NULL, NULL)) {
    cuda_gemv_fused(c, x, n, NULL, 0.0f, 1, ws, NULL, ys, CUDA_GEMV_ADD);
    return;
  }
  matmul_cublas(c, x, w, n, y, 1.0f); /* beta = 1: cuBLAS adds into y */
}

int cuda_matmul_narrowed(cuda_ctx *c, const void *x16, const ts_tensor *w, const ts_tensor *bias,
                         int n, float *y) {
  if (n <= 0) return 0;
  int m = (int)w->shape[0], k = (int)w->shape[1];
  int lda = (int)cuda_weight_stride(w);
  const float one = 1.0f, zero = 0.0f;
  cudaDataType dt = w->dtype == TS_BF16 ? CUDA_R_16BF : CUDA_R_16F;
  if (CUBLAS_CHECK(c, cublasGemmEx(c->cublas, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &one, w->data, dt,
                                   lda, x16, dt, k, &zero, y, CUDA_R_32F, m, CUBLAS_COMPUTE_32F,
                                   CUBLAS_GEMM_DEFAULT)))
    return -1;
  if (bias && bias->data) {
    int64_t count = (int64_t)n * m;
    CUDA_DISPATCH_FLOAT(c, bias->dtype, "matmul bias", B,
                        bias_add_kernel<B><<<grid_for(c, count), 256, 0, c->stream>>>(
                            y, (const B *)bias->data, m, count);
                        CUDA_CHECK_LAUNCH(c, "bias_add_kernel"));
  }
  return c->err_code ? -1 : 0;
}
