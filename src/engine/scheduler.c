/* Scheduling policy: running sequences first, oldest first, each taking all its remaining tokens
 * up to the step's token budget (a decode is one token, a prefill is chunked); then waiting
 * sequences in arrival order while blocks, the budget and max_num_seqs allow. When a running
 * sequence needs a block and none is free, the newest running sequence is preempted. Sequences
 * in flight (a pipeline's other micro-batches) are skipped and never preempted: their tokens are
 * being computed into their blocks. */
#include "engine/scheduler.h"

#include <stdlib.h>
#include <string.h>

int scheduler_init(scheduler *s, const scheduler_config *cfg, block_manager *bm, ts_err *err) {
  memset(s, 0, sizeof *s);
  s->cfg = *cfg;
  s->bm = bm;
  s->cap_waiting = 64;
  s->running = calloc((size_t)cfg->max_num_seqs, sizeof *s->running);
  s->sched = calloc((size_t)cfg->max_num_seqs, sizeof *s->sched);
  s->waiting = calloc((size_t)s->cap_waiting, sizeof *s->waiting);
  if (!s->running || !s->sched || !s->waiting) {
    scheduler_free(s);
    return ts_errorf(err, TS_ENOMEM, "scheduler: out of memory");
  }
  return 0;
}

void scheduler_free(scheduler *s) {
  free(s->running);
  free(s->sched);
  free(s->waiting);
  memset(s, 0, sizeof *s);
}

static int waiting_insert(scheduler *s, int at, engine_seq *q) {
  if (s->n_waiting == s->cap_waiting) {
    int nc = s->cap_waiting * 2;
    engine_seq **nw = realloc(s->waiting, (size_t)nc * sizeof *nw);
    if (!nw) return TS_ENOMEM;
    s->waiting = nw;
    s->cap_waiting = nc;
  }
  memmove(s->waiting + at + 1, s->waiting + at, (size_t)(s->n_waiting - at) * sizeof *s->waiting);
  s->waiting[at] = q;
  s->n_waiting++;
  return 0;
}

int scheduler_add(scheduler *s, engine_seq *q) {
  q->state = SEQ_WAITING;
  q->sched_tokens = 0;
  return waiting_insert(s, s->n_waiting, q);
}

static void list_remove(engine_seq **list, int *n, engine_seq *q) {
  for (int i = 0; i < *n; i++)
    if (list[i] == q) {
      memmove(list + i, list + i + 1, (size_t)(*n - i - 1) * sizeof *list);
      (*n)--;
      return;
    }
}

void scheduler_remove(scheduler *s, engine_seq *q) {
  if (q->state == SEQ_RUNNING) list_remove(s->running, &s->n_running, q);
  else if (q->state == SEQ_WAITING) list_remove(s->waiting, &s->n_waiting, q);
  list_remove(s->sched, &s->n_sched, q);
  /* The workers may still be writing a sequence in flight into its blocks: handing them to
   * another sequence now would let its step run on blocks this one is still filling. */
  if (!q->inflight) block_manager_release(s->bm, &q->bt);
  q->n_computed = 0;
  q->sched_tokens = 0;
  q->state = SEQ_FINISHED;
}

/* Frees the blocks of the newest running sequence and queues it first: it is recomputed from its
 * tokens (prompt and generated so far) when blocks allow, so nothing is lost. */
static engine_seq *preempt_at(scheduler *s, int at) {
  engine_seq *v = s->running[at];
  if (waiting_insert(s, 0, v) < 0) return NULL; /* keeping it running is always safe */
  memmove(s->running + at, s->running + at + 1, (size_t)(s->n_running - at - 1) * sizeof *s->running);
  s->n_running--;
  block_manager_release(s->bm, &v->bt);
  v->n_computed = 0;
  v->sched_tokens = 0;
  v->state = SEQ_WAITING;
  s->preemptions++;
  return v;
}

/* Index of the newest running sequence that is not in flight, -1 when none. */
static int newest_free(const scheduler *s) {
  for (int i = s->n_running - 1; i >= 0; i--)
    if (!s->running[i]->inflight) return i;
  return -1;
}

/* A sibling choice that is still computing the shared prompt: wait for it and share its blocks
 * instead of computing the prompt again. */
static int sibling_prefilling(const engine_seq *q) {
  const engine_req *r = q->req;
  for (int i = 0; i < r->n; i++) {
    const engine_seq *o = &r->seqs[i];
    if (o != q && o->state == SEQ_RUNNING && o->n_computed < r->n_prompt) return 1;
  }
  return 0;
}

/* Gives an empty sequence the blocks it can reuse: a running sibling's prompt blocks, or the
 * prefix cache. Returns the tokens that come from the prefix cache. */
static int attach_prefix(scheduler *s, engine_seq *q) {
  int bs = block_manager_block_size(s->bm);
  const engine_req *r = q->req;
  int limit = q->n_tokens - 1; /* the last token is always computed: its logits are needed */
  /* Prompt logprobs need the logits of every prompt position not done yet, and a cached prefix
   * has none: reuse stops there (a fresh request reuses nothing, as vLLM skips the cache). */
  if (req_plp_pending(r) && limit > r->plp_done) limit = r->plp_done;
  int best = 0;
  const engine_seq *src = NULL;
  for (int i = 0; i < r->n; i++) {
    const engine_seq *o = &r->seqs[i];
    if (o == q || o->state != SEQ_RUNNING) continue;
    int share = o->n_computed < r->n_prompt ? o->n_computed : r->n_prompt;
    if (share > limit) share = limit;
    share = share / bs * bs;
    if (share > best) {
      best = share;
      src = o;
    }
  }
  int cached = block_manager_acquire_prefix(s->bm, &q->bt, q->tokens, limit);
  if (src && best > cached) {
    block_manager_release(s->bm, &q->bt);
    if (block_manager_share(s->bm, &q->bt, &src->bt, best / bs) == 0) {
      q->n_computed = best;
      return 0;
    }
    block_manager_release(s->bm, &q->bt);
    cached = 0;
  }
  q->n_computed = cached;
  return cached;
}

