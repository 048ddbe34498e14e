/* Decode attention (one query token per sequence) split over the keys, flash-decoding style.
 *
 * Grid (sequence, KV head, split): a block takes the keys [split * chunk, +chunk) of one sequence
 * for every query head of the GQA group, so a K/V row is read once for the group. A key row of HD
 * elements is read by CPR = HD / E threads, E elements (16 bytes) each: a half-warp reads a
 * 256-byte bf16 row in one coalesced request, and each thread issues U rows' K and V loads before
 * it uses any, so every split keeps 2 U 16-byte loads a thread in flight. The partial dot products
 * are summed over the row's CPR lanes by shuffles; each thread keeps an online softmax (base 2: Q
 * is scaled by scale * log2 e) over the keys it saw, and the block merges them at the end (shuffles
 * within a warp, shared memory across warps).
 *
 * With one split the block writes the output. With several, each split writes its unnormalised
 * (m, l, acc) to a workspace, and the last split of a (sequence, KV head) to finish (an atomic
 * counter, which it resets for the next launch) merges them: one launch, no host sync, so a
 * captured decode graph replays it. The split count depends only on the staged shape (sequences,
 * KV heads, the context bucket); splits past a sequence's context return at once and are not
 * counted. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "attention_decode.cuh"
#include "mma.cuh"

#define AD_THREADS 128
#define AD_WARPS (AD_THREADS / 32)
#define AD_MIN_CHUNK 32     /* fewest keys a split holds */
#define AD_BLOCKS_PER_SM 4  /* splits are added until the grid has this many blocks per SM */
#define AD_LOG2E 1.4426950408889634f

struct ad_args {
  const float *q;     /* [n_seqs][n_head][HD] (one token per sequence) */
  float *out;         /* [n_seqs][n_head][HD] */
  float *ws_acc;      /* [n_seqs * n_kv][n_splits][group][HD] unnormalised partial outputs */
  float *ws_ml;       /* [n_seqs * n_kv][n_splits][group][2] running max (base 2), sum */
  unsigned *cnt;      /* [n_seqs * n_kv] splits finished; zero between launches */
  const void *kc, *vc; /* [n_blocks][block_size][n_kv][HD] */
  const int32_t *seq_start, *pos, *ctx_len, *block_table;
  int max_blocks, block_size, n_kv, n_head, group, n_splits, chunk;
  float qscale; /* softmax scale * log2(e) */
};

/* 16 bytes of a K/V row as E floats. */
__device__ __forceinline__ void ad_cvt(const uint4 &u, float *f, const float *) {
  f[0] = __uint_as_float(u.x), f[1] = __uint_as_float(u.y);
  f[2] = __uint_as_float(u.z), f[3] = __uint_as_float(u.w);
}
__device__ __forceinline__ void ad_cvt(const uint4 &u, float *f, const __nv_bfloat16 *) {
  const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(&u);
#pragma unroll
  for (int i = 0; i < 4; i++) {
    const float2 v = __bfloat1622float2(h[i]);
    f[2 * i] = v.x, f[2 * i + 1] = v.y;
  }
}
__device__ __forceinline__ void ad_cvt(const uint4 &u, float *f, const __half *) {
  const __half2 *h = reinterpret_cast<const __half2 *>(&u);
#pragma unroll
  for (int i = 0; i < 4; i++) {
    const float2 v = __half22float2(h[i]);
    f[2 * i] = v.x, f[2 * i + 1] = v.y;
  }
}

/* Folds (mo, lo, ao) into (m, l, a): the merge of two online softmaxes. */
template <int E>
__device__ __forceinline__ void ad_merge(float &m, float &l, float *a, float mo, float lo,
                                         const float *ao) {
  const float mn = fmaxf(m, mo);
  if (mn == -INFINITY) return; /* neither side has a key yet */
  const float e1 = m == -INFINITY ? 0.0f : exp2f(m - mn);
  const float e2 = mo == -INFINITY ? 0.0f : exp2f(mo - mn);
  l = l * e1 + lo * e2;
#pragma unroll
  for (int e = 0; e < E; e++) a[e] = a[e] * e1 + ao[e] * e2;
  m = mn;
}

