/* The forward pass, differentially: (1) a synthetic model with random weights (Llama, Qwen2 with
 * q/k/v bias, Qwen3 with q/k norm; NEOX and interleaved RoPE, llama3 scaling, GQA) against a
 * dense double-precision reference written here (weights stored as F32, F16 or BF16), with one rank and with two tensor-parallel ranks
 * all-reducing through an in-test comm; (2) stories260K: whole-prompt prefill, token-by-token
 * decode and chunked prefill of two interleaved sequences over shuffled KV blocks give the same
 * logits, a two-stage pipeline split matches one stage, and the GGUF file matches the HF one. */
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend/backend.h"
#include "dist/comm.h"
#include "model/forward.h"
#include "model/model.h"
#include "test_util.h"

static test_rng rng = {0x7a3c9e1f5b2d4c68ull};
static int rnd(int lo, int hi) { return lo + (int)(test_rng_next(&rng) % (uint64_t)(hi - lo + 1)); }

/* ---- a plan over several sequences ---------------------------------------------------- */

#define MAXT 512
typedef struct {
  ts_batch b;
  int32_t tokens[MAXT], pos[MAXT], seq_start[5], ctx_len[4], rows[MAXT];
} plan;

/* Step of seqs s in [0, ns): tokens [from[s], to[s]) of seq[s]; logits for every token. */
static void make_step(plan *p, int ns, int32_t *const *seq, const int *from, const int *to,
                      const int32_t *table, int max_blocks) {
  int t = 0;
  for (int s = 0; s < ns; s++) {
    p->seq_start[s] = t;
    p->ctx_len[s] = to[s];
    for (int i = from[s]; i < to[s]; i++, t++) {
      p->tokens[t] = seq[s][i];
      p->pos[t] = i;
      p->rows[t] = t;
    }
  }
  p->seq_start[ns] = t;
  p->b = (ts_batch){t, p->tokens, p->pos, ns, p->seq_start, p->ctx_len, max_blocks, table, t, p->rows};
}

static float row_max(const float *x, int n) {
  float m = 0;
  for (int i = 0; i < n; i++) m = fabsf(x[i]) > m ? fabsf(x[i]) : m;
  return m;
}

/* max |a - b| / max |b| over a row. */
static double rel_err(const float *a, const float *b, int n) {
  double e = 0;
  for (int i = 0; i < n; i++) e = fabs(a[i] - b[i]) > e ? fabs(a[i] - b[i]) : e;
  return e / (row_max(b, n) + 1e-30);
}

/* ---- synthetic model ------------------------------------------------------------------ */

typedef struct {
  model_config c;
  float *embd, *out_norm, *lm_head;
  struct {
    float *attn_norm, *wq, *wk, *wv, *bq, *bk, *bv, *qn, *kn, *wo, *ffn_norm, *wg, *wu, *wd;
  } L[2];
  ts_dtype dt;         /* storage of every weight: F32, or F16/BF16 copies below */
  int n_half;
  float *half_src[40]; /* float master (already rounded to dt) -> its 16-bit copy */
  uint16_t *half[40];
} syn_model;

/* Rounds a float master buffer to s->dt in place and keeps the 16-bit copy the model reads. */
static void syn_store(syn_model *s, float *p, size_t n) {
  if (s->dt == TS_F32) return;
  uint16_t *h = malloc(n * sizeof *h);
  for (size_t i = 0; i < n; i++) {
    h[i] = s->dt == TS_F16 ? ts_f32_to_f16(p[i]) : ts_f32_to_bf16(p[i]);
    p[i] = s->dt == TS_F16 ? ts_f16_to_f32(h[i]) : ts_bf16_to_f32(h[i]);
  }
  s->half_src[s->n_half] = p;
  s->half[s->n_half++] = h;
}

/* The tensor data for element `off` of master buffer p, in the model's storage dtype. */
static void *syn_data(const syn_model *s, float *p, int64_t off) {
  for (int i = 0; i < s->n_half; i++)
    if (s->half_src[i] == p) return s->half[i] + off;
  return p + off;
}

