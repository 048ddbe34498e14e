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

  const size_t sk = (size_t)s * a.n_kv + kvh;
  for (int idx = tid; idx < group * HD; idx += AD_THREADS) {
    const int h = idx / HD, d = idx % HD;
    float M = sm_m[0][h], L = sm_l[0][h], A = sm_acc[0][h][d];
#pragma unroll
    for (int w = 1; w < AD_WARPS; w++) ad_merge<1>(M, L, &A, sm_m[w][h], sm_l[w][h], &sm_acc[w][h][d]);
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
  if (tid == 0) sm_last = atomicAdd(&a.cnt[sk], 1u) == (unsigned)(live - 1);
  __syncthreads();
  if (!sm_last) return;
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
  if (hd == 64)
    CUDA_DISPATCH_FLOAT(c, kv->dtype, "attention KV cache", KT,
                        ad_launch<64, KT>(c, grid, a, unroll));
  else
    CUDA_DISPATCH_FLOAT(c, kv->dtype, "attention KV cache", KT,
                        ad_launch<128, KT>(c, grid, a, unroll));
  CUDA_CHECK_LAUNCH(c, "attention_decode_split_kernel");
  return 1;
}
