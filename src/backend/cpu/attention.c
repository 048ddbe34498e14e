/* CPU causal attention over the paged KV cache. The portable path (also the reference) takes one
 * (token, KV head) per work item: dot products, a max-subtracted softmax, a weighted sum of V in
 * float32. The AVX-512 path is a blocked online-softmax attention over tiles of query rows (the
 * GQA group's heads x consecutive tokens of one sequence) that walks the keys in blocks of 16 at
 * absolute positions, so each query row's arithmetic is the same whatever tile or step it is in
 * (batch invariance: chunked prefill and decode give bit-identical outputs). */
#include <math.h>
#include <string.h>

#include "backend/cpu/cpu_backend.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define ATT_TGT __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define ATT_INL __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx512dq,fma"))) static inline

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

/* e^x for 16 floats, x <= ~88: x = n ln2 + r with |r| <= ln2/2 (ln2 split in two so n ln2 is
 * exact enough), e^r by its degree-7 Taylor polynomial (truncation < 6e-9 relative), times 2^n
 * with scalef, which also underflows cleanly to 0 for very negative x. The clamp at -120 keeps
 * -inf from turning r into NaN (e^-120 is below the smallest float anyway). */
ATT_INL __m512 exp_avx512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-120.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723212e-6f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

ATT_TGT static void exp_avx512_n(const float *x, float *y, int n) {
  int i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, exp_avx512(_mm512_loadu_ps(x + i)));
  if (i < n) {
    __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(y + i, m, exp_avx512(_mm512_maskz_loadu_ps(m, x + i)));
  }
}
#endif

void cpu_exp_f32(const float *x, float *y, int n) {
#if defined(__x86_64__)
  if (__builtin_cpu_supports("avx512f")) {
    exp_avx512_n(x, y, n);
    return;
  }
#endif
  for (int i = 0; i < n; i++) y[i] = expf(x[i]);
}

typedef struct {
  cpu_ctx *c;
  const kv_cache *kv;
  int layer;
  const float *q; /* [n_tokens][n_head_l][hd] */
  int n_head_l;
  float scale;
  float *out;     /* [n_tokens][n_head_l][hd] */
  int tile_tokens; /* blocked path: tokens per tile */
  int n_tiles;
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

#if defined(__x86_64__)
/* The blocked path. Key blocks are KB keys at absolute positions [KB b, KB b + KB). */
#define KB 16
#define TILE_ROWS 32 /* query rows per tile (at least one token's group) */

/* Kt[d][k] = rows[k][d] for a KB-key block, 16 dims at a time (16x16 transposes in registers).
 * Kt [hd][KB]; rows[k] [hd] */
ATT_TGT static void transpose_block(const float *const *rows, int hd, float *Kt) {
  for (int d0 = 0; d0 < hd; d0 += 16) {
    __m512 r[16], t[16];
#pragma GCC unroll 16
    for (int k = 0; k < 16; k++) r[k] = _mm512_loadu_ps(rows[k] + d0);
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++) {
      t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    /* r[4k + c], lane L: column 4L + c of rows 4k..4k+3 */
#pragma GCC unroll 4
    for (int k = 0; k < 4; k++) {
      __m512d a = _mm512_castps_pd(t[4 * k]), b = _mm512_castps_pd(t[4 * k + 2]);
      __m512d e = _mm512_castps_pd(t[4 * k + 1]), f = _mm512_castps_pd(t[4 * k + 3]);
      r[4 * k] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
      r[4 * k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
      r[4 * k + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(e, f));
      r[4 * k + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(e, f));
    }
#pragma GCC unroll 4
    for (int c = 0; c < 4; c++) {
      __m512 x = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88), y = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xdd);
      __m512 x2 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
      __m512 y2 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xdd);
      _mm512_storeu_ps(Kt + (size_t)(d0 + c) * KB, _mm512_shuffle_f32x4(x, x2, 0x88));
      _mm512_storeu_ps(Kt + (size_t)(d0 + 4 + c) * KB, _mm512_shuffle_f32x4(y, y2, 0x88));
      _mm512_storeu_ps(Kt + (size_t)(d0 + 8 + c) * KB, _mm512_shuffle_f32x4(x, x2, 0xdd));
      _mm512_storeu_ps(Kt + (size_t)(d0 + 12 + c) * KB, _mm512_shuffle_f32x4(y, y2, 0xdd));
    }
  }
}

