/* The engine: one loop thread that owns all scheduling state (requests, paged KV blocks, prefix
 * cache) and runs steps on an executor. Other threads talk to it only through engine_submit,
 * engine_cancel and the per-request event callback, which it calls from its own thread. */
#ifndef TESSERA_ENGINE_H
#define TESSERA_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "engine/sampling.h"
#include "util/status.h"

struct tokenizer;
struct model;

typedef struct {
  /* Zero fields take defaults: the model's context, 256 sequences, max(2048, max_model_len)
   * tokens (never more than the model's max_tokens), 16-token blocks, and a cache for every
   * sequence at full length up to 2 GiB. */
  int max_model_len;          /* prompt + generated tokens per sequence */
  int max_num_seqs;           /* sequences in one step */
  int max_num_batched_tokens; /* tokens in one step (prefill is chunked under it) */
  int block_size;             /* tokens per KV block */
  int64_t kv_cache_bytes;     /* memory for the KV cache (sets the number of blocks) */
  int enable_prefix_caching;
  uint64_t seed;              /* seeds requests that give no seed */
} engine_config;

typedef struct {
  sampling_params sampling;
  int n;                      /* choices (sequences) for this request */
  int max_tokens;             /* <= 0: up to the context limit */
  int min_tokens;             /* EOS and stop_token_ids are masked until this many tokens */
  int ignore_eos;
  const int32_t *stop_token_ids;
  int n_stop_token_ids;
  const char *const *stop;    /* stop strings, checked on the detokenized text */
  int n_stop;
  int include_stop_str_in_output;
  int skip_special_tokens;
  /* Prompt logprobs (vLLM's prompt_logprobs): each prompt token's logprob given the tokens before
   * it, plus the top prompt_logprobs (<= SAMPLING_MAX_LOGPROBS) at its position. Such a request
   * computes logits for every prompt position, so it does not read the prefix cache. */
  int has_prompt_logprobs;
  int prompt_logprobs;
} engine_request_params;

typedef enum {
  ENGINE_FINISH_NONE = 0,
  ENGINE_FINISH_STOP,     /* EOS, a stop token or a stop string */
  ENGINE_FINISH_LENGTH,   /* max_tokens or the context limit */
  ENGINE_FINISH_ABORT,    /* cancelled */
  ENGINE_FINISH_ERROR,    /* the step failed (e.g. a worker died) */
} engine_finish;

/* One event for one choice of a request. Pointers are valid only during the callback. */
typedef struct {
  int index;                  /* choice index in [0, n) */
  const char *text;           /* new text (complete UTF-8), may be empty */
  size_t text_len;
  int n_tokens;               /* tokens this event covers (0 on a bare finish) */
  const int32_t *tokens;
  const sample_result *samples; /* [n_tokens], for logprobs */
  /* [prompt_tokens] once every prompt position is computed, for a request with prompt logprobs
   * (NULL otherwise): entry i is prompt token i (entry 0, the first token, has no logprob). */
  const sample_result *prompt_logprobs;
  engine_finish finish;       /* != NONE on the choice's last event */
  const char *error;          /* message when finish == ERROR */
  /* Usage, filled on every event: */
  int prompt_tokens;
  int cached_tokens;          /* prompt tokens served from the prefix cache */
  int completion_tokens;      /* of this choice so far */
} engine_event;

/* Called on the engine thread; must not block for long nor call back into the engine. */
typedef void (*engine_event_fn)(void *user, const engine_event *ev);

typedef struct engine engine;

int engine_create(engine **out, struct model *m, const struct tokenizer *tok,
                  const engine_config *cfg, ts_err *err);
/* The same over any executor (uni, mp, ray); the engine owns ex from then on, even on failure.
 * tok may be NULL: events then carry no text and stop strings are refused. */
struct executor;
int engine_create_with_executor(engine **out, struct executor *ex, const struct tokenizer *tok,
                                const engine_config *cfg, ts_err *err);
/* The limits the engine settled on (defaults filled in, clamped to the model). */
void engine_get_config(const engine *e, engine_config *out);
/* Stops the loop, fails every pending request with ENGINE_FINISH_ABORT, frees everything. */
void engine_destroy(engine *e);

/* Queues a request; its events go to fn(user, ...). Returns its id in *id. Fails at once (and
 * calls nothing) when the prompt is empty or cannot fit the context. */
int engine_submit(engine *e, const int32_t *prompt, size_t n_prompt,
                  const engine_request_params *p, engine_event_fn fn, void *user, uint64_t *id,
                  ts_err *err);
/* Cancels a request: its blocks are freed at once and its remaining choices finish with ABORT.
 * After engine_cancel returns, fn is never called again for that request. */
void engine_cancel(engine *e, uint64_t id);

typedef struct {
  int running, waiting;
  int kv_blocks_total, kv_blocks_free;
  int64_t prompt_tokens_total, generation_tokens_total;
  int64_t prefix_cache_queries, prefix_cache_hits; /* in tokens */
  int64_t preemptions;
} engine_stats;
void engine_get_stats(engine *e, engine_stats *out);
/* 0 when the executor's workers answer; else an error naming the dead or stalled one. Safe from
 * any thread; never waits for a step. */
int engine_health(engine *e, ts_err *err);

#endif
