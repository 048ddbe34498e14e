/* The forward pass of Llama, Qwen2 and Qwen3, written once over the backend's ops for a flat
 * batch of tokens from several sequences over the paged KV cache. Every op is row-independent
 * except attention, which reads only the cache, so a token's logits do not depend on how the
 * sequence was split into steps (token-by-token decode, whole prefill or chunks).
 *
 * Per layer:  xn = norm(h)             (fused with h += delta of the previous block)
 *             q,k,v = xn W (+ b)       (Qwen3: per-head RMSNorm of q and k)
 *             rope(q, k); cache k, v; att = attention(q)
 *             delta = att Wo           (all-reduced over tensor-parallel ranks)
 *             xn = norm(h += delta)
 *             delta = (silu(xn Wg) * xn Wu) Wd   (all-reduced)
 * The residual add of the last delta happens in the final norm (last stage) or before handing
 * the hidden state to the next pipeline stage. */
#include "model/forward.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "dist/comm.h"

/* Rows of logits computed per lm_head pass: bounds the logits buffer ([LOGIT_CHUNK][vocab]).
 * A backend that samples on the device keeps the buffer there and takes more rows per pass, so
 * a large decode step reads the lm_head weight fewer times. */
#define LOGIT_CHUNK 64
#define LOGIT_CHUNK_DEVICE 256

typedef struct {
  int T;            /* max tokens per step */
  int lc;           /* logits rows per pass */
  float *h;         /* [T][d_model] residual stream */
  float *xn;        /* [T][d_model] normed input of a block */
  float *q;         /* [T][n_head_l][hd] */
  float *k;         /* [T][n_kv_l][hd] */
  float *v;         /* [T][n_kv_l][hd] */
  float *att;       /* [T][n_head_l][hd] */
  float *delta;     /* [T][d_model] output of a block before the residual add */
  float *gate;      /* [T][d_ff_l] */
  float *up;        /* [T][d_ff_l] */
  float *row_h;     /* [lc][d_model] gathered rows that need logits */
  float *row_d;     /* [lc][d_model] */
  float *row_x;     /* [lc][d_model] */
  float *logits;    /* [lc][vocab] device */
  float *host_tmp;  /* [T][d_model] host: hidden_out assembly on a non-last stage */
} fwd_scratch;

static void scratch_release(backend *be, fwd_scratch *s) {
  float **bufs[] = {&s->h, &s->xn, &s->q, &s->k, &s->v, &s->att, &s->delta, &s->gate,
                    &s->up, &s->row_h, &s->row_d, &s->row_x, &s->logits};
  for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
    if (*bufs[i]) be->ops->free(be->ctx, *bufs[i]);
  free(s->host_tmp);
  free(s);
}

int forward_scratch_create(model *m, ts_err *err) {
  const model_config *c = &m->cfg;
  if (m->max_tokens <= 0) return ts_errorf(err, TS_EINVAL, "max_tokens must be positive");
  fwd_scratch *s = calloc(1, sizeof *s);
  if (!s) return ts_errorf(err, TS_ENOMEM, "out of memory for the forward buffers");
  size_t T = (size_t)m->max_tokens, tp = (size_t)m->shard.tp_size, hd = (size_t)c->head_dim;
  size_t d = (size_t)c->d_model, nh = c->n_head / tp * hd, nkv = c->n_kv_head / tp * hd;
  size_t ff = (size_t)c->d_ff / tp;
  s->T = m->max_tokens;
  const int chunk = m->be->ops->sample ? LOGIT_CHUNK_DEVICE : LOGIT_CHUNK;
  s->lc = m->max_tokens < chunk ? m->max_tokens : chunk;
  struct {
    float **p;
    size_t n;
  } want[] = {{&s->h, T * d},   {&s->xn, T * d},   {&s->q, T * nh},     {&s->k, T * nkv},
              {&s->v, T * nkv}, {&s->att, T * nh}, {&s->delta, T * d},  {&s->gate, T * ff},
              {&s->up, T * ff}, {&s->row_h, s->lc * d}, {&s->row_d, s->lc * d},
              {&s->row_x, s->lc * d}, {&s->logits, s->lc * (size_t)c->vocab_size}};
  for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
    *want[i].p = m->be->ops->alloc(m->be->ctx, (want[i].n ? want[i].n : 1) * sizeof(float));
    if (!*want[i].p) {
      scratch_release(m->be, s);
      return ts_errorf(err, TS_ENOMEM,
                       "out of memory for the forward buffers of %d tokens on %s (lower "
                       "max_num_batched_tokens)",
                       m->max_tokens, m->be->ops->name);
    }
  }
  if (!model_shard_is_last(&m->shard)) {
    s->host_tmp = malloc(T * d * sizeof(float));
    if (!s->host_tmp) {
      scratch_release(m->be, s);
      return ts_errorf(err, TS_ENOMEM, "out of memory for the hidden-state buffer");
    }
  }
  m->scratch = s;
  return 0;
}

