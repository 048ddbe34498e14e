/* Every CUDA backend op against a float64 reference on random inputs (llama.cpp's
 * test-backend-ops idea): embedding, RMSNorm (+ fused add), matmul in F32/BF16/F16 with bias and
 * strided shards, RoPE (both pairings, llama3 scaling), SiLU*mul, gather_rows, KV writes and paged
 * attention (prefill, mixed, GQA, long split decode) over F32/BF16/F16 caches, the fused decode
 * ops against the plain ops they replace, and device sampling (greedy against the host sampler, stochastic by a chi-square test). Outputs are
 * poisoned with NaN before each op, so an unwritten element fails. Without a GPU it prints
 * "skipped: no CUDA device" and passes. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../test_util.h"
#include "backend/backend.h"
#include "backend/cuda/backend_cuda.h"
#include "engine/sampling.h"

static backend *g_be;
static const backend_ops *g_ops;
static test_rng g_rng = {0x9e3779b97f4a7c15ull};

/* ---- helpers ---- */

static float *rand_floats(size_t n, float scale) {
  float *p = malloc(n * sizeof *p);
  for (size_t i = 0; i < n; i++) p[i] = test_rng_float(&g_rng) * scale;
  return p;
}

static int rand_int(int n) { return (int)(test_rng_next(&g_rng) % (uint64_t)n); }

/* Rounds through dtype (as the device sees the value). */
static float round_to(ts_dtype dt, float v) {
  if (dt == TS_BF16) return ts_bf16_to_f32(ts_f32_to_bf16(v));
  if (dt == TS_F16) return ts_f16_to_f32(ts_f32_to_f16(v));
  return v;
}

static void *encode(ts_dtype dt, const float *v, size_t n) {
  size_t es = dt == TS_F32 ? 4 : 2;
  void *p = malloc(n * es);
  for (size_t i = 0; i < n; i++) {
    if (dt == TS_F32) ((float *)p)[i] = v[i];
    else if (dt == TS_BF16) ((uint16_t *)p)[i] = ts_f32_to_bf16(v[i]);
    else ((uint16_t *)p)[i] = ts_f32_to_f16(v[i]);
  }
  return p;
}

static float *dev_floats(const float *host, size_t n) {
  float *d = g_ops->alloc(g_be->ctx, n * sizeof(float));
  if (host) g_ops->upload(g_be->ctx, d, host, n * sizeof(float));
  return d;
}

/* Fills a device float buffer with NaN so that unwritten outputs fail the comparison. */
static float *dev_poisoned(size_t n) {
  float *h = malloc(n * sizeof *h);
  for (size_t i = 0; i < n; i++) h[i] = NAN;
  float *d = dev_floats(h, n);
  free(h);
  return d;
}

static float *download(const float *d, size_t n) {
  float *h = malloc(n * sizeof *h);
  g_ops->download(g_be->ctx, h, d, n * sizeof(float));
  return h;
}

/* A weight of shape [rows][cols] (cols = row length; stride >= cols) on the device. `vals`
 * receives the values as rounded to dtype, packed [rows][cols]. */
static ts_tensor make_weight(ts_dtype dt, int rows, int cols, int stride, float scale,
                             float **vals) {
  int ndim = rows > 0 ? 2 : 1;
  if (rows <= 0) rows = 1;
  float *full = rand_floats((size_t)rows * stride, scale);
  for (size_t i = 0; i < (size_t)rows * stride; i++) full[i] = round_to(dt, full[i]);
  float *packed = malloc((size_t)rows * cols * sizeof *packed);
  for (int r = 0; r < rows; r++) memcpy(packed + (size_t)r * cols, full + (size_t)r * stride,
                                        (size_t)cols * sizeof(float));
  ts_tensor t;
  memset(&t, 0, sizeof t);
  t.data = encode(dt, full, (size_t)rows * stride);
  t.dtype = dt;
  t.ndim = ndim;
  if (ndim == 2) {
    t.shape[0] = rows;
    t.shape[1] = cols;
    t.row_stride = stride;
  } else {
    t.shape[0] = cols;
  }
  void *host = t.data;
  ts_err err = {0};
  int rc = g_ops->weight_prepare(g_be->ctx, &t, &err);
  CHECK_MSG(rc == 0, "weight_prepare: %s", err.msg);
  CHECK(t.data != host);
  free(host);
  free(full);
  *vals = packed;
  return t;
}

/* ‖out − ref‖ / ‖ref‖; any non-finite output fails. */
static double rel_err(const float *out, const double *ref, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; i++) {
    if (!isfinite(out[i])) return INFINITY;
    double d = out[i] - ref[i];
    num += d * d;
    den += ref[i] * ref[i];
  }
  return den > 0 ? sqrt(num / den) : sqrt(num);
}

#define CHECK_CLOSE(what, out, ref, n, tol)                                         \
  do {                                                                              \
    double e_ = rel_err((out), (ref), (n));                                         \
    CHECK_MSG(e_ <= (tol), "%s: relative error %.3g > %.3g", (what), e_, (double)(tol)); \
  } while (0)

static int step_begin(const ts_batch *b, const kv_cache *kv) {
  ts_err err = {0};
  int rc = g_ops->step_begin(g_be->ctx, b, kv, &err);
  CHECK_MSG(rc == 0, "step_begin: %s", err.msg);
  return rc;
}

static void check_sync(const char *what) {
  ts_err err = {0};
  int rc = g_ops->sync(g_be->ctx, &err);
  CHECK_MSG(rc == 0, "%s: %s", what, err.msg);
}

/* A step plan over sequences with new[s] new tokens and ctx[s] total tokens after the step; its
 * block table maps each sequence onto a random permutation of the cache's blocks. */
typedef struct {
  ts_batch b;
  int32_t *tokens, *pos, *seq_start, *ctx_len, *block_table, *logits_rows;
} plan;

static void plan_make(plan *p, int n_seqs, const int *new_toks, const int *ctx, int block_size,
                      int n_blocks, int vocab) {
  memset(p, 0, sizeof *p);
  int nt = 0, mb = 1;
  for (int s = 0; s < n_seqs; s++) {
    nt += new_toks[s];
    int need = (ctx[s] + block_size - 1) / block_size;
    if (need > mb) mb = need;
  }
  p->tokens = malloc((size_t)nt * 4);
  p->pos = malloc((size_t)nt * 4);
  p->seq_start = malloc((size_t)(n_seqs + 1) * 4);
  p->ctx_len = malloc((size_t)n_seqs * 4);
  p->block_table = malloc((size_t)n_seqs * mb * 4);
  p->logits_rows = malloc((size_t)n_seqs * 4);
  int *perm = malloc((size_t)n_blocks * sizeof *perm);
  for (int i = 0; i < n_blocks; i++) perm[i] = i;
  for (int i = n_blocks - 1; i > 0; i--) {
    int j = rand_int(i + 1), t = perm[i];
    perm[i] = perm[j];
    perm[j] = t;
  }
  int t = 0, used = 0;
  for (int s = 0; s < n_seqs; s++) {
    p->seq_start[s] = t;
    p->ctx_len[s] = ctx[s];
    for (int i = 0; i < new_toks[s]; i++, t++) {
      p->tokens[t] = rand_int(vocab);
      p->pos[t] = ctx[s] - new_toks[s] + i;
    }
    p->logits_rows[s] = t - 1;
    for (int j = 0; j < mb; j++)
      p->block_table[(size_t)s * mb + j] =
          j < (ctx[s] + block_size - 1) / block_size ? perm[used++] : -1;
  }
  CHECK(used <= n_blocks);
  p->seq_start[n_seqs] = t;
  free(perm);
  p->b.n_tokens = nt;
  p->b.tokens = p->tokens;
  p->b.pos = p->pos;
  p->b.n_seqs = n_seqs;
  p->b.seq_start = p->seq_start;
  p->b.ctx_len = p->ctx_len;
  p->b.max_blocks = mb;
  p->b.block_table = p->block_table;
  p->b.n_logits = n_seqs;
  p->b.logits_rows = p->logits_rows;
}

