/* Causal attention over the paged KV cache, one kernel for decode, prefill and mixed steps.
 *
 * A block owns up to 16 query rows: a tile of tq consecutive tokens of one sequence times hpt
 * query heads that share one KV head (tq * hpt <= 16). Decode (one token) gets all heads of a
 * GQA group in one block, so each K/V tile is read once for the group; prefill gets tiles of
 * several tokens. K/V are read 32 positions at a time into shared memory through the block table
 * and folded into an online softmax (running max m, sum l, unnormalised acc) per row, all in
 * float32. When the step has few blocks and long contexts, the key range is also split over
 * gridDim.z: each split writes (m, l, acc) to a workspace and a second kernel combines them.
 *
 * Warp w owns rows w, w+4, w+8, w+12; in the score phase lane j owns key j of the tile, in the
 * P.V phase lane j owns dimensions j, j+32, ... (NI of them, hd <= 32 * NI). */
#include <math.h>

#include "attention.cuh"
#include "attention_decode.cuh"
#include "attention_prefill.cuh"
#include "graph.cuh"

#define ATT_THREADS 128
#define ATT_WARPS (ATT_THREADS / 32)
#define ATT_BK 32
#define ATT_ROWS_PER_WARP (CUDA_ATTN_ROWS / ATT_WARPS)

struct att_args {
  const float *q;         /* [n_tokens][n_head][hd] */
  float *out;             /* [n_tokens][n_head][hd] */
  float *ws_acc;          /* [n_splits][n_tokens][n_head][hd] when n_splits > 1 */
  float *ws_ml;           /* [n_splits][n_tokens][n_head][2] */
  const void *kc, *vc;    /* [n_blocks][block_size][n_kv][hd] */
  const int32_t *tiles;   /* [n_tiles][2] (seq, first token) */
  const int32_t *seq_start, *pos, *ctx_len, *block_table;
  int max_blocks, block_size, n_kv, n_head, hd, group, hpt, head_tiles, tq;
  int n_tokens, n_splits, chunk;
  float scale;
};

static size_t att_smem_bytes(int hd) {
  return sizeof(float) * ((size_t)CUDA_ATTN_ROWS * hd + (size_t)ATT_BK * (hd + 1) +
                          (size_t)ATT_BK * hd);
}

