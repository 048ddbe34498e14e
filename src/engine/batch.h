/* A step plan, as data: the tokens of several sequences flattened into one batch (the varlen
 * layout). The same plan drives a 1-token decode, a long prefill chunk and a mix of both. All
 * arrays are host memory owned by the caller; backends stage what they need at step start. */
#ifndef TESSERA_BATCH_H
#define TESSERA_BATCH_H

#include <stdint.h>

typedef struct {
  int n_tokens;               /* total new tokens in this step */
  const int32_t *tokens;      /* [n_tokens] token ids */
  const int32_t *pos;         /* [n_tokens] absolute position of each token in its sequence */
  int n_seqs;
  const int32_t *seq_start;   /* [n_seqs+1] token offsets: seq s owns [seq_start[s], seq_start[s+1]) */
  const int32_t *ctx_len;     /* [n_seqs] tokens in the KV cache for s after this step */
  int max_blocks;             /* columns of block_table */
  const int32_t *block_table; /* [n_seqs][max_blocks] physical KV block ids */
  int n_logits;               /* rows that need logits */
  const int32_t *logits_rows; /* [n_logits] token indices (into [0, n_tokens)) */
} ts_batch;

/* How one logits row is sampled by a device sampler (backend op `sample`): the sampler's
 * parameters (engine/sampling.h has their meaning and order) and what the penalties need. Draws
 * depend only on (seed, counter, token id), so a sequence's output does not depend on what else
 * is in the batch. Logit bias, logprobs and masks are not expressed here: those rows use the host
 * sampler. */
typedef struct {
  float temperature;          /* < 1e-5: greedy (argmax, lowest id on ties) */
  float top_p, min_p;
  int top_k;                  /* 0 or -1: off */
  float presence_penalty, frequency_penalty, repetition_penalty;
  uint64_t seed;              /* the sequence's stream */
  uint64_t counter;           /* the draw's index in that stream (tokens generated so far) */
  int n_penalty;              /* distinct ids seen in the prompt or the output */
  const int32_t *penalty_ids;    /* [n_penalty] */
  const int32_t *penalty_counts; /* [n_penalty] times generated (0: prompt only) */
} ts_sample_row;

#endif