/* After a __syncthreads: merges the AD_WARPS partial softmaxes of each head held in shared memory
 * (m, l [AD_WARPS][gs]; acc [AD_WARPS][gs][HD]) and writes the output or, with several splits, the
 * split's partial; the last split of the (sequence, KV head) to finish then merges the splits. */
template <int HD>
__device__ __forceinline__ void ad_finish(const ad_args &a, int s, int kvh, int split, int t,
                                          int klim, const float *sm_m, const float *sm_l,
                                          const float *sm_acc, int gs, int *sm_last) {
  const int tid = threadIdx.x, group = a.group;
  const size_t sk = (size_t)s * a.n_kv + kvh;
  for (int idx = tid; idx < group * HD; idx += AD_THREADS) {
    const int h = idx / HD, d = idx % HD;
    float M = sm_m[h], L = sm_l[h], A = sm_acc[(size_t)h * HD + d];
#pragma unroll
    for (int w = 1; w < AD_WARPS; w++)
      ad_merge<1>(M, L, &A, sm_m[w * gs + h], sm_l[w * gs + h], &sm_acc[((size_t)w * gs + h) * HD + d]);
    if (a.n_splits == 1) {
      a.out[((size_t)t * a.n_head + kvh * group + h) * HD + d] = A / L; /* L > 0: >= 1 key */
    } else {
      const size_t w = (sk * a.n_splits + split) * group + h;
      a.ws_acc[w * HD + d] = A;
      if (d == 0) {
        a.ws_ml[2 * w] = M;
        a.ws_ml[2 * w + 1] = L;
      }
    }
  }
  if (a.n_splits == 1) return;

  /* The last split to finish merges them all (the threadFenceReduction pattern). */
  __threadfence();
  __syncthreads();
  const int live = (klim + a.chunk - 1) / a.chunk;
  if (tid == 0) *sm_last = atomicAdd(&a.cnt[sk], 1u) == (unsigned)(live - 1);
  __syncthreads();
  if (!*sm_last) return;
  __threadfence();
  for (int idx = tid; idx < group * HD; idx += AD_THREADS) {
    const int h = idx / HD, d = idx % HD;
    float M = -INFINITY, L = 0.0f, A = 0.0f;
    for (int sp = 0; sp < live; sp++) {
      const size_t w = (sk * a.n_splits + sp) * group + h;
      const float ao = __ldcg(a.ws_acc + w * HD + d);
      ad_merge<1>(M, L, &A, __ldcg(a.ws_ml + 2 * w), __ldcg(a.ws_ml + 2 * w + 1), &ao);
    }
    a.out[((size_t)t * a.n_head + kvh * group + h) * HD + d] = A / L;
  }
  if (tid == 0) a.cnt[sk] = 0u; /* for the next launch (the next layer, a graph replay) */
}