static float *rand_buf(size_t n, float scale, float offset) {
  float *p = malloc(n * sizeof(float));
  for (size_t i = 0; i < n; i++) p[i] = offset + scale * test_rng_float(&rng);
  return p;
}

static void syn_init(syn_model *s, model_arch arch, int interleaved, int llama3, ts_dtype dt) {
  memset(s, 0, sizeof *s);
  s->dt = dt;
  model_config *c = &s->c;
  c->arch = arch;
  c->vocab_size = 97;
  c->d_model = 40;
  c->n_layer = 2;
  c->n_head = 4;
  c->n_kv_head = 2;
  c->head_dim = 12;
  c->d_ff = 68;
  c->max_pos = 4096;
  c->rms_eps = 1e-6f;
  c->rope_theta = 10000.0f;
  c->rope_interleaved = interleaved;
  if (llama3) {
    c->rope_scaling = ROPE_SCALING_LLAMA3;
    c->rope_factor = 8;
    c->rope_low_freq_factor = 1;
    c->rope_high_freq_factor = 4;
    c->rope_orig_max_pos = 64;
  }
  c->qkv_bias = arch == ARCH_QWEN2;
  c->qk_norm = arch == ARCH_QWEN3;
  c->bos_id = -1;
  int d = c->d_model, q = c->n_head * c->head_dim, kv = c->n_kv_head * c->head_dim, ff = c->d_ff;
  s->embd = rand_buf((size_t)c->vocab_size * d, 1.0f, 0);
  s->out_norm = rand_buf(d, 0.3f, 1.0f);
  s->lm_head = rand_buf((size_t)c->vocab_size * d, 0.3f, 0);
  for (int l = 0; l < 2; l++) {
    s->L[l].attn_norm = rand_buf(d, 0.3f, 1.0f);
    s->L[l].wq = rand_buf((size_t)q * d, 0.3f, 0);
    s->L[l].wk = rand_buf((size_t)kv * d, 0.3f, 0);
    s->L[l].wv = rand_buf((size_t)kv * d, 0.3f, 0);
    s->L[l].bq = rand_buf(q, 0.5f, 0);
    s->L[l].bk = rand_buf(kv, 0.5f, 0);
    s->L[l].bv = rand_buf(kv, 0.5f, 0);
    s->L[l].qn = rand_buf(c->head_dim, 0.3f, 1.0f);
    s->L[l].kn = rand_buf(c->head_dim, 0.3f, 1.0f);
    s->L[l].wo = rand_buf((size_t)d * q, 0.2f, 0);
    s->L[l].ffn_norm = rand_buf(d, 0.3f, 1.0f);
    s->L[l].wg = rand_buf((size_t)ff * d, 0.3f, 0);
    s->L[l].wu = rand_buf((size_t)ff * d, 0.3f, 0);
    s->L[l].wd = rand_buf((size_t)d * ff, 0.2f, 0);
  }
  syn_store(s, s->embd, (size_t)c->vocab_size * d);
  syn_store(s, s->out_norm, d);
  syn_store(s, s->lm_head, (size_t)c->vocab_size * d);
  for (int l = 0; l < 2; l++) {
    syn_store(s, s->L[l].attn_norm, d);
    syn_store(s, s->L[l].wq, (size_t)q * d);
    syn_store(s, s->L[l].wk, (size_t)kv * d);
    syn_store(s, s->L[l].wv, (size_t)kv * d);
    syn_store(s, s->L[l].bq, q);
    syn_store(s, s->L[l].bk, kv);
    syn_store(s, s->L[l].bv, kv);
    syn_store(s, s->L[l].qn, c->head_dim);
    syn_store(s, s->L[l].kn, c->head_dim);
    syn_store(s, s->L[l].wo, (size_t)d * q);
    syn_store(s, s->L[l].ffn_norm, d);
    syn_store(s, s->L[l].wg, (size_t)ff * d);
    syn_store(s, s->L[l].wu, (size_t)ff * d);
    syn_store(s, s->L[l].wd, (size_t)d * ff);
  }
}

