/* The engine loop: one thread owns every request, the scheduler and the block manager. Each
 * iteration drains the inbox (submits and cancels from other threads), plans a step, runs it on
 * the executor, samples, applies the stop rules and emits one event per choice that advanced.
 * With a pipelined executor (P stages) up to P micro-batches of disjoint sequences stay in flight
 * across steps: each iteration tops the pipeline up, then collects the oldest micro-batch and
 * samples it, so its sequences go back in with the next top-up while the others are computed.
 * Other threads only touch the inbox and the stats snapshot (under mu) and the cancel list (under
 * cb_mu, which is also held around callbacks: engine_submit and engine_get_stats never wait for a
 * callback, and engine_cancel returns only once no callback of that request can run). */
#include "engine/engine.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dist/executor.h"
#include "engine/block_manager.h"
#include "engine/request.h"
#include "engine/scheduler.h"
#include "tokenizer/tokenizer.h"
#include "util/log.h"

#define ENGINE_MAX_EOS 16
#define ENGINE_MAX_PIPE 64 /* micro-batches in flight on a pipelined executor */
/* Logits rows per step once a request asks for prompt logprobs (one row per prompt position):
 * the logits buffer grows to this many rows (or max_num_seqs, if more) on the first such request,
 * and longer prompts are chunked under it. */
#define ENGINE_PLP_ROWS 64

typedef struct {
  engine_req *req;
  engine_event ev;
} pending_event;

struct engine {
  engine_config cfg;
  executor *ex;
  const tokenizer *tok;
  int vocab;
  int32_t eos[ENGINE_MAX_EOS];
  int n_eos;
  block_manager *bm;
  scheduler sched;
  uint64_t step_id;

  /* Step buffers, sized once. */
  int max_blocks_per_seq;
  int32_t *b_tokens;      /* [max_num_batched_tokens] */
  int32_t *b_pos;         /* [max_num_batched_tokens] */
  int32_t *b_seq_start;   /* [max_num_seqs+1] */
  int32_t *b_ctx_len;     /* [max_num_seqs] */
  int32_t *b_block_table; /* [max_num_seqs][max_blocks_per_seq] */
  int32_t *b_logits_rows; /* [n_rows] */
  float *logits;          /* [n_rows][vocab] */
  int n_rows;             /* logits rows per step: max_num_seqs, more once prompt logprobs ask */
  ts_sample_row *s_rows;  /* [max_num_seqs] device sampling rows, by logits row */
  int32_t *s_ids;         /* [max_num_seqs] their sampled ids */
  engine_seq **done;      /* [max_num_seqs] copy of the step's sequences */
  char step_error[TS_ERR_MSG_MAX];
  pending_event *events;  /* [cap_events] */
  int n_events, cap_events;

  /* Live requests (engine thread only). */
  engine_req *live_head;
  int n_live;

  /* Shared with other threads, under mu. */
  pthread_mutex_t mu;
  pthread_cond_t cv;
  pthread_t thread;
  int thread_started;
  int stop;
  uint64_t next_id;
  engine_req *inbox_head, *inbox_tail;
  int n_inbox;
  int cancel_wake;        /* a cancel arrived since the loop last looked */
  pthread_mutex_t cb_mu;
  uint64_t *cancels;      /* ids cancelled and not yet taken out by the loop, under cb_mu */
  int n_cancels, cap_cancels;
  engine_stats stats;
  int64_t prompt_tokens_total, generation_tokens_total;

  /* Pipelined executors (engine thread only): micro-batches submitted and not yet collected,
   * oldest at pipe_head. Each sequence is in at most one (engine_seq.inflight); a request with
   * a sequence in flight is freed only once that micro-batch is collected. */
  int pipe_depth;         /* most micro-batches in flight; 0: steps run one at a time */
  struct {
    uint64_t step_id;
    int n;
    engine_seq **seqs;    /* [max_num_seqs] in batch order (logits rows follow it) */
  } pipe[ENGINE_MAX_PIPE];
  int pipe_head, pipe_n;
};

static uint64_t eng_mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

/* ---- live request list ---- */

static void live_add(engine *e, engine_req *r) {
  r->prev = NULL;
  r->next = e->live_head;
  if (e->live_head) e->live_head->prev = r;
  e->live_head = r;
  e->n_live++;
}

static void live_remove(engine *e, engine_req *r) {
  if (r->prev) r->prev->next = r->next; else e->live_head = r->next;
  if (r->next) r->next->prev = r->prev;
  r->prev = r->next = NULL;
  e->n_live--;
}

static int req_inflight(const engine_req *r) {
  for (int i = 0; i < r->n; i++)
    if (r->seqs[i].inflight) return 1;
  return 0;
}

/* Takes a request out of the scheduler and frees it (no event). With a sequence in flight it
 * stays on the live list, silent and finished, until free_finished finds it landed. */
static void req_drop(engine *e, engine_req *r) {
  for (int i = 0; i < r->n; i++)
    if (r->seqs[i].state != SEQ_FINISHED) scheduler_remove(&e->sched, &r->seqs[i]);
  r->n_unfinished = 0;
  r->fn = NULL;
  if (req_inflight(r)) return;
  live_remove(e, r);
  req_free(r);
}