int scheduler_schedule(scheduler *s) { return scheduler_schedule_group(s, 0); }

/* Logits rows of q's next k tokens: its prompt-logprob positions, plus the sampling row when the
 * k tokens reach its end. Shrinks *k so that they fit in rows_left; returns the rows, or -1 when
 * not even one token fits. */
static int fit_rows(const engine_seq *q, int *k, int rows_left) {
  int pos0;
  int rows = seq_prompt_rows(q, *k, &pos0) + (q->n_computed + *k == q->n_tokens);
  if (rows <= rows_left) return rows;
  if (rows_left <= 0) return -1;
  int k0 = *k;
  /* Every position from pos0 on is a row: stop the chunk after rows_left of them, and before the
   * last token when its sampling row would not fit. */
  int nk = seq_prompt_rows(q, k0, &pos0) > 0 ? pos0 - q->n_computed + rows_left : k0;
  if (nk >= k0) nk = k0 - 1;
  if (nk <= 0) return -1;
  *k = nk;
  rows = seq_prompt_rows(q, nk, &pos0) + (q->n_computed + nk == q->n_tokens);
  return rows <= rows_left ? rows : -1;
}

int scheduler_schedule_group(scheduler *s, int max_seqs) {
  int budget = s->cfg.max_num_batched_tokens;
  int rows_left = s->cfg.max_logits_rows > 0 ? s->cfg.max_logits_rows : s->cfg.max_num_seqs;
  int preempted = 0, n_inflight = 0;
  if (max_seqs <= 0) max_seqs = s->cfg.max_num_seqs;
  s->n_sched = 0;
  s->n_sched_tokens = 0;
  for (int i = 0; i < s->n_running; i++) n_inflight += s->running[i]->inflight != 0;
  for (int i = 0; i < s->n_running && budget > 0 && s->n_sched < max_seqs; i++) {
    engine_seq *q = s->running[i];
    if (q->inflight) continue;
    int k = q->n_tokens - q->n_computed;
    if (k > budget) k = budget;
    int rows = fit_rows(q, &k, rows_left);
    if (rows < 0) break;
    int ok = 1;
    while (block_manager_ensure(s->bm, &q->bt, q->n_computed + k) != 0) {
      /* Every sequence before q is scheduled or in flight, so the newest free one is q or newer.
       * When it is q and others are in flight, q waits for them to land (they may finish and
       * free their blocks) instead of giving its own up. */
      int at = newest_free(s);
      engine_seq *v = at < 0 || (s->running[at] == q && n_inflight > 0) ? NULL : preempt_at(s, at);
      preempted = 1; /* the cache is full either way */
      if (!v || v == q) {
        ok = 0;
        break;
      }
    }
    if (!ok) break;
    q->sched_tokens = k;
    s->sched[s->n_sched++] = q;
    s->n_sched_tokens += k;
    budget -= k;
    rows_left -= rows;
  }
  /* After a preemption the cache is full: admitting now would only preempt again. */
  for (int i = 0; !preempted && i < s->n_waiting && budget > 0 && s->n_sched < max_seqs &&
                  s->n_running < s->cfg.max_num_seqs;) {
    engine_seq *q = s->waiting[i];
    if (q->bt.n == 0 && sibling_prefilling(q)) {
      i++;
      continue;
    }
    int cached = q->bt.n == 0 ? attach_prefix(s, q) : 0;
    int k = q->n_tokens - q->n_computed;
    if (k > budget) k = budget;
    int rows = fit_rows(q, &k, rows_left);
    if (rows < 0 || block_manager_ensure(s->bm, &q->bt, q->n_computed + k) != 0) {
      block_manager_release(s->bm, &q->bt);
      q->n_computed = 0;
      break;
    }
    if (block_manager_prefix_caching(s->bm)) {
      s->cache_queries += q->n_tokens;
      s->cache_hits += cached;
    }
    if (!q->req->admitted) {
      q->req->admitted = 1;
      q->req->cached_tokens = cached;
    }
    memmove(s->waiting + i, s->waiting + i + 1, (size_t)(s->n_waiting - i - 1) * sizeof *s->waiting);
    s->n_waiting--;
    q->state = SEQ_RUNNING;
    s->running[s->n_running++] = q;
    q->sched_tokens = k;
    s->sched[s->n_sched++] = q;
    s->n_sched_tokens += k;
    budget -= k;
    rows_left -= rows;
  }
  return s->n_sched;
}

void scheduler_commit(scheduler *s) {
  for (int i = 0; i < s->n_sched; i++) {
    engine_seq *q = s->sched[i];
    q->n_computed += q->sched_tokens;
    block_manager_commit(s->bm, &q->bt, q->tokens, q->n_computed);
  }
}

void scheduler_launch(scheduler *s, engine_seq *q) {
  (void)s;
  q->inflight = 1;
}

void scheduler_land(scheduler *s, engine_seq *q, int ok) {
  q->inflight = 0;
  if (q->state == SEQ_FINISHED) {
    block_manager_release(s->bm, &q->bt); /* removed while in flight */
    return;
  }
  if (ok) {
    q->n_computed += q->sched_tokens;
    block_manager_commit(s->bm, &q->bt, q->tokens, q->n_computed);
  }
  q->sched_tokens = 0;
}