static void syn_free(syn_model *s) {
  free(s->embd);
  free(s->out_norm);
  free(s->lm_head);
  for (int l = 0; l < 2; l++) {
    float *p[] = {s->L[l].attn_norm, s->L[l].wq, s->L[l].wk, s->L[l].wv, s->L[l].bq,
                  s->L[l].bk, s->L[l].bv, s->L[l].qn, s->L[l].kn, s->L[l].wo,
                  s->L[l].ffn_norm, s->L[l].wg, s->L[l].wu, s->L[l].wd};
    for (size_t i = 0; i < sizeof p / sizeof p[0]; i++) free(p[i]);
  }
  for (int i = 0; i < s->n_half; i++) free(s->half[i]);
}

static ts_tensor vec(const syn_model *s, float *p, int64_t off, int64_t n) {
  ts_tensor t = {syn_data(s, p, off), s->dt, 1, {n}, n};
  return t;
}
/* Rows [r0, r0+nr) or columns [c0, c0+nc) of a [rows][cols] matrix, as the loader shards them. */
static ts_tensor mat(const syn_model *s, float *p, int64_t rows, int64_t cols, int64_t r0,
                     int64_t nr, int64_t c0, int64_t nc) {
  ts_tensor t = {syn_data(s, p, r0 * cols + c0), s->dt, 2, {nr, nc}, cols};
  (void)rows;
  return t;
}

/* The rank's model over the synthetic weights (views, like the loader's). */
static model *syn_rank(syn_model *s, backend *be, int rank, int size, comm *c) {
  model *m = calloc(1, sizeof *m);
  m->cfg = s->c;
  const model_config *k = &s->c;
  m->shard = (model_shard){rank, size, 0, 1, 0, k->n_layer};
  m->be = be;
  m->tp_comm = c;
  m->max_tokens = 64;
  int d = k->d_model, hd = k->head_dim, q = k->n_head * hd, kv = k->n_kv_head * hd, ff = k->d_ff;
  int ql = q / size, kvl = kv / size, ffl = ff / size;
  m->w.tok_embd = mat(s, s->embd, k->vocab_size, d, 0, k->vocab_size, 0, d);
  m->w.out_norm = vec(s, s->out_norm, 0, d);
  m->w.lm_head = mat(s, s->lm_head, k->vocab_size, d, 0, k->vocab_size, 0, d);
  m->w.n_layers = k->n_layer;
  m->w.layers = calloc(2, sizeof *m->w.layers);
  for (int l = 0; l < 2; l++) {
    layer_weights *L = &m->w.layers[l];
    L->attn_norm = vec(s, s->L[l].attn_norm, 0, d);
    L->wq = mat(s, s->L[l].wq, q, d, rank * ql, ql, 0, d);
    L->wk = mat(s, s->L[l].wk, kv, d, rank * kvl, kvl, 0, d);
    L->wv = mat(s, s->L[l].wv, kv, d, rank * kvl, kvl, 0, d);
    if (k->qkv_bias) {
      L->bq = vec(s, s->L[l].bq, rank * ql, ql);
      L->bk = vec(s, s->L[l].bk, rank * kvl, kvl);
      L->bv = vec(s, s->L[l].bv, rank * kvl, kvl);
    }
    if (k->qk_norm) {
      L->q_norm = vec(s, s->L[l].qn, 0, hd);
      L->k_norm = vec(s, s->L[l].kn, 0, hd);
    }
    L->wo = mat(s, s->L[l].wo, d, q, 0, d, rank * ql, ql);
    L->ffn_norm = vec(s, s->L[l].ffn_norm, 0, d);
    L->w_gate = mat(s, s->L[l].wg, ff, d, rank * ffl, ffl, 0, d);
    L->w_up = mat(s, s->L[l].wu, ff, d, rank * ffl, ffl, 0, d);
    L->w_down = mat(s, s->L[l].wd, d, ff, 0, d, rank * ffl, ffl);
  }
  ts_err err = {0};
  CHECK_MSG(forward_scratch_create(m, &err) == 0, "%s", err.msg);
  return m;
}

static void syn_rank_free(model *m) {
  forward_scratch_free(m);
  free(m->w.layers);
  free(m);
}