/* Raw scores of query rows against one key block: s[r][k] = sum_d q[r][d] Kt[d][k], even and
 * odd d in two chains added at the end; the four-row and one-row kernels do the same per row.
 * q[r] [hd]; s [rows][KB] */
ATT_TGT static void scores_4(const float *Kt, int hd, const float *const *q, float *s) {
  const float *q0 = q[0], *q1 = q[1], *q2 = q[2], *q3 = q[3];
  __m512 a0 = _mm512_setzero_ps(), b0 = a0, a1 = a0, b1 = a0, a2 = a0, b2 = a0, a3 = a0, b3 = a0;
  for (int d = 0; d < hd; d += 2) {
    __m512 k0 = _mm512_loadu_ps(Kt + (size_t)d * KB), k1 = _mm512_loadu_ps(Kt + (size_t)(d + 1) * KB);
    a0 = _mm512_fmadd_ps(_mm512_set1_ps(q0[d]), k0, a0);
    b0 = _mm512_fmadd_ps(_mm512_set1_ps(q0[d + 1]), k1, b0);
    a1 = _mm512_fmadd_ps(_mm512_set1_ps(q1[d]), k0, a1);
    b1 = _mm512_fmadd_ps(_mm512_set1_ps(q1[d + 1]), k1, b1);
    a2 = _mm512_fmadd_ps(_mm512_set1_ps(q2[d]), k0, a2);
    b2 = _mm512_fmadd_ps(_mm512_set1_ps(q2[d + 1]), k1, b2);
    a3 = _mm512_fmadd_ps(_mm512_set1_ps(q3[d]), k0, a3);
    b3 = _mm512_fmadd_ps(_mm512_set1_ps(q3[d + 1]), k1, b3);
  }
  _mm512_storeu_ps(s, _mm512_add_ps(a0, b0));
  _mm512_storeu_ps(s + KB, _mm512_add_ps(a1, b1));
  _mm512_storeu_ps(s + 2 * KB, _mm512_add_ps(a2, b2));
  _mm512_storeu_ps(s + 3 * KB, _mm512_add_ps(a3, b3));
}

ATT_TGT static void scores_1(const float *Kt, int hd, const float *q0, float *s) {
  __m512 a0 = _mm512_setzero_ps(), b0 = a0;
  for (int d = 0; d < hd; d += 2) {
    a0 = _mm512_fmadd_ps(_mm512_set1_ps(q0[d]), _mm512_loadu_ps(Kt + (size_t)d * KB), a0);
    b0 = _mm512_fmadd_ps(_mm512_set1_ps(q0[d + 1]), _mm512_loadu_ps(Kt + (size_t)(d + 1) * KB), b0);
  }
  _mm512_storeu_ps(s, _mm512_add_ps(a0, b0));
}

/* o[r] += sum_{k < nk} p[r][k] V[k], in key order per element; the four-row kernel (nk = KB)
 * and the one-row kernel do the same per row.   o[r] [hd]; p[r] [KB]; v[k] [hd] */