static void plan_free(plan *p) {
  free(p->tokens);
  free(p->pos);
  free(p->seq_start);
  free(p->ctx_len);
  free(p->block_table);
  free(p->logits_rows);
}

static const ts_dtype k_dtypes[3] = {TS_F32, TS_BF16, TS_F16};

/* ---- embedding and gather ---- */

static void test_embed_gather(void) {
  const int vocab = 300, d = 72;
  int new_toks[3] = {5, 1, 31}, ctx[3] = {5, 9, 40};
  plan p;
  plan_make(&p, 3, new_toks, ctx, 16, 16, vocab);
  int n = p.b.n_tokens;
  if (step_begin(&p.b, NULL)) return;
  for (int di = 0; di < 3; di++) {
    float *vals;
    ts_tensor table = make_weight(k_dtypes[di], vocab, d, d, 1.0f, &vals);
    float *out = dev_poisoned((size_t)n * d);
    g_ops->embed(g_be->ctx, &table, n, d, out);
    float *h = download(out, (size_t)n * d);
    double *ref = malloc((size_t)n * d * sizeof *ref);
    for (int i = 0; i < n; i++)
      for (int j = 0; j < d; j++) ref[(size_t)i * d + j] = vals[(size_t)p.tokens[i] * d + j];
    CHECK_CLOSE("embed", h, ref, (size_t)n * d, 0.0);

    /* gather_rows through the staged logits_rows, then through a device index buffer */
    float *g = dev_poisoned((size_t)p.b.n_logits * d);
    g_ops->gather_rows(g_be->ctx, out, p.logits_rows, p.b.n_logits, d, g);
    float *hg = download(g, (size_t)p.b.n_logits * d);
    double *rg = malloc((size_t)n * d * sizeof *rg);
    for (int i = 0; i < p.b.n_logits; i++)
      for (int j = 0; j < d; j++) rg[(size_t)i * d + j] = h[(size_t)p.logits_rows[i] * d + j];
    CHECK_CLOSE("gather_rows staged", hg, rg, (size_t)p.b.n_logits * d, 0.0);
    /* a later run of the staged rows (the forward gathers logits rows in chunks) */
    g_ops->gather_rows(g_be->ctx, out, p.logits_rows + 1, p.b.n_logits - 1, d, g);
    free(hg);
    hg = download(g, (size_t)(p.b.n_logits - 1) * d);
    CHECK_CLOSE("gather_rows staged run", hg, rg + d, (size_t)(p.b.n_logits - 1) * d, 0.0);
    int32_t rows[4] = {rand_int(n), rand_int(n), rand_int(n), rand_int(n)};
    int32_t *drows = g_ops->alloc(g_be->ctx, sizeof rows);
    g_ops->upload(g_be->ctx, drows, rows, sizeof rows);
    float *g2 = dev_poisoned((size_t)4 * d);
    g_ops->gather_rows(g_be->ctx, out, drows, 4, d, g2);
    float *hg2 = download(g2, (size_t)4 * d);
    for (int i = 0; i < 4; i++)
      for (int j = 0; j < d; j++) rg[(size_t)i * d + j] = h[(size_t)rows[i] * d + j];
    CHECK_CLOSE("gather_rows device", hg2, rg, (size_t)4 * d, 0.0);
    /* host indices the step did not stage */
    g_ops->gather_rows(g_be->ctx, out, rows, 4, d, g2);
    free(hg2);
    hg2 = download(g2, (size_t)4 * d);
    CHECK_CLOSE("gather_rows host", hg2, rg, (size_t)4 * d, 0.0);
    check_sync("embed/gather");
    g_ops->free(g_be->ctx, drows);
    g_ops->free(g_be->ctx, g);
    g_ops->free(g_be->ctx, g2);
    g_ops->free(g_be->ctx, out);
    g_ops->weight_release(g_be->ctx, &table);
    CHECK(table.data == NULL);
    free(h);
    free(hg);
    free(hg2);
    free(ref);
    free(rg);
    free(vals);
  }
  plan_free(&p);
}

/* ---- norms ---- */

static void test_norms(void) {
  const int shapes[3][2] = {{5, 96}, {3, 1000}, {17, 64}};
  for (int si = 0; si < 3; si++)
    for (int di = 0; di < 3; di++) {
      int rows = shapes[si][0], dim = shapes[si][1];
      size_t n = (size_t)rows * dim;
      float eps = 1e-5f;
      float *wv;
      ts_tensor w = make_weight(k_dtypes[di], 0, dim, dim, 1.5f, &wv);
      float *x = rand_floats(n, 2.0f), *res = rand_floats(n, 2.0f);
      float *dx = dev_floats(x, n), *dres = dev_floats(res, n), *dout = dev_poisoned(n);
      double *ref = malloc(n * sizeof *ref), *rres = malloc(n * sizeof *rres);

      g_ops->rmsnorm(g_be->ctx, dx, &w, eps, rows, dim, dout);
      float *h = download(dout, n);
      for (int r = 0; r < rows; r++) {
        double ss = 0;
        for (int j = 0; j < dim; j++) ss += (double)x[r * dim + j] * x[r * dim + j];
        double inv = 1.0 / sqrt(ss / dim + eps);
        for (int j = 0; j < dim; j++) ref[r * dim + j] = x[r * dim + j] * inv * wv[j];
      }
      CHECK_CLOSE("rmsnorm", h, ref, n, 1e-5);
      free(h);

      /* fused add, writing the output over x (the aliasing the forward uses) */
      g_ops->add_rmsnorm(g_be->ctx, dres, dx, &w, eps, rows, dim, dx);
      float *hres = download(dres, n);
      h = download(dx, n);
      for (int r = 0; r < rows; r++) {
        double ss = 0;
        for (int j = 0; j < dim; j++) {
          rres[r * dim + j] = (double)res[r * dim + j] + x[r * dim + j];
          ss += rres[r * dim + j] * rres[r * dim + j];
        }
        double inv = 1.0 / sqrt(ss / dim + eps);
        for (int j = 0; j < dim; j++) ref[r * dim + j] = rres[r * dim + j] * inv * wv[j];
      }
      CHECK_CLOSE("add_rmsnorm residual", hres, rres, n, 1e-6);
      CHECK_CLOSE("add_rmsnorm out", h, ref, n, 1e-5);
      check_sync("norms");
      free(h);
      free(hres);
      free(ref);
      free(rres);
      free(x);
      free(res);
      free(wv);
      g_ops->free(g_be->ctx, dx);
      g_ops->free(g_be->ctx, dres);
      g_ops->free(g_be->ctx, dout);
      g_ops->weight_release(g_be->ctx, &w);
    }
}

/* ---- matmul ---- */