static void ref_rmsnorm(const double *x, const float *w, int n, double eps, double *out) {
  double ss = 0;
  for (int i = 0; i < n; i++) ss += x[i] * x[i];
  double inv = 1 / sqrt(ss / n + eps);
  for (int i = 0; i < n; i++) out[i] = x[i] * inv * w[i];
}

static double ref_inv_freq(const model_config *c, int i) {
  double inv = 1.0 / pow(c->rope_theta, 2.0 * i / c->head_dim);
  if (c->rope_scaling == ROPE_SCALING_LLAMA3) {
    double wl = 2 * M_PI / inv, lo = c->rope_orig_max_pos / c->rope_low_freq_factor,
           hi = c->rope_orig_max_pos / c->rope_high_freq_factor;
    if (wl > lo) inv /= c->rope_factor;
    else if (wl >= hi) {
      double sm = (c->rope_orig_max_pos / wl - c->rope_low_freq_factor) /
                  (c->rope_high_freq_factor - c->rope_low_freq_factor);
      inv = (1 - sm) * inv / c->rope_factor + sm * inv;
    }
  }
  return inv;
}

static void ref_rope(const model_config *c, double *v, int pos) {
  int hd = c->head_dim, half = hd / 2;
  for (int i = 0; i < half; i++) {
    double a = pos * ref_inv_freq(c, i);
    int ia = c->rope_interleaved ? 2 * i : i, ib = c->rope_interleaved ? 2 * i + 1 : i + half;
    double x0 = v[ia], x1 = v[ib];
    v[ia] = x0 * cos(a) - x1 * sin(a);
    v[ib] = x1 * cos(a) + x0 * sin(a);
  }
}

static void ref_linear(const double *x, const float *w, const float *b, int m, int k, double *y) {
  for (int r = 0; r < m; r++) {
    double acc = b ? b[r] : 0;
    for (int i = 0; i < k; i++) acc += x[i] * w[(size_t)r * k + i];
    y[r] = acc;
  }
}