void forward_scratch_free(model *m) {
  if (m && m->scratch) scratch_release(m->be, m->scratch);
  if (m) m->scratch = NULL;
}

static int sync_be(backend *be, ts_err *err) {
  return be->ops->sync ? be->ops->sync(be->ctx, err) : 0;
}

/* Sums a block's partial output over the tensor-parallel group. A stream-ordered group (NCCL)
 * queues the sum behind the ops that produce buf, so the step never waits on the host here. */
static int tp_reduce(model *m, float *buf, size_t n, ts_err *err) {
  if (!m->tp_comm || m->tp_comm->size == 1) return 0;
  if (!m->tp_comm->stream_ordered) TS_TRY(sync_be(m->be, err));
  int rc = comm_all_reduce_sum_f32(m->tp_comm, buf, n, err);
  if (rc < 0) ts_err_prefix(err, "tensor-parallel all-reduce");
  return rc;
}

static int check_batch(const model *m, const kv_cache *kv, const ts_batch *b,
                       const float *hidden_in, float *hidden_out, float *logits, ts_err *err) {
  const model_config *c = &m->cfg;
  const fwd_scratch *s = m->scratch;
  if (!s) return ts_errorf(err, TS_EINVAL, "model has no forward buffers");
  if (b->n_tokens < 0 || b->n_tokens > s->T)
    return ts_errorf(err, TS_EINVAL, "step of %d tokens exceeds the model's max_tokens %d",
                     b->n_tokens, s->T);
  int tp = m->shard.tp_size;
  if (kv->n_layers != m->w.n_layers || kv->n_kv_l != c->n_kv_head / tp ||
      kv->head_dim != c->head_dim)
    return ts_errorf(err, TS_EINVAL,
                     "kv cache shape (%d layers, %d kv heads of %d) does not match the model "
                     "shard (%d layers, %d kv heads of %d)",
                     kv->n_layers, kv->n_kv_l, kv->head_dim, m->w.n_layers, c->n_kv_head / tp,
                     c->head_dim);
  if (model_shard_is_first(&m->shard)) {
    for (int i = 0; i < b->n_tokens; i++)
      if (b->tokens[i] < 0 || b->tokens[i] >= c->vocab_size)
        return ts_errorf(err, TS_EINVAL, "token id %d at %d is outside the vocabulary of %d",
                         b->tokens[i], i, c->vocab_size);
  } else if (!hidden_in && b->n_tokens > 0) {
    return ts_errorf(err, TS_EINVAL, "a non-first pipeline stage needs hidden_in");
  }
  if (model_shard_is_last(&m->shard)) {
    if (b->n_logits < 0 || b->n_logits > b->n_tokens)
      return ts_errorf(err, TS_EINVAL, "%d logits rows for %d tokens", b->n_logits, b->n_tokens);
    if (b->n_logits > 0 && !logits) return ts_errorf(err, TS_EINVAL, "logits buffer is NULL");
    for (int i = 0; i < b->n_logits; i++)
      if (b->logits_rows[i] < 0 || b->logits_rows[i] >= b->n_tokens)
        return ts_errorf(err, TS_EINVAL, "logits row %d is outside the step's %d tokens",
                         b->logits_rows[i], b->n_tokens);
  } else if (!hidden_out && b->n_tokens > 0) {
    return ts_errorf(err, TS_EINVAL, "a non-last pipeline stage needs hidden_out");
  }
  return 0;
}

