/* Causal attention of steps with several query tokens per sequence, on the tensor cores.
 *
 * A block of four warps owns one KV head and a tile of one sequence's query tokens; warp w owns
 * 16 tokens of one query head of the GQA group, so the hb heads of a block (hb = 4, 2 or 1 as the
 * group allows) read every K/V tile from shared memory once. The tile is 16 * 4 / hb tokens.
 * K/V are read through the block table 64 keys at a time, narrowed to bf16 in shared memory
 * (two stages: cp.async straight from a BF16 cache, converting loads from F32/F16), and each
 * warp computes S = Q K^T and O += P V with mma.sync m16n8k16 (bf16 in, float32 accumulators)
 * and an online softmax in base 2 (the scale times log2(e) is folded into Q). A row's keys are
 * those at positions <= its own (and < the context), so query tokens may start after cached
 * context of an earlier chunk or a prefix-cache hit.
 *
 * Fragment layouts (PTX ISA, mma.m16n8k16 bf16): with r = lane / 4 and c = 2 * (lane % 4), the
 * A operand holds rows r and r + 8, columns c, c+1 and c+8, c+9; B holds rows (k) c, c+1 and
 * c+8, c+9 of column (n) r; the accumulator holds rows r and r + 8, columns c and c+1. The
 * scores' accumulators are therefore, repacked to bf16, the A operand of P V (mma.cuh). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <type_traits>

#include "attention_prefill.cuh"
#include "mma.cuh"

#define PF_WARPS 4
#define PF_THREADS (PF_WARPS * 32)
#define PF_BK 64 /* keys per shared-memory tile */
#define PF_PAD 8 /* bf16 per shared row beyond hd: 16 bytes, so fragment loads miss no bank */
#define PF_LOG2E 1.4426950408889634f

struct pf_args {
  const float *q;  /* [n_tokens][n_head][hd] */
  float *out;      /* [n_tokens][n_head][hd] */
  const void *kc, *vc; /* [n_blocks][block_size][n_kv][hd] */
  const int32_t *seq_start, *pos, *ctx_len, *block_table;
  int n_seqs, max_blocks, block_size, n_kv, n_head, group, hb, head_tiles, tq;
  float qscale; /* softmax scale * log2(e) */
};

/* Four consecutive cache elements (16-byte aligned for F32, 8 for 16-bit) as floats. */
__device__ __forceinline__ float4 pf_ld4(const float *p) { return *(const float4 *)p; }
__device__ __forceinline__ float4 pf_ld4(const __half *p) {
  uint2 u = *(const uint2 *)p;
  float2 a = __half22float2(*reinterpret_cast<__half2 *>(&u.x));
  float2 b = __half22float2(*reinterpret_cast<__half2 *>(&u.y));
  return make_float4(a.x, a.y, b.x, b.y);
}
__device__ __forceinline__ float4 pf_ld4(const __nv_bfloat16 *p) {
  uint2 u = *(const uint2 *)p;
  float2 a = __bfloat1622float2(*reinterpret_cast<__nv_bfloat162 *>(&u.x));
  float2 b = __bfloat1622float2(*reinterpret_cast<__nv_bfloat162 *>(&u.y));
  return make_float4(a.x, a.y, b.x, b.y);
}

/* Warp 0: finds the block's tile (sequence, first token) when every sequence's new tokens are
 * cut into runs of tq, by a running prefix sum of tiles per sequence, 32 sequences at a time.
 * sh[0] = -1 when the tile number is past the last tile. */
__device__ void pf_find_tile(const pf_args &a, int tile, int *sh) {
  const int lane = threadIdx.x & 31;
  if (lane == 0) sh[0] = -1;
  __syncwarp();
  int base = 0;
  for (int s0 = 0; s0 < a.n_seqs && base <= tile; s0 += 32) {
    const int s = s0 + lane;
    int start = 0, cnt = 0;
    if (s < a.n_seqs) {
      start = a.seq_start[s];
      cnt = (a.seq_start[s + 1] - start + a.tq - 1) / a.tq;
    }
    int incl = cnt;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += v;
    }
    const int excl = incl - cnt;
    if (cnt > 0 && tile >= base + excl && tile < base + incl) {
      sh[0] = s;
      sh[1] = start + (tile - base - excl) * a.tq;
    }
    base += __shfl_sync(0xffffffffu, incl, 31);
  }
}