template <int NI, typename KT>
__global__ void __launch_bounds__(ATT_THREADS) attention_kernel(att_args a) {
  extern __shared__ float smem[];
  const int hd = a.hd;
  float *qs = smem;                               /* [16][hd] */
  float *ks = qs + CUDA_ATTN_ROWS * hd;           /* [32][hd+1], padded against bank conflicts */
  float *vs = ks + ATT_BK * (hd + 1);             /* [32][hd] */
  const KT *kc = (const KT *)a.kc, *vc = (const KT *)a.vc;

  const int tile = blockIdx.x;
  const int kvh = blockIdx.y / a.head_tiles;
  const int head0 = kvh * a.group + (blockIdx.y % a.head_tiles) * a.hpt;
  const int heads_here = min(a.hpt, a.group - (blockIdx.y % a.head_tiles) * a.hpt);
  const int split = blockIdx.z;
  const int s = a.tiles[2 * tile], t0 = a.tiles[2 * tile + 1];
  const int nt = min(a.tq, a.seq_start[s + 1] - t0);
  const int ctx = a.ctx_len[s];
  const int32_t *bt = a.block_table + (size_t)s * a.max_blocks;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

  /* Row r is token t0 + r / hpt, head head0 + r % hpt; rows past nt * hpt or the group are idle. */
  int klim[ATT_ROWS_PER_WARP];
  int kmax = 0;
  for (int r = 0; r < nt * a.hpt; r++)
    if (r % a.hpt < heads_here) kmax = max(kmax, min(a.pos[t0 + r / a.hpt] + 1, ctx));
#pragma unroll
  for (int i = 0; i < ATT_ROWS_PER_WARP; i++) {
    int r = warp + ATT_WARPS * i;
    klim[i] = (r < nt * a.hpt && r % a.hpt < heads_here) ? min(a.pos[t0 + r / a.hpt] + 1, ctx) : 0;
  }
  /* Same layout as the K/V tiles below: unrolled, coalesced, every load in flight at once. */
#pragma unroll
  for (int i = 0; i < ATT_ROWS_PER_WARP; i++) {
    const int r = warp + ATT_WARPS * i;
    const bool act = r < nt * a.hpt && r % a.hpt < heads_here;
    const float *src = a.q + ((size_t)(t0 + (act ? r / a.hpt : 0)) * a.n_head + head0 +
                              (act ? r % a.hpt : 0)) * hd;
#pragma unroll
    for (int n = 0; n < NI; n++) {
      const int d = lane + 32 * n;
      if (d < hd) qs[r * hd + d] = act ? src[d] : 0.0f;
    }
  }

  const int k_begin = split * a.chunk;
  const int k_end = min(kmax, k_begin + a.chunk);

  float m[ATT_ROWS_PER_WARP], l[ATT_ROWS_PER_WARP], acc[ATT_ROWS_PER_WARP][NI];
#pragma unroll
  for (int i = 0; i < ATT_ROWS_PER_WARP; i++) {
    m[i] = -INFINITY;
    l[i] = 0.0f;
#pragma unroll
    for (int n = 0; n < NI; n++) acc[i][n] = 0.0f;
  }

  for (int k0 = k_begin; k0 < k_end; k0 += ATT_BK) {
    const int kn = min(ATT_BK, k_end - k0);
    __syncthreads(); /* the previous tile is no longer read (and qs is written, first time) */
    /* Warp w loads keys w, w+4, ...; lane l dimensions l, l+32, ...: each key row is one
     * coalesced read, and the unrolled loop keeps all of a thread's loads in flight at once
     * (a loop of dependent block-table and cache loads left the kernel latency-bound). */
#pragma unroll
    for (int jj = 0; jj < ATT_BK / ATT_WARPS; jj++) {
      const int j = warp + ATT_WARPS * jj;
      const bool valid = j < kn;
      size_t base = 0;
      if (valid) {
        const int p = k0 + j;
        base = (((size_t)bt[p / a.block_size] * a.block_size + p % a.block_size) * a.n_kv + kvh) *
               hd;
      }
#pragma unroll
      for (int n = 0; n < NI; n++) {
        const int d = lane + 32 * n;
        if (d < hd) {
          ks[j * (hd + 1) + d] = valid ? cuda_ld(kc + base + d) : 0.0f;
          vs[j * hd + d] = valid ? cuda_ld(vc + base + d) : 0.0f;
        }
      }
    }
    __syncthreads();

#pragma unroll
    for (int i = 0; i < ATT_ROWS_PER_WARP; i++) {
      if (klim[i] <= k0) continue; /* warp-uniform: the row's causal limit is before this tile */
      const int r = warp + ATT_WARPS * i;
      const int p = k0 + lane;
      float sc = -INFINITY;
      if (lane < kn && p < klim[i]) {
        const float *qr = qs + r * hd, *kr = ks + lane * (hd + 1);
        float dot = 0.0f;
        for (int d = 0; d < hd; d++) dot += qr[d] * kr[d];
        sc = dot * a.scale;
      }
      float m_new = fmaxf(m[i], cuda_warp_max(sc));
      /* m_new is finite: the row has at least key k0 (klim > k0). */
      float pj = sc == -INFINITY ? 0.0f : expf(sc - m_new);
      float alpha = m[i] == -INFINITY ? 0.0f : expf(m[i] - m_new);
      l[i] = l[i] * alpha + cuda_warp_sum(pj);
      m[i] = m_new;
#pragma unroll
      for (int n = 0; n < NI; n++) acc[i][n] *= alpha;
      for (int j = 0; j < kn; j++) {
        float pb = __shfl_sync(0xffffffffu, pj, j);
        const float *vr = vs + j * hd;
#pragma unroll
        for (int n = 0; n < NI; n++) {
          int d = lane + 32 * n;
          if (d < hd) acc[i][n] += pb * vr[d];
        }
      }
    }
  }

#pragma unroll
  for (int i = 0; i < ATT_ROWS_PER_WARP; i++) {
    const int r = warp + ATT_WARPS * i;
    if (r >= nt * a.hpt || r % a.hpt >= heads_here) continue;
    const int t = t0 + r / a.hpt, h = head0 + r % a.hpt;
    const size_t row = (size_t)t * a.n_head + h;
    if (a.n_splits == 1) {
      float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
#pragma unroll
      for (int n = 0; n < NI; n++) {
        int d = lane + 32 * n;
        if (d < hd) a.out[row * hd + d] = acc[i][n] * inv;
      }
    } else {
      size_t wrow = (size_t)split * a.n_tokens * a.n_head + row;
#pragma unroll
      for (int n = 0; n < NI; n++) {
        int d = lane + 32 * n;
        if (d < hd) a.ws_acc[wrow * hd + d] = acc[i][n];
      }
      if (lane == 0) {
        a.ws_ml[2 * wrow] = m[i];
        a.ws_ml[2 * wrow + 1] = l[i];
      }
    }
  }
}