template <int HD, int G, int U, typename KT>
__global__ void __launch_bounds__(AD_THREADS) attention_decode_split_kernel(ad_args a) {
  constexpr int E = 16 / (int)sizeof(KT); /* elements per 16-byte load */
  constexpr int CPR = HD / E;             /* threads per key row */
  constexpr int KPP = AD_THREADS / CPR;   /* keys per pass of the block */
  static_assert(HD % E == 0 && CPR >= 2 && CPR <= 32 && (CPR & (CPR - 1)) == 0,
                "a key row must be a power-of-two number of 16-byte pieces, at most a warp");
  __shared__ float sm_acc[AD_WARPS][G][HD];
  __shared__ float sm_m[AD_WARPS][G], sm_l[AD_WARPS][G];
  __shared__ int sm_last;
  cuda_pdl_wait();
  cuda_pdl_trigger();
  const int s = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
  const int t = a.seq_start[s];
  const int klim = min(a.pos[t] + 1, a.ctx_len[s]);
  const int k_begin = split * a.chunk;
  if (k_begin >= klim) return; /* block-uniform: the split is past this sequence's context */
  const int k_end = min(klim, k_begin + a.chunk);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int c = tid % CPR, kg = tid / CPR; /* row piece, key of the pass */
  const int group = a.group;
  const KT *kc = (const KT *)a.kc, *vc = (const KT *)a.vc;
  const int32_t *bt = a.block_table + (size_t)s * a.max_blocks;

  float q[G][E], m[G], l[G], acc[G][E];
#pragma unroll
  for (int h = 0; h < G; h++) {
    m[h] = -INFINITY;
    l[h] = 0.0f;
    const float *qr = a.q + ((size_t)t * a.n_head + kvh * group + (h < group ? h : 0)) * HD + c * E;
#pragma unroll
    for (int e = 0; e < E; e += 4) {
      const float4 v = h < group ? *(const float4 *)(qr + e) : make_float4(0.f, 0.f, 0.f, 0.f);
      q[h][e] = v.x * a.qscale, q[h][e + 1] = v.y * a.qscale;
      q[h][e + 2] = v.z * a.qscale, q[h][e + 3] = v.w * a.qscale;
    }
#pragma unroll
    for (int e = 0; e < E; e++) acc[h][e] = 0.0f;
  }

  /* The loop bound is block-uniform, so every lane reaches the shuffles. */
  for (int kb = k_begin; kb < k_end; kb += KPP * U) {
    uint4 kr[U], vr[U];
    bool ok[U];
#pragma unroll
    for (int u = 0; u < U; u++) {
      const int p = kb + u * KPP + kg;
      ok[u] = p < k_end;
      kr[u] = vr[u] = make_uint4(0u, 0u, 0u, 0u);
      if (ok[u]) {
        const size_t base =
            (((size_t)bt[p / a.block_size] * a.block_size + p % a.block_size) * a.n_kv + kvh) *
                HD + c * E;
        kr[u] = __ldg((const uint4 *)(kc + base));
        vr[u] = __ldg((const uint4 *)(vc + base));
      }
    }
    float sc[U][G];
#pragma unroll
    for (int u = 0; u < U; u++) {
      float kf[E];
      ad_cvt(kr[u], kf, kc);
#pragma unroll
      for (int h = 0; h < G; h++) {
        float d = 0.0f;
#pragma unroll
        for (int e = 0; e < E; e++) d += q[h][e] * kf[e];
#pragma unroll
        for (int o = 1; o < CPR; o <<= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
        sc[u][h] = ok[u] ? d : -INFINITY;
      }
    }
#pragma unroll
    for (int h = 0; h < G; h++) {
      if (h >= group) break;
      float mt = sc[0][h];
#pragma unroll
      for (int u = 1; u < U; u++) mt = fmaxf(mt, sc[u][h]);
      const float mn = fmaxf(m[h], mt);
      if (mn == -INFINITY) continue; /* none of this thread's keys yet */
      const float al = m[h] == -INFINITY ? 0.0f : exp2f(m[h] - mn);
      l[h] *= al;
#pragma unroll
      for (int e = 0; e < E; e++) acc[h][e] *= al;
      m[h] = mn;
#pragma unroll
      for (int u = 0; u < U; u++) {
        const float p = ok[u] ? exp2f(sc[u][h] - mn) : 0.0f;
        l[h] += p;
        float vf[E];
        ad_cvt(vr[u], vf, vc);
#pragma unroll
        for (int e = 0; e < E; e++) acc[h][e] += p * vf[e];
      }
    }
  }

  /* Merge the keys of one warp (lanes c, c + CPR, ... hold the same dimensions). */
#pragma unroll
  for (int o = CPR; o < 32; o <<= 1)
#pragma unroll
    for (int h = 0; h < G; h++) {
      float ao[E];
      const float mo = __shfl_xor_sync(0xffffffffu, m[h], o);
      const float lo = __shfl_xor_sync(0xffffffffu, l[h], o);
#pragma unroll
      for (int e = 0; e < E; e++) ao[e] = __shfl_xor_sync(0xffffffffu, acc[h][e], o);
      ad_merge<E>(m[h], l[h], acc[h], mo, lo, ao);
    }
  if (lane < CPR) {
#pragma unroll
    for (int h = 0; h < G; h++) {
#pragma unroll
      for (int e = 0; e < E; e++) sm_acc[warp][h][c * E + e] = acc[h][e];
      if (lane == 0) {
        sm_m[warp][h] = m[h];
        sm_l[warp][h] = l[h];
      }
    }
  }
  __syncthreads();

  ad_finish<HD>(a, s, kvh, split, t, klim, &sm_m[0][0], &sm_l[0][0], &sm_acc[0][0][0], G,
                &sm_last);
}

/* The tensor-core form (TESSERA_CUDA_DECODE_MMA=1; a BF16 cache): the GQA group's query heads are
 * the rows of an m16n8k16 A operand (rows past the group are zero), K/V tiles of AD_MMA_BK keys
 * come into shared memory by cp.async two stages deep, so the next tile streams in while this one
 * is used, and warp w takes keys 16w .. 16w+15 of each tile: S = Q K^T and O += P V on the tensor
 * cores (bf16 operands, float32 accumulators), an online softmax per row in base 2, and the
 * warps' partials merged as in the kernel above. */
#define AD_MMA_BK 64
#define AD_MMA_PAD 8 /* bf16 per shared row beyond HD: fragment loads miss no bank */

template <int HD>
static size_t ad_mma_smem() {
  const size_t tiles = (size_t)2 * 2 * AD_MMA_BK * (HD + AD_MMA_PAD) * sizeof(__nv_bfloat16);
  const size_t merge = (size_t)AD_WARPS * 8 * HD * sizeof(float);
  return tiles > merge ? tiles : merge;
}

template <int HD>
__device__ __forceinline__ void ad_mma_load(const ad_args &a, const int32_t *bt, int kvh, int k0,
                                            int kend, __nv_bfloat16 *dk, __nv_bfloat16 *dv) {
  constexpr int LD = HD + AD_MMA_PAD, CPR = HD / 8; /* 16-byte pieces per key row */
  const __nv_bfloat16 *kc = (const __nv_bfloat16 *)a.kc, *vc = (const __nv_bfloat16 *)a.vc;
#pragma unroll
  for (int i = 0; i < AD_MMA_BK * CPR / AD_THREADS; i++) {
    const int ci = threadIdx.x + i * AD_THREADS;
    const int key = ci / CPR, col = (ci % CPR) * 8;
    const int p = k0 + key;
    const bool valid = p < kend;
    size_t base = 0;
    if (valid)
      base = (((size_t)bt[p / a.block_size] * a.block_size + p % a.block_size) * a.n_kv + kvh) *
                 HD + col;
    mma_cp_async16(dk + key * LD + col, kc + base, valid);
    mma_cp_async16(dv + key * LD + col, vc + base, valid);
  }
}

template <int HD>
__global__ void __launch_bounds__(AD_THREADS) attention_decode_mma_kernel(ad_args a) {
  constexpr int LD = HD + AD_MMA_PAD;
  extern __shared__ __align__(16) unsigned char ad_smem[];
  __nv_bfloat16 *ks = (__nv_bfloat16 *)ad_smem; /* [2][AD_MMA_BK][LD] */
  __nv_bfloat16 *vs = ks + 2 * AD_MMA_BK * LD;   /* [2][AD_MMA_BK][LD] */
  __shared__ float sm_m[AD_WARPS][8], sm_l[AD_WARPS][8];
  __shared__ int sm_last;
  cuda_pdl_wait();
  cuda_pdl_trigger();
  const int s = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
  const int t = a.seq_start[s];
  const int klim = min(a.pos[t] + 1, a.ctx_len[s]);
  const int k_begin = split * a.chunk;
  if (k_begin >= klim) return; /* block-uniform: the split is past this sequence's context */
  const int k_end = min(klim, k_begin + a.chunk);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int r = lane >> 2, qc = (lane & 3) * 2; /* fragment row (head), column pair */
  const int group = a.group;
  const bool hv = r < group;
  const int32_t *bt = a.block_table + (size_t)s * a.max_blocks;

  /* Q as A fragments: row r is head r of the group; rows r + 8 are zero (group <= 8). */
  uint32_t qa[HD / 16][4];
  {
    const float *qr = a.q + ((size_t)t * a.n_head + kvh * group + (hv ? r : 0)) * HD + qc;
#pragma unroll
    for (int kc = 0; kc < HD / 16; kc++) {
      const float2 x0 = hv ? *(const float2 *)(qr + kc * 16) : make_float2(0.f, 0.f);
      const float2 x2 = hv ? *(const float2 *)(qr + kc * 16 + 8) : make_float2(0.f, 0.f);
      qa[kc][0] = mma_pack_bf16(x0.x * a.qscale, x0.y * a.qscale);
      qa[kc][1] = 0u;
      qa[kc][2] = mma_pack_bf16(x2.x * a.qscale, x2.y * a.qscale);
      qa[kc][3] = 0u;
    }
  }
  float o[HD / 8][4]; /* rows r (and r + 8, unused) x dims nd * 8 + qc, +1 */
#pragma unroll
  for (int nd = 0; nd < HD / 8; nd++) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.0f;
  float m_a = -INFINITY, l_a = 0.0f; /* l: this lane's columns */

  const int n_kt = (k_end - k_begin + AD_MMA_BK - 1) / AD_MMA_BK;
  ad_mma_load<HD>(a, bt, kvh, k_begin, k_end, ks, vs);
  mma_cp_async_commit();
  for (int it = 0; it < n_kt; it++) {
    /* The next tile goes into the other stage, which the previous iteration finished reading. */
    if (it + 1 < n_kt)
      ad_mma_load<HD>(a, bt, kvh, k_begin + (it + 1) * AD_MMA_BK, k_end,
                      ks + ((it + 1) & 1) * AD_MMA_BK * LD, vs + ((it + 1) & 1) * AD_MMA_BK * LD);
    mma_cp_async_commit();
    mma_cp_async_wait1();
    __syncthreads();
    const int kw = k_begin + it * AD_MMA_BK + 16 * warp; /* this warp's first key */
    if (kw < k_end) { /* warp-uniform */
      const __nv_bfloat16 *kt = ks + (it & 1) * AD_MMA_BK * LD + 16 * warp * LD;
      const __nv_bfloat16 *vt = vs + (it & 1) * AD_MMA_BK * LD + 16 * warp * LD;
      float sc[2][4]; /* scores: rows r, r+8 x keys nj * 8 + qc, +1 */
#pragma unroll
      for (int nj = 0; nj < 2; nj++) sc[nj][0] = sc[nj][1] = sc[nj][2] = sc[nj][3] = 0.0f;
#pragma unroll
      for (int kc = 0; kc < HD / 16; kc++)
#pragma unroll
        for (int nj = 0; nj < 2; nj++) {
          const __nv_bfloat16 *kp = kt + (nj * 8 + r) * LD + kc * 16 + qc;
          mma_bf16_16816(sc[nj], qa[kc], *(const uint32_t *)kp, *(const uint32_t *)(kp + 8));
        }
      float mx = -INFINITY;
#pragma unroll
      for (int nj = 0; nj < 2; nj++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
          if (kw + nj * 8 + qc + e >= k_end) sc[nj][e] = -INFINITY;
          mx = fmaxf(mx, sc[nj][e]);
        }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1)); /* a row lives on a quad */
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float mn = fmaxf(m_a, mx); /* finite: the warp's first key is valid */
      const float al = m_a == -INFINITY ? 0.0f : exp2f(m_a - mn);
      m_a = mn;
      float rs = 0.0f;
#pragma unroll
      for (int nj = 0; nj < 2; nj++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
          sc[nj][e] = sc[nj][e] == -INFINITY ? 0.0f : exp2f(sc[nj][e] - mn);
          rs += sc[nj][e];
        }
      l_a = l_a * al + rs;
#pragma unroll
      for (int nd = 0; nd < HD / 8; nd++) {
        o[nd][0] *= al;
        o[nd][1] *= al;
      }
      const uint32_t pa[4] = {mma_pack_bf16(sc[0][0], sc[0][1]), 0u,
                              mma_pack_bf16(sc[1][0], sc[1][1]), 0u};
      /* ldmatrix .trans: matrices (keys +0/+8) x (dims +0/+8) give B of dims nd, nd+1 */
      const __nv_bfloat16 *vrow = vt + ((lane & 7) + ((lane >> 3) & 1) * 8) * LD + (lane >> 4) * 8;
#pragma unroll
      for (int ndp = 0; ndp < HD / 16; ndp++) {
        uint32_t b0, b1, b2, b3;
        mma_ldmatrix_x4_trans(b0, b1, b2, b3, vrow + ndp * 16);
        mma_bf16_16816(o[2 * ndp], pa, b0, b1);
        mma_bf16_16816(o[2 * ndp + 1], pa, b2, b3);
      }
    }
    __syncthreads(); /* this stage may be overwritten by the next iteration's load */
  }
  mma_cp_async_wait0(); /* nothing may land in the tiles reused below */
  __syncthreads();

  l_a += __shfl_xor_sync(0xffffffffu, l_a, 1);
  l_a += __shfl_xor_sync(0xffffffffu, l_a, 2);
  float *sm_acc = (float *)ad_smem; /* [AD_WARPS][8][HD], over the tiles */
  if (hv) {
#pragma unroll
    for (int nd = 0; nd < HD / 8; nd++) {
      sm_acc[(warp * 8 + r) * HD + nd * 8 + qc] = o[nd][0];
      sm_acc[(warp * 8 + r) * HD + nd * 8 + qc + 1] = o[nd][1];
    }
  }
  if ((lane & 3) == 0) {
    sm_m[warp][r] = m_a;
    sm_l[warp][r] = l_a;
  }
  __syncthreads();
  ad_finish<HD>(a, s, kvh, split, t, klim, &sm_m[0][0], &sm_l[0][0], sm_acc, 8, &sm_last);
}