ATT_TGT static void pv_4(float *const *o, const float *const *p, const float *const *v, int hd) {
  const float *p0 = p[0], *p1 = p[1], *p2 = p[2], *p3 = p[3];
  for (int d = 0; d < hd; d += 32) {
    __m512 a0 = _mm512_loadu_ps(o[0] + d), b0 = _mm512_loadu_ps(o[0] + d + 16);
    __m512 a1 = _mm512_loadu_ps(o[1] + d), b1 = _mm512_loadu_ps(o[1] + d + 16);
    __m512 a2 = _mm512_loadu_ps(o[2] + d), b2 = _mm512_loadu_ps(o[2] + d + 16);
    __m512 a3 = _mm512_loadu_ps(o[3] + d), b3 = _mm512_loadu_ps(o[3] + d + 16);
    for (int k = 0; k < KB; k++) {
      __m512 v0 = _mm512_loadu_ps(v[k] + d), v1 = _mm512_loadu_ps(v[k] + d + 16), w;
      w = _mm512_set1_ps(p0[k]);
      a0 = _mm512_fmadd_ps(w, v0, a0);
      b0 = _mm512_fmadd_ps(w, v1, b0);
      w = _mm512_set1_ps(p1[k]);
      a1 = _mm512_fmadd_ps(w, v0, a1);
      b1 = _mm512_fmadd_ps(w, v1, b1);
      w = _mm512_set1_ps(p2[k]);
      a2 = _mm512_fmadd_ps(w, v0, a2);
      b2 = _mm512_fmadd_ps(w, v1, b2);
      w = _mm512_set1_ps(p3[k]);
      a3 = _mm512_fmadd_ps(w, v0, a3);
      b3 = _mm512_fmadd_ps(w, v1, b3);
    }
    _mm512_storeu_ps(o[0] + d, a0);
    _mm512_storeu_ps(o[0] + d + 16, b0);
    _mm512_storeu_ps(o[1] + d, a1);
    _mm512_storeu_ps(o[1] + d + 16, b1);
    _mm512_storeu_ps(o[2] + d, a2);
    _mm512_storeu_ps(o[2] + d + 16, b2);
    _mm512_storeu_ps(o[3] + d, a3);
    _mm512_storeu_ps(o[3] + d + 16, b3);
  }
}

ATT_TGT static void pv_1(float *o, const float *p, const float *const *v, int nk, int hd) {
  for (int d = 0; d < hd; d += 32) {
    __m512 a0 = _mm512_loadu_ps(o + d), b0 = _mm512_loadu_ps(o + d + 16);
    for (int k = 0; k < nk; k++) {
      __m512 w = _mm512_set1_ps(p[k]);
      a0 = _mm512_fmadd_ps(w, _mm512_loadu_ps(v[k] + d), a0);
      b0 = _mm512_fmadd_ps(w, _mm512_loadu_ps(v[k] + d + 16), b0);
    }
    _mm512_storeu_ps(o + d, a0);
    _mm512_storeu_ps(o + d + 16, b0);
  }
}

/* Scores of n rows, four at a time and then singly. */
ATT_TGT static void scores_all(const float *Kt, int hd, const float *const *q, float *s, int n) {
  int r = 0;
  for (; r + 4 <= n; r += 4) scores_4(Kt, hd, q + r, s + r * KB);
  for (; r < n; r++) scores_1(Kt, hd, q[r], s + r * KB);
}

/* One work item: the query rows of tokens [t0, t1) (one sequence) x the group of KV head kvh.
 * Per row: running max m, running sum as 16 lanes l (reduced once at the end), output
 * accumulated unnormalised in place. */