/* The step; on the last stage either downloads the logits rows (rows == NULL) or samples them on
 * the device and writes token ids. */
static int forward_step(model *m, kv_cache *kv, const ts_batch *b, const float *hidden_in,
                        float *hidden_out, float *logits, const ts_sample_row *rows,
                        int32_t *ids, ts_err *err) {
  const model_config *c = &m->cfg;
  const backend_ops *op = m->be->ops;
  void *bc = m->be->ctx;
  fwd_scratch *s = m->scratch;
  const int n = b->n_tokens, d = c->d_model, hd = c->head_dim, tp = m->shard.tp_size;
  const int nh = c->n_head / tp, nkv = c->n_kv_head / tp, ff = c->d_ff / tp;
  if (n == 0) return 0;
  TS_TRY(op->step_begin(bc, b, kv, err));

  if (model_shard_is_first(&m->shard))
    op->embed(bc, &m->w.tok_embd, n, d, s->h);
  else
    op->upload(bc, s->h, hidden_in, (size_t)n * d * sizeof(float));

  const rope_params rp = {c->rope_theta,          c->rope_interleaved,    c->rope_scaling,
                          c->rope_factor,         c->rope_low_freq_factor, c->rope_high_freq_factor,
                          c->rope_orig_max_pos};
  const float scale = 1.0f / sqrtf((float)hd);
  int have_delta = 0; /* s->delta holds a block output not yet added to s->h */
  /* Fused ops (CUDA): norms in the products' prologues, residual adds in their epilogues (only
   * without tensor parallelism, where a block's output needs its all-reduce before the add). */
  const int fused = op->norm_matmul && op->norm_gate_up && op->matmul_add && op->qk_rope_kv &&
                    tp == 1;
  for (int l = 0; l < m->w.n_layers && fused; l++) {
    const layer_weights *L = &m->w.layers[l];
    const ts_tensor *wqkv[3] = {&L->wq, &L->wk, &L->wv}, *bqkv[3] = {&L->bq, &L->bk, &L->bv};
    float *const yqkv[3] = {s->q, s->k, s->v};
    op->norm_matmul(bc, s->h, &L->attn_norm, c->rms_eps, n, 3, wqkv, bqkv, yqkv);
    op->qk_rope_kv(bc, kv, l, s->q, s->k, s->v, nh, c->qk_norm ? &L->q_norm : NULL,
                   c->qk_norm ? &L->k_norm : NULL, c->rms_eps, &rp);
    op->attention(bc, kv, l, s->q, nh, scale, s->att);
    op->matmul_add(bc, s->att, &L->wo, n, s->h);
    op->norm_gate_up(bc, s->h, &L->ffn_norm, c->rms_eps, n, &L->w_gate, &L->w_up, s->gate);
    op->matmul_add(bc, s->gate, &L->w_down, n, s->h);
  }
  for (int l = 0; l < m->w.n_layers && !fused; l++) {
    const layer_weights *L = &m->w.layers[l];
    if (have_delta)
      op->add_rmsnorm(bc, s->h, s->delta, &L->attn_norm, c->rms_eps, n, d, s->xn);
    else
      op->rmsnorm(bc, s->h, &L->attn_norm, c->rms_eps, n, d, s->xn);
    op->matmul(bc, s->xn, &L->wq, &L->bq, n, s->q);
    op->matmul(bc, s->xn, &L->wk, &L->bk, n, s->k);
    op->matmul(bc, s->xn, &L->wv, &L->bv, n, s->v);
    if (c->qk_norm) {
      op->rmsnorm(bc, s->q, &L->q_norm, c->rms_eps, n * nh, hd, s->q);
      op->rmsnorm(bc, s->k, &L->k_norm, c->rms_eps, n * nkv, hd, s->k);
    }
    op->rope(bc, s->q, nh, hd, &rp);
    op->rope(bc, s->k, nkv, hd, &rp);
    op->kv_write(bc, kv, l, s->k, s->v);
    op->attention(bc, kv, l, s->q, nh, scale, s->att);
    op->matmul(bc, s->att, &L->wo, NULL, n, s->delta);
    TS_TRY(tp_reduce(m, s->delta, (size_t)n * d, err));
    op->add_rmsnorm(bc, s->h, s->delta, &L->ffn_norm, c->rms_eps, n, d, s->xn);
    op->matmul(bc, s->xn, &L->w_gate, NULL, n, s->gate);
    op->matmul(bc, s->xn, &L->w_up, NULL, n, s->up);
    op->silu_mul(bc, s->gate, s->up, n, ff, s->gate);
    op->matmul(bc, s->gate, &L->w_down, NULL, n, s->delta);
    TS_TRY(tp_reduce(m, s->delta, (size_t)n * d, err));
    have_delta = 1;
  }

  if (!model_shard_is_last(&m->shard)) {
    op->download(bc, hidden_out, s->h, (size_t)n * d * sizeof(float));
    if (have_delta) {
      op->download(bc, s->host_tmp, s->delta, (size_t)n * d * sizeof(float));
      for (size_t i = 0; i < (size_t)n * d; i++) hidden_out[i] += s->host_tmp[i];
    }
    return sync_be(m->be, err);
  }
  const int V = c->vocab_size;
  for (int r0 = 0; r0 < b->n_logits; r0 += s->lc) {
    int nr = b->n_logits - r0 < s->lc ? b->n_logits - r0 : s->lc;
    op->gather_rows(bc, s->h, b->logits_rows + r0, nr, d, s->row_h);
    if (have_delta) {
      op->gather_rows(bc, s->delta, b->logits_rows + r0, nr, d, s->row_d);
      op->add_rmsnorm(bc, s->row_h, s->row_d, &m->w.out_norm, c->rms_eps, nr, d, s->row_x);
    } else {
      op->rmsnorm(bc, s->row_h, &m->w.out_norm, c->rms_eps, nr, d, s->row_x);
    }
    op->matmul(bc, s->row_x, &m->w.lm_head, NULL, nr, s->logits);
    if (rows) {
      TS_TRY(op->sample(bc, s->logits, nr, V, rows + r0, ids + r0, err));
      continue;
    }
    TS_TRY(sync_be(m->be, err));
    op->download(bc, logits + (size_t)r0 * V, s->logits, (size_t)nr * V * sizeof(float));
  }
  return sync_be(m->be, err);
}