static void test_matmul(void) {
  const int cases[5][4] = {/* n, k, m, stride */ {1, 96, 50, 96},
                           {7, 200, 130, 200},
                           {33, 64, 300, 96},
                           {130, 256, 513, 256},
                           {5, 128, 77, 136}};
  for (int ci = 0; ci < 5; ci++)
    for (int di = 0; di < 3; di++) {
      ts_dtype dt = k_dtypes[di];
      int n = cases[ci][0], k = cases[ci][1], m = cases[ci][2], stride = cases[ci][3];
      float *wv, *bv = NULL;
      ts_tensor w = make_weight(dt, m, k, stride, 0.5f, &wv);
      ts_tensor bias;
      int with_bias = ci % 2 == 1;
      if (with_bias) bias = make_weight(k_dtypes[(di + 1) % 3], 0, m, m, 1.0f, &bv);
      float *x = rand_floats((size_t)n * k, 1.0f);
      float *dx = dev_floats(x, (size_t)n * k), *dy = dev_poisoned((size_t)n * m);
      g_ops->matmul(g_be->ctx, dx, &w, with_bias ? &bias : NULL, n, dy);
      float *h = download(dy, (size_t)n * m);
      double *ref = malloc((size_t)n * m * sizeof *ref);
      /* 16-bit weights multiply activations narrowed to the same type (cuBLAS), except in the
       * skinny kernel (a few rows, k a multiple of 8, no bias of another dtype),
       * which reads the float32 activations as they are. */
      int skinny = dt != TS_F32 && n <= 8 && k % 8 == 0 && !with_bias;
      for (int i = 0; i < n; i++)
        for (int j = 0; j < m; j++) {
          double s = with_bias ? bv[j] : 0.0;
          for (int q = 0; q < k; q++)
            s += (double)(skinny ? x[(size_t)i * k + q] : round_to(dt, x[(size_t)i * k + q])) *
                 wv[(size_t)j * k + q];
          ref[(size_t)i * m + j] = s;
        }
      char what[64];
      snprintf(what, sizeof what, "matmul %s n=%d k=%d m=%d", ts_dtype_table[dt].name, n, k, m);
      CHECK_CLOSE(what, h, ref, (size_t)n * m, 1e-5);
      check_sync(what);
      free(h);
      free(ref);
      free(x);
      free(wv);
      free(bv);
      g_ops->free(g_be->ctx, dx);
      g_ops->free(g_be->ctx, dy);
      g_ops->weight_release(g_be->ctx, &w);
      if (with_bias) g_ops->weight_release(g_be->ctx, &bias);
    }
}

/* ---- rope ---- */

static double ref_inv_freq(const rope_params *rp, int i, int hd) {
  double f = 1.0 / pow(rp->theta, (double)(2 * i) / hd);
  if (rp->scaling == ROPE_SCALING_LLAMA3) {
    double wavelen = 2.0 * M_PI / f;
    double lo = rp->orig_max_pos / rp->low_freq_factor, hi = rp->orig_max_pos / rp->high_freq_factor;
    if (wavelen > lo) {
      f /= rp->factor;
    } else if (wavelen >= hi) {
      double sm = (rp->orig_max_pos / wavelen - rp->low_freq_factor) /
                  (rp->high_freq_factor - rp->low_freq_factor);
      f = (1 - sm) * f / rp->factor + sm * f;
    }
  }
  return (float)f;
}

static void test_rope(void) {
  const int hds[3] = {8, 64, 128};
  for (int hi = 0; hi < 3; hi++)
    for (int inter = 0; inter < 2; inter++)
      for (int scaled = 0; scaled < 2; scaled++) {
        int hd = hds[hi], heads = 3;
        int new_toks[2] = {6, 1}, ctx[2] = {4000 + rand_int(100), 1 + rand_int(64)};
        plan p;
        plan_make(&p, 2, new_toks, ctx, 64, 80, 100);
        if (step_begin(&p.b, NULL)) return;
        rope_params rp = {.theta = scaled ? 500000.0f : 10000.0f,
                          .interleaved = inter,
                          .scaling = scaled ? ROPE_SCALING_LLAMA3 : ROPE_SCALING_NONE,
                          .factor = 8.0f,
                          .low_freq_factor = 1.0f,
                          .high_freq_factor = 4.0f,
                          .orig_max_pos = 8192};
        int n = p.b.n_tokens;
        size_t cnt = (size_t)n * heads * hd;
        float *x = rand_floats(cnt, 1.0f);
        float *dx = dev_floats(x, cnt);
        g_ops->rope(g_be->ctx, dx, heads, hd, &rp);
        float *h = download(dx, cnt);
        double *ref = malloc(cnt * sizeof *ref);
        for (int t = 0; t < n; t++)
          for (int hh = 0; hh < heads; hh++) {
            const float *xr = x + ((size_t)t * heads + hh) * hd;
            double *rr = ref + ((size_t)t * heads + hh) * hd;
            for (int i = 0; i < hd / 2; i++) {
              double ang = (double)p.pos[t] * ref_inv_freq(&rp, i, hd);
              int i0 = inter ? 2 * i : i, i1 = inter ? 2 * i + 1 : i + hd / 2;
              rr[i0] = xr[i0] * cos(ang) - xr[i1] * sin(ang);
              rr[i1] = xr[i0] * sin(ang) + xr[i1] * cos(ang);
            }
          }
        /* positions near 4000 in float32: the angle itself carries ~1e-4 of rounding */
        CHECK_CLOSE("rope", h, ref, cnt, 5e-4);
        check_sync("rope");
        free(h);
        free(ref);
        free(x);
        g_ops->free(g_be->ctx, dx);
        plan_free(&p);
      }
}

/* ---- silu * mul ---- */

static void test_silu_mul(void) {
  int n = 9, d = 301;
  size_t cnt = (size_t)n * d;
  float *g = rand_floats(cnt, 6.0f), *u = rand_floats(cnt, 2.0f);
  float *dg = dev_floats(g, cnt), *du = dev_floats(u, cnt), *dout = dev_poisoned(cnt);
  g_ops->silu_mul(g_be->ctx, dg, du, n, d, dout);
  float *h = download(dout, cnt);
  double *ref = malloc(cnt * sizeof *ref);
  for (size_t i = 0; i < cnt; i++) ref[i] = g[i] / (1.0 + exp(-(double)g[i])) * u[i];
  CHECK_CLOSE("silu_mul", h, ref, cnt, 1e-6);
  check_sync("silu_mul");
  free(h);
  free(ref);
  free(g);
  free(u);
  g_ops->free(g_be->ctx, dg);
  g_ops->free(g_be->ctx, du);
  g_ops->free(g_be->ctx, dout);
}

/* ---- KV write and attention ---- */

typedef struct {
  const char *name;
  int n_seqs;
  int new_toks[256], ctx[256];
  int n_kv, n_head, hd, block_size;
  ts_dtype kv_dtype;
  int bf16_ops; /* the kernel rounds its operands to bf16 (tensor cores) */
} att_case;