/* ---- events ---- */

static engine_event *event_new(engine *e, engine_req *r, engine_seq *s) {
  if (e->n_events == e->cap_events) {
    int nc = e->cap_events ? e->cap_events * 2 : 64;
    pending_event *ne = realloc(e->events, (size_t)nc * sizeof *ne);
    if (!ne) return NULL;
    e->events = ne;
    e->cap_events = nc;
  }
  pending_event *pe = &e->events[e->n_events++];
  memset(pe, 0, sizeof *pe);
  pe->req = r;
  pe->ev.index = s->index;
  pe->ev.text = "";
  pe->ev.prompt_tokens = r->n_prompt;
  pe->ev.cached_tokens = r->cached_tokens;
  pe->ev.completion_tokens = s->completion_tokens;
  if (r->plp && !req_plp_pending(r)) pe->ev.prompt_logprobs = r->plp;
  return &pe->ev;
}

static int cancelled_locked(const engine *e, uint64_t id) {
  for (int i = 0; i < e->n_cancels; i++)
    if (e->cancels[i] == id) return 1;
  return 0;
}

/* Calls back under cb_mu so that engine_cancel, which takes cb_mu, returns only once no callback
 * of that request can run any more. */
static void events_flush(engine *e) {
  if (e->n_events == 0) return;
  pthread_mutex_lock(&e->cb_mu);
  for (int i = 0; i < e->n_events; i++) {
    pending_event *pe = &e->events[i];
    if (pe->req->fn && !cancelled_locked(e, pe->req->id)) pe->req->fn(pe->req->user, &pe->ev);
  }
  pthread_mutex_unlock(&e->cb_mu);
  e->n_events = 0;
}

/* Finishes every unfinished choice of r with finish (ERROR or ABORT) and frees its blocks; the
 * request itself is freed by the caller after the events went out. */
static void req_fail(engine *e, engine_req *r, engine_finish finish, const char *msg) {
  for (int i = 0; i < r->n; i++) {
    engine_seq *s = &r->seqs[i];
    if (s->state == SEQ_FINISHED) continue;
    scheduler_remove(&e->sched, s);
    s->finish = finish;
    r->n_unfinished--;
    engine_event *ev = event_new(e, r, s);
    if (ev) {
      ev->finish = finish;
      ev->error = msg;
    }
  }
}

static void free_finished(engine *e) {
  for (engine_req *r = e->live_head, *next; r; r = next) {
    next = r->next;
    if (r->n_unfinished == 0 && !req_inflight(r)) {
      live_remove(e, r);
      req_free(r);
    }
  }
}

/* ---- one step ---- */

static int is_eos(const engine *e, int32_t t) {
  for (int i = 0; i < e->n_eos; i++)
    if (e->eos[i] == t) return 1;
  return 0;
}

static int is_stop_id(const engine_req *r, int32_t t) {
  for (int i = 0; i < r->p.n_stop_token_ids; i++)
    if (r->stop_ids[i] == t) return 1;
  return 0;
}

static void build_batch(engine *e, ts_batch *b) {
  scheduler *sc = &e->sched;
  int bs = e->cfg.block_size, n_tok = 0, n_logits = 0, max_blocks = 1;
  for (int j = 0; j < sc->n_sched; j++) {
    int ctx = sc->sched[j]->n_computed + sc->sched[j]->sched_tokens;
    int nb = (ctx + bs - 1) / bs;
    if (nb > max_blocks) max_blocks = nb;
  }
  for (int j = 0; j < sc->n_sched; j++) {
    engine_seq *q = sc->sched[j];
    e->b_seq_start[j] = n_tok;
    for (int t = q->n_computed; t < q->n_computed + q->sched_tokens; t++) {
      e->b_tokens[n_tok] = q->tokens[t];
      e->b_pos[n_tok] = t;
      n_tok++;
    }
    e->b_ctx_len[j] = q->n_computed + q->sched_tokens;
    int32_t *row = e->b_block_table + (size_t)j * max_blocks;
    int nb = q->bt.n < max_blocks ? q->bt.n : max_blocks;
    memcpy(row, q->bt.blocks, (size_t)nb * sizeof *row);
    for (int c = nb; c < max_blocks; c++) row[c] = 0;
    int pos0;
    q->plp_rows = seq_prompt_rows(q, q->sched_tokens, &pos0);
    q->plp_row = n_logits;
    q->plp_pos = pos0;
    for (int r = 0; r < q->plp_rows; r++)
      e->b_logits_rows[n_logits++] = e->b_seq_start[j] + pos0 - q->n_computed + r;
    q->logits_row = -1;
    if (q->n_computed + q->sched_tokens == q->n_tokens) {
      q->logits_row = n_logits;
      e->b_logits_rows[n_logits++] = n_tok - 1;
    }
  }
  e->b_seq_start[sc->n_sched] = n_tok;
  b->n_tokens = n_tok;
  b->tokens = e->b_tokens;
  b->pos = e->b_pos;
  b->n_seqs = sc->n_sched;
  b->seq_start = e->b_seq_start;
  b->ctx_len = e->b_ctx_len;
  b->max_blocks = max_blocks;
  b->block_table = e->b_block_table;
  b->n_logits = n_logits;
  b->logits_rows = e->b_logits_rows;
}

