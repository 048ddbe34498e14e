/* Token sampling on the device, one block per logits row, in the host sampler's order
 * (engine/sampling.c): repetition, frequency and presence penalties over the row's seen ids,
 * temperature, then min-p, top-k and top-p truncation, then a draw.
 *
 * Greedy rows (temperature < 1e-5, or no finite logit) take the argmax with the host's rule:
 * largest value, lowest id on ties, NaN never wins. Truncation never sorts: top-k finds the k-th
 * largest logit by a radix select over the float's order-preserving bit pattern (four passes of
 * 8-bit digits with a shared-memory histogram), top-p finds the smallest top prefix whose
 * probability mass reaches top_p the same way with the histogram weighted by mass. Ties at either
 * cut are broken as the host's sort breaks them, lowest ids first. Masses are summed in 40-bit
 * fixed point with integer atomics, so the cut does not depend on the order threads add in.
 *
 * The draw is the Gumbel-max trick: the kept token maximising logit / T + G, where G is a Gumbel
 * variate from a hash of (seed, counter, id). That is an exact draw from the truncated softmax,
 * and it depends only on the row's own values, never on the batch or the launch shape. */
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "graph.cuh"
#include "sample.cuh"

#define SAMP_THREADS 1024
#define SAMP_WARPS (SAMP_THREADS / 32)
#define SAMP_GREEDY_EPS 1e-5f
#define SAMP_FIX 1099511627776.0 /* 2^40: fixed-point scale of a probability mass */

struct samp_row {
  float temperature, top_p, min_p;
  int top_k;
  float presence, frequency, repetition;
  int pen_off, n_pen, pad;
  unsigned long long seed, counter;
};

/* Float order as unsigned order (NaN excluded by the callers). */
__device__ __forceinline__ uint32_t samp_key(float v) {
  uint32_t u = __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ unsigned long long samp_mix(unsigned long long z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/* a beats b: larger value, NaN below everything, lower id on ties (and among NaNs). */
__device__ __forceinline__ bool samp_better(float av, int ai, float bv, int bi) {
  bool an = isnan(av), bn = isnan(bv);
  if (an || bn) return an && bn ? ai < bi : bn;
  return av > bv || (av == bv && ai < bi);
}

/* Block-wide argmax of (v, i) pairs; every thread gets the winner. */
__device__ void samp_block_argmax(float &v, int &i, float *sv, int *si) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    float ov = __shfl_xor_sync(0xffffffffu, v, o);
    int oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (samp_better(ov, oi, v, i)) {
      v = ov;
      i = oi;
    }
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();
  if (lane == 0) {
    sv[warp] = v;
    si[warp] = i;
  }
  __syncthreads();
  v = sv[0];
  i = si[0];
  for (int w = 1; w < SAMP_WARPS; w++)
    if (samp_better(sv[w], si[w], v, i)) {
      v = sv[w];
      i = si[w];
    }
}

__device__ unsigned long long samp_block_sum(unsigned long long x, unsigned long long *sh) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = x;
  __syncthreads();
  unsigned long long t = 0;
  for (int w = 0; w < SAMP_WARPS; w++) t += sh[w];
  return t;
}

struct samp_state {
  const float *x;
  int vocab;
  float inv;      /* 1/T applied to every logit (1 when greedy or T == 1) */
  float min_f;    /* candidates: value >= min_f (min-p), never NaN */
  float mx;       /* largest scaled logit */
  uint32_t k_key; /* top-k cut: key > k_key, or == k_key with id <= k_cut */
  int k_cut;
  uint32_t p_key; /* top-p cut, the same way */
  int p_cut;

  __device__ float val(int i) const { return inv == 1.0f ? x[i] : x[i] * inv; }
  __device__ bool cand(float v) const { return v >= min_f; }
  __device__ bool in_k(uint32_t key, int i) const {
    return key > k_key || (key == k_key && i <= k_cut);
  }
  __device__ bool in_p(uint32_t key, int i) const {
    return key > p_key || (key == p_key && i <= p_cut);
  }
  __device__ unsigned long long mass(float v) const {
    return (unsigned long long)((double)expf(v - mx) * SAMP_FIX);
  }
};

/* The id of the need-th element (1-based, in id order) with key == key among those passing
 * stage (1: candidates, 2: also within top-k). Every thread gets it. */
