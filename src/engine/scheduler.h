/* The scheduler: decides each step which sequences run and how many of their tokens (continuous
 * batching; decodes and prefill chunks mixed under the token budget), admits waiting sequences
 * while blocks and the sequence limit allow, and preempts the newest sequences when blocks run
 * out (their blocks are freed and their tokens recomputed later). With a pipelined executor
 * several steps (micro-batches) are in flight at once: a sequence in flight is never scheduled
 * again, preempted or freed until its micro-batch lands. Engine thread only. */
#ifndef TESSERA_SCHEDULER_H
#define TESSERA_SCHEDULER_H

#include <stdint.h>

#include "engine/block_manager.h"
#include "engine/request.h"

typedef struct {
  int max_num_seqs;
  int max_num_batched_tokens;
  int max_logits_rows;   /* logits rows in one step (0: max_num_seqs); prompt logprobs take one
                            per prompt position, so such a prefill is chunked under it too */
} scheduler_config;

typedef struct {
  scheduler_config cfg;
  block_manager *bm;
  engine_seq **running;  /* [max_num_seqs] in admission order: the tail is preempted first */
  int n_running;
  engine_seq **waiting;  /* [cap_waiting] first come, first served; preempted go to the front */
  int n_waiting, cap_waiting;
  engine_seq **sched;    /* [max_num_seqs] this step's sequences */
  int n_sched;
  int n_sched_tokens;
  /* Counters (tokens for the cache). */
  int64_t preemptions;
  int64_t cache_queries, cache_hits;
} scheduler;

int scheduler_init(scheduler *s, const scheduler_config *cfg, block_manager *bm, ts_err *err);
void scheduler_free(scheduler *s);

/* Queues a new sequence at the back. */
int scheduler_add(scheduler *s, engine_seq *q);
/* Takes a sequence out (running or waiting) and frees its blocks; a sequence in flight keeps
 * its blocks until scheduler_land. */
void scheduler_remove(scheduler *s, engine_seq *q);
/* Plans the next step: fills s->sched, sets each chosen sequence's sched_tokens. Returns the
 * number of sequences scheduled. */
int scheduler_schedule(scheduler *s);
/* The same for one micro-batch of a pipeline: at most max_seqs sequences (0: no limit), none
 * of them in flight; a sequence that needs a block waits for the sequences in flight rather
 * than preempting one of them. */
int scheduler_schedule_group(scheduler *s, int max_seqs);
/* After a successful step: the scheduled tokens are now in the KV cache. */
void scheduler_commit(scheduler *s);
/* Pipelined steps: q's micro-batch was submitted (scheduler_launch) or came back (scheduler_land;
 * ok: its sched_tokens are in the KV cache now). A sequence removed while in flight frees its
 * blocks on landing. */
void scheduler_launch(scheduler *s, engine_seq *q);
void scheduler_land(scheduler *s, engine_seq *q, int ok);

#endif