/* Keys k0 .. k0+63 of KV head kvh into dk/dv [PF_BK][HD + PF_PAD] as bf16; keys at or past kend
 * become zeros (a zero V row keeps P V finite where P is 0). */
template <int HD, typename KT>
__device__ __forceinline__ void pf_load_tile(const pf_args &a, const int32_t *bt, int kvh, int k0,
                                             int kend, __nv_bfloat16 *dk, __nv_bfloat16 *dv) {
  constexpr int LD = HD + PF_PAD;
  const KT *kc = (const KT *)a.kc, *vc = (const KT *)a.vc;
  if constexpr (std::is_same<KT, __nv_bfloat16>::value) {
    constexpr int CPR = HD / 8; /* 16-byte chunks per key row */
#pragma unroll
    for (int i = 0; i < PF_BK * CPR / PF_THREADS; i++) {
      const int ci = threadIdx.x + i * PF_THREADS;
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
  } else {
    /* Loads then stores, NB chunks at a time: with the loads of a batch in flight together, a
     * tile costs two round trips to memory instead of one per chunk (the compiler may not move a
     * global load above a shared store it cannot prove apart). */
    constexpr int CPR = HD / 4; /* 4-element chunks per key row */
    constexpr int N = PF_BK * CPR / PF_THREADS, NB = N < 8 ? N : 8;
#pragma unroll
    for (int i0 = 0; i0 < N; i0 += NB) {
      float4 kx[NB], vx[NB];
#pragma unroll
      for (int j = 0; j < NB; j++) {
        const int ci = threadIdx.x + (i0 + j) * PF_THREADS;
        const int key = ci / CPR, col = (ci % CPR) * 4;
        const int p = k0 + key;
        kx[j] = vx[j] = make_float4(0.f, 0.f, 0.f, 0.f);
        if (p < kend) {
          const size_t base =
              (((size_t)bt[p / a.block_size] * a.block_size + p % a.block_size) * a.n_kv + kvh) *
                  HD + col;
          kx[j] = pf_ld4(kc + base);
          vx[j] = pf_ld4(vc + base);
        }
      }
#pragma unroll
      for (int j = 0; j < NB; j++) {
        const int ci = threadIdx.x + (i0 + j) * PF_THREADS;
        const int key = ci / CPR, col = (ci % CPR) * 4;
        *(uint2 *)(dk + key * LD + col) =
            make_uint2(mma_pack_bf16(kx[j].x, kx[j].y), mma_pack_bf16(kx[j].z, kx[j].w));
        *(uint2 *)(dv + key * LD + col) =
            make_uint2(mma_pack_bf16(vx[j].x, vx[j].y), mma_pack_bf16(vx[j].z, vx[j].w));
      }
    }
  }
}

/* grid (tiles, n_kv * head_tiles); PF_THREADS threads; dynamic shared memory
 * 2 stages x (K, V) x [PF_BK][HD + PF_PAD] bf16. */
template <int HD, typename KT>
__global__ void __launch_bounds__(PF_THREADS) attention_prefill_kernel(pf_args a) {
  constexpr int LD = HD + PF_PAD;
  extern __shared__ __align__(16) unsigned char pf_smem[];
  __nv_bfloat16 *ks = (__nv_bfloat16 *)pf_smem; /* [2][PF_BK][LD] */
  __nv_bfloat16 *vs = ks + 2 * PF_BK * LD;      /* [2][PF_BK][LD] */
  __shared__ int sh_tile[2];
  __shared__ int sh_kmax[PF_WARPS];

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  /* Last tiles first: a sequence's later tokens see the most keys. */
  if (warp == 0) pf_find_tile(a, gridDim.x - 1 - blockIdx.x, sh_tile);
  __syncthreads();
  const int s = sh_tile[0];
  if (s < 0) return; /* block-uniform: the grid is sized for the most tiles the step can have */
  const int t0 = sh_tile[1];
  const int t_end = min(t0 + a.tq, a.seq_start[s + 1]);
  const int ctx = a.ctx_len[s];
  const int kvh = blockIdx.y / a.head_tiles;
  const int wt = PF_WARPS / a.hb; /* warps per head: token sub-tiles of 16 */
  const int g = (blockIdx.y % a.head_tiles) * a.hb + warp / wt;
  const bool head_ok = g < a.group;
  const int h = kvh * a.group + (head_ok ? g : 0);
  const int tw = t0 + (warp % wt) * 16;
  const int r = lane >> 2, qc = (lane & 3) * 2;
  const int ta = tw + r, tb = tw + r + 8; /* this thread's two rows */
  const bool va = head_ok && ta < t_end, vb = head_ok && tb < t_end;
  const int klim_a = va ? min(a.pos[ta] + 1, ctx) : 0;
  const int klim_b = vb ? min(a.pos[tb] + 1, ctx) : 0;
  int wmax = max(klim_a, klim_b);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) wmax = max(wmax, __shfl_xor_sync(0xffffffffu, wmax, o));
  if (lane == 0) sh_kmax[warp] = wmax;

  /* Q as A fragments, scaled into base 2 and rounded to bf16: [HD/16][4] */
  uint32_t qa[HD / 16][4];
  {
    const float *qra = a.q + ((size_t)(va ? ta : t0) * a.n_head + h) * HD + qc;
    const float *qrb = a.q + ((size_t)(vb ? tb : t0) * a.n_head + h) * HD + qc;
#pragma unroll
    for (int kc = 0; kc < HD / 16; kc++) {
      const float2 x0 = *(const float2 *)(qra + kc * 16), x1 = *(const float2 *)(qrb + kc * 16);
      const float2 x2 = *(const float2 *)(qra + kc * 16 + 8);
      const float2 x3 = *(const float2 *)(qrb + kc * 16 + 8);
      qa[kc][0] = mma_pack_bf16(x0.x * a.qscale, x0.y * a.qscale);
      qa[kc][1] = mma_pack_bf16(x1.x * a.qscale, x1.y * a.qscale);
      qa[kc][2] = mma_pack_bf16(x2.x * a.qscale, x2.y * a.qscale);
      qa[kc][3] = mma_pack_bf16(x3.x * a.qscale, x3.y * a.qscale);
    }
  }
  __syncthreads();
  int kend = 0;
#pragma unroll
  for (int w = 0; w < PF_WARPS; w++) kend = max(kend, sh_kmax[w]);
  const int n_kt = (kend + PF_BK - 1) / PF_BK;
  const int32_t *bt = a.block_table + (size_t)s * a.max_blocks;

  float o[HD / 8][4]; /* O accumulators: rows r, r+8 x dims nd*8 + qc, +1 */
#pragma unroll
  for (int nd = 0; nd < HD / 8; nd++) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.0f;
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.0f, l_b = 0.0f; /* l: this thread's columns */

  if (n_kt > 0) pf_load_tile<HD, KT>(a, bt, kvh, 0, kend, ks, vs);
  mma_cp_async_commit();
  for (int it = 0; it < n_kt; it++) {
    /* The next tile goes into the other stage, which the previous iteration finished reading. */
    if (it + 1 < n_kt)
      pf_load_tile<HD, KT>(a, bt, kvh, (it + 1) * PF_BK, kend, ks + ((it + 1) & 1) * PF_BK * LD,
                           vs + ((it + 1) & 1) * PF_BK * LD);
    mma_cp_async_commit();
    mma_cp_async_wait1();
    __syncthreads();
    const int k0 = it * PF_BK;
    if (k0 < wmax) { /* warp-uniform: some row of the warp sees keys of this tile */
      const __nv_bfloat16 *kt = ks + (it & 1) * PF_BK * LD, *vt = vs + (it & 1) * PF_BK * LD;
      float sc[PF_BK / 8][4]; /* scores: rows r, r+8 x keys nj*8 + qc, +1 */
#pragma unroll
      for (int nj = 0; nj < PF_BK / 8; nj++) sc[nj][0] = sc[nj][1] = sc[nj][2] = sc[nj][3] = 0.0f;
#pragma unroll
      for (int kc = 0; kc < HD / 16; kc++)
#pragma unroll
        for (int nj = 0; nj < PF_BK / 8; nj++) {
          const __nv_bfloat16 *kp = kt + (nj * 8 + r) * LD + kc * 16 + qc;
          mma_bf16_16816(sc[nj], qa[kc], *(const uint32_t *)kp, *(const uint32_t *)(kp + 8));
        }
      float mx_a = -INFINITY, mx_b = -INFINITY;
#pragma unroll
      for (int nj = 0; nj < PF_BK / 8; nj++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
          const int p = k0 + nj * 8 + qc + e;
          if (p >= klim_a) sc[nj][e] = -INFINITY;
          if (p >= klim_b) sc[nj][2 + e] = -INFINITY;
          mx_a = fmaxf(mx_a, sc[nj][e]);
          mx_b = fmaxf(mx_b, sc[nj][2 + e]);
        }
      /* a row lives on the four lanes of a quad */
      mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 1));
      mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 2));
      mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 1));
      mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 2));
      const float mn_a = fmaxf(m_a, mx_a), mn_b = fmaxf(m_b, mx_b);
      /* A row with no key yet keeps m = -inf; subtracting 0 then gives p = 0, alpha = 0. */
      const float mu_a = mn_a == -INFINITY ? 0.0f : mn_a;
      const float mu_b = mn_b == -INFINITY ? 0.0f : mn_b;
      const float al_a = exp2f(m_a - mu_a), al_b = exp2f(m_b - mu_b);
      m_a = mn_a;
      m_b = mn_b;
      float rs_a = 0.0f, rs_b = 0.0f;
