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

#endif