/* grid (n_tokens, n_head): merges the splits' partial softmaxes of one row. */
__global__ void attention_combine_kernel(const float *ws_acc, const float *ws_ml, int n_splits,
                                         int n_rows, int hd, float *out) {
  cuda_pdl_wait();
  cuda_pdl_trigger();
  const size_t row = (size_t)blockIdx.x * gridDim.y + blockIdx.y;
  float m_max = -INFINITY;
  for (int sp = 0; sp < n_splits; sp++) {
    size_t w = (size_t)sp * n_rows + row;
    if (ws_ml[2 * w + 1] > 0.0f) m_max = fmaxf(m_max, ws_ml[2 * w]);
  }
  float denom = 0.0f;
  for (int sp = 0; sp < n_splits; sp++) {
    size_t w = (size_t)sp * n_rows + row;
    if (ws_ml[2 * w + 1] > 0.0f) denom += ws_ml[2 * w + 1] * expf(ws_ml[2 * w] - m_max);
  }
  float inv = denom > 0.0f ? 1.0f / denom : 0.0f;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float v = 0.0f;
    for (int sp = 0; sp < n_splits; sp++) {
      size_t w = (size_t)sp * n_rows + row;
      if (ws_ml[2 * w + 1] > 0.0f) v += ws_acc[w * hd + d] * expf(ws_ml[2 * w] - m_max);
    }
    out[row * hd + d] = v * inv;
  }
}

/* Decode steps (one query token per sequence): grid (sequence, KV head, split). The block's four
 * warps take every fourth key of the split; each lane holds NI consecutive dimensions of the key
 * and value rows (one vector load each: a 256-byte bf16 row is one coalesced read) and of every
 * query head of the GQA group, and a warp reduction gives each score. Each warp keeps an online
 * softmax per head; the warps are merged through shared memory at the end. G (a power of two at
 * least the group) sizes the per-head registers: small enough that many blocks share a
 * multiprocessor and enough loads are in flight to stream the cache. */
#define DEC_MAXG 8
#define DEC_MAXHD 128

/* NI consecutive elements of a K/V row as float, in one load where the width allows. */
template <int NI, typename KT>
__device__ __forceinline__ void dec_load(const KT *p, float f[NI]) {
  if constexpr (sizeof(KT) == 2 && NI == 4) {
    uint2 u = __ldg((const uint2 *)p);
    const KT *h = (const KT *)&u;
#pragma unroll
    for (int n = 0; n < 4; n++) f[n] = cuda_ld(h + n);
  } else if constexpr (sizeof(KT) == 2 && NI == 2) {
    unsigned u = __ldg((const unsigned *)p);
    const KT *h = (const KT *)&u;
    f[0] = cuda_ld(h);
    f[1] = cuda_ld(h + 1);
  } else if constexpr (sizeof(KT) == 4 && NI == 4) {
    float4 u = __ldg((const float4 *)p);
    f[0] = u.x, f[1] = u.y, f[2] = u.z, f[3] = u.w;
  } else if constexpr (sizeof(KT) == 4 && NI == 2) {
    float2 u = __ldg((const float2 *)p);
    f[0] = u.x, f[1] = u.y;
  } else {
#pragma unroll
    for (int n = 0; n < NI; n++) f[n] = cuda_ld(p + n);
  }
}

