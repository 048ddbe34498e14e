/* Requests and their sequences as the engine thread holds them: a deep copy of the caller's
 * parameters, one sequence per choice (tokens, computed count, block table, sampler, incremental
 * detokenizer), and the stop-string logic over each choice's detokenized text. */
#ifndef TESSERA_REQUEST_H
#define TESSERA_REQUEST_H

#include <stddef.h>
#include <stdint.h>

#include "engine/block_manager.h"
#include "engine/engine.h"
#include "engine/sampling.h"

struct tokenizer;
struct tok_stream;
struct engine_req;

typedef enum { SEQ_WAITING = 0, SEQ_RUNNING, SEQ_FINISHED } seq_state;

typedef struct engine_seq {
  struct engine_req *req;
  int index;            /* choice index */
  seq_state state;
  int32_t *tokens;      /* [alloc] prompt then generated tokens */
  int n_tokens;
  int alloc;            /* grows by doubling, never past cap */
  int cap;              /* most tokens this sequence may reach (context or max_tokens) */
  int n_computed;       /* tokens whose K/V are in the blocks of bt */
  block_table bt;
  sampler *smp;
  struct tok_stream *ts;
  int completion_tokens;
  engine_finish finish;
  /* Text not yet emitted because it could be the start of a stop string. */
  char *held;
  size_t held_len, held_cap;
  /* Text to emit with this step's event (valid until the next step). */
  char *out;
  size_t out_len, out_cap;
  size_t tail_pos;      /* bytes of req->prompt_tail already matched and dropped */
  sample_result last_sample;
  int32_t last_token;
  /* Scheduling scratch for the current step. */
  int sched_tokens;     /* new tokens in this step, 0 when not scheduled */
  int logits_row;       /* row of this step's logits, -1 when none */
  int plp_row, plp_pos, plp_rows; /* prompt logprobs: plp_rows logits rows from plp_row hold the
                                     positions from plp_pos on (0 rows: none this step) */
  int inflight;         /* in a submitted micro-batch not yet collected (pipelined executors):
                           not scheduled again nor preempted, and its blocks outlive a removal */
} engine_seq;

typedef struct engine_req {
  uint64_t id;
  engine_event_fn fn;
  void *user;
  engine_request_params p; /* pointers below are the request's own copies */
  int32_t *prompt;
  int n_prompt;
  int n;
  engine_seq *seqs;        /* [n] */
  int n_unfinished;
  int cached_tokens;       /* prompt tokens served from the prefix cache at first admission */
  int admitted;            /* some choice has been admitted once */
  int counted;             /* prompt tokens added to the engine's totals */
  sample_result *plp;      /* [n_prompt] prompt logprobs when asked for (else NULL): entry i is
                              prompt token i given the ones before it; entry 0 stays empty */
  int plp_done;            /* prompt positions whose logits filled plp (all from 0 on); the
                              logits of position p give entry p + 1, so n_prompt - 1 is all */
  /* Prompt text the detokenizer still holds after being primed with the prompt (an unfinished
   * byte group, say): it comes out with the first generated token and is dropped there. */
  char *prompt_tail;
  size_t prompt_tail_len;
  char **stop;             /* [n_stop] */
  size_t *stop_len;        /* [n_stop] */
  size_t max_stop_len;
  int32_t *stop_ids;
  int32_t *bias_ids;
  float *bias;
  struct engine_req *prev, *next; /* the engine's list of live requests */
} engine_req;

/* Validates p and builds a request with n sequences, each with its sampler (seed + index when the
 * request gives a seed, else derived from engine_seed) and, when tok is given, its incremental
 * detokenizer. cap_tokens bounds prompt + generated tokens per sequence. */
int req_create(engine_req **out, uint64_t id, const int32_t *prompt, size_t n_prompt,
               const engine_request_params *p, int vocab_size, int cap_tokens,
               uint64_t engine_seed, const struct tokenizer *tok, engine_event_fn fn, void *user,
               ts_err *err);
/* Frees the request's memory (its sequences must hold no blocks). */
void req_free(engine_req *r);

/* Prompt positions in [first, first + k) of s's next k scheduled tokens whose logits its request
 * still needs for prompt logprobs; *pos0 gets the first such position. 0 when none. */
int seq_prompt_rows(const engine_seq *s, int k, int *pos0);
/* Whether s's request still needs prompt logits (it then reuses no cached prefix past plp_done). */
static inline int req_plp_pending(const engine_req *r) {
  return r->plp && r->plp_done < r->n_prompt - 1;
}

/* Appends a generated token (growing the array by doubling). TS_ENOMEM when it cannot grow. */
int seq_append(engine_seq *s, int32_t t);

/* Drops from a detokenized chunk the prompt text the stream still held (see prompt_tail). */
void seq_skip_prompt_tail(engine_seq *s, const char **text, size_t *len);

/* Feeds a generated token's text through the stop strings. finishing: this is the choice's last
 * text (flush everything that is not cut by a stop string). Appends what to emit now to seq->out
 * (the caller empties it once per step); returns 1 when a stop string ended the choice. */
int seq_text_push(engine_seq *s, const char *text, size_t len, int finishing);

#endif