static void seq_accept(engine *e, engine_seq *s);

/* Turns s's prompt-logprob rows of this step into its request's entries (they continue where
 * the entries stop: a prefix is reused only up to plp_done). */
static void seq_take_prompt_rows(engine *e, engine_seq *s, const float *logits) {
  engine_req *r = s->req;
  for (int i = 0; i < s->plp_rows && s->plp_pos + i == r->plp_done; i++) {
    int pos = s->plp_pos + i;
    sampling_prompt_logprob(logits + (size_t)(s->plp_row + i) * e->vocab, e->vocab,
                            r->prompt[pos + 1], r->p.prompt_logprobs, &r->plp[pos + 1]);
    r->plp_done++;
  }
  s->plp_rows = 0;
}

/* After a step: s's prompt-logprob rows, then whether it may sample (its logits row exists and
 * every prompt logprob before it is in: the first event carries them all). */
static int seq_step_rows(engine *e, engine_seq *s) {
  if (s->state != SEQ_RUNNING) return 0;
  if (s->plp_rows > 0) seq_take_prompt_rows(e, s, e->logits);
  if (s->logits_row < 0) return 0;
  if (req_plp_pending(s->req)) {
    req_fail(e, s->req, ENGINE_FINISH_ERROR, "engine: the prompt logprobs were not all computed");
    return 0;
  }
  return 1;
}

/* Samples the next token of s from its logits row and applies the stop rules; queues its event. */
static void seq_advance(engine *e, engine_seq *s, float *logits) {
  engine_req *r = s->req;
  const engine_request_params *p = &r->p;
  if (s->completion_tokens < p->min_tokens) {
    if (!p->ignore_eos)
      for (int i = 0; i < e->n_eos; i++) logits[e->eos[i]] = -INFINITY;
    for (int i = 0; i < p->n_stop_token_ids; i++) logits[r->stop_ids[i]] = -INFINITY;
  }
  sample_result *res = &s->last_sample;
  if (sampler_sample(s->smp, logits, res) < 0 || res->token < 0 || res->token >= e->vocab) {
    req_fail(e, r, ENGINE_FINISH_ERROR, "sampling failed");
    return;
  }
  seq_accept(e, s);
}

/* Whether s's next token may be drawn on the device: nothing the device sampler cannot express
 * (logit_bias, logprobs: sampler_device_row; masks while min_tokens holds). */
static int seq_device_row(engine *e, engine_seq *s, ts_sample_row *row) {
  const engine_request_params *p = &s->req->p;
  if (s->completion_tokens < p->min_tokens &&
      ((!p->ignore_eos && e->n_eos > 0) || p->n_stop_token_ids > 0))
    return 0;
  return sampler_device_row(s->smp, row);
}

/* Appends s->last_sample's token and applies the stop rules; queues its event. */
static void seq_accept(engine *e, engine_seq *s) {
  engine_req *r = s->req;
  const engine_request_params *p = &r->p;
  sample_result *res = &s->last_sample;
  if (res->token < 0 || res->token >= e->vocab) {
    req_fail(e, r, ENGINE_FINISH_ERROR, "sampling failed");
    return;
  }
  int32_t t = res->token;
  if (seq_append(s, t) < 0) {
    req_fail(e, r, ENGINE_FINISH_ERROR, "out of memory for the generated tokens");
    return;
  }
  sampler_observe(s->smp, t);
  s->last_token = t;
  s->completion_tokens++;
  e->generation_tokens_total++;

  engine_finish fin = ENGINE_FINISH_NONE;
  int stop_tok = (!p->ignore_eos && is_eos(e, t)) || is_stop_id(r, t);
  if (stop_tok)
    fin = ENGINE_FINISH_STOP;
  else if ((p->max_tokens > 0 && s->completion_tokens >= p->max_tokens) ||
           s->n_tokens >= e->cfg.max_model_len || s->n_tokens >= s->cap)
    fin = ENGINE_FINISH_LENGTH;

  s->out_len = 0;
  if (s->ts) {
    const char *txt = NULL;
    size_t len = 0;
    int stopped = 0;
    /* A stop token's own text is left out unless asked for, as vLLM does. */
    if (!stop_tok || p->include_stop_str_in_output) {
      if (tok_stream_push(s->ts, t, &txt, &len) < 0) len = 0;
      seq_skip_prompt_tail(s, &txt, &len);
      stopped = seq_text_push(s, txt, len, 0);
    }
    if (stopped) {
      fin = ENGINE_FINISH_STOP;
    } else if (fin != ENGINE_FINISH_NONE) {
      txt = NULL;
      len = 0;
      if (tok_stream_flush(s->ts, &txt, &len) < 0) len = 0;
      seq_skip_prompt_tail(s, &txt, &len);
      seq_text_push(s, txt, len, 1);
    }
  }
  engine_event *ev = event_new(e, r, s);
  if (ev) {
    ev->text = s->out ? s->out : "";
    ev->text_len = s->out_len;
    ev->n_tokens = 1;
    ev->tokens = &s->last_token;
    ev->samples = &s->last_sample;
    ev->finish = fin;
  }
  if (fin != ENGINE_FINISH_NONE) {
    s->finish = fin;
    scheduler_remove(&e->sched, s);
    r->n_unfinished--;
  }
}