template <int NI, int G, typename KT>
__global__ void __launch_bounds__(ATT_THREADS) attention_decode_kernel(att_args a) {
  __shared__ float sm_acc[ATT_WARPS][G][DEC_MAXHD];
  __shared__ float sm_m[ATT_WARPS][G], sm_l[ATT_WARPS][G];
  cuda_pdl_wait();
  cuda_pdl_trigger();
  const int s = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
  const int hd = a.hd, group = a.group;
  const int t = a.seq_start[s];
  const int klim = min(a.pos[t] + 1, a.ctx_len[s]);
  const int k_begin = split * a.chunk, k_end = min(klim, k_begin + a.chunk);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const KT *kc = (const KT *)a.kc, *vc = (const KT *)a.vc;
  const int32_t *bt = a.block_table + (size_t)s * a.max_blocks;
  const int d0 = lane * NI; /* this lane's dimensions: d0 .. d0 + NI - 1 (hd == 32 * NI) */

  float q[G][NI], acc[G][NI], m[G], l[G];
#pragma unroll
  for (int h = 0; h < G; h++) {
    m[h] = -INFINITY;
    l[h] = 0.0f;
#pragma unroll
    for (int n = 0; n < NI; n++) {
      acc[h][n] = 0.0f;
      q[h][n] = h < group ? a.q[((size_t)t * a.n_head + kvh * group + h) * hd + d0 + n] : 0.0f;
    }
  }
#pragma unroll 4
  for (int p = k_begin + warp; p < k_end; p += ATT_WARPS) {
    const size_t base =
        (((size_t)bt[p / a.block_size] * a.block_size + p % a.block_size) * a.n_kv + kvh) * hd +
        d0;
    float kf[NI], vf[NI];
    dec_load<NI, KT>(kc + base, kf);
    dec_load<NI, KT>(vc + base, vf);
#pragma unroll
    for (int h = 0; h < G; h++) {
      if (h >= group) break;
      float d = 0.0f;
#pragma unroll
      for (int n = 0; n < NI; n++) d += q[h][n] * kf[n];
      d = cuda_warp_sum(d) * a.scale;
      const float mn = fmaxf(m[h], d);
      const float al = expf(m[h] - mn), pe = expf(d - mn);
      l[h] = l[h] * al + pe;
      m[h] = mn;
#pragma unroll
      for (int n = 0; n < NI; n++) acc[h][n] = acc[h][n] * al + pe * vf[n];
    }
  }
#pragma unroll
  for (int h = 0; h < G; h++) {
    if (h >= group) break;
#pragma unroll
    for (int n = 0; n < NI; n++) sm_acc[warp][h][d0 + n] = acc[h][n];
    if (lane == 0) {
      sm_m[warp][h] = m[h];
      sm_l[warp][h] = l[h];
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < group * hd; idx += ATT_THREADS) {
    const int h = idx / hd, d = idx % hd;
    float M = -INFINITY;
    for (int w = 0; w < ATT_WARPS; w++)
      if (sm_l[w][h] > 0.0f) M = fmaxf(M, sm_m[w][h]);
    float L = 0.0f, A = 0.0f;
    for (int w = 0; w < ATT_WARPS; w++)
      if (sm_l[w][h] > 0.0f) {
        const float e = expf(sm_m[w][h] - M);
        L += sm_l[w][h] * e;
        A += sm_acc[w][h][d] * e;
      }
    const size_t row = (size_t)t * a.n_head + kvh * group + h;
    if (a.n_splits == 1) {
      a.out[row * hd + d] = L > 0.0f ? A / L : 0.0f;
    } else {
      const size_t wrow = (size_t)split * a.n_tokens * a.n_head + row;
      a.ws_acc[wrow * hd + d] = A;
      if (d == 0) {
        a.ws_ml[2 * wrow] = M;
        a.ws_ml[2 * wrow + 1] = L;
      }
    }
  }
}

/* The tiled form, for steps whose key splits give every warp whole tiles (>= 128 keys a block):
 * the block's four warps take tiles of 32 keys in turn (warp w: keys 32w.., 32(w+4)..). In a
 * tile, lane j scores key j against every query head of the GQA group (the queries sit in shared
 * memory and are read as broadcasts; the key row is read in 16-byte pieces), so a tile costs one
 * max and one sum reduction per head instead of one per key and keeps 32 rows in flight. Then
 * each lane accumulates its NI consecutive dimensions of the 32 value rows (one coalesced vector
 * load per row). Faster at many sequences (256: 285 against 306 us a layer); slower when a split
 * holds only 64 keys (batch 1), where the per-key kernel above keeps all four warps busy. */
/* 16 bytes of a key row: E = 16 / sizeof(KT) elements as float. */
template <typename KT>
__device__ __forceinline__ void dec_load16(const KT *p, float *f) {
  uint4 u = __ldg((const uint4 *)p);
  if constexpr (sizeof(KT) == 4) {
    const float *h = (const float *)&u;
#pragma unroll
    for (int e = 0; e < 4; e++) f[e] = h[e];
  } else {
    const KT *h = (const KT *)&u;
#pragma unroll
    for (int e = 0; e < 8; e++) f[e] = cuda_ld(h + e);
  }
}

template <int NI, int G, typename KT>
__global__ void __launch_bounds__(ATT_THREADS) attention_decode_tiled_kernel(att_args a) {
  constexpr int E = 16 / (int)sizeof(KT); /* key elements per 16-byte load */
  constexpr int HD = 32 * NI;             /* head_dim */
  __shared__ float sm_acc[ATT_WARPS][G][DEC_MAXHD];
  __shared__ float sm_m[ATT_WARPS][G], sm_l[ATT_WARPS][G];
  __shared__ __align__(16) float qs[G][HD];
  cuda_pdl_wait();
  cuda_pdl_trigger();
  const int s = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
  const int group = a.group;
  const int t = a.seq_start[s];
  const int klim = min(a.pos[t] + 1, a.ctx_len[s]);
  const int k_begin = split * a.chunk, k_end = min(klim, k_begin + a.chunk);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const KT *kc = (const KT *)a.kc, *vc = (const KT *)a.vc;
  const int32_t *bt = a.block_table + (size_t)s * a.max_blocks;
  const int d0 = lane * NI; /* this lane's value dimensions: d0 .. d0 + NI - 1 */

  for (int i = threadIdx.x; i < G * HD; i += ATT_THREADS) {
    const int h = i / HD, d = i % HD;
    qs[h][d] = h < group ? a.q[((size_t)t * a.n_head + kvh * group + h) * HD + d] * a.scale : 0.0f;
  }
  __syncthreads();

  float acc[G][NI], m[G], l[G];
#pragma unroll
  for (int h = 0; h < G; h++) {
    m[h] = -INFINITY;
    l[h] = 0.0f;
#pragma unroll
    for (int n = 0; n < NI; n++) acc[h][n] = 0.0f;
  }
  for (int k0 = k_begin + 32 * warp; k0 < k_end; k0 += 32 * ATT_WARPS) {
    const int p = k0 + lane;
    const bool valid = p < k_end;
    const size_t base =
        valid ? (((size_t)bt[p / a.block_size] * a.block_size + p % a.block_size) * a.n_kv + kvh) *
                    HD
              : 0;
    float sc[G];
#pragma unroll
    for (int h = 0; h < G; h++) sc[h] = 0.0f;
    if (valid) {
#pragma unroll 4
      for (int c = 0; c < HD / E; c++) {
        float kf[E];
        dec_load16<KT>(kc + base + c * E, kf);
#pragma unroll
        for (int h = 0; h < G; h++) {
          if (h >= group) break;
          const float4 *qv = (const float4 *)&qs[h][c * E];
#pragma unroll
          for (int e4 = 0; e4 < E / 4; e4++) {
            const float4 qq = qv[e4];
            sc[h] += qq.x * kf[4 * e4] + qq.y * kf[4 * e4 + 1] + qq.z * kf[4 * e4 + 2] +
                     qq.w * kf[4 * e4 + 3];
          }
        }
      }
    }
    float pr[G];
#pragma unroll
    for (int h = 0; h < G; h++) {
      if (h >= group) break;
      const float mt = cuda_warp_max(valid ? sc[h] : -INFINITY);
      const float mn = fmaxf(m[h], mt); /* finite: lane 0's key is valid */
      const float al = expf(m[h] - mn);
      pr[h] = valid ? expf(sc[h] - mn) : 0.0f;
      l[h] = l[h] * al + cuda_warp_sum(pr[h]);
      m[h] = mn;
#pragma unroll
      for (int n = 0; n < NI; n++) acc[h][n] *= al;
    }
    const int kn = min(32, k_end - k0);
#pragma unroll 4
    for (int j = 0; j < kn; j++) {
      const size_t bj = __shfl_sync(0xffffffffu, base, j);
      float vf[NI];
      dec_load<NI, KT>(vc + bj + d0, vf);
#pragma unroll
      for (int h = 0; h < G; h++) {
        if (h >= group) break;
        const float pj = __shfl_sync(0xffffffffu, pr[h], j);
#pragma unroll
        for (int n = 0; n < NI; n++) acc[h][n] += pj * vf[n];
      }
    }
  }
#pragma unroll
  for (int h = 0; h < G; h++) {
    if (h >= group) break;
#pragma unroll
    for (int n = 0; n < NI; n++) sm_acc[warp][h][d0 + n] = acc[h][n];
    if (lane == 0) {
      sm_m[warp][h] = m[h];
      sm_l[warp][h] = l[h];
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < group * HD; idx += ATT_THREADS) {
    const int h = idx / HD, d = idx % HD;
    float M = -INFINITY;
    for (int w = 0; w < ATT_WARPS; w++)
      if (sm_l[w][h] > 0.0f) M = fmaxf(M, sm_m[w][h]);
    float L = 0.0f, A = 0.0f;
    for (int w = 0; w < ATT_WARPS; w++)
      if (sm_l[w][h] > 0.0f) {
        const float e = expf(sm_m[w][h] - M);
        L += sm_l[w][h] * e;
        A += sm_acc[w][h][d] * e;
      }
    const size_t row = (size_t)t * a.n_head + kvh * group + h;
    if (a.n_splits == 1) {
      a.out[row * HD + d] = L > 0.0f ? A / L : 0.0f;
    } else {
      const size_t wrow = (size_t)split * a.n_tokens * a.n_head + row;
      a.ws_acc[wrow * HD + d] = A;
      if (d == 0) {
        a.ws_ml[2 * wrow] = M;
        a.ws_ml[2 * wrow + 1] = L;
      }
    }
  }
}

/* Keys per block from which the tiled decode kernel is used: a tile of 32 for each warp. */
#define DEC_TILED_MIN_KEYS (32 * ATT_WARPS)

template <int NI, typename KT>
static void attention_decode_launch_ni(cuda_ctx *c, dim3 grid, const att_args &a) {
  const dim3 th(ATT_THREADS);
  if (a.chunk >= DEC_TILED_MIN_KEYS) {
    if (a.group <= 1) cuda_launch_pdl(c, attention_decode_tiled_kernel<NI, 1, KT>, grid, th, 0, a);
    else if (a.group <= 2) cuda_launch_pdl(c, attention_decode_tiled_kernel<NI, 2, KT>, grid, th, 0, a);
    else if (a.group <= 4) cuda_launch_pdl(c, attention_decode_tiled_kernel<NI, 4, KT>, grid, th, 0, a);
    else cuda_launch_pdl(c, attention_decode_tiled_kernel<NI, DEC_MAXG, KT>, grid, th, 0, a);
    return;
  }
  if (a.group <= 1) cuda_launch_pdl(c, attention_decode_kernel<NI, 1, KT>, grid, th, 0, a);
  else if (a.group <= 2) cuda_launch_pdl(c, attention_decode_kernel<NI, 2, KT>, grid, th, 0, a);
  else if (a.group <= 4) cuda_launch_pdl(c, attention_decode_kernel<NI, 4, KT>, grid, th, 0, a);
  else cuda_launch_pdl(c, attention_decode_kernel<NI, DEC_MAXG, KT>, grid, th, 0, a);
}

/* head_dim is a multiple of 32 up to DEC_MAXHD (checked by the caller). */
template <typename KT>
static void attention_decode_launch(cuda_ctx *c, dim3 grid, const att_args &a) {
  if (a.hd == 32) attention_decode_launch_ni<1, KT>(c, grid, a);
  else if (a.hd == 64) attention_decode_launch_ni<2, KT>(c, grid, a);
  else if (a.hd == 96) attention_decode_launch_ni<3, KT>(c, grid, a);
  else attention_decode_launch_ni<4, KT>(c, grid, a);
  CUDA_CHECK_LAUNCH(c, "attention_decode_kernel");
}

template <int NI, typename KT>
static void attention_launch(cuda_ctx *c, dim3 grid, const att_args &a) {
  size_t smem = att_smem_bytes(a.hd);
  /* Above 48 KiB a kernel must opt in; the attribute is cheap to set again. */
  if (smem > 48 * 1024 &&
      CUDA_CHECK(c, cudaFuncSetAttribute(attention_kernel<NI, KT>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem)))
    return;
  attention_kernel<NI, KT><<<grid, ATT_THREADS, smem, c->stream>>>(a);
  CUDA_CHECK_LAUNCH(c, "attention_kernel");
}

template <typename KT>
static void attention_dispatch_ni(cuda_ctx *c, dim3 grid, const att_args &a) {
  int ni = (a.hd + 31) / 32;
  if (ni <= 1) attention_launch<1, KT>(c, grid, a);
  else if (ni <= 2) attention_launch<2, KT>(c, grid, a);
  else if (ni <= 4) attention_launch<4, KT>(c, grid, a);
  else attention_launch<8, KT>(c, grid, a);
}

void cuda_op_attention(void *ctx, const kv_cache *kv, int layer, const float *q, int n_head_l,
                       float scale, float *out) {
  cuda_ctx *c = (cuda_ctx *)ctx;
  if (cuda_graph_op(c, CUDA_OP_ATTENTION, q, out, kv->k[layer], n_head_l, layer)) return;
  if (c->n_tokens <= 0) return;
  const int n_kv = kv->n_kv_l, hd = kv->head_dim;
  if (n_kv <= 0 || n_head_l % n_kv != 0 || hd > 256 || hd <= 0) {
    cuda_fail(c, TS_EUNSUPPORTED,
              "CUDA attention: %d query heads over %d KV heads of dim %d not supported "
              "(heads must be a multiple of KV heads, head_dim <= 256)",
              n_head_l, n_kv, hd);
    return;
  }
  if (c->block_size != kv->block_size) {
    cuda_fail(c, TS_EINVAL, "CUDA attention: the step was staged for another KV cache");
    return;
  }
  /* A sequence with several query tokens: the tensor-core kernel, where it applies. */
  if (c->n_tokens > c->n_seqs && cuda_attention_prefill(c, kv, layer, q, n_head_l, scale, out))
    return;
  /* One token per sequence: the key-split decode kernel, where it applies. */
  if (cuda_attention_decode(c, kv, layer, q, n_head_l, scale, out)) return;
  const int group = n_head_l / n_kv;
  const int hpt = group < CUDA_ATTN_ROWS ? group : CUDA_ATTN_ROWS;
  int tqi = 0; /* largest token tile with tq * hpt <= 16 */
  while (tqi + 1 < CUDA_ATTN_TQ_COUNT && (2 << tqi) * hpt <= CUDA_ATTN_ROWS) tqi++;
  const int head_tiles = (group + hpt - 1) / hpt;

  att_args a;
  a.q = q;
  a.out = out;
  a.kc = kv->k[layer];
  a.vc = kv->v[layer];
  a.tiles = c->d_tiles[tqi];
  a.seq_start = c->d_seq_start;
  a.pos = c->d_pos;
  a.ctx_len = c->d_ctx_len;
  a.block_table = c->d_block_table;
  a.max_blocks = c->max_blocks;
  a.block_size = kv->block_size;
  a.n_kv = n_kv;
  a.n_head = n_head_l;
  a.hd = hd;
  a.group = group;
  a.hpt = hpt;
  a.head_tiles = head_tiles;
  a.tq = 1 << tqi;
  a.n_tokens = c->n_tokens;
  a.scale = scale;

  /* Split the key range only when the grid would leave most multiprocessors idle. */
  int64_t blocks = (int64_t)c->n_tiles[tqi] * n_kv * head_tiles;
  int n_splits = 1, chunk = c->max_ctx > 0 ? c->max_ctx : 1;
  if (c->max_ctx >= 128 && blocks < 2 * (int64_t)c->sm_count) {
    int64_t want = (2 * (int64_t)c->sm_count + blocks - 1) / blocks;
    /* At least 64 keys per split: a decode step of one sequence has only n_kv blocks, each of
     * which streams its keys at a small fraction of the bandwidth, so splitting pays early. */
    int64_t most = (c->max_ctx + 63) / 64;
    n_splits = (int)(want < most ? want : most);
    chunk = (c->max_ctx + n_splits - 1) / n_splits;
    chunk = (chunk + ATT_BK - 1) / ATT_BK * ATT_BK;
    n_splits = (c->max_ctx + chunk - 1) / chunk;
  }
  a.n_splits = n_splits;
  a.chunk = chunk;
  a.ws_acc = a.ws_ml = NULL;
  if (n_splits > 1) {
    size_t rows = (size_t)c->n_tokens * n_head_l * n_splits;
    size_t floats = rows * hd + rows * 2;
    if (cuda_scratch_reserve(c, (void **)&c->attn_ws, &c->attn_ws_cap, floats * sizeof(float)))
      return;
    a.ws_acc = c->attn_ws;
    a.ws_ml = c->attn_ws + rows * hd;
  }

  dim3 grid((unsigned)c->n_tiles[tqi], (unsigned)(n_kv * head_tiles), (unsigned)n_splits);
  /* One token per sequence, a small group and a head_dim of whole warps: the decode kernel
   * (its tiles are the sequences, one block per KV head and split, as in the grid above). */
  /* n_tokens == n_seqs with every sequence in one 16-token tile means one token each. */
  const int decode = c->n_tokens == c->n_seqs && c->n_tiles[CUDA_ATTN_TQ_COUNT - 1] == c->n_seqs &&
                     group <= DEC_MAXG && hd % 32 == 0 &&
                     hd <= DEC_MAXHD && head_tiles == 1;
  if (decode)
    CUDA_DISPATCH_FLOAT(c, kv->dtype, "attention KV cache", KT,
                        attention_decode_launch<KT>(c, grid, a));
  else
    CUDA_DISPATCH_FLOAT(c, kv->dtype, "attention KV cache", KT,
                        attention_dispatch_ni<KT>(c, grid, a));
  if (n_splits > 1 && !c->err_code) {
    cuda_launch_pdl(c, attention_combine_kernel, dim3((unsigned)c->n_tokens, (unsigned)n_head_l),
                    dim3(128), 0, (const float *)a.ws_acc, (const float *)a.ws_ml, n_splits,
                    c->n_tokens * n_head_l, hd, out);
    CUDA_CHECK_LAUNCH(c, "attention_combine_kernel");
  }
}
