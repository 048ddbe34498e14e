/* Skinny matrix products for decode steps: y = x @ w^T with n <= 8 activation rows and BF16/F16
 * weights. One warp owns one output row: its lanes stream the weight row in 16-byte loads (8
 * elements), multiply each by the matching float32 activations of all n rows (read through the
 * L1 cache, they are small and shared by every warp) and reduce across the warp. Accumulation is
 * float32, as in the cuBLAS path. */
#include <string.h>

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
  const uint4 *wr = (const uint4 *)(w + (size_t)(row < m ? row : 0) * ldw);
  const int chunks = k / 8;
  /* The weights are the step's constants: fetch them into L2 while the previous kernel ends. */
  if (row < m)
    for (int ch = lane; ch < chunks; ch += 32) asm volatile("prefetch.global.L2 [%0];" ::"l"(wr + ch));
  cuda_pdl_wait();
  cuda_pdl_trigger();
  if (row >= m) return;
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
    cuda_launch_pdl(c, gemv_kernel<T, NN>, grid, dim3(GEMV_THREADS), 0, wd, ld, x, k, m, bias, y); \
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

/* ---- fused forms (fused.cu's ops) ----
 * The same warp-per-row stream, with an optional RMSNorm prologue (each block recomputes the
 * rows' sums of squares from x, which is small and in L2, and normalises on the fly as the
 * rmsnorm kernel does: (x * inv) * w), up to three weights in one launch (rows of q, then k,
 * then v), and three epilogues: store (+ bias), add into y (the residual add), or
 * silu(gate) * up with a warp reading the gate and the up row of one output. A short product
 * (few rows) splits each row's k over several warps of its block, so enough loads are in flight
 * to stream at full bandwidth; their partial sums meet in shared memory in a fixed order. */

template <typename T>
struct gemv_seg {
  const T *w;
  int64_t ld;
  const T *bias;
  float *y;
  int m, row0;
};

template <typename T>
struct gemv_fargs {
  gemv_seg<T> seg[3];
  int nseg, rows, ksplit, mode;
  const float *x;
  int k;
  const void *nw; /* norm weight [k] or NULL */
  int nw_dtype;
  float eps;
};

__device__ __forceinline__ void gemv_norm_w8(const void *nw, int dt, int ch, float f[8]) {
  if (dt == TS_F32) {
    const float4 *p = (const float4 *)nw + 2 * ch;
    float4 a = __ldg(p), b = __ldg(p + 1);
    f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w, f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
  } else if (dt == TS_BF16) {
    gemv_unpack(__ldg((const uint4 *)nw + ch), (const __nv_bfloat16 *)0, f);
  } else {
    gemv_unpack(__ldg((const uint4 *)nw + ch), (const __half *)0, f);
  }
}