ATT_TGT static void attn_tile(attn_job *j, int t0, int t1, int kvh, float *scratch) {
  cpu_ctx *c = j->c;
  const kv_cache *kv = j->kv;
  const int hd = kv->head_dim, n_kv = kv->n_kv_l, bs = kv->block_size;
  const int group = j->n_head_l / n_kv;
  const float *K = kv->k[j->layer], *V = kv->v[j->layer]; /* [n_blocks][bs][n_kv][hd] */
  const int32_t *table = c->block_table + (size_t)c->tok_seq[t0] * c->max_blocks;
  const int nrow = (t1 - t0) * group;
  float *Kt = scratch;                       /* [hd][KB] */
  float *S = Kt + (size_t)hd * KB;           /* [nrow][KB] scores, then probabilities */
  float *L = S + (size_t)TILE_ROWS * KB;     /* [nrow][KB] running sums */
  float *M = L + (size_t)TILE_ROWS * KB;     /* [nrow] running maxima */
  float *zero = M + TILE_ROWS;               /* [hd] stands in for keys past the tile's last */
  float *Vb = zero + hd;                     /* [KB][hd] the block's values, contiguous */
  memset(zero, 0, (size_t)hd * sizeof(float));
  const float *qr[TILE_ROWS], *aq[TILE_ROWS], *krow[KB], *vrow[KB];
  float *orow[TILE_ROWS];
  int rpos[TILE_ROWS], act[TILE_ROWS], maxpos = 0;
  const __m512 scale = _mm512_set1_ps(j->scale);
  for (int i = 0; i < nrow; i++) {
    int t = t0 + i / group;
    size_t h = (size_t)t * j->n_head_l + (size_t)kvh * group + (size_t)(i % group);
    qr[i] = j->q + h * hd;
    orow[i] = j->out + h * hd;
    rpos[i] = c->pos[t];
    if (rpos[i] > maxpos) maxpos = rpos[i];
  }
  for (int b = 0; b * KB <= maxpos; b++) {
    int kbase = b * KB, nact = 0;
    for (int i = 0; i < nrow; i++)
      if (rpos[i] >= kbase) act[nact++] = i;
    if (nact == 0) continue;
    for (int k = 0; k < KB; k++) {
      int p = kbase + k;
      if (p > maxpos) {
        krow[k] = vrow[k] = zero;
        continue;
      }
      size_t row = (size_t)table[p / bs] * bs + (size_t)(p % bs);
      krow[k] = K + (row * n_kv + kvh) * hd;
      vrow[k] = V + (row * n_kv + kvh) * hd;
    }
    transpose_block(krow, hd, Kt);
    /* The cache's rows are n_kv * hd floats apart (often 4 KB: one L1 set for all 16), so the
     * block's values are gathered once into a contiguous copy that every row group reads. */
    for (int k = 0; k < KB; k++) {
      for (int d = 0; d < hd; d += 16) _mm512_storeu_ps(Vb + k * hd + d, _mm512_loadu_ps(vrow[k] + d));
      vrow[k] = Vb + k * hd;
    }
    for (int a = 0; a < nact; a++) aq[a] = qr[act[a]];
    scores_all(Kt, hd, aq, S, nact);
    /* Online softmax per active row; S[a] becomes the block's probabilities (0 past the row's
     * own position). */
    for (int a = 0; a < nact; a++) {
      int i = act[a], nk = rpos[i] - kbase + 1;
      __mmask16 m = nk >= KB ? (__mmask16)0xffff : (__mmask16)((1u << nk) - 1);
      __m512 s = _mm512_mask_mul_ps(_mm512_set1_ps(-INFINITY), m, _mm512_loadu_ps(S + a * KB), scale);
      float bm = _mm512_reduce_max_ps(s);
      __m512 l;
      if (b == 0) {
        M[i] = bm;
        l = _mm512_setzero_ps();
        memset(orow[i], 0, (size_t)hd * sizeof(float));
      } else {
        l = _mm512_loadu_ps(L + i * KB);
        if (bm > M[i]) {
          __m512 alpha = exp_avx512(_mm512_set1_ps(M[i] - bm));
          l = _mm512_mul_ps(l, alpha);
          for (int d = 0; d < hd; d += 16)
            _mm512_storeu_ps(orow[i] + d, _mm512_mul_ps(_mm512_loadu_ps(orow[i] + d), alpha));
          M[i] = bm;
        }
      }
      __m512 p = _mm512_maskz_mov_ps(m, exp_avx512(_mm512_sub_ps(s, _mm512_set1_ps(M[i]))));
      _mm512_storeu_ps(L + i * KB, _mm512_add_ps(l, p));
      _mm512_storeu_ps(S + a * KB, p);
    }
    /* P.V over all KB keys of the block, four rows at a time. A row's keys past its position
     * have p = +0, so they leave its sums unchanged except for the sign of an exact zero (which
     * the final + 0 folds away): each row's result is the one its own keys alone give. */
    int r = 0;
    for (; r + 4 <= nact; r += 4) {
      const float *fp[4] = {S + r * KB, S + (r + 1) * KB, S + (r + 2) * KB, S + (r + 3) * KB};
      float *fo[4] = {orow[act[r]], orow[act[r + 1]], orow[act[r + 2]], orow[act[r + 3]]};
      pv_4(fo, fp, vrow, hd);
    }
    for (; r < nact; r++) pv_1(orow[act[r]], S + r * KB, vrow, KB, hd);
  }
  for (int i = 0; i < nrow; i++) {
    __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(_mm512_loadu_ps(L + i * KB)));
    for (int d = 0; d < hd; d += 16)
      _mm512_storeu_ps(orow[i] + d, _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(orow[i] + d), inv),
                                                  _mm512_setzero_ps()));
  }
}