/* Dense reference: logits [n][vocab] of one whole sequence. */
static void ref_forward(const syn_model *s, const int32_t *ids, int n, float *logits) {
  const model_config *c = &s->c;
  int d = c->d_model, hd = c->head_dim, nh = c->n_head, nkv = c->n_kv_head, ff = c->d_ff;
  int q = nh * hd, kv = nkv * hd;
  double *h = calloc((size_t)n * d, sizeof(double)), *xn = malloc(sizeof(double) * d);
  double *Q = malloc(sizeof(double) * n * q), *K = malloc(sizeof(double) * n * kv);
  double *Vv = malloc(sizeof(double) * n * kv), *att = malloc(sizeof(double) * q);
  double *tmp = malloc(sizeof(double) * (ff > d ? ff : d) * 2), *sc = malloc(sizeof(double) * n);
  for (int t = 0; t < n; t++)
    for (int i = 0; i < d; i++) h[t * d + i] = s->embd[(size_t)ids[t] * d + i];
  for (int l = 0; l < c->n_layer; l++) {
    for (int t = 0; t < n; t++) {
      ref_rmsnorm(h + t * d, s->L[l].attn_norm, d, c->rms_eps, xn);
      ref_linear(xn, s->L[l].wq, c->qkv_bias ? s->L[l].bq : NULL, q, d, Q + t * q);
      ref_linear(xn, s->L[l].wk, c->qkv_bias ? s->L[l].bk : NULL, kv, d, K + t * kv);
      ref_linear(xn, s->L[l].wv, c->qkv_bias ? s->L[l].bv : NULL, kv, d, Vv + t * kv);
      for (int hh = 0; hh < nh; hh++) {
        if (c->qk_norm) ref_rmsnorm(Q + t * q + hh * hd, s->L[l].qn, hd, c->rms_eps, Q + t * q + hh * hd);
        ref_rope(c, Q + t * q + hh * hd, t);
      }
      for (int hh = 0; hh < nkv; hh++) {
        if (c->qk_norm) ref_rmsnorm(K + t * kv + hh * hd, s->L[l].kn, hd, c->rms_eps, K + t * kv + hh * hd);
        ref_rope(c, K + t * kv + hh * hd, t);
      }
    }
    for (int t = 0; t < n; t++) {
      for (int hh = 0; hh < nh; hh++) {
        int g = hh / (nh / nkv);
        double mx = -1e300, sum = 0;
        for (int j = 0; j <= t; j++) {
          double dd = 0;
          for (int i = 0; i < hd; i++) dd += Q[t * q + hh * hd + i] * K[j * kv + g * hd + i];
          sc[j] = dd / sqrt((double)hd);
          mx = sc[j] > mx ? sc[j] : mx;
        }
        for (int j = 0; j <= t; j++) sum += (sc[j] = exp(sc[j] - mx));
        for (int i = 0; i < hd; i++) {
          double o = 0;
          for (int j = 0; j <= t; j++) o += sc[j] / sum * Vv[j * kv + g * hd + i];
          att[hh * hd + i] = o;
        }
      }
      ref_linear(att, s->L[l].wo, NULL, d, q, tmp);
      for (int i = 0; i < d; i++) h[t * d + i] += tmp[i];
      ref_rmsnorm(h + t * d, s->L[l].ffn_norm, d, c->rms_eps, xn);
      double *gt = tmp, *up = tmp + ff;
      ref_linear(xn, s->L[l].wg, NULL, ff, d, gt);
      ref_linear(xn, s->L[l].wu, NULL, ff, d, up);
      for (int i = 0; i < ff; i++) gt[i] = gt[i] / (1 + exp(-gt[i])) * up[i];
      double *dn = malloc(sizeof(double) * d);
      ref_linear(gt, s->L[l].wd, NULL, d, ff, dn);
      for (int i = 0; i < d; i++) h[t * d + i] += dn[i];
      free(dn);
    }
  }
  double *lg = malloc(sizeof(double) * c->vocab_size);
  for (int t = 0; t < n; t++) {
    ref_rmsnorm(h + t * d, s->out_norm, d, c->rms_eps, xn);
    ref_linear(xn, s->lm_head, NULL, c->vocab_size, d, lg);
    for (int v = 0; v < c->vocab_size; v++) logits[(size_t)t * c->vocab_size + v] = (float)lg[v];
  }
  free(lg);
  free(h);
  free(xn);
  free(Q);
  free(K);
  free(Vv);
  free(att);
  free(tmp);
  free(sc);
}

/* Two-rank comm: each rank posts its buffer, both sum after a barrier. */
typedef struct {
  pthread_barrier_t bar;
  float *bufs[2];
} duo;
static duo duo_state;

static int duo_all_reduce(comm *c, float *buf, size_t n, ts_err *err) {
  (void)err;
  duo_state.bufs[c->rank] = buf;
  pthread_barrier_wait(&duo_state.bar);
  float *sum = malloc(n * sizeof(float));
  for (size_t i = 0; i < n; i++) sum[i] = duo_state.bufs[0][i] + duo_state.bufs[1][i];
  pthread_barrier_wait(&duo_state.bar);
  memcpy(buf, sum, n * sizeof(float));
  free(sum);
  return 0;
}
static const comm_ops duo_ops = {.name = "test-duo", .all_reduce_sum_f32 = duo_all_reduce};

typedef struct {
  model *m;
  kv_cache kv;
  const ts_batch *b;
  float *logits;
  int rc;
  ts_err err;
} rank_job;

static void *rank_run(void *arg) {
  rank_job *j = arg;
  j->rc = model_forward(j->m, &j->kv, j->b, NULL, NULL, j->logits, &j->err);
  return NULL;
}

