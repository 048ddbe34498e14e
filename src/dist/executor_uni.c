/* The uni executor: runs each step's forward pass in this process on the model it was given,
 * over a KV cache it owns. */
#include <stdlib.h>
#include <string.h>

#include "dist/executor.h"
#include "model/model.h"

typedef struct {
  model *m;
  kv_cache kv;
  int kv_ready;
} uni_impl;

static int uni_init_kv(executor *ex, int block_size, int64_t kv_cache_bytes, int n_blocks,
                       int *n_blocks_out, ts_err *err) {
  uni_impl *u = ex->impl;
  if (u->kv_ready) return ts_errorf(err, TS_EINVAL, "executor: the KV cache is already allocated");
  if (block_size <= 0) return ts_errorf(err, TS_EINVAL, "executor: block size %d must be > 0", block_size);
  int64_t per_block = model_kv_bytes(u->m, block_size);
  if (n_blocks <= 0) {
    if (per_block <= 0) return ts_errorf(err, TS_EINVAL, "executor: the model has no KV heads");
    int64_t nb = kv_cache_bytes / per_block;
    if (nb > (1 << 30)) nb = 1 << 30;
    n_blocks = (int)nb;
  }
  if (n_blocks <= 0)
    return ts_errorf(err, TS_ERANGE,
                     "executor: %lld bytes of KV cache hold no block of %d tokens (%lld bytes); "
                     "raise --kv-cache-memory",
                     (long long)kv_cache_bytes, block_size, (long long)per_block);
  int n_kv_l = u->m->cfg.n_kv_head / (u->m->shard.tp_size > 0 ? u->m->shard.tp_size : 1);
  int rc = kv_cache_create(&u->kv, u->m->be, u->m->w.n_layers, n_blocks, block_size, n_kv_l,
                           u->m->cfg.head_dim, err);
  if (rc < 0) return ts_err_prefix(err, "executor: KV cache of %d blocks", n_blocks);
  u->kv_ready = 1;
  *n_blocks_out = n_blocks;
  return 0;
}

static int uni_execute_step(executor *ex, uint64_t step_id, const ts_batch *b, float *logits,
                            ts_err *err) {
  (void)step_id;
  uni_impl *u = ex->impl;
  if (!u->kv_ready) return ts_errorf(err, TS_EINVAL, "executor: step before the KV cache exists");
  return model_forward(u->m, &u->kv, b, NULL, NULL, logits, err);
}

static int uni_execute_step_sample(executor *ex, uint64_t step_id, const ts_batch *b,
                                   const ts_sample_row *rows, int32_t *ids, ts_err *err) {
  (void)step_id;
  uni_impl *u = ex->impl;
  if (!u->kv_ready) return ts_errorf(err, TS_EINVAL, "executor: step before the KV cache exists");
  return model_forward_sample(u->m, &u->kv, b, rows, ids, err);
}

static int uni_health(executor *ex, ts_err *err) {
  (void)ex;
  (void)err;
  return 0;
}

static void uni_shutdown(executor *ex) {
  uni_impl *u = ex->impl;
  if (u->kv_ready) kv_cache_free(&u->kv, u->m->be);
  free(u);
  free(ex);
}

static const executor_ops uni_ops = {
    .name = "uni",
    .init_kv = uni_init_kv,
    .execute_step = uni_execute_step,
    .health = uni_health,
    .shutdown = uni_shutdown,
};

/* The same over a backend that samples on the device. */
static const executor_ops uni_ops_sample = {
    .name = "uni",
    .init_kv = uni_init_kv,
    .execute_step = uni_execute_step,
    .execute_step_sample = uni_execute_step_sample,
    .health = uni_health,
    .shutdown = uni_shutdown,
};

int executor_uni_create(executor **out, model *m, ts_err *err) {
  *out = NULL;
  if (!m) return ts_errorf(err, TS_EINVAL, "executor: no model");
  if (!model_shard_is_first(&m->shard) || !model_shard_is_last(&m->shard))
    return ts_errorf(err, TS_EINVAL, "executor: the uni executor needs the whole model (pp_size 1)");
  executor *ex = calloc(1, sizeof *ex);
  uni_impl *u = calloc(1, sizeof *u);
  if (!ex || !u) {
    free(ex);
    free(u);
    return ts_errorf(err, TS_ENOMEM, "executor: out of memory");
  }
  u->m = m;
  ex->ops = m->be->ops->sample ? &uni_ops_sample : &uni_ops;
  ex->impl = u;
  ex->info.vocab_size = m->cfg.vocab_size;
  ex->info.max_pos = m->cfg.max_pos;
  ex->info.max_tokens = m->max_tokens;
  ex->info.kv_bytes_per_token = model_kv_bytes(m, 1);
  ex->info.bos_id = m->cfg.bos_id;
  ex->info.n_eos = m->cfg.n_eos < MODEL_MAX_EOS ? m->cfg.n_eos : MODEL_MAX_EOS;
  for (int i = 0; i < ex->info.n_eos; i++) ex->info.eos_ids[i] = m->cfg.eos_ids[i];
  *out = ex;
  return 0;
}