static void test_attention_case(const att_case *ac) {
  const int n_layers = 2, layer = 1;
  int blocks_needed = 0;
  for (int s = 0; s < ac->n_seqs; s++)
    blocks_needed += (ac->ctx[s] + ac->block_size - 1) / ac->block_size;
  int n_blocks = blocks_needed + 3;
  plan p;
  plan_make(&p, ac->n_seqs, ac->new_toks, ac->ctx, ac->block_size, n_blocks, 1000);
  int nt = p.b.n_tokens, row = ac->n_kv * ac->hd;
  size_t cache_elems = (size_t)n_blocks * ac->block_size * row;
  size_t es = ac->kv_dtype == TS_F32 ? 4 : 2;

  /* The cache starts full of random earlier context; mirror it on the host, rounded. */
  kv_cache kv;
  memset(&kv, 0, sizeof kv);
  kv.n_layers = n_layers;
  kv.n_blocks = n_blocks;
  kv.block_size = ac->block_size;
  kv.n_kv_l = ac->n_kv;
  kv.head_dim = ac->hd;
  kv.dtype = ac->kv_dtype;
  void *kptr[2], *vptr[2];
  kv.k = kptr;
  kv.v = vptr;
  float *mk = rand_floats(cache_elems, 1.0f), *mv = rand_floats(cache_elems, 1.0f);
  for (size_t i = 0; i < cache_elems; i++) {
    mk[i] = round_to(ac->kv_dtype, mk[i]);
    mv[i] = round_to(ac->kv_dtype, mv[i]);
  }
  void *ek = encode(ac->kv_dtype, mk, cache_elems), *ev = encode(ac->kv_dtype, mv, cache_elems);
  for (int l = 0; l < n_layers; l++) {
    kptr[l] = g_ops->alloc(g_be->ctx, cache_elems * es);
    vptr[l] = g_ops->alloc(g_be->ctx, cache_elems * es);
    g_ops->upload(g_be->ctx, kptr[l], ek, cache_elems * es);
    g_ops->upload(g_be->ctx, vptr[l], ev, cache_elems * es);
  }
  free(ek);
  free(ev);
  if (step_begin(&p.b, &kv)) return;

  float *k = rand_floats((size_t)nt * row, 1.0f), *v = rand_floats((size_t)nt * row, 1.0f);
  float *dk = dev_floats(k, (size_t)nt * row), *dv = dev_floats(v, (size_t)nt * row);
  g_ops->kv_write(g_be->ctx, &kv, layer, dk, dv);
  for (int s = 0; s < ac->n_seqs; s++)
    for (int t = p.seq_start[s]; t < p.seq_start[s + 1]; t++) {
      int pos = p.pos[t];
      size_t slot = (size_t)p.block_table[(size_t)s * p.b.max_blocks + pos / ac->block_size] *
                        ac->block_size + pos % ac->block_size;
      for (int j = 0; j < row; j++) {
        mk[slot * row + j] = round_to(ac->kv_dtype, k[(size_t)t * row + j]);
        mv[slot * row + j] = round_to(ac->kv_dtype, v[(size_t)t * row + j]);
      }
    }
  /* the cache must now equal the mirror exactly */
  {
    void *raw = malloc(cache_elems * es);
    g_ops->download(g_be->ctx, raw, kptr[layer], cache_elems * es);
    void *want = encode(ac->kv_dtype, mk, cache_elems);
    CHECK_MSG(memcmp(raw, want, cache_elems * es) == 0, "%s: kv_write K differs", ac->name);
    free(want);
    g_ops->download(g_be->ctx, raw, vptr[layer], cache_elems * es);
    want = encode(ac->kv_dtype, mv, cache_elems);
    CHECK_MSG(memcmp(raw, want, cache_elems * es) == 0, "%s: kv_write V differs", ac->name);
    free(want);
    free(raw);
  }

  size_t qn = (size_t)nt * ac->n_head * ac->hd;
  float *q = rand_floats(qn, 3.0f);
  float *dq = dev_floats(q, qn), *dout = dev_poisoned(qn);
  float scale = 1.0f / sqrtf((float)ac->hd);
  g_ops->attention(g_be->ctx, &kv, layer, dq, ac->n_head, scale, dout);
  float *h = download(dout, qn);
  double *ref = malloc(qn * sizeof *ref);
  int group = ac->n_head / ac->n_kv;
  int max_ctx = 0;
  for (int s = 0; s < ac->n_seqs; s++)
    if (ac->ctx[s] > max_ctx) max_ctx = ac->ctx[s];
  double *sc = malloc((size_t)max_ctx * sizeof *sc);
  for (int s = 0; s < ac->n_seqs; s++)
    for (int t = p.seq_start[s]; t < p.seq_start[s + 1]; t++)
      for (int hh = 0; hh < ac->n_head; hh++) {
        int kvh = hh / group, nk = p.pos[t] + 1;
        const float *qr = q + ((size_t)t * ac->n_head + hh) * ac->hd;
        double mx = -INFINITY, sum = 0;
        for (int j = 0; j < nk; j++) {
          size_t slot = (size_t)p.block_table[(size_t)s * p.b.max_blocks + j / ac->block_size] *
                            ac->block_size + j % ac->block_size;
          const float *kr = mk + slot * row + (size_t)kvh * ac->hd;
          double dot = 0;
          for (int d = 0; d < ac->hd; d++) dot += (double)qr[d] * kr[d];
          sc[j] = dot * scale;
          if (sc[j] > mx) mx = sc[j];
        }
        double *rr = ref + ((size_t)t * ac->n_head + hh) * ac->hd;
        for (int d = 0; d < ac->hd; d++) rr[d] = 0;
        for (int j = 0; j < nk; j++) {
          double e = exp(sc[j] - mx);
          sum += e;
          size_t slot = (size_t)p.block_table[(size_t)s * p.b.max_blocks + j / ac->block_size] *
                            ac->block_size + j % ac->block_size;
          const float *vr = mv + slot * row + (size_t)kvh * ac->hd;
          for (int d = 0; d < ac->hd; d++) rr[d] += e * vr[d];
        }
        for (int d = 0; d < ac->hd; d++) rr[d] /= sum;
      }
  char what[128];
  snprintf(what, sizeof what, "attention %s", ac->name);
  /* A step with several tokens in a sequence and head_dim 64 or 128 runs on the tensor cores
   * with bf16 operands (test_cuda_prefill checks that kernel closely); the rest is float32. */
  int tc = nt > ac->n_seqs && (ac->hd == 64 || ac->hd == 128);
  CHECK_CLOSE(what, h, ref, qn, tc || ac->bf16_ops ? 1e-2 : 2e-5);
  check_sync(what);

  free(sc);
  free(h);
  free(ref);
  free(q);
  free(k);
  free(v);
  free(mk);
  free(mv);
  g_ops->free(g_be->ctx, dq);
  g_ops->free(g_be->ctx, dout);
  g_ops->free(g_be->ctx, dk);
  g_ops->free(g_be->ctx, dv);
  for (int l = 0; l < n_layers; l++) {
    g_ops->free(g_be->ctx, kptr[l]);
    g_ops->free(g_be->ctx, vptr[l]);
  }
  plan_free(&p);
}

static void test_attention(void) {
  const att_case cases[] = {
      {"mixed prefill/decode GQA4 hd64", 4, {37, 1, 16, 5}, {50, 20, 16, 300}, 2, 8, 64, 16,
       TS_F32, 0},
      {"stories-like hd8", 2, {9, 1}, {9, 33}, 4, 8, 8, 16, TS_F32, 0},
      {"MHA hd128 bf16", 3, {20, 1, 3}, {20, 70, 90}, 3, 3, 128, 32, TS_BF16, 0},
      {"long decode split GQA8 hd128", 3, {1, 1, 1}, {700, 2100, 1500}, 2, 16, 128, 16,
       TS_BF16, 0},
      {"group20 hd80 f16", 2, {3, 1}, {40, 600}, 1, 20, 80, 8, TS_F16, 0},
      {"long prefill chunk hd256", 1, {70, 0, 0, 0}, {1100, 0, 0, 0}, 1, 2, 256, 16, TS_F32, 0},
      /* decode steps (one token per sequence): head_dim 64/128 take the key-split kernel
       * (attention_decode.cu), 32/96 the per-key and tiled kernels of attention.cu */
      {"decode GQA4 hd64 f16", 4, {1, 1, 1, 1}, {1, 64, 300, 129}, 2, 8, 64, 16, TS_F16, 0},
      {"decode GQA2 hd96 f32", 2, {1, 1}, {5, 260}, 4, 8, 96, 16, TS_F32, 0},
      {"decode MHA hd32 bf16", 3, {1, 1, 1}, {33, 2, 520}, 4, 4, 32, 8, TS_BF16, 0},
      /* long contexts in few splits (the tiled kernel for head_dim 96) */
      {"decode tiled GQA2 hd128 bf16", 4, {1, 1, 1, 1}, {1500, 37, 900, 2100}, 8, 16, 128, 16,
       TS_BF16, 0},
      {"decode tiled GQA4 hd64 f32", 4, {1, 1, 1, 1}, {300, 1000, 5, 777}, 8, 32, 64, 16, TS_F32, 0},
      {"decode tiled MHA hd96 f16", 3, {1, 1, 1}, {2000, 129, 1}, 16, 16, 96, 32, TS_F16, 0},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) test_attention_case(&cases[i]);
}

