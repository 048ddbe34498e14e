/* The executor: where the engine runs its steps. The engine hands over a step plan made only of
 * plain arrays (engine/batch.h: token ids, positions, block tables, logits rows) and gets logits
 * rows back; nothing points into engine state, so an mp or ray executor can serialise the plan to
 * worker processes unchanged. Each worker owns its shard of the weights and of the paged KV cache;
 * the engine only ever sees block ids. A worker that dies or stalls is reported as an error from
 * execute_step or health (never a hang, never an exit). Implementations: uni (in process), mp
 * and ray (worker processes, dist/executor_mp.h). */
#ifndef TESSERA_EXECUTOR_H
#define TESSERA_EXECUTOR_H

#include <stdint.h>

#include "engine/batch.h"
#include "model/config.h"
#include "util/status.h"

struct model;
typedef struct executor executor;

/* What the engine needs to know about the model behind the executor. */
typedef struct {
  int vocab_size;
  int max_pos;        /* max_position_embeddings: the longest context the model supports */
  int max_tokens;     /* most tokens one step may carry (activation buffers were sized for it) */
  int64_t kv_bytes_per_token; /* KV cache bytes one token takes on the largest worker */
  int64_t kv_bytes_limit;     /* KV bytes the tightest worker's GPU has room for
                                 (--gpu-memory-utilization); 0: no device limit */
  int bos_id;         /* -1 when none */
  int n_eos;
  int eos_ids[MODEL_MAX_EOS]; /* ids that end generation according to the model config */
  int max_inflight;   /* steps submit_step may have outstanding (pipeline stages); 0 or 1: one */
} executor_info;

typedef struct executor_ops {
  const char *name;
  /* Allocates the paged KV cache on every worker: as many blocks of block_size tokens as fit in
   * kv_cache_bytes per worker (the smallest worker decides), or exactly n_blocks when it is > 0.
   * Reports the number of blocks in *n_blocks_out. Called once, before any step. */
  int (*init_kv)(executor *ex, int block_size, int64_t kv_cache_bytes, int n_blocks,
                 int *n_blocks_out, ts_err *err);
  /* Runs one step of the plan b (step_id increases by one per call, for the wire protocol's
   * ordering checks). Writes logits [b->n_logits][vocab_size] into logits (host memory). */
  int (*execute_step)(executor *ex, uint64_t step_id, const ts_batch *b, float *logits,
                      ts_err *err);
  /* Optional (NULL: the engine samples the logits on the host): runs the step like execute_step
   * but samples each logits row on the device with rows [b->n_logits] and writes only token ids
   * [b->n_logits] (engine/batch.h's ts_sample_row says what a row can express). */
  int (*execute_step_sample)(executor *ex, uint64_t step_id, const ts_batch *b,
                             const ts_sample_row *rows, int32_t *ids, ts_err *err);
  /* 0 when every worker answers; an error naming the dead or stalled worker otherwise. */
  int (*health)(executor *ex, ts_err *err);
  /* Stops the workers and frees the executor (not the model it was given). */
  void (*shutdown)(executor *ex);
} executor_ops;

/* Pipelined steps, for executors whose workers form a pipeline: submit_step ships a plan and
 * returns at once; collect_step waits for the oldest outstanding step and writes its logits, in
 * submission order. At most info.max_inflight steps are outstanding, and steps in flight together
 * must not share a sequence (each needs the token the previous one samples). After a failure
 * every outstanding step is still collected (each returns the error). */
typedef struct executor_pipeline_ops {
  int (*submit_step)(executor *ex, uint64_t step_id, const ts_batch *b, ts_err *err);
  int (*collect_step)(executor *ex, uint64_t *step_id, float *logits, ts_err *err);
} executor_pipeline_ops;

struct executor {
  const executor_ops *ops;
  const executor_pipeline_ops *pipe; /* NULL: one step at a time through execute_step */
  executor_info info;
  void *impl;
  /* Bumped (by the executor, atomically) each time the workers' KV caches were lost, e.g. when
   * they were restarted; the engine then fails every live request, forgets its prefix cache and
   * sets kv_epoch_seen. Steps are refused while the two differ. Always 0 for uni. */
  uint64_t kv_epoch;
  uint64_t kv_epoch_seen;
};

/* In-process executor over an already loaded model (which the caller keeps and frees after
 * executor_shutdown). */
int executor_uni_create(executor **out, struct model *m, ts_err *err);

static inline int executor_init_kv(executor *ex, int block_size, int64_t kv_cache_bytes,
                                   int n_blocks, int *n_blocks_out, ts_err *err) {
  return ex->ops->init_kv(ex, block_size, kv_cache_bytes, n_blocks, n_blocks_out, err);
}
static inline int executor_execute_step(executor *ex, uint64_t step_id, const ts_batch *b,
                                        float *logits, ts_err *err) {
  return ex->ops->execute_step(ex, step_id, b, logits, err);
}
static inline int executor_submit_step(executor *ex, uint64_t step_id, const ts_batch *b,
                                       ts_err *err) {
  return ex->pipe->submit_step(ex, step_id, b, err);
}
static inline int executor_collect_step(executor *ex, uint64_t *step_id, float *logits,
                                        ts_err *err) {
  return ex->pipe->collect_step(ex, step_id, logits, err);
}
static inline int executor_health(executor *ex, ts_err *err) {
  return ex->ops->health ? ex->ops->health(ex, err) : 0;
}
static inline void executor_shutdown(executor *ex) {
  if (ex) ex->ops->shutdown(ex);
}

#endif
