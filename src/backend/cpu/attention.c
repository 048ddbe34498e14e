/* CPU causal attention over the paged KV cache. One work item is one (token, KV head): it walks
 * the token's sequence through the staged block table up to its own position (causal) for the
 * query heads that share the KV head, with a max-subtracted softmax in float32. */
#include <math.h>
#include <string.h>

#include "backend/cpu/cpu_backend.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define ATT_TGT __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

ATT_TGT static float dot_avx512(const float *a, const float *b, int n) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
  }
  for (; i < n; i += 16) {
    __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
    s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

/* o += w * v   o, v [n] */
ATT_TGT static void axpy_avx512(float *o, float w, const float *v, int n) {
  __m512 wv = _mm512_set1_ps(w);
  int i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(o + i, _mm512_fmadd_ps(wv, _mm512_loadu_ps(v + i), _mm512_loadu_ps(o + i)));
  if (i < n) {
    __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(o + i, m,
                          _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, v + i),
                                          _mm512_maskz_loadu_ps(m, o + i)));
  }
}
#endif

typedef struct {
  cpu_ctx *c;
  const kv_cache *kv;
  int layer;
  const float *q; /* [n_tokens][n_head_l][hd] */
  int n_head_l;
  float scale;
  float *out;     /* [n_tokens][n_head_l][hd] */
} attn_job;

/* One item is one (token, KV head): the group of query heads sharing that KV head walks the keys
 * together, so each K and V row is read once per group. Per query head the arithmetic (dot,
 * softmax, weighted sum, in key order) is the same as one head alone would do. */
static void attn_items(void *arg, int64_t i0, int64_t i1, int thread) {
  attn_job *j = arg;
  cpu_ctx *c = j->c;
  const kv_cache *kv = j->kv;
  const int hd = kv->head_dim, n_kv = kv->n_kv_l, bs = kv->block_size;
  const int group = j->n_head_l / n_kv;
  const float *K = kv->k[j->layer], *V = kv->v[j->layer]; /* [n_blocks][bs][n_kv][hd] */
  const size_t stride = (size_t)c->max_ctx + 1;
  float *scores = cpu_scratch(c, thread); /* [group][max_ctx + 1] */
#if defined(__x86_64__)
  const int simd512 = c->simd >= CPU_ISA_AVX512;
#endif
  for (int64_t it = i0; it < i1; it++) {
    int t = (int)(it / n_kv), kvh = (int)(it % n_kv);
    const int32_t *table = c->block_table + (size_t)c->tok_seq[t] * c->max_blocks;
    const size_t h0 = (size_t)t * j->n_head_l + (size_t)kvh * group; /* first query head */
    int n_ctx = c->pos[t] + 1; /* keys at positions 0..pos */
    for (int p = 0; p < n_ctx; p++) {
      size_t row = (size_t)table[p / bs] * bs + (size_t)(p % bs);
      const float *kr = K + (row * n_kv + kvh) * hd;
      for (int g = 0; g < group; g++) {
        const float *qv = j->q + (h0 + g) * hd;
#if defined(__x86_64__)
        float s = (simd512 ? dot_avx512(qv, kr, hd) : cpu_dot(c, qv, kr, hd)) * j->scale;
#else
        float s = cpu_dot(c, qv, kr, hd) * j->scale;
#endif
        scores[g * stride + p] = s;
      }
    }
    for (int g = 0; g < group; g++) {
      float *sc = scores + g * stride;
      float mx = -INFINITY;
      for (int p = 0; p < n_ctx; p++)
        if (sc[p] > mx) mx = sc[p];
      float sum = 0;
      for (int p = 0; p < n_ctx; p++) {
        sc[p] = expf(sc[p] - mx);
        sum += sc[p];
      }
      float inv = 1.0f / sum;
      for (int p = 0; p < n_ctx; p++) sc[p] *= inv;
      memset(j->out + (h0 + g) * hd, 0, (size_t)hd * sizeof(float));
    }
    for (int p = 0; p < n_ctx; p++) {
      size_t row = (size_t)table[p / bs] * bs + (size_t)(p % bs);
      const float *vr = V + (row * n_kv + kvh) * hd;
      for (int g = 0; g < group; g++) {
        float *o = j->out + (h0 + g) * hd;
        float w = scores[g * stride + p];
#if defined(__x86_64__)
        if (simd512) {
          axpy_avx512(o, w, vr, hd);
          continue;
        }
#endif
        for (int d = 0; d < hd; d++) o[d] += w * vr[d];
      }
    }
  }
}

void cpu_attention(void *ctx, const kv_cache *kv, int layer, const float *q, int n_head_l,
                   float scale, float *out) {
  cpu_ctx *c = ctx;
  int64_t items = (int64_t)c->n_tokens * kv->n_kv_l;
  if (items <= 0) return;
  if (cpu_scratch_reserve(c, ((size_t)c->max_ctx + 1) * (size_t)(n_head_l / kv->n_kv_l)) < 0) {
    for (int64_t i = 0; i < (int64_t)c->n_tokens * n_head_l * kv->head_dim; i++) out[i] = NAN;
    return;
  }
  attn_job j = {c, kv, layer, q, n_head_l, scale, out};
  threadpool_parallel_for(c->pool, items, 1, attn_items, &j);
}