/* The key-split decode kernels (attention_decode.cu, CUDA-core and tensor-core forms): 1..256
 * sequences of random odd context lengths, GQA groups 1/2/3/4/8, head_dim 64/128, every cache
 * dtype, the default split and forced split counts whose last splits lie past every context (the
 * context bucket of a decode step is a power of two >= 256). */
static void test_attention_decode_split(void) {
  static const struct {
    int n_seqs, n_kv, group, hd, max_ctx, splits, unroll, mma;
    ts_dtype dt;
  } dc[] = {
      {1, 8, 2, 128, 900, 0, 0, 0, TS_BF16}, /* the Qwen3-0.6B shape at batch 1 */
      {1, 2, 8, 64, 700, 0, 0, 0, TS_F32},    {3, 4, 1, 128, 600, 0, 8, 0, TS_F16},
      {7, 2, 4, 128, 1200, 5, 0, 0, TS_BF16}, {2, 1, 4, 64, 300, 64, 0, 0, TS_BF16},
      {5, 3, 2, 128, 200, 200, 8, 0, TS_F32}, /* one key or none per split */
      {17, 4, 2, 64, 500, 1, 0, 0, TS_F16},   {64, 8, 2, 128, 400, 0, 0, 0, TS_BF16},
      {256, 8, 2, 128, 160, 0, 0, 0, TS_BF16}, {256, 8, 2, 128, 200, 2, 8, 0, TS_BF16},
      {256, 2, 8, 64, 300, 3, 0, 0, TS_F32},
      /* the tensor-core form (BF16 cache) */
      {1, 8, 2, 128, 900, 0, 0, 1, TS_BF16},  {7, 2, 4, 128, 1200, 5, 0, 1, TS_BF16},
      {2, 4, 1, 128, 300, 64, 0, 1, TS_BF16}, {5, 2, 8, 64, 400, 3, 0, 1, TS_BF16},
      {40, 1, 3, 64, 700, 0, 0, 1, TS_BF16},  {256, 8, 2, 128, 200, 0, 0, 1, TS_BF16},
  };
  for (size_t i = 0; i < sizeof dc / sizeof dc[0]; i++) {
    static att_case ac; /* 2 KB of arrays */
    char name[96];
    memset(&ac, 0, sizeof ac);
    snprintf(name, sizeof name, "decode split %d seqs GQA%d hd%d %s splits %d unroll %d mma %d",
             dc[i].n_seqs, dc[i].group, dc[i].hd, ts_dtype_table[dc[i].dt].name, dc[i].splits,
             dc[i].unroll, dc[i].mma);
    ac.name = name;
    ac.n_seqs = dc[i].n_seqs;
    for (int s = 0; s < ac.n_seqs; s++) {
      ac.new_toks[s] = 1;
      ac.ctx[s] = 1 + rand_int(dc[i].max_ctx) / 2 * 2; /* odd: no split ends on a whole tile */
    }
    ac.n_kv = dc[i].n_kv;
    ac.n_head = dc[i].n_kv * dc[i].group;
    ac.hd = dc[i].hd;
    ac.block_size = 8 << rand_int(3);
    ac.kv_dtype = dc[i].dt;
    char sp[16];
    snprintf(sp, sizeof sp, "%d", dc[i].splits);
    if (dc[i].splits) setenv("TESSERA_CUDA_DECODE_SPLITS", sp, 1);
    if (dc[i].unroll) setenv("TESSERA_CUDA_DECODE_UNROLL", "8", 1);
    if (dc[i].mma) setenv("TESSERA_CUDA_DECODE_MMA", "1", 1);
    ac.bf16_ops = dc[i].mma;
    test_attention_case(&ac);
    unsetenv("TESSERA_CUDA_DECODE_SPLITS");
    unsetenv("TESSERA_CUDA_DECODE_UNROLL");
    unsetenv("TESSERA_CUDA_DECODE_MMA");
  }
}

/* ---- plan validation ---- */

static void test_step_errors(void) {
  int new_toks[1] = {4}, ctx[1] = {40};
  plan p;
  plan_make(&p, 1, new_toks, ctx, 16, 4, 10);
  kv_cache kv;
  memset(&kv, 0, sizeof kv);
  kv.n_blocks = 4;
  kv.block_size = 16;
  p.pos[3] = 64; /* beyond both the context and the block table */
  ts_err err = {0};
  int rc = g_ops->step_begin(g_be->ctx, &p.b, &kv, &err);
  CHECK(rc == TS_EINVAL);
  CHECK(strlen(err.msg) > 0);
  plan_free(&p);
}

/* ---- fused decode ops, against the plain ops they replace ---- */

static double *to_double(const float *v, size_t n) {
  double *d = malloc(n * sizeof *d);
  for (size_t i = 0; i < n; i++) d[i] = v[i];
  return d;
}

/* norm_matmul (q, k, v with biases), norm_gate_up and matmul_add on the skinny kernel's shapes
 * (n <= 8, 16-bit weights; k long enough to split rows over warps) and on the fallback's. */
static void test_fused_products(void) {
  const int ns[4] = {1, 3, 8, 13};
  const int D = 1024, FF = 512, mq = 96, mk = 32;
  for (int di = 0; di < 3; di++)
    for (int ni = 0; ni < 4; ni++) {
      ts_dtype dt = k_dtypes[di];
      int n = ns[ni];
      char what[96];
      float *vals;
      ts_tensor nw = make_weight(ni % 2 ? TS_F32 : (dt == TS_F32 ? TS_BF16 : dt), 0, D, D, 1.5f,
                                 &vals);
      free(vals);
      ts_tensor w[3], b[3], wg, wu, wd;
      int ms[3] = {mq, mk, mk};
      for (int i = 0; i < 3; i++) {
        w[i] = make_weight(dt, ms[i], D, D, 0.05f, &vals);
        free(vals);
        b[i] = make_weight(dt, 0, ms[i], ms[i], 0.5f, &vals);
        free(vals);
      }
      wg = make_weight(dt, FF, D, D, 0.05f, &vals);
      free(vals);
      wu = make_weight(dt, FF, D, D, 0.05f, &vals);
      free(vals);
      wd = make_weight(dt, D, FF, FF, 0.05f, &vals);
      free(vals);
      float *x = rand_floats((size_t)n * D, 2.0f), *x2 = rand_floats((size_t)n * FF, 1.0f);
      float *y0 = rand_floats((size_t)n * D, 1.0f);
      float *dx = dev_floats(x, (size_t)n * D), *dx2 = dev_floats(x2, (size_t)n * FF);
      float *xn = dev_poisoned((size_t)n * D);
      float *p1[3], *p2[3];
      for (int i = 0; i < 3; i++) {
        p1[i] = dev_poisoned((size_t)n * ms[i]);
        p2[i] = dev_poisoned((size_t)n * ms[i]);
      }
      /* plain: rmsnorm, then each product with its bias */
      g_ops->rmsnorm(g_be->ctx, dx, &nw, 1e-6f, n, D, xn);
      for (int i = 0; i < 3; i++) g_ops->matmul(g_be->ctx, xn, &w[i], &b[i], n, p1[i]);
      const ts_tensor *wp[3] = {&w[0], &w[1], &w[2]}, *bp[3] = {&b[0], &b[1], &b[2]};
      g_ops->norm_matmul(g_be->ctx, dx, &nw, 1e-6f, n, 3, wp, bp, p2);
      for (int i = 0; i < 3; i++) {
        float *a = download(p1[i], (size_t)n * ms[i]), *f = download(p2[i], (size_t)n * ms[i]);
        double *ad = to_double(a, (size_t)n * ms[i]);
        snprintf(what, sizeof what, "norm_matmul %s n=%d weight %d", ts_dtype_table[dt].name, n,
                 i);
        CHECK_CLOSE(what, f, ad, (size_t)n * ms[i], 2e-5);
        free(a);
        free(f);
        free(ad);
      }
      /* gate/up + silu */
      float *g1 = dev_poisoned((size_t)n * FF), *u1 = dev_poisoned((size_t)n * FF);
      float *o2 = dev_poisoned((size_t)n * FF);
      g_ops->matmul(g_be->ctx, xn, &wg, NULL, n, g1);
      g_ops->matmul(g_be->ctx, xn, &wu, NULL, n, u1);
      g_ops->silu_mul(g_be->ctx, g1, u1, n, FF, g1);
      g_ops->norm_gate_up(g_be->ctx, dx, &nw, 1e-6f, n, &wg, &wu, o2);
      {
        float *a = download(g1, (size_t)n * FF), *f = download(o2, (size_t)n * FF);
        double *ad = to_double(a, (size_t)n * FF);
        snprintf(what, sizeof what, "norm_gate_up %s n=%d", ts_dtype_table[dt].name, n);
        CHECK_CLOSE(what, f, ad, (size_t)n * FF, 2e-5);
        free(a);
        free(f);
        free(ad);
      }
      /* residual add: y0 + x2 @ wd^T */
      float *t = dev_poisoned((size_t)n * D), *dy = dev_floats(y0, (size_t)n * D);
      g_ops->matmul(g_be->ctx, dx2, &wd, NULL, n, t);
      g_ops->matmul_add(g_be->ctx, dx2, &wd, n, dy);
      {
        float *a = download(t, (size_t)n * D), *f = download(dy, (size_t)n * D);
        double *ad = malloc((size_t)n * D * sizeof *ad);
        for (size_t i = 0; i < (size_t)n * D; i++) ad[i] = (double)y0[i] + a[i];
        snprintf(what, sizeof what, "matmul_add %s n=%d", ts_dtype_table[dt].name, n);
        CHECK_CLOSE(what, f, ad, (size_t)n * D, 2e-6);
        free(a);
        free(f);
        free(ad);
      }
      check_sync("fused products");
      float *bufs[] = {dx, dx2, xn, p1[0], p1[1], p1[2], p2[0], p2[1], p2[2], g1, u1, o2, t, dy};
      for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) g_ops->free(g_be->ctx, bufs[i]);
      ts_tensor *ts[] = {&nw, &w[0], &w[1], &w[2], &b[0], &b[1], &b[2], &wg, &wu, &wd};
      for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++) g_ops->weight_release(g_be->ctx, ts[i]);
      free(x);
      free(x2);
      free(y0);
    }
}