#pragma unroll
      for (int nj = 0; nj < PF_BK / 8; nj++) {
        sc[nj][0] = exp2f(sc[nj][0] - mu_a);
        sc[nj][1] = exp2f(sc[nj][1] - mu_a);
        sc[nj][2] = exp2f(sc[nj][2] - mu_b);
        sc[nj][3] = exp2f(sc[nj][3] - mu_b);
        rs_a += sc[nj][0] + sc[nj][1];
        rs_b += sc[nj][2] + sc[nj][3];
      }
      l_a = l_a * al_a + rs_a;
      l_b = l_b * al_b + rs_b;
#pragma unroll
      for (int nd = 0; nd < HD / 8; nd++) {
        o[nd][0] *= al_a;
        o[nd][1] *= al_a;
        o[nd][2] *= al_b;
        o[nd][3] *= al_b;
      }
#pragma unroll
      for (int kk = 0; kk < PF_BK / 16; kk++) {
        const uint32_t pa[4] = {mma_pack_bf16(sc[2 * kk][0], sc[2 * kk][1]),
                                mma_pack_bf16(sc[2 * kk][2], sc[2 * kk][3]),
                                mma_pack_bf16(sc[2 * kk + 1][0], sc[2 * kk + 1][1]),
                                mma_pack_bf16(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
        /* ldmatrix .trans: matrices (keys +0/+8) x (dims +0/+8) give B of dims nd, nd+1 */
        const __nv_bfloat16 *vrow =
            vt + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + (lane >> 4) * 8;
#pragma unroll
        for (int ndp = 0; ndp < HD / 16; ndp++) {
          uint32_t b0, b1, b2, b3;
          mma_ldmatrix_x4_trans(b0, b1, b2, b3, vrow + ndp * 16);
          mma_bf16_16816(o[2 * ndp], pa, b0, b1);
          mma_bf16_16816(o[2 * ndp + 1], pa, b2, b3);
        }
      }
    }
    __syncthreads(); /* this stage may be overwritten by the next iteration's load */
  }

  l_a += __shfl_xor_sync(0xffffffffu, l_a, 1);
  l_a += __shfl_xor_sync(0xffffffffu, l_a, 2);
  l_b += __shfl_xor_sync(0xffffffffu, l_b, 1);
  l_b += __shfl_xor_sync(0xffffffffu, l_b, 2);
  const float inv_a = l_a > 0.0f ? 1.0f / l_a : 0.0f, inv_b = l_b > 0.0f ? 1.0f / l_b : 0.0f;
  if (va) {
    float *dst = a.out + ((size_t)ta * a.n_head + h) * HD + qc;
#pragma unroll
    for (int nd = 0; nd < HD / 8; nd++)
      *(float2 *)(dst + nd * 8) = make_float2(o[nd][0] * inv_a, o[nd][1] * inv_a);
  }
  if (vb) {
    float *dst = a.out + ((size_t)tb * a.n_head + h) * HD + qc;
#pragma unroll
    for (int nd = 0; nd < HD / 8; nd++)
      *(float2 *)(dst + nd * 8) = make_float2(o[nd][2] * inv_b, o[nd][3] * inv_b);
  }
}