template <typename T, int N>
__global__ void __launch_bounds__(GEMV_THREADS) gemv_fused_kernel(const gemv_fargs<T> a) {
  __shared__ float s_inv[N];
  __shared__ float s_part[GEMV_WARPS][2][N];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int k = a.k, chunks = k / 8;
  const int per_block = GEMV_WARPS / a.ksplit;
  const int row = blockIdx.x * per_block + warp / a.ksplit, part = warp % a.ksplit;
  const bool active = row < a.rows;
  int si = 0;
  if (a.mode != CUDA_GEMV_SILU)
    while (si + 1 < a.nseg && row >= a.seg[si + 1].row0) si++;
  const T *w0 = si == 0 ? a.seg[0].w : si == 1 ? a.seg[1].w : a.seg[2].w;
  const int64_t ld0 = si == 0 ? a.seg[0].ld : si == 1 ? a.seg[1].ld : a.seg[2].ld;
  const int r = row - (si == 0 ? a.seg[0].row0 : si == 1 ? a.seg[1].row0 : a.seg[2].row0);
  const uint4 *wr = (const uint4 *)(w0 + (size_t)(active ? r : 0) * ld0);
  const uint4 *ur = (const uint4 *)(a.seg[1].w + (size_t)(active ? r : 0) * a.seg[1].ld);
  /* The weights are the step's constants: fetch this warp's share into L2 while the previous
   * kernel ends, then wait for it (x is its output). */
  if (active)
    for (int ch = lane + 32 * part; ch < chunks; ch += 32 * a.ksplit) {
      asm volatile("prefetch.global.L2 [%0];" ::"l"(wr + ch));
      if (a.mode == CUDA_GEMV_SILU) asm volatile("prefetch.global.L2 [%0];" ::"l"(ur + ch));
    }
  cuda_pdl_wait();
  cuda_pdl_trigger();
  if (a.nw) {
    float ss[N];
#pragma unroll
    for (int n = 0; n < N; n++) ss[n] = 0.0f;
    for (int j = threadIdx.x; j < k / 4; j += GEMV_THREADS)
#pragma unroll
      for (int n = 0; n < N; n++) {
        float4 v = __ldg((const float4 *)(a.x + (size_t)n * k) + j);
        ss[n] += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
      }
#pragma unroll
    for (int n = 0; n < N; n++) {
      ss[n] = cuda_warp_sum(ss[n]);
      if (lane == 0) s_part[warp][0][n] = ss[n];
    }
    __syncthreads();
    if (threadIdx.x < N) {
      float t = 0.0f;
      for (int w = 0; w < GEMV_WARPS; w++) t += s_part[w][0][threadIdx.x];
      s_inv[threadIdx.x] = 1.0f / sqrtf(t / (float)k + a.eps);
    }
    __syncthreads();
  }
  float acc[N], acc2[N];
#pragma unroll
  for (int n = 0; n < N; n++) acc[n] = acc2[n] = 0.0f;
  if (active) {
#pragma unroll 4
    for (int ch = lane + 32 * part; ch < chunks; ch += 32 * a.ksplit) {
      float wf[8], uf[8], nf[8];
      gemv_unpack(gemv_ld_stream(wr + ch), (const T *)0, wf);
      if (a.mode == CUDA_GEMV_SILU) gemv_unpack(gemv_ld_stream(ur + ch), (const T *)0, uf);
      if (a.nw) gemv_norm_w8(a.nw, a.nw_dtype, ch, nf);
#pragma unroll
      for (int n = 0; n < N; n++) {
        const float4 *xr = (const float4 *)(a.x + (size_t)n * k) + 2 * ch;
        float4 p = __ldg(xr), q = __ldg(xr + 1);
        float xe[8] = {p.x, p.y, p.z, p.w, q.x, q.y, q.z, q.w};
        if (a.nw) {
#pragma unroll
          for (int e = 0; e < 8; e++) xe[e] = xe[e] * s_inv[n] * nf[e];
        }
        float d = 0.0f;
#pragma unroll
        for (int e = 0; e < 8; e++) d += wf[e] * xe[e];
        acc[n] += d;
        if (a.mode == CUDA_GEMV_SILU) {
          float d2 = 0.0f;
#pragma unroll
          for (int e = 0; e < 8; e++) d2 += uf[e] * xe[e];
          acc2[n] += d2;
        }
      }
    }
  }
#pragma unroll
  for (int n = 0; n < N; n++) {
    acc[n] = cuda_warp_sum(acc[n]);
    if (a.mode == CUDA_GEMV_SILU) acc2[n] = cuda_warp_sum(acc2[n]);
  }
  if (a.ksplit > 1) {
    __syncthreads(); /* the prologue's s_part reads are done */
    if (lane == 0)
#pragma unroll
      for (int n = 0; n < N; n++) {
        s_part[warp][0][n] = acc[n];
        s_part[warp][1][n] = acc2[n];
      }
    __syncthreads();
    if (part != 0) return;
#pragma unroll
    for (int n = 0; n < N; n++) {
      float t = 0.0f, t2 = 0.0f;
      for (int p = 0; p < a.ksplit; p++) {
        t += s_part[warp + p][0][n];
        t2 += s_part[warp + p][1][n];
      }
      acc[n] = t;
      acc2[n] = t2;
    }
  }
  if (!active || lane != 0) return;
  const int m = si == 0 ? a.seg[0].m : si == 1 ? a.seg[1].m : a.seg[2].m;
  float *y = si == 0 ? a.seg[0].y : si == 1 ? a.seg[1].y : a.seg[2].y;
  const T *bias = si == 0 ? a.seg[0].bias : si == 1 ? a.seg[1].bias : a.seg[2].bias;
#pragma unroll
  for (int n = 0; n < N; n++) {
    float *o = y + (size_t)n * m + r;
    if (a.mode == CUDA_GEMV_ADD) {
      *o += acc[n];
    } else if (a.mode == CUDA_GEMV_SILU) {
      const float g = acc[n];
      *o = g / (1.0f + expf(-g)) * acc2[n];
    } else {
      *o = acc[n] + (bias ? cuda_ld(bias + r) : 0.0f);
    }
  }
}