/* qk_rope_kv against rmsnorm + rope + kv_write: q and k, and every cache row written. */
static void test_qk_rope_kv(void) {
  const int hds[3] = {8, 64, 128};
  const ts_dtype cdt[2] = {TS_F32, TS_BF16};
  for (int hi = 0; hi < 3; hi++)
    for (int ci = 0; ci < 2; ci++)
      for (int normed = 0; normed < 2; normed++) {
        const int hd = hds[hi], nh = 4, nkv = 2, bs = 16, n_blocks = 12;
        int new_toks[3] = {1, 4, 1}, ctx[3] = {40, 20, 7};
        plan p;
        plan_make(&p, 3, new_toks, ctx, bs, n_blocks, 100);
        const int n = p.b.n_tokens;
        kv_cache kv[2];
        void *kp[2][1], *vp[2][1];
        size_t es = cdt[ci] == TS_F32 ? 4 : 2, row = (size_t)nkv * hd;
        size_t cache_bytes = (size_t)n_blocks * bs * row * es;
        void *zero = calloc(1, cache_bytes);
        for (int j = 0; j < 2; j++) {
          memset(&kv[j], 0, sizeof kv[j]);
          kv[j].n_layers = 1;
          kv[j].n_blocks = n_blocks;
          kv[j].block_size = bs;
          kv[j].n_kv_l = nkv;
          kv[j].head_dim = hd;
          kv[j].dtype = cdt[ci];
          kp[j][0] = g_ops->alloc(g_be->ctx, cache_bytes);
          vp[j][0] = g_ops->alloc(g_be->ctx, cache_bytes);
          g_ops->upload(g_be->ctx, kp[j][0], zero, cache_bytes);
          g_ops->upload(g_be->ctx, vp[j][0], zero, cache_bytes);
          kv[j].k = kp[j];
          kv[j].v = vp[j];
        }
        if (step_begin(&p.b, &kv[0])) return;
        rope_params rp = {.theta = 10000.0f, .interleaved = hi == 0, .scaling = ROPE_SCALING_NONE};
        float *vals;
        ts_tensor qn = make_weight(TS_BF16, 0, hd, hd, 1.5f, &vals);
        free(vals);
        ts_tensor kn = make_weight(TS_BF16, 0, hd, hd, 1.5f, &vals);
        free(vals);
        float *q = rand_floats((size_t)n * nh * hd, 2.0f), *k = rand_floats((size_t)n * row, 2.0f);
        float *v = rand_floats((size_t)n * row, 1.0f);
        float *q1 = dev_floats(q, (size_t)n * nh * hd), *k1 = dev_floats(k, (size_t)n * row);
        float *q2 = dev_floats(q, (size_t)n * nh * hd), *k2 = dev_floats(k, (size_t)n * row);
        float *dv = dev_floats(v, (size_t)n * row);
        if (normed) {
          g_ops->rmsnorm(g_be->ctx, q1, &qn, 1e-6f, n * nh, hd, q1);
          g_ops->rmsnorm(g_be->ctx, k1, &kn, 1e-6f, n * nkv, hd, k1);
        }
        g_ops->rope(g_be->ctx, q1, nh, hd, &rp);
        g_ops->rope(g_be->ctx, k1, nkv, hd, &rp);
        g_ops->kv_write(g_be->ctx, &kv[0], 0, k1, dv);
        g_ops->qk_rope_kv(g_be->ctx, &kv[1], 0, q2, k2, dv, nh, normed ? &qn : NULL,
                          normed ? &kn : NULL, 1e-6f, &rp);
        char what[96];
        snprintf(what, sizeof what, "qk_rope_kv hd=%d cache %s norm=%d", hd,
                 ts_dtype_table[cdt[ci]].name, normed);
        float *a = download(q1, (size_t)n * nh * hd), *f = download(q2, (size_t)n * nh * hd);
        double *ad = to_double(a, (size_t)n * nh * hd);
        CHECK_CLOSE(what, f, ad, (size_t)n * nh * hd, 1e-5);
        free(a);
        free(f);
        free(ad);
        /* the caches, decoded to float (F32 as is; BF16 rows may differ by one rounding) */
        size_t cn = (size_t)n_blocks * bs * row;
        for (int kvi = 0; kvi < 2; kvi++) {
          void *h1 = malloc(cache_bytes), *h2 = malloc(cache_bytes);
          g_ops->download(g_be->ctx, h1, kvi ? vp[0][0] : kp[0][0], cache_bytes);
          g_ops->download(g_be->ctx, h2, kvi ? vp[1][0] : kp[1][0], cache_bytes);
          float *f1 = malloc(cn * sizeof *f1), *f2 = malloc(cn * sizeof *f2);
          for (size_t i = 0; i < cn; i++) {
            f1[i] = es == 4 ? ((float *)h1)[i] : ts_bf16_to_f32(((uint16_t *)h1)[i]);
            f2[i] = es == 4 ? ((float *)h2)[i] : ts_bf16_to_f32(((uint16_t *)h2)[i]);
          }
          double *d1 = to_double(f1, cn);
          CHECK_CLOSE(what, f2, d1, cn, es == 4 ? 1e-5 : 8e-3);
          free(h1);
          free(h2);
          free(f1);
          free(f2);
          free(d1);
        }
        check_sync(what);
        float *bufs[] = {q1, k1, q2, k2, dv};
        for (size_t i = 0; i < 5; i++) g_ops->free(g_be->ctx, bufs[i]);
        for (int j = 0; j < 2; j++) {
          g_ops->free(g_be->ctx, kp[j][0]);
          g_ops->free(g_be->ctx, vp[j][0]);
        }
        g_ops->weight_release(g_be->ctx, &qn);
        g_ops->weight_release(g_be->ctx, &kn);
        free(q);
        free(k);
        free(v);
        free(zero);
        plan_free(&p);
      }
}