int model_forward(model *m, kv_cache *kv, const ts_batch *b, const float *hidden_in,
                  float *hidden_out, float *logits, ts_err *err) {
  TS_TRY(check_batch(m, kv, b, hidden_in, hidden_out, logits, err));
  return forward_step(m, kv, b, hidden_in, hidden_out, logits, NULL, NULL, err);
}

int model_forward_sample(model *m, kv_cache *kv, const ts_batch *b, const ts_sample_row *rows,
                         int32_t *ids, ts_err *err) {
  if (!m->be->ops->sample)
    return ts_errorf(err, TS_EUNSUPPORTED, "the %s backend cannot sample on the device",
                     m->be->ops->name);
  if (!model_shard_is_first(&m->shard) || !model_shard_is_last(&m->shard))
    return ts_errorf(err, TS_EINVAL, "device sampling needs the whole model (one pipeline stage)");
  if (b->n_logits > 0 && (!rows || !ids))
    return ts_errorf(err, TS_EINVAL, "device sampling needs rows and an ids buffer");
  /* check_batch wants a logits buffer for the rows; ids stand in for it. */
  TS_TRY(check_batch(m, kv, b, NULL, NULL, (float *)ids, err));
  return forward_step(m, kv, b, NULL, NULL, NULL, rows, ids, err);
}