/* The workers lost their KV caches (e.g. they were restarted): every live request fails, since its
 * cached state is gone and its request may be what broke them, and the prefix cache is forgotten. */
static int kv_epoch_sync(engine *e) {
  uint64_t epoch = __atomic_load_n(&e->ex->kv_epoch, __ATOMIC_ACQUIRE);
  if (epoch == e->ex->kv_epoch_seen) return 0;
  LOG_W("engine: the workers' KV caches were lost; failing %d live requests", e->n_live);
  for (engine_req *r = e->live_head; r; r = r->next)
    req_fail(e, r, ENGINE_FINISH_ERROR, "the workers were restarted and lost the KV cache");
  block_manager_clear_cache(e->bm);
  e->ex->kv_epoch_seen = epoch;
  return 1;
}

static void engine_step(engine *e) {
  scheduler *sc = &e->sched;
  if (kv_epoch_sync(e)) return;
  if (scheduler_schedule(sc) == 0) {
    /* Work exists but nothing fits: only possible when the head of the queue can never run.
     * Fail it rather than spin. */
    if (sc->n_running == 0 && sc->n_waiting > 0) {
      engine_req *r = sc->waiting[0]->req;
      LOG_W("engine: request %llu cannot be scheduled; failing it", (unsigned long long)r->id);
      req_fail(e, r, ENGINE_FINISH_ERROR, "the request does not fit the KV cache");
    }
    return;
  }
  for (int j = 0; j < sc->n_sched; j++) {
    engine_req *r = sc->sched[j]->req;
    if (!r->counted) {
      r->counted = 1;
      e->prompt_tokens_total += r->n_prompt;
    }
  }
  ts_batch b;
  build_batch(e, &b);
  ts_err err;
  ts_err_clear(&err);
  /* Device sampling when the executor offers it and every row can use it: only ids come back. */
  int device = e->ex->ops->execute_step_sample && !(e->ex->pipe && e->ex->info.max_inflight > 1);
  /* Prompt logprobs need their logits rows here: then every row comes back as logits. */
  for (int j = 0; j < sc->n_sched && device; j++) device = sc->sched[j]->plp_rows == 0;
  for (int j = 0; j < sc->n_sched && device; j++) {
    engine_seq *q = sc->sched[j];
    if (q->logits_row >= 0) device = seq_device_row(e, q, &e->s_rows[q->logits_row]);
  }
  int rc = device ? e->ex->ops->execute_step_sample(e->ex, e->step_id++, &b, e->s_rows, e->s_ids,
                                                    &err)
                  : executor_execute_step(e->ex, e->step_id++, &b, e->logits, &err);
  if (rc < 0) {
    LOG_E("engine: step failed: %s", err.msg);
    /* Every request in the failed step ends with the error; the cache contents of its blocks are
     * unknown, so nothing is committed. */
    snprintf(e->step_error, sizeof e->step_error, "%s", err.msg[0] ? err.msg : ts_strerror(rc));
    int n = sc->n_sched;
    memcpy(e->done, sc->sched, (size_t)n * sizeof *e->done);
    for (int j = 0; j < n; j++) req_fail(e, e->done[j]->req, ENGINE_FINISH_ERROR, e->step_error);
    return;
  }
  scheduler_commit(sc);
  /* Sampling may finish sequences, which takes them out of sc->sched: walk a copy. */
  int n = sc->n_sched;
  memcpy(e->done, sc->sched, (size_t)n * sizeof *e->done);
  for (int j = 0; j < n; j++) {
    engine_seq *s = e->done[j];
    if (!seq_step_rows(e, s)) continue;
    if (device) {
      memset(&s->last_sample, 0, sizeof s->last_sample);
      s->last_sample.token = e->s_ids[s->logits_row];
      seq_accept(e, s);
    } else {
      seq_advance(e, s, e->logits + (size_t)s->logits_row * e->vocab);
    }
  }
}

/* ---- pipelined steps ---- */

/* Counts the prompts of the step just planned into the totals (once per request). */
static void count_prompts(engine *e) {
  scheduler *sc = &e->sched;
  for (int j = 0; j < sc->n_sched; j++) {
    engine_req *r = sc->sched[j]->req;
    if (!r->counted) {
      r->counted = 1;
      e->prompt_tokens_total += r->n_prompt;
    }
  }
}

/* Takes the oldest micro-batch off the pipeline: its sequences land (committed when ok) and are
 * returned in *seqs (valid until the next submit into that slot). */
static int pipe_pop(engine *e, int ok, engine_seq ***seqs) {
  int slot = e->pipe_head, n = e->pipe[slot].n;
  e->pipe_head = (e->pipe_head + 1) % e->pipe_depth;
  e->pipe_n--;
  for (int j = 0; j < n; j++) scheduler_land(&e->sched, e->pipe[slot].seqs[j], ok);
  *seqs = e->pipe[slot].seqs;
  return n;
}

