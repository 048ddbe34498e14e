/* Skinny matrix products for decode steps: y = x @ w^T with n <= 8 activation rows and BF16/F16
 * weights. One warp owns one output row: its lanes stream the weight row in 16-byte loads (8
 * elements), multiply each by the matching float32 activations of all n rows (read through the
 * L1 cache, they are small and shared by every warp) and reduce across the warp. Accumulation is
 * float32, as in the cuBLAS path. */
#include "gemv.cuh"

#define GEMV_THREADS 256
#define GEMV_WARPS (GEMV_THREADS / 32)

__device__ __forceinline__ void gemv_unpack(uint4 v, const __nv_bfloat16 *, float f[8]) {
  const __nv_bfloat162 *h = (const __nv_bfloat162 *)&v;
#pragma unroll
  for (int i = 0; i < 4; i++) {
    float2 p = __bfloat1622float2(h[i]);
    f[2 * i] = p.x;
    f[2 * i + 1] = p.y;
  }
}

__device__ __forceinline__ void gemv_unpack(uint4 v, const __half *, float f[8]) {
  const __half2 *h = (const __half2 *)&v;
#pragma unroll
  for (int i = 0; i < 4; i++) {
    float2 p = __half22float2(h[i]);
    f[2 * i] = p.x;
    f[2 * i + 1] = p.y;
  }
}

/* Weights are read once per step: keep them out of L1 so the activations stay there. */
__device__ __forceinline__ uint4 gemv_ld_stream(const uint4 *p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

template <typename T, int N>
__global__ void __launch_bounds__(GEMV_THREADS)
    gemv_kernel(const T *w, int64_t ldw, const float *x, int k, int m, const T *bias, float *y) {
  const int row = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= m) return;
  const uint4 *wr = (const uint4 *)(w + (size_t)row * ldw);
  const int chunks = k / 8;
  float acc[N];
#pragma unroll
  for (int n = 0; n < N; n++) acc[n] = 0.0f;
#pragma unroll 4
  for (int ch = lane; ch < chunks; ch += 32) {
    float wf[8];
    gemv_unpack(gemv_ld_stream(wr + ch), (const T *)0, wf);
#pragma unroll
    for (int n = 0; n < N; n++) {
      const float4 *xr = (const float4 *)(x + (size_t)n * k) + 2 * ch;
      float4 a = __ldg(xr), b = __ldg(xr + 1);
      acc[n] += wf[0] * a.x + wf[1] * a.y + wf[2] * a.z + wf[3] * a.w + wf[4] * b.x +
                wf[5] * b.y + wf[6] * b.z + wf[7] * b.w;
    }
  }
#pragma unroll
  for (int n = 0; n < N; n++) {
    float v = cuda_warp_sum(acc[n]);
    if (lane == 0) y[(size_t)n * m + row] = v + (bias ? cuda_ld(bias + row) : 0.0f);
  }
}

int cuda_gemv_fits(const ts_tensor *w, int n) {
  if (n < 1 || n > CUDA_GEMV_MAX_N || w->ndim != 2) return 0;
  if (w->dtype != TS_BF16 && w->dtype != TS_F16) return 0;
  int64_t k = w->shape[1], ld = cuda_weight_stride(w);
  return k % 8 == 0 && ld % 8 == 0 && ((uintptr_t)w->data & 15) == 0;
}

template <typename T>
static void gemv_launch_t(cuda_ctx *c, const float *x, const ts_tensor *w, const T *bias, int n,
                          float *y) {
  const int m = (int)w->shape[0], k = (int)w->shape[1];
  const int64_t ld = cuda_weight_stride(w);
  dim3 grid((unsigned)((m + GEMV_WARPS - 1) / GEMV_WARPS));
  const T *wd = (const T *)w->data;
  switch (n) {
#define GEMV_CASE(NN)                                                                         \
  case NN:                                                                                    \
    gemv_kernel<T, NN><<<grid, GEMV_THREADS, 0, c->stream>>>(wd, ld, x, k, m, bias, y);     \
    break;
    GEMV_CASE(1) GEMV_CASE(2) GEMV_CASE(3) GEMV_CASE(4)
    GEMV_CASE(5) GEMV_CASE(6) GEMV_CASE(7) GEMV_CASE(8)
#undef GEMV_CASE
  }
}

int cuda_gemv(cuda_ctx *c, const float *x, const ts_tensor *w, const ts_tensor *bias, int n,
              float *y) {
  /* The bias must share the weight's type here (checkpoints store them alike); else fail. */
  const void *bd = bias && bias->data ? bias->data : NULL;
  if (bd && bias->dtype != w->dtype) {
    cuda_fail(c, TS_EUNSUPPORTED, "CUDA gemv: bias dtype %s differs from the weight's %s",
              ts_dtype_table[bias->dtype].name, ts_dtype_table[w->dtype].name);
    return -1;
  }
  if (w->dtype == TS_BF16)
    gemv_launch_t<__nv_bfloat16>(c, x, w, (const __nv_bfloat16 *)bd, n, y);
  else
    gemv_launch_t<__half>(c, x, w, (const __half *)bd, n, y);
  return CUDA_CHECK_LAUNCH(c, "gemv_kernel");
}