__device__ int samp_tie_cut(const samp_state &s, int stage, uint32_t key, long long need,
                            int *s_warp, int *s_cut) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (threadIdx.x == 0) *s_cut = s.vocab - 1;
  long long running = 0;
  for (int base = 0; base < s.vocab; base += SAMP_THREADS) {
    const int i = base + threadIdx.x;
    bool f = false;
    if (i < s.vocab) {
      float v = s.val(i);
      if (s.cand(v)) {
        uint32_t kk = samp_key(v);
        f = kk == key && (stage < 2 || s.in_k(kk, i));
      }
    }
    unsigned ballot = __ballot_sync(0xffffffffu, f);
    __syncthreads(); /* the previous tile's counts are read */
    if (lane == 0) s_warp[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, total = 0;
    for (int w = 0; w < SAMP_WARPS; w++) {
      if (w < warp) before += s_warp[w];
      total += s_warp[w];
    }
    long long rank = running + before + __popc(ballot & ((1u << lane) - 1)) + 1;
    if (f && rank == need) *s_cut = i;
    running += total;
    if (running >= need) break; /* block-uniform */
  }
  __syncthreads();
  return *s_cut;
}

/* Radix select from the top over the keys of the elements passing stage. By count (mass ==
 * false): the key of the need-th largest; by mass: the key at which the mass of the larger keys
 * plus the bin's reaches need. Leaves in *above the count or mass strictly above the returned
 * key, in *at_count the elements at it. */
__device__ uint32_t samp_select(const samp_state &s, int stage, bool by_mass,
                                unsigned long long need, unsigned long long *hist,
                                unsigned int *cnt, unsigned long long *above,
                                unsigned int *at_count, unsigned int *s_sel) {
  uint32_t prefix = 0, pmask = 0;
  unsigned long long acc = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += SAMP_THREADS) {
      hist[b] = 0;
      cnt[b] = 0;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < s.vocab; i += SAMP_THREADS) {
      float v = s.val(i);
      if (!s.cand(v)) continue;
      uint32_t key = samp_key(v);
      if ((key & pmask) != prefix || (stage >= 2 && !s.in_k(key, i))) continue;
      int b = (key >> shift) & 255;
      atomicAdd(&cnt[b], 1u);
      if (by_mass) atomicAdd(&hist[b], s.mass(v));
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int sel = -1, low = -1;
      for (int b = 255; b >= 0; b--) {
        if (!cnt[b]) continue;
        low = b;
        unsigned long long w = by_mass ? hist[b] : cnt[b];
        if (acc + w >= need) {
          sel = b;
          break;
        }
        acc += w;
      }
      if (sel < 0) { /* rounding left the total short of need: keep down to the lowest bin */
        sel = low < 0 ? 0 : low;
        if (low >= 0) acc -= by_mass ? hist[low] : cnt[low];
      }
      *s_sel = (unsigned)sel;
      *at_count = cnt[sel];
      *above = acc;
    }
    __syncthreads();
    acc = *above;
    prefix |= *s_sel << shift;
    pmask |= 255u << shift;
    __syncthreads();
  }
  return prefix;
}

