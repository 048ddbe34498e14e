/* Loading a model shard: open the files, validate the shard, map its weights and make them
 * usable on the backend, then size the forward buffers once for max_tokens. */
#include "model/model.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/forward.h"
#include "util/log.h"

/* Every weight of the shard with a printable name, for preparing and releasing them. */
typedef struct {
  ts_tensor *t;
  char name[48];
  int vector; /* norms and biases: read in partial rows, so plain dtypes only */
} weight_ref;

static int list_weights(model *m, weight_ref *out) {
  int n = 0;
  model_weights *w = &m->w;
  out[n++] = (weight_ref){&w->tok_embd, "token embedding", 0};
  out[n++] = (weight_ref){&w->out_norm, "output norm", 1};
  if (w->lm_head.data != w->tok_embd.data) out[n++] = (weight_ref){&w->lm_head, "lm_head", 0};
  for (int l = 0; l < w->n_layers; l++) {
    layer_weights *L = &w->layers[l];
    struct {
      ts_tensor *t;
      const char *nm;
      int vec;
    } ls[] = {{&L->attn_norm, "attn_norm", 1}, {&L->wq, "q_proj", 0},   {&L->wk, "k_proj", 0},
              {&L->wv, "v_proj", 0},           {&L->bq, "q_bias", 1},   {&L->bk, "k_bias", 1},
              {&L->bv, "v_bias", 1},           {&L->q_norm, "q_norm", 1}, {&L->k_norm, "k_norm", 1},
              {&L->wo, "o_proj", 0},           {&L->ffn_norm, "ffn_norm", 1},
              {&L->w_gate, "gate_proj", 0},    {&L->w_up, "up_proj", 0}, {&L->w_down, "down_proj", 0}};
    for (size_t i = 0; i < sizeof ls / sizeof ls[0]; i++) {
      out[n].t = ls[i].t;
      snprintf(out[n].name, sizeof out[n].name, "layer %d %s", m->shard.layer_start + l, ls[i].nm);
      out[n].vector = ls[i].vec;
      n++;
    }
  }
  return n;
}

static int prepare_weights(model *m, ts_err *err) {
  int cap = 3 + 14 * m->w.n_layers;
  weight_ref *refs = malloc((size_t)cap * sizeof *refs);
  if (!refs) return ts_errorf(err, TS_ENOMEM, "out of memory listing weights");
  int n = list_weights(m, refs), rc = 0, i;
  int tied = m->w.lm_head.data && m->w.lm_head.data == m->w.tok_embd.data;
  for (i = 0; i < n && rc == 0; i++) {
    ts_tensor *t = refs[i].t;
    if (!ts_tensor_present(t)) continue;
    if (refs[i].vector && t->dtype != TS_F32 && t->dtype != TS_F16 && t->dtype != TS_BF16) {
      rc = ts_errorf(err, TS_EUNSUPPORTED, "%s: weight %s has dtype %s (norms and biases must be "
                     "F32, F16 or BF16)", model_files_path(m->files), refs[i].name,
                     ts_dtype_table[t->dtype].name);
      i++; /* keep i one past the failing weight, as after a failed prepare */
      break;
    }
    if (m->be->ops->weight_prepare) {
      rc = m->be->ops->weight_prepare(m->be->ctx, t, err);
      if (rc < 0) ts_err_prefix(err, "%s: weight %s", model_files_path(m->files), refs[i].name);
    }
  }
  if (rc == 0 && tied) m->w.lm_head = m->w.tok_embd; /* the prepared view, shared */
  if (rc < 0) {
    /* Release only what was prepared (refs before the failing one), then drop the views so
     * model_free does not release the rest. */
    int done = i - 1;
    for (int j = 0; j < done; j++)
      if (ts_tensor_present(refs[j].t) && m->be->ops->weight_release)
        m->be->ops->weight_release(m->be->ctx, refs[j].t);
    model_weights_free(&m->w);
  }
  free(refs);
  return rc;
}

static void release_weights(model *m) {
  if (!m->be || !m->be->ops->weight_release || !m->w.layers) return;
  int cap = 3 + 14 * m->w.n_layers;
  weight_ref *refs = malloc((size_t)cap * sizeof *refs);
  if (!refs) return;
  int n = list_weights(m, refs);
  for (int i = 0; i < n; i++)
    if (ts_tensor_present(refs[i].t)) m->be->ops->weight_release(m->be->ctx, refs[i].t);
  free(refs);
}

int model_load(model **out, const char *path, const model_shard *shard, backend *be,
               int max_tokens, ts_err *err) {
  *out = NULL;
  model *m = calloc(1, sizeof *m);
  if (!m) return ts_errorf(err, TS_ENOMEM, "out of memory loading a model");
  m->be = be;
  m->max_tokens = max_tokens;
  int rc = model_files_open(&m->files, path, err);
  if (rc < 0) goto fail;
  m->cfg = *model_files_config(m->files);
  m->shard = shard ? *shard : model_shard_default(&m->cfg, 0, 1, 0, 1);
  if ((rc = model_shard_validate(&m->cfg, &m->shard, err)) < 0) goto fail;
  if (m->cfg.head_dim % 2 || m->cfg.head_dim > 2048) {
    rc = ts_errorf(err, TS_EUNSUPPORTED, "%s: head_dim %d is not supported (even, <= 2048)", path,
                   m->cfg.head_dim);
    goto fail;
  }
  if ((rc = model_files_load_weights(m->files, &m->shard, &m->w, err)) < 0) goto fail;
  if ((rc = prepare_weights(m, err)) < 0) goto fail;
  if ((rc = forward_scratch_create(m, err)) < 0) goto fail;
  LOG_I("model %s: %s, %d layers [%d, %d), d_model %d, %d heads (%d kv) of %d, vocab %d, tp %d/%d, "
        "pp %d/%d",
        path, m->cfg.arch_name, m->w.n_layers, m->shard.layer_start, m->shard.layer_end,
        m->cfg.d_model, m->cfg.n_head, m->cfg.n_kv_head, m->cfg.head_dim, m->cfg.vocab_size,
        m->shard.tp_rank, m->shard.tp_size, m->shard.pp_rank, m->shard.pp_size);
  *out = m;
  return 0;
fail:
  model_free(m);
  return rc;
}

int64_t model_kv_bytes(const model *m, int64_t tokens) {
  int n_kv_l = m->cfg.n_kv_head / (m->shard.tp_size > 0 ? m->shard.tp_size : 1);
  return 2 * (int64_t)ts_dtype_bytes(kv_cache_dtype(m->be), (int64_t)m->w.n_layers * tokens *
                                                                n_kv_l * m->cfg.head_dim);
}

void model_free(model *m) {
  if (!m) return;
  forward_scratch_free(m);
  release_weights(m);
  model_weights_free(&m->w);
  model_files_close(m->files);
  free(m);
}