template <int HD>
static void ad_mma_launch(cuda_ctx *c, dim3 grid, const ad_args &a) {
  const size_t smem = ad_mma_smem<HD>();
  /* Above 48 KiB a kernel must opt in; the attribute is cheap to set again. */
  if (smem > 48 * 1024 &&
      CUDA_CHECK(c, cudaFuncSetAttribute(attention_decode_mma_kernel<HD>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem)))
    return;
  cuda_launch_pdl(c, attention_decode_mma_kernel<HD>, grid, dim3(AD_THREADS), smem, a);
}

/* unroll: rows in flight per thread; 8 is built for groups of up to 2 (fewer registers). */
template <int HD, int G, typename KT>
static void ad_launch_g(cuda_ctx *c, dim3 grid, const ad_args &a, int unroll) {
  if constexpr (G <= 2) {
    if (unroll >= 8) {
      cuda_launch_pdl(c, attention_decode_split_kernel<HD, G, 8, KT>, grid, dim3(AD_THREADS), 0,
                      a);
      return;
    }
  }
  /* Fewer rows in flight for the widest group keeps its registers off the stack. */
  constexpr int U = G >= 8 ? 2 : 4;
  cuda_launch_pdl(c, attention_decode_split_kernel<HD, G, U, KT>, grid, dim3(AD_THREADS), 0, a);
}

