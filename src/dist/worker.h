/* The distributed worker: one process that owns one device, maps its shard of the weights, holds
 * its shard of the paged KV cache and runs the steps the driver sends. Rank r is tensor-parallel
 * rank r % tp of pipeline stage r / tp. It joins its stage's TCP all-reduce group, takes hidden
 * states from the previous stage's worker of the same tp rank and hands them to the next stage
 * directly (never through the driver); tp rank 0 of the last stage returns the logits rows. */
#ifndef TESSERA_WORKER_H
#define TESSERA_WORKER_H

#include <stdint.h>

#include "dist/wire.h"
#include "model/config.h"
#include "util/status.h"

#define WORKER_SECRET_ENV "TESSERA_SECRET"
#define WORKER_MAX_PP 256

typedef struct {
  const char *driver;        /* HOST:PORT of the driver */
  int rank, world_size, tp, pp;
  const char *model_path;
  const char *device;        /* cpu | cuda */
  const char *unit;          /* the resource unit this worker was given (for its log line) */
  const char *node_ip;       /* this node's address: listeners bind here */
  int threads;               /* 0: the backend's default */
  const char *layer_split;   /* "3,2": layers per stage; NULL: even */
  int max_tokens;            /* most tokens one step may carry */
  double gpu_memory_utilization; /* CUDA: share of the GPU this worker may use (0: 0.9) */
  uint64_t group_id;         /* this launch */
  uint8_t secret[WIRE_SECRET_LEN];
} worker_config;

/* Runs until the driver sends SHUTDOWN (0) or goes away or a fatal error (< 0, err set). */
int worker_run(const worker_config *cfg, ts_err *err);

/* The shard of pipeline stage pp_rank: layer_split "a,b,..." (pp counts summing to n_layer) or
 * the even split when NULL or empty. */
int dist_stage_shard(const model_config *cfg, const char *layer_split, int tp_rank, int tp,
                     int pp_rank, int pp, model_shard *out, ts_err *err);

#endif