static void test_synthetic(backend *be) {
  struct {
    model_arch arch;
    int inter, llama3;
    ts_dtype dt;
  } cases[] = {{ARCH_LLAMA, 0, 0, TS_F32},
               {ARCH_LLAMA, 1, 1, TS_BF16},
               {ARCH_QWEN2, 0, 0, TS_F16},
               {ARCH_QWEN3, 0, 1, TS_BF16}};
  for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
    syn_model s;
    syn_init(&s, cases[ci].arch, cases[ci].inter, cases[ci].llama3, cases[ci].dt);
    int V = s.c.vocab_size;
    /* Two sequences of different lengths, run in random chunks, interleaved in each step. */
    int len[2] = {rnd(20, 60), rnd(5, 40)};
    int32_t *seq[2];
    float *want[2];
    for (int q = 0; q < 2; q++) {
      seq[q] = malloc(sizeof(int32_t) * len[q]);
      for (int i = 0; i < len[q]; i++) seq[q][i] = rnd(0, V - 1);
      want[q] = malloc(sizeof(float) * len[q] * V);
      ref_forward(&s, seq[q], len[q], want[q]);
    }
    int32_t table[2 * 16];
    for (int i = 0; i < 32; i++) table[i] = i;
    for (int i = 31; i > 0; i--) {
      int j = rnd(0, i), t = table[i];
      table[i] = table[j];
      table[j] = t;
    }
    for (int tp = 1; tp <= 2; tp++) {
      comm duo_comm[2] = {{.ops = &duo_ops, .rank = 0, .size = 2},
                          {.ops = &duo_ops, .rank = 1, .size = 2}};
      rank_job jobs[2];
      memset(jobs, 0, sizeof jobs);
      /* Each rank has its own backend, as each worker process does (a backend's thread pool
       * runs one op at a time). */
      backend *rbe[2] = {be, NULL};
      ts_err berr = {0};
      if (tp == 2) CHECK(backend_create(&rbe[1], "cpu", 1, &berr) == 0);
      for (int r = 0; r < tp; r++) {
        jobs[r].m = syn_rank(&s, rbe[r], r, tp, tp == 2 ? &duo_comm[r] : NULL);
        ts_err err = {0};
        CHECK(kv_cache_create(&jobs[r].kv, rbe[r], 2, 32, 4, s.c.n_kv_head / tp, s.c.head_dim, &err) == 0);
      }
      if (tp == 2) pthread_barrier_init(&duo_state.bar, NULL, 2);
      int done[2] = {0, 0};
      double worst = 0;
      while (done[0] < len[0] || done[1] < len[1]) {
        int from[2], to[2];
        for (int q = 0; q < 2; q++) {
          from[q] = done[q];
          to[q] = done[q] + rnd(0, 9);
          if (to[q] > len[q]) to[q] = len[q];
        }
        plan p;
        make_step(&p, 2, seq, from, to, table, 16);
        float *lg[2] = {malloc(sizeof(float) * (p.b.n_tokens + 1) * V), malloc(sizeof(float) * (p.b.n_tokens + 1) * V)};
        pthread_t th[2];
        for (int r = 0; r < tp; r++) {
          jobs[r].b = &p.b;
          jobs[r].logits = lg[r];
          if (tp == 2) pthread_create(&th[r], NULL, rank_run, &jobs[r]);
          else rank_run(&jobs[r]);
        }
        if (tp == 2)
          for (int r = 0; r < 2; r++) pthread_join(th[r], NULL);
        for (int r = 0; r < tp; r++) CHECK_MSG(jobs[r].rc == 0, "forward: %s", jobs[r].err.msg);
        for (int q = 0; q < 2; q++)
          for (int t = p.seq_start[q]; t < p.seq_start[q + 1]; t++) {
            const float *ref = want[q] + (size_t)p.pos[t] * V;
            for (int r = 0; r < tp; r++) {
              double e = rel_err(lg[r] + (size_t)t * V, ref, V);
              worst = e > worst ? e : worst;
            }
          }
        free(lg[0]);
        free(lg[1]);
        done[0] = to[0];
        done[1] = to[1];
      }
      CHECK_MSG(worst < 1e-4, "arch %d interleaved %d llama3 %d tp %d: logits off by %g",
                cases[ci].arch, cases[ci].inter, cases[ci].llama3, tp, worst);
      if (tp == 2) pthread_barrier_destroy(&duo_state.bar);
      for (int r = 0; r < tp; r++) {
        kv_cache_free(&jobs[r].kv, rbe[r]);
        syn_rank_free(jobs[r].m);
      }
      backend_destroy(rbe[1]);
    }
    for (int q = 0; q < 2; q++) {
      free(seq[q]);
      free(want[q]);
    }
    syn_free(&s);
  }
}