/* Items are (token tile, KV head), so a single decode token still makes n_kv items. A tile is
 * tile_tokens consecutive step tokens, cut further where the sequence changes (each piece is one
 * attn_tile). */
static void attn_tiles(void *arg, int64_t i0, int64_t i1, int thread) {
  attn_job *j = arg;
  cpu_ctx *c = j->c;
  float *scratch = cpu_scratch(c, thread);
  for (int64_t it = i0; it < i1; it++) {
    int tile = (int)(it / j->kv->n_kv_l), kvh = (int)(it % j->kv->n_kv_l);
    int t = tile * j->tile_tokens, end = t + j->tile_tokens;
    if (end > c->n_tokens) end = c->n_tokens;
    while (t < end) {
      int u = t + 1;
      while (u < end && c->tok_seq[u] == c->tok_seq[t]) u++;
      attn_tile(j, t, u, kvh, scratch);
      t = u;
    }
  }
}
#endif

void cpu_attention(void *ctx, const kv_cache *kv, int layer, const float *q, int n_head_l,
                   float scale, float *out) {
  cpu_ctx *c = ctx;
  int64_t items = (int64_t)c->n_tokens * kv->n_kv_l;
  if (items <= 0) return;
  const int group = n_head_l / kv->n_kv_l, hd = kv->head_dim;
  attn_job j = {c, kv, layer, q, n_head_l, scale, out, 0, 0};
#if defined(__x86_64__)
  if (c->simd >= CPU_ISA_AVX512 && hd % 32 == 0 && group <= TILE_ROWS) {
    j.tile_tokens = TILE_ROWS / group;
    if (cpu_scratch_reserve(c, (size_t)hd * (2 * KB + 1) + (size_t)TILE_ROWS * (2 * KB + 1)) < 0) {
      for (int64_t i = 0; i < (int64_t)c->n_tokens * n_head_l * hd; i++) out[i] = NAN;
      return;
    }
    j.n_tiles = (c->n_tokens + j.tile_tokens - 1) / j.tile_tokens;
    threadpool_parallel_for(c->pool, (int64_t)j.n_tiles * kv->n_kv_l, 1, attn_tiles, &j);
    return;
  }
#endif
  if (cpu_scratch_reserve(c, ((size_t)c->max_ctx + 1) * (size_t)group) < 0) {
    for (int64_t i = 0; i < (int64_t)c->n_tokens * n_head_l * hd; i++) out[i] = NAN;
    return;
  }
  threadpool_parallel_for(c->pool, items, 1, attn_items, &j);
}