__global__ void __launch_bounds__(SAMP_THREADS)
    sample_kernel(float *logits, int vocab, const samp_row *rows, const int32_t *pen_ids,
                  const int32_t *pen_counts, int32_t *out) {
  __shared__ float s_v[SAMP_WARPS];
  __shared__ int s_i[SAMP_WARPS];
  __shared__ unsigned long long s_u[SAMP_WARPS];
  __shared__ unsigned long long hist[256];
  __shared__ unsigned int cnt[256];
  __shared__ unsigned long long s_above;
  __shared__ unsigned int s_at, s_sel;
  __shared__ int s_cut;
  const samp_row P = rows[blockIdx.x];
  float *x = logits + (size_t)blockIdx.x * vocab;

  /* Penalties: ids are distinct, so no two threads touch one logit. */
  for (int j = threadIdx.x; j < P.n_pen; j += SAMP_THREADS) {
    const int id = pen_ids[P.pen_off + j];
    if (id < 0 || id >= vocab) continue;
    float l = x[id];
    if (P.repetition != 1.0f) l = l > 0 ? l / P.repetition : l * P.repetition;
    const int c = pen_counts[P.pen_off + j];
    if (c) l -= P.frequency * (float)c + P.presence;
    x[id] = l;
  }
  __syncthreads();

  const bool greedy = P.temperature < SAMP_GREEDY_EPS;
  samp_state s;
  s.x = x;
  s.vocab = vocab;
  s.inv = greedy || P.temperature == 1.0f ? 1.0f : 1.0f / P.temperature;
  s.min_f = -INFINITY;
  s.k_key = 0;
  s.k_cut = vocab;
  s.p_key = 0;
  s.p_cut = vocab;

  float bv = NAN;
  int bi = INT_MAX;
  for (int i = threadIdx.x; i < vocab; i += SAMP_THREADS) {
    float v = s.val(i);
    if (samp_better(v, i, bv, bi)) {
      bv = v;
      bi = i;
    }
  }
  samp_block_argmax(bv, bi, s_v, s_i);
  if (greedy || !isfinite(bv)) {
    if (threadIdx.x == 0) out[blockIdx.x] = bi;
    return;
  }
  s.mx = bv;
  if (P.min_p > 0) {
    /* The smallest float >= mx + log(min_p) in double, the host's comparison. */
    double lim = (double)bv + log((double)P.min_p);
    float f = (float)lim;
    if ((double)f < lim) f = nextafterf(f, INFINITY);
    s.min_f = f;
  }

  unsigned long long n_cand = 0;
  for (int i = threadIdx.x; i < vocab; i += SAMP_THREADS) n_cand += s.cand(s.val(i));
  n_cand = samp_block_sum(n_cand, s_u);

  if (P.top_k > 0 && (unsigned long long)P.top_k < n_cand) {
    uint32_t key = samp_select(s, 1, false, (unsigned long long)P.top_k, hist, cnt, &s_above,
                               &s_at, &s_sel);
    long long need = (long long)P.top_k - (long long)s_above;
    s.k_key = key;
    s.k_cut = need >= (long long)s_at ? vocab : samp_tie_cut(s, 1, key, need, s_i, &s_cut);
  }
  if (P.top_p < 1.0f) {
    unsigned long long total = 0;
    for (int i = threadIdx.x; i < vocab; i += SAMP_THREADS) {
      float v = s.val(i);
      if (s.cand(v) && s.in_k(samp_key(v), i)) total += s.mass(v);
    }
    total = samp_block_sum(total, s_u);
    unsigned long long target = (unsigned long long)((double)P.top_p * (double)total);
    if (target < 1) target = 1;
    uint32_t key = samp_select(s, 2, true, target, hist, cnt, &s_above, &s_at, &s_sel);
    /* Ties at the cut share one mass: take as many (lowest ids first) as reach the target. */
    unsigned long long w = 0;
    {
      uint32_t u = key & 0x80000000u ? key & 0x7FFFFFFFu : ~key;
      w = s.mass(__uint_as_float(u));
    }
    long long need = (long long)s_at;
    if (w > 0 && target > s_above) {
      unsigned long long k = (target - s_above + w - 1) / w;
      if (k < (unsigned long long)need) need = (long long)k;
    }
    if (need < 1) need = 1;
    s.p_key = key;
    s.p_cut = need >= (long long)s_at ? vocab : samp_tie_cut(s, 2, key, need, s_i, &s_cut);
  }

  /* Gumbel-max over the kept tokens. */
  const unsigned long long h = samp_mix(P.seed ^ samp_mix(P.counter + 0x632BE59BD9B4E019ull));
  float gv = NAN;
  int gi = INT_MAX;
  for (int i = threadIdx.x; i < vocab; i += SAMP_THREADS) {
    float v = s.val(i);
    if (!s.cand(v)) continue;
    uint32_t key = samp_key(v);
    if (!s.in_k(key, i) || !s.in_p(key, i)) continue;
    unsigned long long z = samp_mix(h ^ ((unsigned long long)i * 0xD1B54A32D192ED03ull));
    float u = ((float)(z >> 40) + 0.5f) * 5.9604644775390625e-8f; /* (0, 1), 24 bits */
    float g = v - logf(-logf(u));
    if (samp_better(g, i, gv, gi)) {
      gv = g;
      gi = i;
    }
  }
  samp_block_argmax(gv, gi, s_v, s_i);
  if (threadIdx.x == 0) out[blockIdx.x] = gi < vocab ? gi : bi;
}

/* Grows a pinned host or a device buffer. The previous call synchronised, so nothing reads the
 * old one, and no graph holds it (sampling runs outside them), so graphs are kept. */
