/* Every CUDA backend op against a float64 reference on random inputs (llama.cpp's
 * test-backend-ops idea): embedding, RMSNorm (+ fused add), matmul in F32/BF16/F16 with bias and
 * strided shards, RoPE (both pairings, llama3 scaling), SiLU*mul, gather_rows, KV writes and paged
 * attention (prefill, mixed, GQA, long split decode) over F32/BF16/F16 caches. Outputs are
 * poisoned with NaN before each op, so an unwritten element fails. Without a GPU it prints
 * "skipped: no CUDA device" and passes. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../test_util.h"
#include "backend/backend.h"
#include "backend/cuda/backend_cuda.h"

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
  int new_toks[4], ctx[4];
  int n_kv, n_head, hd, block_size;
  ts_dtype kv_dtype;
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
  CHECK_CLOSE(what, h, ref, qn, 2e-5);
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
       TS_F32},
      {"stories-like hd8", 2, {9, 1}, {9, 33}, 4, 8, 8, 16, TS_F32},
      {"MHA hd128 bf16", 3, {20, 1, 3}, {20, 70, 90}, 3, 3, 128, 32, TS_BF16},
      {"long decode split GQA8 hd128", 3, {1, 1, 1}, {700, 2100, 1500}, 2, 16, 128, 16,
       TS_BF16},
      {"group20 hd80 f16", 2, {3, 1}, {40, 600}, 1, 20, 80, 8, TS_F16},
      {"long prefill chunk hd256", 1, {70, 0, 0, 0}, {1100, 0, 0, 0}, 1, 2, 256, 16, TS_F32},
      /* decode kernel (one token per sequence, group <= 8, head_dim a multiple of 32) */
      {"decode GQA4 hd64 f16", 4, {1, 1, 1, 1}, {1, 64, 300, 129}, 2, 8, 64, 16, TS_F16},
      {"decode GQA2 hd96 f32", 2, {1, 1}, {5, 260}, 4, 8, 96, 16, TS_F32},
      {"decode MHA hd32 bf16", 3, {1, 1, 1}, {33, 2, 520}, 4, 4, 32, 8, TS_BF16},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) test_attention_case(&cases[i]);
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
  CHECK(strcmp(g_ops->name, "cuda") == 0);
  test_embed_gather();
  test_norms();
  test_matmul();
  test_rope();
  test_silu_mul();
  test_attention();
  test_step_errors();
  check_sync("end");
  g_be->destroy(g_be);
  return test_finish("test_cuda_ops");
}