/* ---- sampling ---- */

/* Greedy rows against the host sampler (engine/sampling.c) on the same logits and penalty state:
 * exactly the same ids, including ties (logits on a coarse grid), NaN and infinite logits. */
static void test_sample_greedy(void) {
  const int vocabs[2] = {1000, 151936};
  for (int vi = 0; vi < 2; vi++) {
    const int V = vocabs[vi], n = vi ? 9 : 37;
    float *lg = malloc((size_t)n * V * sizeof *lg);
    for (size_t i = 0; i < (size_t)n * V; i++)
      lg[i] = (float)rand_int(41) * 0.5f - 10.0f; /* many exact ties at the top */
    lg[(size_t)1 * V + (size_t)rand_int(V)] = NAN;
    for (int j = 0; j < V; j++) lg[(size_t)2 * V + j] = NAN; /* all NaN: id 0 */
    lg[(size_t)3 * V + (size_t)rand_int(V)] = INFINITY;
    for (int j = 0; j < V; j++) lg[(size_t)4 * V + j] = -INFINITY;
    lg[(size_t)4 * V + 5] = NAN;
    sampler **smp = calloc((size_t)n, sizeof *smp);
    ts_sample_row *rows = calloc((size_t)n, sizeof *rows);
    int32_t *want = malloc((size_t)n * sizeof *want), *got = malloc((size_t)n * sizeof *got);
    for (int r = 0; r < n; r++) {
      sampling_params sp;
      sampling_params_default(&sp);
      sp.temperature = r % 3 == 0 ? 0.0f : 1e-6f;
      if (r % 2) {
        sp.repetition_penalty = 1.3f;
        sp.frequency_penalty = 0.5f;
        sp.presence_penalty = 0.25f * (float)(r % 4);
      }
      ts_err err = {0};
      CHECK_MSG(sampler_create(&smp[r], &sp, V, 7, &err) == 0, "sampler_create: %s", err.msg);
      for (int i = 0; i < 30; i++) {
        int32_t id = rand_int(V);
        sampler_observe_prompt(smp[r], &id, 1);
      }
      for (int i = 0; i < 25; i++) sampler_observe(smp[r], (int32_t)rand_int(V));
      CHECK(sampler_device_row(smp[r], &rows[r]) == 1);
    }
    float *d = dev_floats(lg, (size_t)n * V);
    ts_err err = {0};
    int rc = g_ops->sample(g_be->ctx, d, n, V, rows, got, &err);
    CHECK_MSG(rc == 0, "sample: %s", err.msg);
    int bad = 0;
    for (int r = 0; r < n; r++) {
      sample_result res;
      sampler_sample(smp[r], lg + (size_t)r * V, &res);
      want[r] = res.token;
      if (got[r] != want[r] && bad++ < 3)
        fprintf(stderr, "greedy V=%d row %d: device %d, host %d\n", V, r, got[r], want[r]);
    }
    CHECK_MSG(bad == 0, "greedy V=%d: %d of %d rows differ from the host sampler", V, bad, n);
    CHECK(want[2] == 0 && got[2] == 0);
    for (int r = 0; r < n; r++) sampler_free(smp[r]);
    g_ops->free(g_be->ctx, d);
    free(smp);
    free(rows);
    free(want);
    free(got);
    free(lg);
  }
}

typedef struct {
  const char *name;
  float temperature, top_p, min_p;
  int top_k;
  float rep, freq, pres;
  int grid; /* logits on a 0.5 grid: ties at the truncation cuts */
} samp_case;

static int cmp_desc_ref(const void *a, const void *b, void *ctx) {
  const float *v = ctx;
  int ia = *(const int *)a, ib = *(const int *)b;
  if (v[ia] != v[ib]) return v[ia] > v[ib] ? -1 : 1;
  return ia < ib ? -1 : 1;
}

/* The host sampler's truncated distribution in float64: prob [V] (0 outside the kept set). */
static void ref_dist(const samp_case *sc, const float *logits, const int32_t *pen_ids,
                     const int32_t *pen_cnt, int n_pen, int V, double *prob) {
  float *v = malloc((size_t)V * sizeof *v);
  int *ord = malloc((size_t)V * sizeof *ord);
  memcpy(v, logits, (size_t)V * sizeof *v);
  for (int i = 0; i < n_pen; i++) {
    float l = v[pen_ids[i]];
    if (sc->rep != 1.0f) l = l > 0 ? l / sc->rep : l * sc->rep;
    if (pen_cnt[i]) l -= sc->freq * (float)pen_cnt[i] + sc->pres;
    v[pen_ids[i]] = l;
  }
  if (sc->temperature != 1.0f) {
    float inv = 1.0f / sc->temperature;
    for (int i = 0; i < V; i++) v[i] *= inv;
  }
  for (int i = 0; i < V; i++) ord[i] = i;
  qsort_r(ord, (size_t)V, sizeof *ord, cmp_desc_ref, v);
  double mx = v[ord[0]];
  int n = V;
  if (sc->min_p > 0) {
    double lim = mx + log(sc->min_p);
    n = 0;
    while (n < V && v[ord[n]] >= lim) n++;
  }
  if (sc->top_k > 0 && sc->top_k < n) n = sc->top_k;
  double total = 0;
  for (int i = 0; i < n; i++) total += exp(v[ord[i]] - mx);
  if (sc->top_p < 1.0f) {
    double acc = 0, target = sc->top_p * total;
    for (int i = 0; i < n; i++) {
      acc += exp(v[ord[i]] - mx);
      if (acc >= target) {
        n = i + 1;
        break;
      }
    }
    total = acc;
  }
  for (int i = 0; i < V; i++) prob[i] = 0;
  for (int i = 0; i < n; i++) prob[ord[i]] = exp(v[ord[i]] - mx) / total;
  free(v);
  free(ord);
}

/* Stochastic rows: many draws of one distribution (one row per draw, counters 0..N-1) against
 * the float64 truncated softmax by a chi-square test; no draw outside the kept set; and the same
 * (seed, counter) gives the same id wherever the row sits in another batch. */