static int samp_reserve(cuda_ctx *c, void **buf, size_t *cap, size_t bytes, int host) {
  if (*cap >= bytes && *buf) return 0;
  if (*buf) host ? cudaFreeHost(*buf) : cudaFree(*buf);
  *buf = NULL;
  *cap = 0;
  size_t want = bytes + bytes / 2 + 4096;
  if (CUDA_CHECK(c, host ? cudaMallocHost(buf, want) : cudaMalloc(buf, want))) return -1;
  *cap = want;
  return 0;
}

int cuda_op_sample(void *ctx, float *logits, int n, int vocab, const ts_sample_row *rows,
                   int32_t *ids, ts_err *err) {
  cuda_ctx *c = (cuda_ctx *)ctx;
  /* The rows' parameters change every step: run eagerly after the step's graph. */
  cuda_prof_mark(c, CUDA_OP_SAMPLE);
  if (cuda_graph_flush(c) || c->err_code) return ts_errorf(err, c->err_code, "%s", c->err_msg);
  if (n <= 0) return 0;
  if (vocab <= 0) return ts_errorf(err, TS_EINVAL, "CUDA sample: vocabulary of %d", vocab);
  size_t n_pen = 0;
  for (int r = 0; r < n; r++) {
    if (rows[r].n_penalty < 0 || (rows[r].n_penalty > 0 && (!rows[r].penalty_ids ||
                                                             !rows[r].penalty_counts)))
      return ts_errorf(err, TS_EINVAL, "CUDA sample: row %d has a malformed penalty list", r);
    n_pen += (size_t)rows[r].n_penalty;
  }
  size_t off_pen = (size_t)n * sizeof(samp_row);
  size_t off_cnt = off_pen + n_pen * 4;
  size_t off_out = off_cnt + n_pen * 4;
  off_out = (off_out + 15) & ~(size_t)15;
  size_t total = off_out + (size_t)n * 4;
  if (samp_reserve(c, &c->samp_host, &c->samp_host_cap, total, 1) ||
      samp_reserve(c, &c->samp_dev, &c->samp_dev_cap, total, 0))
    return ts_errorf(err, c->err_code, "%s", c->err_msg);
  char *h = (char *)c->samp_host;
  samp_row *hr = (samp_row *)h;
  int32_t *hp = (int32_t *)(h + off_pen), *hc = (int32_t *)(h + off_cnt);
  size_t k = 0;
  for (int r = 0; r < n; r++) {
    const ts_sample_row *q = &rows[r];
    samp_row *o = &hr[r];
    memset(o, 0, sizeof *o);
    o->temperature = q->temperature;
    o->top_p = q->top_p;
    o->min_p = q->min_p;
    o->top_k = q->top_k;
    o->presence = q->presence_penalty;
    o->frequency = q->frequency_penalty;
    o->repetition = q->repetition_penalty;
    o->pen_off = (int)k;
    o->seed = q->seed;
    o->counter = q->counter;
    /* Penalties that change nothing are not sent. */
    if (q->repetition_penalty != 1.0f || q->frequency_penalty != 0.0f ||
        q->presence_penalty != 0.0f) {
      o->n_pen = q->n_penalty;
      if (q->n_penalty) {
        memcpy(hp + k, q->penalty_ids, (size_t)q->n_penalty * 4);
        memcpy(hc + k, q->penalty_counts, (size_t)q->n_penalty * 4);
      }
      k += (size_t)q->n_penalty;
    }
  }
  char *d = (char *)c->samp_dev;
  if (CUDA_CHECK(c, cudaMemcpyAsync(d, h, off_out, cudaMemcpyHostToDevice, c->stream)))
    return ts_errorf(err, c->err_code, "%s", c->err_msg);
  cuda_stats_ready(c);
  sample_kernel<<<(unsigned)n, SAMP_THREADS, 0, c->stream>>>(
      logits, vocab, (const samp_row *)d, (const int32_t *)(d + off_pen),
      (const int32_t *)(d + off_cnt), (int32_t *)(d + off_out));
  if (CUDA_CHECK_LAUNCH(c, "sample_kernel") ||
      CUDA_CHECK(c, cudaMemcpyAsync(h + off_out, d + off_out, (size_t)n * 4,
                                    cudaMemcpyDeviceToHost, c->stream)) ||
      CUDA_CHECK(c, cudaStreamSynchronize(c->stream)))
    return ts_errorf(err, c->err_code, "%s", c->err_msg);
  cuda_stats_done(c);
  memcpy(ids, h + off_out, (size_t)n * 4);
  cuda_prof_mark(c, 0);
  return 0;
}