/* After a failed submit or collect: every micro-batch still in flight is collected (the
 * executor fails each at once) and its requests end with msg, so that nothing is left
 * outstanding when the next step is submitted. */
static void pipe_fail_all(engine *e, const char *msg) {
  while (e->pipe_n > 0) {
    ts_err err;
    ts_err_clear(&err);
    executor_collect_step(e->ex, NULL, e->logits, &err);
    engine_seq **seqs;
    int n = pipe_pop(e, 0, &seqs);
    for (int j = 0; j < n; j++) req_fail(e, seqs[j]->req, ENGINE_FINISH_ERROR, msg);
  }
}

/* Submits micro-batches until P are in flight or nothing else can run. Each takes about its share
 * of the live sequences (those in flight included), so P groups of similar size form and keep
 * going round; new requests join the next micro-batch submitted. */
static void pipe_fill(engine *e) {
  scheduler *sc = &e->sched;
  while (e->pipe_n < e->pipe_depth) {
    int live = sc->n_running + sc->n_waiting;
    if (live > e->cfg.max_num_seqs) live = e->cfg.max_num_seqs;
    if (live == 0) return;
    if (scheduler_schedule_group(sc, (live + e->pipe_depth - 1) / e->pipe_depth) == 0) {
      /* With nothing in flight, as in engine_step: the head of the queue can never run. */
      if (e->pipe_n == 0 && sc->n_running == 0 && sc->n_waiting > 0) {
        engine_req *r = sc->waiting[0]->req;
        LOG_W("engine: request %llu cannot be scheduled; failing it", (unsigned long long)r->id);
        req_fail(e, r, ENGINE_FINISH_ERROR, "the request does not fit the KV cache");
        continue;
      }
      return;
    }
    count_prompts(e);
    ts_batch b;
    build_batch(e, &b);
    ts_err err;
    ts_err_clear(&err);
    uint64_t id = e->step_id++;
    int rc = executor_submit_step(e->ex, id, &b, &err);
    int n = sc->n_sched;
    memcpy(e->done, sc->sched, (size_t)n * sizeof *e->done);
    sc->n_sched = 0;
    if (rc < 0) {
      LOG_E("engine: step failed: %s", err.msg);
      snprintf(e->step_error, sizeof e->step_error, "%s", err.msg[0] ? err.msg : ts_strerror(rc));
      for (int j = 0; j < n; j++) req_fail(e, e->done[j]->req, ENGINE_FINISH_ERROR, e->step_error);
      pipe_fail_all(e, e->step_error);
      return;
    }
    int slot = (e->pipe_head + e->pipe_n) % e->pipe_depth;
    e->pipe[slot].step_id = id;
    e->pipe[slot].n = n;
    memcpy(e->pipe[slot].seqs, e->done, (size_t)n * sizeof *e->done);
    for (int j = 0; j < n; j++) scheduler_launch(sc, e->done[j]);
    e->pipe_n++;
  }
}

/* Collects the oldest micro-batch and samples its sequences. */
static void pipe_collect(engine *e) {
  ts_err err;
  ts_err_clear(&err);
  uint64_t want = e->pipe[e->pipe_head].step_id, got = want;
  int rc = executor_collect_step(e->ex, &got, e->logits, &err);
  if (rc == 0 && got != want)
    rc = ts_errorf(&err, TS_EINTERNAL, "engine: collected step %llu, expected %llu",
                   (unsigned long long)got, (unsigned long long)want);
  engine_seq **seqs;
  int n = pipe_pop(e, rc == 0, &seqs);
  if (rc < 0) {
    LOG_E("engine: step failed: %s", err.msg);
    snprintf(e->step_error, sizeof e->step_error, "%s", err.msg[0] ? err.msg : ts_strerror(rc));
    for (int j = 0; j < n; j++) req_fail(e, seqs[j]->req, ENGINE_FINISH_ERROR, e->step_error);
    pipe_fail_all(e, e->step_error);
    return;
  }
  for (int j = 0; j < n; j++) {
    engine_seq *s = seqs[j];
    if (seq_step_rows(e, s)) seq_advance(e, s, e->logits + (size_t)s->logits_row * e->vocab);
  }
}

static void pipe_step(engine *e) {
  pipe_fill(e);
  if (e->pipe_n > 0) pipe_collect(e);
}

/* Engine teardown: the micro-batches in flight are abandoned (the executor is shut down next)
 * and their sequences' blocks given back. */
static void pipe_abandon(engine *e) {
  while (e->pipe_n > 0) {
    engine_seq **seqs;
    pipe_pop(e, 0, &seqs);
  }
}

/* ---- the loop ---- */

/* A request with prompt logprobs arrived: the logits buffer takes ENGINE_PLP_ROWS rows per step
 * from now on (never more than a step's tokens), so its prompt is not chunked one row at a time. */
static int grow_rows(engine *e) {
  int want = ENGINE_PLP_ROWS < e->cfg.max_num_batched_tokens ? ENGINE_PLP_ROWS
                                                              : e->cfg.max_num_batched_tokens;
  if (want <= e->n_rows) return 0;
  float *l = realloc(e->logits, (size_t)want * (size_t)e->vocab * sizeof *l);
  if (!l) return TS_ENOMEM;
  e->logits = l;
  int32_t *rows = realloc(e->b_logits_rows, (size_t)want * sizeof *rows);
  if (!rows) return TS_ENOMEM;
  e->b_logits_rows = rows;
  e->n_rows = want;
  e->sched.cfg.max_logits_rows = want;
  return 0;
}