int cuda_gemv_fused_fits(const float *x, int n, int nw, const ts_tensor *const *w,
                         const ts_tensor *const *bias, const ts_tensor *norm_w) {
  if (((uintptr_t)x & 15) || nw < 1 || nw > 3) return 0;
  for (int i = 0; i < nw; i++) {
    if (!cuda_gemv_fits(w[i], n) || w[i]->dtype != w[0]->dtype ||
        w[i]->shape[1] != w[0]->shape[1])
      return 0;
    const ts_tensor *b = bias ? bias[i] : NULL;
    if (b && b->data && b->dtype != w[0]->dtype) return 0;
  }
  if (norm_w) {
    ts_dtype d = norm_w->dtype;
    if ((d != TS_F32 && d != TS_BF16 && d != TS_F16) || ((uintptr_t)norm_w->data & 15) ||
        ts_tensor_nelem(norm_w) != w[0]->shape[1])
      return 0;
  }
  return 1;
}

template <typename T>
static void gemv_fused_launch(cuda_ctx *c, const float *x, int n, const ts_tensor *norm_w,
                              float eps, int nw, const ts_tensor *const *w,
                              const ts_tensor *const *bias, float *const *y, int mode) {
  gemv_fargs<T> a;
  memset(&a, 0, sizeof a);
  int rows = 0;
  for (int i = 0; i < nw; i++) {
    gemv_seg<T> &s = a.seg[i];
    s.w = (const T *)w[i]->data;
    s.ld = cuda_weight_stride(w[i]);
    s.bias = bias && bias[i] && bias[i]->data ? (const T *)bias[i]->data : NULL;
    s.y = y[i];
    s.m = (int)w[i]->shape[0];
    s.row0 = rows;
    rows += s.m;
  }
  a.nseg = nw;
  a.mode = mode;
  if (mode == CUDA_GEMV_SILU) {
    a.seg[1].y = y[0];
    rows = a.seg[0].m;
  }
  a.rows = rows;
  a.x = x;
  a.k = (int)w[0]->shape[1];
  a.nw = norm_w ? norm_w->data : NULL;
  a.nw_dtype = norm_w ? (int)norm_w->dtype : 0;
  a.eps = eps;
  /* Warps per row: enough blocks to cover every multiprocessor twice. */
  int ks = 1;
  while (ks < GEMV_WARPS && (int64_t)rows * ks < (int64_t)c->sm_count * 2 * GEMV_WARPS &&
         a.k / 8 >= 64 * ks)
    ks *= 2;
  a.ksplit = ks;
  const int per_block = GEMV_WARPS / ks;
  dim3 grid((unsigned)((rows + per_block - 1) / per_block));
  switch (n) {
#define GEMV_FCASE(NN) \
  case NN: cuda_launch_pdl(c, gemv_fused_kernel<T, NN>, grid, dim3(GEMV_THREADS), 0, a); break;
    GEMV_FCASE(1) GEMV_FCASE(2) GEMV_FCASE(3) GEMV_FCASE(4)
    GEMV_FCASE(5) GEMV_FCASE(6) GEMV_FCASE(7) GEMV_FCASE(8)
#undef GEMV_FCASE
  }
}

int cuda_gemv_fused(cuda_ctx *c, const float *x, int n, const ts_tensor *norm_w, float eps,
                    int nw, const ts_tensor *const *w, const ts_tensor *const *bias,
                    float *const *y, int mode) {
  if (w[0]->dtype == TS_BF16)
    gemv_fused_launch<__nv_bfloat16>(c, x, n, norm_w, eps, nw, w, bias, y, mode);
  else
    gemv_fused_launch<__half>(c, x, n, norm_w, eps, nw, w, bias, y, mode);
  return CUDA_CHECK_LAUNCH(c, "gemv_fused_kernel");
}