/* ---- stories260K ---------------------------------------------------------------------- */

/* Logits of every position of seq, computed one token per step. */
static void decode_all(model *m, backend *be, const int32_t *seq, int n, float *out) {
  kv_cache kv;
  ts_err err = {0};
  CHECK(kv_cache_create(&kv, be, m->w.n_layers, 8, 16, m->cfg.n_kv_head, m->cfg.head_dim, &err) == 0);
  int32_t table[8] = {3, 1, 7, 0, 5, 2, 6, 4};
  int32_t *const seqs[1] = {(int32_t *)seq};
  for (int i = 0; i < n; i++) {
    plan p;
    int from[1] = {i}, to[1] = {i + 1};
    make_step(&p, 1, seqs, from, to, table, 8);
    CHECK(model_forward(m, &kv, &p.b, NULL, NULL, out + (size_t)i * m->cfg.vocab_size, &err) == 0);
  }
  kv_cache_free(&kv, be);
}

static void test_stories(backend *be) {
  char hf[1024], gg[1024];
  snprintf(hf, sizeof hf, "%s/models/stories260K-hf", test_shared_dir());
  snprintf(gg, sizeof gg, "%s/models/stories260K/stories260K.gguf", test_shared_dir());
  ts_err err = {0};
  model *m = NULL, *mg = NULL;
  CHECK_MSG(model_load(&m, hf, NULL, be, 128, &err) == 0, "%s", err.msg);
  CHECK_MSG(model_load(&mg, gg, NULL, be, 128, &err) == 0, "%s", err.msg);
  if (!m || !mg) return;
  const int V = m->cfg.vocab_size, n = rnd(60, 120);
  int32_t seq[2][128];
  for (int q = 0; q < 2; q++)
    for (int i = 0; i < n; i++) seq[q][i] = rnd(0, V - 1);
  float *dec = malloc(sizeof(float) * n * V), *pre = malloc(sizeof(float) * n * V);
  float *chunk = malloc(sizeof(float) * 2 * n * V), *gguf = malloc(sizeof(float) * n * V);
  decode_all(m, be, seq[0], n, dec);
  decode_all(mg, be, seq[0], n, gguf);

  /* Whole prompt in one step. */
  kv_cache kv;
  CHECK(kv_cache_create(&kv, be, 5, 16, 16, m->cfg.n_kv_head, m->cfg.head_dim, &err) == 0);
  int32_t table[16];
  for (int i = 0; i < 16; i++) table[i] = 15 - i;
  int32_t *const seqs[2] = {seq[0], seq[1]};
  plan p;
  int from[2] = {0, 0}, to[2] = {n, n};
  make_step(&p, 1, seqs, from, to, table, 8);
  CHECK(model_forward(m, &kv, &p.b, NULL, NULL, pre, &err) == 0);
  double e_pre = 0, e_gguf = 0;
  for (int t = 0; t < n; t++) {
    double e = rel_err(pre + (size_t)t * V, dec + (size_t)t * V, V);
    e_pre = e > e_pre ? e : e_pre;
    e = rel_err(gguf + (size_t)t * V, dec + (size_t)t * V, V);
    e_gguf = e > e_gguf ? e : e_gguf;
  }
  CHECK_MSG(e_pre < 1e-5, "prefill vs decode: %g", e_pre);
  CHECK_MSG(e_gguf < 1e-4, "gguf vs hf: %g", e_gguf);

  /* Chunked prefill: seq 0 again (fresh blocks) and seq 1, random chunks in shared steps. The
   * second sequence's block table lives in the second row of a two-row table. */
  int32_t table2[2][8] = {{0, 2, 4, 6, 8, 10, 12, 14}, {1, 3, 5, 7, 9, 11, 13, 15}};
  int done[2] = {0, 0};
  float *dec1 = malloc(sizeof(float) * n * V);
  decode_all(m, be, seq[1], n, dec1);
  double e_chunk = 0;
  while (done[0] < n || done[1] < n) {
    for (int q = 0; q < 2; q++) {
      from[q] = done[q];
      to[q] = done[q] + rnd(0, 33);
      if (to[q] > n) to[q] = n;
    }
    make_step(&p, 2, seqs, from, to, &table2[0][0], 8);
    if (p.b.n_tokens > 128) continue;
    CHECK(model_forward(m, &kv, &p.b, NULL, NULL, chunk, &err) == 0);
    for (int q = 0; q < 2; q++)
      for (int t = p.seq_start[q]; t < p.seq_start[q + 1]; t++) {
        const float *ref = (q ? dec1 : dec) + (size_t)p.pos[t] * V;
        double e = rel_err(chunk + (size_t)t * V, ref, V);
        e_chunk = e > e_chunk ? e : e_chunk;
      }
    done[0] = to[0];
    done[1] = to[1];
  }
  CHECK_MSG(e_chunk < 1e-5, "chunked prefill vs decode: %g", e_chunk);

  /* Two pipeline stages: layers [0, 2) hand hidden states to [2, 5). */
  model *st[2] = {NULL, NULL};
  model_shard sh0 = {0, 1, 0, 2, 0, 2}, sh1 = {0, 1, 1, 2, 2, 5};
  CHECK_MSG(model_load(&st[0], hf, &sh0, be, 128, &err) == 0, "%s", err.msg);
  CHECK_MSG(model_load(&st[1], hf, &sh1, be, 128, &err) == 0, "%s", err.msg);
  if (st[0] && st[1]) {
    kv_cache k0, k1;
    CHECK(kv_cache_create(&k0, be, 2, 16, 16, m->cfg.n_kv_head, m->cfg.head_dim, &err) == 0);
    CHECK(kv_cache_create(&k1, be, 3, 16, 16, m->cfg.n_kv_head, m->cfg.head_dim, &err) == 0);
    float *hid = malloc(sizeof(float) * n * m->cfg.d_model);
    from[0] = 0;
    to[0] = n;
    make_step(&p, 1, seqs, from, to, table, 8);
    CHECK(model_forward(st[0], &k0, &p.b, NULL, hid, NULL, &err) == 0);
    CHECK(model_forward(st[1], &k1, &p.b, hid, NULL, chunk, &err) == 0);
    double e_pp = 0;
    for (int t = 0; t < n; t++) {
      double e = rel_err(chunk + (size_t)t * V, dec + (size_t)t * V, V);
      e_pp = e > e_pp ? e : e_pp;
    }
    CHECK_MSG(e_pp < 1e-5, "pipeline stages vs one stage: %g", e_pp);
    /* A stage without its input is refused, not run. */
    CHECK(model_forward(st[1], &k1, &p.b, NULL, NULL, chunk, &err) == TS_EINVAL);
    free(hid);
    kv_cache_free(&k0, be);
    kv_cache_free(&k1, be);
  }
  model_free(st[0]);
  model_free(st[1]);

  /* Bad plans fail with a message. */
  p.tokens[0] = V;
  CHECK(model_forward(m, &kv, &p.b, NULL, NULL, chunk, &err) == TS_EINVAL);
  CHECK(strstr(err.msg, "vocabulary") != NULL);
  kv_cache_free(&kv, be);
  free(dec);
  free(dec1);
  free(pre);
  free(chunk);
  free(gguf);
  model_free(m);
  model_free(mg);

  CHECK(model_load(&m, "/nonexistent/dir", NULL, be, 16, &err) < 0 && m == NULL);
}

int main(void) {
  /* The references here keep float32 activations; AMX-BF16 rounds them (test_cpu_amx.c). */
  setenv("TESSERA_CPU_AMX", "0", 1);
  backend *be = NULL;
  ts_err err = {0};
  CHECK(backend_create(&be, "cpu", 2, &err) == 0);
  test_synthetic(be);
  test_stories(be);
  backend_destroy(be);
  return test_finish("test_forward");
}