template <int HD, typename KT>
static void ad_launch(cuda_ctx *c, dim3 grid, const ad_args &a, int unroll) {
  if (a.group <= 1) ad_launch_g<HD, 1, KT>(c, grid, a, unroll);
  else if (a.group <= 2) ad_launch_g<HD, 2, KT>(c, grid, a, unroll);
  else if (a.group <= 4) ad_launch_g<HD, 4, KT>(c, grid, a, unroll);
  else ad_launch_g<HD, 8, KT>(c, grid, a, unroll);
}

int cuda_attention_decode(cuda_ctx *c, const kv_cache *kv, int layer, const float *q,
                          int n_head_l, float scale, float *out) {
  const int hd = kv->head_dim, n_kv = kv->n_kv_l, ns = c->n_seqs;
  const int group = n_head_l / n_kv;
  /* n_tokens == n_seqs with every sequence in one 16-token tile: one token each. */
  if (c->n_tokens != ns || c->n_tiles[CUDA_ATTN_TQ_COUNT - 1] != ns || ns <= 0) return 0;
  if ((hd != 64 && hd != 128) || group > 8) return 0;
  if (kv->dtype != TS_F32 && kv->dtype != TS_BF16 && kv->dtype != TS_F16) return 0;
  const char *env = getenv("TESSERA_CUDA_DECODE_ATTN");
  if (env && !strcmp(env, "0")) return 0;

  /* Split the keys until the grid has AD_BLOCKS_PER_SM blocks per SM, at least AD_MIN_CHUNK keys
   * a split. max_ctx is the step's context bucket (a power of two for graph steps), so the
   * split count, a launch parameter, is fixed for the captured shape; sequences shorter than the
   * bucket leave their last splits empty. */
  const int max_ctx = c->max_ctx > 0 ? c->max_ctx : 1;
  const int64_t blocks = (int64_t)ns * n_kv, target = (int64_t)AD_BLOCKS_PER_SM * c->sm_count;
  int n_splits = 1;
  if (blocks < target) {
    int64_t want = (target + blocks - 1) / blocks;
    int64_t most = (max_ctx + AD_MIN_CHUNK - 1) / AD_MIN_CHUNK;
    n_splits = (int)(want < most ? want : most);
  }
  const char *fs = getenv("TESSERA_CUDA_DECODE_SPLITS");
  const int forced = fs ? atoi(fs) : 0;
  if (forced > 0) n_splits = forced < max_ctx ? (forced < 4096 ? forced : 4096) : max_ctx;
  int chunk = (max_ctx + n_splits - 1) / n_splits;
  if (forced <= 0) chunk = (chunk + AD_MIN_CHUNK - 1) / AD_MIN_CHUNK * AD_MIN_CHUNK;
  n_splits = (max_ctx + chunk - 1) / chunk;

  ad_args a;
  memset(&a, 0, sizeof a);
  if (n_splits > 1) {
    const size_t rows = (size_t)blocks * n_splits * group;
    if (cuda_scratch_reserve(c, (void **)&c->attn_ws, &c->attn_ws_cap,
                             (rows * hd + rows * 2) * sizeof(float)))
      return 1;
    a.ws_acc = c->attn_ws;
    a.ws_ml = c->attn_ws + rows * hd;
    const void *before = c->attn_cnt;
    if (cuda_scratch_reserve(c, (void **)&c->attn_cnt, &c->attn_cnt_cap,
                             (size_t)blocks * sizeof(unsigned)))
      return 1;
    /* A new buffer starts at zero; afterwards each launch leaves it at zero. */
    if ((const void *)c->attn_cnt != before &&
        CUDA_CHECK(c, cudaMemsetAsync(c->attn_cnt, 0, c->attn_cnt_cap, c->stream)))
      return 1;
    a.cnt = c->attn_cnt;
  }
  a.q = q;
  a.out = out;
  a.kc = kv->k[layer];
  a.vc = kv->v[layer];
  a.seq_start = c->d_seq_start;
  a.pos = c->d_pos;
  a.ctx_len = c->d_ctx_len;
  a.block_table = c->d_block_table;
  a.max_blocks = c->max_blocks;
  a.block_size = kv->block_size;
  a.n_kv = n_kv;
  a.n_head = n_head_l;
  a.group = group;
  a.n_splits = n_splits;
  a.chunk = chunk;
  a.qscale = scale * AD_LOG2E;
  const dim3 grid((unsigned)ns, (unsigned)n_kv, (unsigned)n_splits);
  const char *ue = getenv("TESSERA_CUDA_DECODE_UNROLL");
  const int unroll = ue ? atoi(ue) : 4;
  const char *me = getenv("TESSERA_CUDA_DECODE_MMA");
  if (me && !strcmp(me, "1") && kv->dtype == TS_BF16) {
    if (hd == 64) ad_mma_launch<64>(c, grid, a);
    else ad_mma_launch<128>(c, grid, a);
  } else if (hd == 64)
    CUDA_DISPATCH_FLOAT(c, kv->dtype, "attention KV cache", KT,
                        ad_launch<64, KT>(c, grid, a, unroll));
  else
    CUDA_DISPATCH_FLOAT(c, kv->dtype, "attention KV cache", KT,
                        ad_launch<128, KT>(c, grid, a, unroll));
  CUDA_CHECK_LAUNCH(c, "attention_decode_split_kernel");
  return 1;
}