static void stats_update_locked(engine *e) {
  engine_stats *st = &e->stats;
  int running = 0, waiting = 0;
  for (engine_req *r = e->live_head; r; r = r->next) {
    if (r->n_unfinished == 0) continue; /* cancelled, freed once its micro-batch is collected */
    int any = 0;
    for (int i = 0; i < r->n; i++) any |= r->seqs[i].state == SEQ_RUNNING;
    if (any) running++; else waiting++;
  }
  st->running = running;
  st->waiting = waiting; /* engine_get_stats adds the inbox */
  st->kv_blocks_total = block_manager_num_blocks(e->bm);
  st->kv_blocks_free = block_manager_num_free(e->bm);
  st->prompt_tokens_total = e->prompt_tokens_total;
  st->generation_tokens_total = e->generation_tokens_total;
  st->prefix_cache_queries = e->sched.cache_queries;
  st->prefix_cache_hits = e->sched.cache_hits;
  st->preemptions = e->sched.preemptions;
}

static void *engine_loop(void *arg) {
  engine *e = arg;
  uint64_t *cancels = NULL;
  int cap = 0;
  for (;;) {
    pthread_mutex_lock(&e->mu);
    stats_update_locked(e);
    while (!e->stop && !e->inbox_head && !e->cancel_wake && e->n_live == 0)
      pthread_cond_wait(&e->cv, &e->mu);
    if (e->stop) {
      pthread_mutex_unlock(&e->mu);
      break;
    }
    engine_req *in = e->inbox_head;
    e->inbox_head = e->inbox_tail = NULL;
    e->n_inbox = 0;
    e->cancel_wake = 0;
    pthread_mutex_unlock(&e->mu);

    pthread_mutex_lock(&e->cb_mu);
    int n_cancels = e->n_cancels;
    if (n_cancels > cap) {
      uint64_t *nc = realloc(cancels, (size_t)n_cancels * sizeof *nc);
      if (nc) {
        cancels = nc;
        cap = n_cancels;
      } else {
        n_cancels = cap;
      }
    }
    if (n_cancels) memcpy(cancels, e->cancels, (size_t)n_cancels * sizeof *cancels);
    /* Ids stay on the shared list until their requests are gone, so no event slips through. */
    pthread_mutex_unlock(&e->cb_mu);

    /* Before new requests join: they start on the restarted workers. Micro-batches of the lost
     * caches (if any are left) must not be mistaken for new ones. */
    if (kv_epoch_sync(e)) pipe_fail_all(e, "the workers were restarted and lost the KV cache");
    for (engine_req *r = in, *next; r; r = next) {
      next = r->next;
      live_add(e, r);
      if (r->plp && grow_rows(e) < 0) {
        req_fail(e, r, ENGINE_FINISH_ERROR, "out of memory for the prompt logprobs' logits");
        continue;
      }
      for (int i = 0; i < r->n; i++) {
        if (scheduler_add(&e->sched, &r->seqs[i]) < 0) {
          req_fail(e, r, ENGINE_FINISH_ERROR, "out of memory queueing the request");
          break;
        }
      }
    }
    for (int c = 0; c < n_cancels; c++)
      for (engine_req *r = e->live_head; r; r = r->next)
        if (r->id == cancels[c]) {
          req_drop(e, r);
          break;
        }
    if (n_cancels) {
      pthread_mutex_lock(&e->cb_mu);
      memmove(e->cancels, e->cancels + n_cancels, (size_t)(e->n_cancels - n_cancels) * sizeof *cancels);
      e->n_cancels -= n_cancels;
      pthread_mutex_unlock(&e->cb_mu);
    }
    if (e->pipe_depth > 0) pipe_step(e);
    else if (e->sched.n_running + e->sched.n_waiting > 0) engine_step(e);
    events_flush(e);
    free_finished(e);
  }
  free(cancels);
  return NULL;
}

/* ---- public API ---- */

void engine_get_config(const engine *e, engine_config *out) { *out = e->cfg; }