static void test_sample_dist(void) {
  const samp_case cases[] = {
      {"plain T=1", 1.0f, 1.0f, 0.0f, 0, 1.0f, 0.0f, 0.0f, 0},
      {"T=0.7 top_k=7", 0.7f, 1.0f, 0.0f, 7, 1.0f, 0.0f, 0.0f, 0},
      {"T=1.5 top_p=0.7", 1.5f, 0.7f, 0.0f, 0, 1.0f, 0.0f, 0.0f, 0},
      {"min_p=0.1", 1.0f, 1.0f, 0.1f, 0, 1.0f, 0.0f, 0.0f, 0},
      {"all + penalties", 0.9f, 0.9f, 0.02f, 12, 1.2f, 0.5f, 0.3f, 0},
      {"ties top_k=5", 1.0f, 1.0f, 0.0f, 5, 1.0f, 0.0f, 0.0f, 1},
      {"ties top_p=0.5", 1.0f, 0.5f, 0.0f, 0, 1.0f, 0.0f, 0.0f, 1},
  };
  const int V = 40, N = 8192;
  float *row = malloc((size_t)V * sizeof *row);
  float *lg = malloc((size_t)N * V * sizeof *lg);
  double *prob = malloc((size_t)V * sizeof *prob);
  ts_sample_row *rows = calloc((size_t)N, sizeof *rows);
  int32_t *ids = malloc((size_t)N * sizeof *ids), *ids2 = malloc((size_t)N * sizeof *ids2);
  float *d = dev_floats(NULL, (size_t)N * V);
  for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
    const samp_case *sc = &cases[ci];
    for (int i = 0; i < V; i++)
      row[i] = sc->grid ? (float)rand_int(9) * 0.5f : test_rng_float(&g_rng) * 3.0f;
    int32_t pen_ids[6], pen_cnt[6];
    for (int i = 0; i < 6; i++) {
      pen_ids[i] = i * 6 + rand_int(6); /* distinct */
      pen_cnt[i] = i % 3;
    }
    ref_dist(sc, row, pen_ids, pen_cnt, 6, V, prob);
    uint64_t seed = test_rng_next(&g_rng);
    for (int r = 0; r < N; r++) {
      memcpy(lg + (size_t)r * V, row, (size_t)V * sizeof *row);
      ts_sample_row *q = &rows[r];
      memset(q, 0, sizeof *q);
      q->temperature = sc->temperature;
      q->top_p = sc->top_p;
      q->min_p = sc->min_p;
      q->top_k = sc->top_k;
      q->repetition_penalty = sc->rep;
      q->frequency_penalty = sc->freq;
      q->presence_penalty = sc->pres;
      q->seed = seed;
      q->counter = (uint64_t)r;
      q->n_penalty = 6;
      q->penalty_ids = pen_ids;
      q->penalty_counts = pen_cnt;
    }
    g_ops->upload(g_be->ctx, d, lg, (size_t)N * V * sizeof(float));
    ts_err err = {0};
    int rc = g_ops->sample(g_be->ctx, d, N, V, rows, ids, &err);
    CHECK_MSG(rc == 0, "sample %s: %s", sc->name, err.msg);
    int count[64] = {0}, outside = 0;
    for (int r = 0; r < N; r++) {
      if (ids[r] < 0 || ids[r] >= V || prob[ids[r]] == 0) outside++;
      else count[ids[r]]++;
    }
    CHECK_MSG(outside == 0, "sample %s: %d draws outside the kept set", sc->name, outside);
    /* Chi-square over the kept tokens, those expected fewer than 5 times pooled. */
    double chi = 0, pool_o = 0, pool_e = 0;
    int df = -1, kept = 0;
    for (int i = 0; i < V; i++) {
      if (prob[i] == 0) continue;
      kept++;
      double e = prob[i] * N;
      if (e < 5) {
        pool_o += count[i];
        pool_e += e;
        continue;
      }
      chi += (count[i] - e) * (count[i] - e) / e;
      df++;
    }
    if (pool_e > 0) {
      chi += (pool_o - pool_e) * (pool_o - pool_e) / pool_e;
      df++;
    }
    /* Far in the tail (p < 1e-6 for these df): a wrong temperature or cut gives thousands. */
    double lim = df + 6.0 * sqrt(2.0 * (df > 0 ? df : 1)) + 12.0;
    CHECK_MSG(chi <= lim, "sample %s: chi-square %.1f over %d dof (limit %.1f, %d kept)",
              sc->name, chi, df, lim, kept);
    CHECK_MSG(kept > 1, "sample %s: the case keeps only %d token", sc->name, kept);
    /* Batch independence: the first 1000 rows again, reversed, at other batch positions. */
    const int M = 1000;
    for (int r = 0; r < M; r++) {
      memcpy(lg + (size_t)r * V, row, (size_t)V * sizeof *row);
      rows[r] = rows[N - 1 - r];
    }
    g_ops->upload(g_be->ctx, d, lg, (size_t)M * V * sizeof(float));
    rc = g_ops->sample(g_be->ctx, d, M, V, rows, ids2, &err);
    CHECK_MSG(rc == 0, "sample %s again: %s", sc->name, err.msg);
    int moved = 0;
    for (int r = 0; r < M; r++) moved += ids2[r] != ids[N - 1 - r];
    CHECK_MSG(moved == 0, "sample %s: %d draws changed with their batch position", sc->name,
              moved);
  }
  g_ops->free(g_be->ctx, d);
  free(row);
  free(lg);
  free(prob);
  free(rows);
  free(ids);
  free(ids2);
}

/* A model-sized vocabulary: draws stay inside the reference's kept set, and top_k = 1 is the
 * argmax of the tempered logits. */
static void test_sample_large(void) {
  const int V = 151936, n = 12;
  float *lg = rand_floats((size_t)n * V, 8.0f);
  double *prob = malloc((size_t)V * sizeof *prob);
  ts_sample_row rows[12];
  samp_case cs[12];
  for (int r = 0; r < n; r++) {
    samp_case c = {"large", 0.5f + 0.1f * (float)r, 1.0f, 0.0f, 0, 1.0f, 0.0f, 0.0f, 0};
    if (r % 4 == 0) c.top_k = 1 + rand_int(60);
    if (r % 4 == 1) c.top_p = 0.05f + 0.1f * (float)rand_int(9);
    if (r % 4 == 2) c.min_p = 0.01f * (float)(1 + rand_int(20));
    if (r % 4 == 3) c.top_k = 1;
    cs[r] = c;
    memset(&rows[r], 0, sizeof rows[r]);
    rows[r].temperature = c.temperature;
    rows[r].top_p = c.top_p;
    rows[r].min_p = c.min_p;
    rows[r].top_k = c.top_k;
    rows[r].repetition_penalty = 1.0f;
    rows[r].seed = test_rng_next(&g_rng);
  }
  float *d = dev_floats(lg, (size_t)n * V);
  int32_t ids[12];
  ts_err err = {0};
  int rc = g_ops->sample(g_be->ctx, d, n, V, rows, ids, &err);
  CHECK_MSG(rc == 0, "sample large: %s", err.msg);
  for (int r = 0; r < n; r++) {
    ref_dist(&cs[r], lg + (size_t)r * V, NULL, NULL, 0, V, prob);
    CHECK_MSG(ids[r] >= 0 && ids[r] < V && prob[ids[r]] > 0,
              "sample large row %d (top_k %d top_p %g min_p %g): id %d outside the kept set", r,
              cs[r].top_k, cs[r].top_p, cs[r].min_p, ids[r]);
  }
  g_ops->free(g_be->ctx, d);
  free(lg);
  free(prob);
}

int main(void) {
  ts_err err = {0};
  int rc = backend_cuda_create(&g_be, 0, &err);
  if (rc != 0) {
    if (strncmp(err.msg, "no CUDA device", 14) == 0) {
      printf("skipped: no CUDA device (%s)\n", err.msg);
      return 0;
    }
    fprintf(stderr, "backend_cuda_create: %s\n", err.msg);
    return 1;
  }
  g_ops = g_be->ops;
  g_rng.s = test_seed(0x63756461u);
  CHECK(strcmp(g_ops->name, "cuda") == 0);
  /* TESSERA_CUDA_OPS_ONLY=attention: the attention cases alone (for compute-sanitizer). */
  const char *only = getenv("TESSERA_CUDA_OPS_ONLY");
  int all = !only || strcmp(only, "attention") != 0;
  if (all) {
    test_embed_gather();
    test_norms();
    test_matmul();
    test_rope();
    test_silu_mul();
  }
  test_attention();
  test_attention_decode_split();
  if (all) {
    test_step_errors();
    test_fused_products();
    test_qk_rope_kv();
    test_sample_greedy();
    test_sample_dist();
    test_sample_large();
  }
  check_sync("end");
  g_be->destroy(g_be);
  return test_finish("test_cuda_ops");
}
