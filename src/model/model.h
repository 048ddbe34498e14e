/* A loaded model shard and its forward pass. The forward is written once for every supported
 * architecture over the backend's ops, and takes a flat batch of tokens from several sequences
 * over the paged KV cache. With pipeline parallelism a stage takes hidden states in and hands
 * hidden states out; tensor parallelism all-reduces through comm (a no-op with one rank). */
#ifndef TESSERA_MODEL_H
#define TESSERA_MODEL_H

#include "backend/backend.h"
#include "engine/batch.h"
#include "model/config.h"
#include "model/model_files.h"
#include "model/weights.h"
#include "util/status.h"

struct comm;

typedef struct model {
  model_files *files;
  model_config cfg;
  model_shard shard;
  model_weights w;
  backend *be;
  struct comm *tp_comm; /* tensor-parallel group, NULL or single rank = no-op */
  void *scratch;        /* activation buffers sized for max_tokens, owned by forward.c */
  int max_tokens;       /* most tokens one step may carry */
} model;

/* Opens path (HF directory or .gguf), validates the shard, maps its weights and prepares them on
 * the backend. max_tokens bounds one step's batch (activation buffers are sized once here). */
int model_load(model **out, const char *path, const model_shard *shard, backend *be,
               int max_tokens, ts_err *err);
void model_free(model *m);

/* Bytes of K and V that `tokens` tokens take in this shard's KV cache (its layers and KV heads,
 * in the backend's cache dtype). */
int64_t model_kv_bytes(const model *m, int64_t tokens);

/* Runs one step. First stage: embeds b->tokens; otherwise reads hidden_in [n_tokens][d_model].
 * Last stage: writes logits [b->n_logits][vocab_size] (host memory); otherwise writes hidden_out
 * [n_tokens][d_model] (host memory). Unused pointers may be NULL. */
int model_forward(model *m, kv_cache *kv, const ts_batch *b, const float *hidden_in,
                  float *hidden_out, float *logits, ts_err *err);
/* The same on a whole model (one pipeline stage), but each logits row is sampled on the device
 * (backend op `sample`, with rows [b->n_logits]) and only the token ids [b->n_logits] come back.
 * TS_EUNSUPPORTED when the backend has no device sampler. */
int model_forward_sample(model *m, kv_cache *kv, const ts_batch *b, const ts_sample_row *rows,
                         int32_t *ids, ts_err *err);

#endif