int engine_create_with_executor(engine **out, executor *ex, const tokenizer *tok,
                                const engine_config *cfg_in, ts_err *err) {
  *out = NULL;
  if (!ex) return ts_errorf(err, TS_EINVAL, "engine: no executor");
  engine_config cfg = cfg_in ? *cfg_in : (engine_config){0};
  const executor_info *info = &ex->info;
  if (cfg.block_size <= 0) cfg.block_size = 16;
  if (cfg.max_model_len <= 0) cfg.max_model_len = info->max_pos;
  if (cfg.max_num_seqs <= 0) cfg.max_num_seqs = 256;
  if (cfg.max_num_batched_tokens <= 0)
    cfg.max_num_batched_tokens = cfg.max_model_len > 2048 ? cfg.max_model_len : 2048;
  if (info->max_tokens > 0 && cfg.max_num_batched_tokens > info->max_tokens)
    cfg.max_num_batched_tokens = info->max_tokens;
  int rc = 0;
  if (info->vocab_size <= 0 || info->max_pos <= 0) {
    rc = ts_errorf(err, TS_EINVAL, "engine: the executor reports no vocabulary or context");
  } else if (cfg.max_model_len > info->max_pos) {
    rc = ts_errorf(err, TS_ERANGE,
                   "engine: --max-model-len %d exceeds the model's max_position_embeddings %d",
                   cfg.max_model_len, info->max_pos);
  } else if (cfg.max_model_len < 2) {
    rc = ts_errorf(err, TS_ERANGE, "engine: --max-model-len %d is too small", cfg.max_model_len);
  }
  if (rc < 0) {
    executor_shutdown(ex);
    return rc;
  }
  int per_seq = (cfg.max_model_len + cfg.block_size - 1) / cfg.block_size;
  int n_blocks = 0;
  if (cfg.kv_cache_bytes <= 0) {
    /* Room for every sequence at full length, but no more than 2 GiB by default. */
    int64_t want = (int64_t)cfg.max_num_seqs * per_seq;
    int64_t per_block = info->kv_bytes_per_token * cfg.block_size;
    if (per_block > 0 && want * per_block > ((int64_t)2 << 30)) want = ((int64_t)2 << 30) / per_block;
    if (want < per_seq) want = per_seq;
    n_blocks = (int)(want < (1 << 30) ? want : (1 << 30));
  }
  rc = executor_init_kv(ex, cfg.block_size, cfg.kv_cache_bytes, n_blocks, &n_blocks, err);
  if (rc < 0) {
    executor_shutdown(ex);
    return rc;
  }
  if ((int64_t)n_blocks * cfg.block_size < cfg.max_model_len) {
    executor_shutdown(ex);
    return ts_errorf(err, TS_ERANGE,
                     "engine: the KV cache holds %d blocks of %d tokens, fewer than one sequence of "
                     "--max-model-len %d; raise --kv-cache-memory or lower --max-model-len",
                     n_blocks, cfg.block_size, cfg.max_model_len);
  }
  engine *e = calloc(1, sizeof *e);
  if (!e) {
    executor_shutdown(ex);
    return ts_errorf(err, TS_ENOMEM, "engine: out of memory");
  }
  e->cfg = cfg;
  e->ex = ex;
  e->tok = tok;
  e->vocab = info->vocab_size;
  e->next_id = 1;
  for (int i = 0; i < info->n_eos && e->n_eos < ENGINE_MAX_EOS; i++)
    if (info->eos_ids[i] >= 0 && info->eos_ids[i] < e->vocab) e->eos[e->n_eos++] = info->eos_ids[i];
  if (tok) {
    const int32_t *ids = NULL;
    int n = tok_eos_ids(tok, &ids);
    for (int i = 0; i < n && ids && e->n_eos < ENGINE_MAX_EOS; i++)
      if (ids[i] >= 0 && ids[i] < e->vocab && !is_eos(e, ids[i])) e->eos[e->n_eos++] = ids[i];
  }
  e->max_blocks_per_seq = per_seq;
  size_t nt = (size_t)cfg.max_num_batched_tokens, ns = (size_t)cfg.max_num_seqs;
  e->b_tokens = malloc(nt * sizeof *e->b_tokens);
  e->b_pos = malloc(nt * sizeof *e->b_pos);
  e->b_seq_start = malloc((ns + 1) * sizeof *e->b_seq_start);
  e->b_ctx_len = malloc(ns * sizeof *e->b_ctx_len);
  e->b_block_table = malloc(ns * (size_t)per_seq * sizeof *e->b_block_table);
  e->b_logits_rows = malloc(ns * sizeof *e->b_logits_rows);
  e->logits = malloc(ns * (size_t)e->vocab * sizeof *e->logits);
  e->s_rows = malloc(ns * sizeof *e->s_rows);
  e->s_ids = malloc(ns * sizeof *e->s_ids);
  e->done = malloc(ns * sizeof *e->done);
  int oom = 0;
  if (ex->pipe && info->max_inflight > 1) {
    e->pipe_depth = info->max_inflight < ENGINE_MAX_PIPE ? info->max_inflight : ENGINE_MAX_PIPE;
    for (int k = 0; k < e->pipe_depth; k++)
      oom |= !(e->pipe[k].seqs = malloc(ns * sizeof *e->pipe[k].seqs));
  }
  rc = block_manager_create(&e->bm, n_blocks, cfg.block_size, cfg.enable_prefix_caching, err);
  if (rc == 0) {
    scheduler_config sc = {cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.max_num_seqs};
    e->n_rows = cfg.max_num_seqs;
    rc = scheduler_init(&e->sched, &sc, e->bm, err);
  }
  if (rc == 0 && (!e->b_tokens || !e->b_pos || !e->b_seq_start || !e->b_ctx_len ||
                  !e->b_block_table || !e->b_logits_rows || !e->logits || !e->s_rows || !e->s_ids ||
                  !e->done || oom))
    rc = ts_errorf(err, TS_ENOMEM, "engine: out of memory for step buffers");
  if (rc == 0) {
    pthread_mutex_init(&e->mu, NULL);
    pthread_mutex_init(&e->cb_mu, NULL);
    pthread_cond_init(&e->cv, NULL);
    if (pthread_create(&e->thread, NULL, engine_loop, e) != 0) {
      pthread_mutex_destroy(&e->mu);
      pthread_mutex_destroy(&e->cb_mu);
      pthread_cond_destroy(&e->cv);
      rc = ts_errorf(err, TS_EINTERNAL, "engine: cannot start the loop thread");
    } else {
      e->thread_started = 1;
    }
  }
  if (rc < 0) {
    engine_destroy(e);
    return rc;
  }
  LOG_I("engine: %d KV blocks of %d tokens, max_model_len %d, max_num_seqs %d, "
        "max_num_batched_tokens %d, prefix caching %s",
        n_blocks, cfg.block_size, cfg.max_model_len, cfg.max_num_seqs,
        cfg.max_num_batched_tokens, cfg.enable_prefix_caching ? "on" : "off");
  *out = e;
  return 0;
}