template <int HD, typename KT>
static void pf_launch(cuda_ctx *c, dim3 grid, const pf_args &a) {
  const size_t smem = (size_t)2 * 2 * PF_BK * (HD + PF_PAD) * sizeof(__nv_bfloat16);
  /* Above 48 KiB a kernel must opt in; the attribute is cheap to set again. */
  if (smem > 48 * 1024 &&
      CUDA_CHECK(c, cudaFuncSetAttribute(attention_prefill_kernel<HD, KT>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem)))
    return;
  attention_prefill_kernel<HD, KT><<<grid, PF_THREADS, smem, c->stream>>>(a);
  CUDA_CHECK_LAUNCH(c, "attention_prefill_kernel");
}

int cuda_attention_prefill(cuda_ctx *c, const kv_cache *kv, int layer, const float *q,
                           int n_head_l, float scale, float *out) {
  const int hd = kv->head_dim, n_kv = kv->n_kv_l;
  if (hd != 64 && hd != 128) return 0;
  if (kv->dtype != TS_F32 && kv->dtype != TS_BF16 && kv->dtype != TS_F16) return 0;
  const char *e = getenv("TESSERA_CUDA_PREFILL_ATTN");
  if (e && !strcmp(e, "0")) return 0;
  const int group = n_head_l / n_kv;
  const int hb = group % 4 == 0 ? 4 : group % 2 == 0 ? 2 : 1;
  const int tq = 16 * (PF_WARPS / hb);

  pf_args a;
  a.q = q;
  a.out = out;
  a.kc = kv->k[layer];
  a.vc = kv->v[layer];
  a.seq_start = c->d_seq_start;
  a.pos = c->d_pos;
  a.ctx_len = c->d_ctx_len;
  a.block_table = c->d_block_table;
  a.n_seqs = c->n_seqs;
  a.max_blocks = c->max_blocks;
  a.block_size = kv->block_size;
  a.n_kv = n_kv;
  a.n_head = n_head_l;
  a.group = group;
  a.hb = hb;
  a.head_tiles = group / hb;
  a.tq = tq;
  a.qscale = scale * PF_LOG2E;

  /* At most the tokens over tq plus one partial tile per sequence; blocks past the step's
   * last tile return at once. */
  const int64_t tiles = ((int64_t)c->n_tokens + (int64_t)c->n_seqs * (tq - 1)) / tq;
  if (tiles <= 0) return 1;
  dim3 grid((unsigned)tiles, (unsigned)(n_kv * a.head_tiles));
  if (hd == 64)
    CUDA_DISPATCH_FLOAT(c, kv->dtype, "attention KV cache", KT, pf_launch<64, KT>(c, grid, a));
  else
    CUDA_DISPATCH_FLOAT(c, kv->dtype, "attention KV cache", KT, pf_launch<128, KT>(c, grid, a));
  return 1;
}