void engine_destroy(engine *e) {
  if (!e) return;
  if (e->thread_started) {
    pthread_mutex_lock(&e->mu);
    e->stop = 1;
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
    pthread_join(e->thread, NULL);
    /* The loop is gone: this thread owns everything now. */
    for (engine_req *r = e->inbox_head, *next; r; r = next) {
      next = r->next;
      live_add(e, r);
    }
    e->inbox_head = e->inbox_tail = NULL;
    pipe_abandon(e);
    for (engine_req *r = e->live_head; r; r = r->next) req_fail(e, r, ENGINE_FINISH_ABORT, NULL);
    events_flush(e);
    while (e->live_head) req_drop(e, e->live_head);
    pthread_mutex_destroy(&e->mu);
    pthread_mutex_destroy(&e->cb_mu);
    pthread_cond_destroy(&e->cv);
  }
  scheduler_free(&e->sched);
  block_manager_free(e->bm);
  executor_shutdown(e->ex);
  free(e->b_tokens);
  free(e->b_pos);
  free(e->b_seq_start);
  free(e->b_ctx_len);
  free(e->b_block_table);
  free(e->b_logits_rows);
  free(e->logits);
  free(e->s_rows);
  free(e->s_ids);
  free(e->done);
  for (int k = 0; k < ENGINE_MAX_PIPE; k++) free(e->pipe[k].seqs);
  free(e->events);
  free(e->cancels);
  free(e);
}

int engine_submit(engine *e, const int32_t *prompt, size_t n_prompt,
                  const engine_request_params *p, engine_event_fn fn, void *user, uint64_t *id,
                  ts_err *err) {
  if (!prompt || n_prompt == 0) return ts_errorf(err, TS_EINVAL, "engine: the prompt is empty");
  if (n_prompt >= (size_t)e->cfg.max_model_len)
    return ts_errorf(err, TS_ERANGE,
                     "engine: the prompt has %zu tokens; the context holds %d, so at most %d fit",
                     n_prompt, e->cfg.max_model_len, e->cfg.max_model_len - 1);
  pthread_mutex_lock(&e->mu);
  uint64_t rid = e->next_id++;
  pthread_mutex_unlock(&e->mu);
  int cap = e->cfg.max_model_len;
  if (p && p->max_tokens > 0 && (int64_t)n_prompt + p->max_tokens < cap)
    cap = (int)n_prompt + p->max_tokens;
  engine_req *r;
  TS_TRY(req_create(&r, rid, prompt, n_prompt, p, e->vocab, cap, eng_mix(e->cfg.seed ^ eng_mix(rid)),
                    e->tok, fn, user, err));
  pthread_mutex_lock(&e->mu);
  r->next = NULL;
  if (e->inbox_tail) e->inbox_tail->next = r; else e->inbox_head = r;
  e->inbox_tail = r;
  e->n_inbox++;
  pthread_cond_signal(&e->cv);
  pthread_mutex_unlock(&e->mu);
  if (id) *id = rid;
  return 0;
}

void engine_cancel(engine *e, uint64_t id) {
  pthread_mutex_lock(&e->cb_mu);
  if (e->n_cancels == e->cap_cancels) {
    int nc = e->cap_cancels ? e->cap_cancels * 2 : 16;
    uint64_t *n = realloc(e->cancels, (size_t)nc * sizeof *n);
    if (!n) {
      pthread_mutex_unlock(&e->cb_mu);
      LOG_E("engine: out of memory cancelling request %llu", (unsigned long long)id);
      return;
    }
    e->cancels = n;
    e->cap_cancels = nc;
  }
  e->cancels[e->n_cancels++] = id;
  pthread_mutex_unlock(&e->cb_mu);
  pthread_mutex_lock(&e->mu);
  e->cancel_wake = 1;
  pthread_cond_signal(&e->cv);
  pthread_mutex_unlock(&e->mu);
}

int engine_health(engine *e, ts_err *err) { return executor_health(e->ex, err); }

void engine_get_stats(engine *e, engine_stats *out) {
  pthread_mutex_lock(&e->mu);
  *out = e->stats;
  out->waiting += e->n_inbox;
  pthread_mutex_unlock(&e->mu);
}
