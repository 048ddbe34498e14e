/* Engine over a fake pipelined executor that keeps up to P micro-batches in flight and computes
 * each only when it is collected, as a real pipeline finishes them later. Its "model" reads the
 * whole context back through the block tables (a row's logits hash every token in the sequence's
 * KV blocks), and it counts hazards: a micro-batch that writes a block another one in flight
 * reads or writes, or reads a block another one writes (a block freed or preempted while in
 * flight and handed on). Outputs under load, cancels, failures and lost caches are compared with
 * each request run alone on a one-step-at-a-time executor. */
#include <pthread.h>
#include <string.h>
#include <unistd.h>

#include "dist/executor.h"
#include "engine/engine.h"
#include "test_util.h"

#define VOCAB 48
#define EOS_ID 2
#define MAX_POS 256
#define MAX_OUT 256
#define DEPTH_MAX 4

/* ---- the fake executor ---- */

typedef struct {
  uint64_t id;
  int n_tokens, n_seqs, max_blocks, n_logits;
  int32_t *tokens, *pos, *seq_start, *ctx_len, *block_table, *logits_rows;
} saved_step;

typedef struct {
  int n_blocks, block_size;
  int32_t *tok, *pos;  /* [n_blocks][block_size] what the KV cache holds */
  int *reading;        /* [n_blocks] micro-batches in flight that read the block */
  int *writing;        /* [n_blocks] ... that write it */
  saved_step q[DEPTH_MAX];
  int head, n, depth;
  int fail_at;         /* step id whose collect fails (with every step then in flight); -1 */
  int failing;
  int delay_us;        /* per collect, so that other threads act mid-pipeline */
} pfake;

/* Counters that outlive the executor (the engine frees it). */
static int g_hazards, g_max_outstanding;
static executor *g_ex;

static int pf_init_kv(executor *ex, int block_size, int64_t bytes, int n_blocks, int *out,
                      ts_err *err) {
  pfake *f = ex->impl;
  if (n_blocks <= 0) n_blocks = (int)(bytes / (ex->info.kv_bytes_per_token * block_size));
  if (n_blocks <= 0) return ts_errorf(err, TS_ERANGE, "fake: no blocks");
  f->n_blocks = n_blocks;
  f->block_size = block_size;
  f->tok = calloc((size_t)n_blocks * block_size, sizeof *f->tok);
  f->pos = malloc((size_t)n_blocks * block_size * sizeof *f->pos);
  f->reading = calloc((size_t)n_blocks, sizeof *f->reading);
  f->writing = calloc((size_t)n_blocks, sizeof *f->writing);
  for (int i = 0; i < n_blocks * block_size; i++) f->pos[i] = -1;
  *out = n_blocks;
  return 0;
}

/* Writes the step's tokens into the KV blocks and hashes each logits row's whole context. */
static int pf_compute(pfake *f, const ts_batch *b, float *logits, ts_err *err) {
  int bs = f->block_size, row = 0;
  if (b->n_tokens <= 0 || b->n_seqs <= 0) return ts_errorf(err, TS_EINVAL, "fake: empty step");
  for (int s = 0; s < b->n_seqs; s++) {
    const int32_t *bt = b->block_table + (size_t)s * b->max_blocks;
    for (int i = b->seq_start[s]; i < b->seq_start[s + 1]; i++) {
      int p = b->pos[i];
      if (p / bs >= b->max_blocks || p >= b->ctx_len[s]) return ts_errorf(err, TS_EINVAL, "fake: bad pos");
      int blk = bt[p / bs];
      if (blk < 0 || blk >= f->n_blocks) return ts_errorf(err, TS_EINVAL, "fake: bad block");
      f->tok[blk * bs + p % bs] = b->tokens[i];
      f->pos[blk * bs + p % bs] = p;
    }
    if (row < b->n_logits && b->logits_rows[row] == b->seq_start[s + 1] - 1) {
      uint64_t h = 1469598103934665603ull;
      for (int p = 0; p < b->ctx_len[s]; p++) {
        int blk = bt[p / bs];
        if (f->pos[blk * bs + p % bs] != p) return ts_errorf(err, TS_EINVAL, "fake: stale KV at %d", p);
        h = test_mix64(h ^ (uint64_t)f->tok[blk * bs + p % bs]);
      }
      float *out = logits + (size_t)row * VOCAB;
      for (int v = 0; v < VOCAB; v++) out[v] = (float)(test_mix64(h + (uint64_t)v) >> 40) / 16777216.0f * 6.0f;
      row++;
    }
  }
  if (row != b->n_logits) return ts_errorf(err, TS_EINVAL, "fake: logits rows out of order");
  return 0;
}

static int pf_execute(executor *ex, uint64_t step_id, const ts_batch *b, float *logits,
                      ts_err *err) {
  (void)step_id;
  return pf_compute(ex->impl, b, logits, err);
}

static int32_t *dup32(const int32_t *p, int n) {
  int32_t *d = malloc((size_t)(n > 0 ? n : 1) * sizeof *d);
  if (n > 0) memcpy(d, p, (size_t)n * sizeof *d);
  return d;
}

/* Marks (d = +1) or unmarks (d = -1) the blocks a step reads and writes; when marking, counts
 * conflicts with the steps already in flight first. */
static void pf_mark(pfake *f, const saved_step *s, int d) {
  int bs = f->block_size;
  for (int pass = d > 0 ? 0 : 1; pass < 2; pass++)
    for (int j = 0; j < s->n_seqs; j++) {
      const int32_t *bt = s->block_table + (size_t)j * s->max_blocks;
      int first_new = s->pos[s->seq_start[j]];
      for (int c = 0; c * bs < s->ctx_len[j]; c++) {
        int blk = bt[c], writes = (c + 1) * bs > first_new;
        if (pass == 0) {
          if (writes ? f->reading[blk] + f->writing[blk] > 0 : f->writing[blk] > 0) g_hazards++;
        } else {
          f->reading[blk] += d;
          if (writes) f->writing[blk] += d;
        }
      }
    }
}

static int pf_submit(executor *ex, uint64_t step_id, const ts_batch *b, ts_err *err) {
  pfake *f = ex->impl;
  if (f->n == f->depth) return ts_errorf(err, TS_EBUSY, "fake: too many steps in flight");
  saved_step *s = &f->q[(f->head + f->n) % DEPTH_MAX];
  s->id = step_id;
  s->n_tokens = b->n_tokens;
  s->n_seqs = b->n_seqs;
  s->max_blocks = b->max_blocks;
  s->n_logits = b->n_logits;
  s->tokens = dup32(b->tokens, b->n_tokens);
  s->pos = dup32(b->pos, b->n_tokens);
  s->seq_start = dup32(b->seq_start, b->n_seqs + 1);
  s->ctx_len = dup32(b->ctx_len, b->n_seqs);
  s->block_table = dup32(b->block_table, b->n_seqs * b->max_blocks);
  s->logits_rows = dup32(b->logits_rows, b->n_logits);
  pf_mark(f, s, 1);
  f->n++;
  if (f->n > g_max_outstanding) g_max_outstanding = f->n;
  return 0;
}

static int pf_collect(executor *ex, uint64_t *step_id, float *logits, ts_err *err) {
  pfake *f = ex->impl;
  if (f->n == 0) return ts_errorf(err, TS_EINVAL, "fake: nothing to collect");
  if (f->delay_us) usleep((useconds_t)f->delay_us);
  saved_step *s = &f->q[f->head];
  f->head = (f->head + 1) % DEPTH_MAX;
  f->n--;
  pf_mark(f, s, -1);
  if (step_id) *step_id = s->id;
  if (f->fail_at >= 0 && s->id == (uint64_t)f->fail_at) f->failing = 1;
  int rc;
  if (f->failing) {
    rc = ts_errorf(err, TS_ENET, "fake: stage 1 died");
    if (f->n == 0) f->failing = 0; /* "restarted" */
  } else {
    ts_batch b = {.n_tokens = s->n_tokens, .tokens = s->tokens, .pos = s->pos,
                  .n_seqs = s->n_seqs, .seq_start = s->seq_start, .ctx_len = s->ctx_len,
                  .max_blocks = s->max_blocks, .block_table = s->block_table,
                  .n_logits = s->n_logits, .logits_rows = s->logits_rows};
    rc = pf_compute(f, &b, logits, err);
  }
  free(s->tokens);
  free(s->pos);
  free(s->seq_start);
  free(s->ctx_len);
  free(s->block_table);
  free(s->logits_rows);
  return rc;
}

static void pf_shutdown(executor *ex) {
  pfake *f = ex->impl;
  for (; f->n > 0; f->n--, f->head = (f->head + 1) % DEPTH_MAX) {
    saved_step *s = &f->q[f->head];
    free(s->tokens);
    free(s->pos);
    free(s->seq_start);
    free(s->ctx_len);
    free(s->block_table);
    free(s->logits_rows);
  }
  free(f->tok);
  free(f->pos);
  free(f->reading);
  free(f->writing);
  free(f);
  free(ex);
}

static const executor_ops pf_ops = {
    .name = "pfake", .init_kv = pf_init_kv, .execute_step = pf_execute, .shutdown = pf_shutdown};
static const executor_pipeline_ops pf_pipe_ops = {pf_submit, pf_collect};

/* depth 0: one step at a time (the reference). */
static executor *pf_create(int depth, int fail_at, int delay_us) {
  executor *ex = calloc(1, sizeof *ex);
  pfake *f = calloc(1, sizeof *f);
  f->depth = depth;
  f->fail_at = fail_at;
  f->delay_us = delay_us;
  ex->ops = &pf_ops;
  ex->impl = f;
  ex->info.vocab_size = VOCAB;
  ex->info.max_pos = MAX_POS;
  ex->info.max_tokens = 4096;
  ex->info.kv_bytes_per_token = 8;
  ex->info.bos_id = 1;
  ex->info.n_eos = 1;
  ex->info.eos_ids[0] = EOS_ID;
  if (depth > 0) {
    ex->pipe = &pf_pipe_ops;
    ex->info.max_inflight = depth;
  }
  g_ex = ex;
  return ex;
}

/* ---- events ---- */

typedef struct {
  int32_t toks[MAX_OUT];
  int n;
  engine_finish finish;
  int events_after_finish;
  int completion_tokens;
} choice_out;

typedef struct {
  choice_out ch[4];
  int n_events;
  int cancelled; /* set once engine_cancel returned: no event may come after */
  int late_events;
} req_out;

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_cv = PTHREAD_COND_INITIALIZER;
static int g_done;

static void on_event(void *user, const engine_event *ev) {
  req_out *o = user;
  pthread_mutex_lock(&g_mu);
  if (o->cancelled) o->late_events++;
  choice_out *c = &o->ch[ev->index];
  if (c->finish != ENGINE_FINISH_NONE) c->events_after_finish++;
  for (int i = 0; i < ev->n_tokens && c->n < MAX_OUT; i++) c->toks[c->n++] = ev->tokens[i];
  c->completion_tokens = ev->completion_tokens;
  o->n_events++;
  if (ev->finish != ENGINE_FINISH_NONE) {
    c->finish = ev->finish;
    g_done++;
    pthread_cond_broadcast(&g_cv);
  }
  pthread_mutex_unlock(&g_mu);
}

static void reset_done(void) {
  pthread_mutex_lock(&g_mu);
  g_done = 0;
  pthread_mutex_unlock(&g_mu);
}

static void wait_done(int target) {
  pthread_mutex_lock(&g_mu);
  while (g_done < target) pthread_cond_wait(&g_cv, &g_mu);
  pthread_mutex_unlock(&g_mu);
}

static int events_now(const req_out *o) {
  pthread_mutex_lock(&g_mu);
  int n = o->n_events;
  pthread_mutex_unlock(&g_mu);
  return n;
}

/* Waits until the engine has nothing left and checks that every block is free. */
static void check_idle(engine *e, const char *what) {
  engine_stats st;
  for (int i = 0; i < 20000; i++) {
    engine_get_stats(e, &st);
    if (st.running == 0 && st.waiting == 0 && st.kv_blocks_free == st.kv_blocks_total) break;
    usleep(500);
  }
  CHECK_MSG(st.running == 0 && st.waiting == 0, "%s: running %d waiting %d", what, st.running,
            st.waiting);
  CHECK_MSG(st.kv_blocks_free == st.kv_blocks_total, "%s: %d of %d blocks free", what,
            st.kv_blocks_free, st.kv_blocks_total);
}

/* ---- workloads ---- */

#define NREQ 48

typedef struct {
  int32_t prompt[200];
  int n_prompt;
  engine_request_params p;
} req_spec;

static void make_specs(req_spec *specs, int n, test_rng *r) {
  int32_t shared[2][200];
  for (int k = 0; k < 2; k++)
    for (int i = 0; i < 200; i++) shared[k][i] = 3 + (int32_t)(test_rng_next(r) % (VOCAB - 3));
  for (int q = 0; q < n; q++) {
    req_spec *s = &specs[q];
    s->n_prompt = 1 + (int)(test_rng_next(r) % 120);
    int base = (int)(test_rng_next(r) % 3); /* 2: no shared prefix */
    int keep = base < 2 ? (int)(test_rng_next(r) % (s->n_prompt + 1)) : 0;
    for (int i = 0; i < s->n_prompt; i++)
      s->prompt[i] = i < keep ? shared[base][i] : 3 + (int32_t)(test_rng_next(r) % (VOCAB - 3));
    memset(&s->p, 0, sizeof s->p);
    sampling_params_default(&s->p.sampling);
    s->p.sampling.temperature = 0;
    s->p.n = test_rng_next(r) % 5 == 0 ? 2 + (int)(test_rng_next(r) % 3) : 1;
    s->p.max_tokens = 1 + (int)(test_rng_next(r) % 80);
    s->p.ignore_eos = (int)(test_rng_next(r) % 3 == 0);
  }
}

static engine *make_engine(executor *ex, int max_seqs, int max_batched, int bs, int kv_tokens,
                           int caching) {
  engine_config cfg = {0};
  cfg.max_model_len = MAX_POS;
  cfg.max_num_seqs = max_seqs;
  cfg.max_num_batched_tokens = max_batched;
  cfg.block_size = bs;
  cfg.kv_cache_bytes = (int64_t)kv_tokens * 8;
  cfg.enable_prefix_caching = caching;
  cfg.seed = 99;
  engine *e = NULL;
  ts_err err;
  int rc = engine_create_with_executor(&e, ex, NULL, &cfg, &err);
  CHECK_MSG(rc == 0, "%s", err.msg);
  return e;
}

static void submit(engine *e, const req_spec *s, req_out *o, uint64_t *id) {
  ts_err err;
  uint64_t tmp;
  int rc = engine_submit(e, s->prompt, (size_t)s->n_prompt, &s->p, on_event, o, id ? id : &tmp,
                         &err);
  CHECK_MSG(rc == 0, "%s", err.msg);
}

/* Runs specs[0..n) all at once (or one at a time) and waits for every choice. */
static void run_all(engine *e, const req_spec *specs, int n, req_out *outs, int one_at_a_time) {
  memset(outs, 0, (size_t)n * sizeof *outs);
  reset_done();
  int total = 0;
  for (int q = 0; q < n; q++) {
    total += specs[q].p.n;
    submit(e, &specs[q], &outs[q], NULL);
    if (one_at_a_time) wait_done(total);
  }
  wait_done(total);
}

static int compare(const char *what, const req_spec *specs, const req_out *ref,
                   const req_out *got, int n) {
  int bad = 0;
  for (int q = 0; q < n; q++)
    for (int c = 0; c < specs[q].p.n; c++) {
      const choice_out *a = &ref[q].ch[c], *b = &got[q].ch[c];
      int same = a->n == b->n && !memcmp(a->toks, b->toks, (size_t)a->n * sizeof *a->toks) &&
                 a->finish == b->finish;
      if (!same && bad++ < 3)
        fprintf(stderr, "%s: request %d choice %d differs (%d vs %d tokens, finish %d vs %d)\n",
                what, q, c, a->n, b->n, a->finish, b->finish);
      CHECK(b->events_after_finish == 0);
      CHECK(b->completion_tokens == b->n);
    }
  CHECK_MSG(bad == 0, "%s: %d choices differ", what, bad);
  return bad;
}

static req_spec g_specs[NREQ];
static req_out g_ref[NREQ];

/* The reference: one request at a time, one step at a time, roomy cache, no caching. */
static void make_reference(void) {
  engine *e = make_engine(pf_create(0, -1, 0), 8, 4096, 16, 64 * MAX_POS, 0);
  run_all(e, g_specs, NREQ, g_ref, 1);
  check_idle(e, "reference");
  engine_destroy(e);
  for (int q = 0; q < NREQ; q++) {
    const choice_out *c = &g_ref[q].ch[0];
    CHECK(c->finish == ENGINE_FINISH_STOP || c->finish == ENGINE_FINISH_LENGTH);
    CHECK(c->n >= 1 && c->n <= g_specs[q].p.max_tokens);
  }
}

static void test_differential(void) {
  static req_out got[NREQ];
  struct {
    const char *name;
    int depth, max_seqs, max_batched, bs, kv_tokens, caching;
  } cfgs[] = {
      {"P=2", 2, 64, 4096, 16, 64 * MAX_POS, 0},
      {"P=2 prefix caching", 2, 64, 4096, 16, 64 * MAX_POS, 1},
      {"P=3 chunked prefill + caching", 3, 64, 13, 4, 64 * MAX_POS, 1},
      {"P=2 tiny cache (preemption)", 2, 32, 256, 8, MAX_POS + 64, 0},
      {"P=4 tiny cache + caching", 4, 16, 37, 2, MAX_POS + 24, 1},
      {"P=3 few seqs", 3, 5, 64, 16, 8 * MAX_POS, 1},
  };
  for (size_t k = 0; k < sizeof cfgs / sizeof cfgs[0]; k++) {
    g_hazards = 0;
    g_max_outstanding = 0;
    engine *e = make_engine(pf_create(cfgs[k].depth, -1, 0), cfgs[k].max_seqs,
                            cfgs[k].max_batched, cfgs[k].bs, cfgs[k].kv_tokens, cfgs[k].caching);
    /* Two waves: the second meets the first's blocks in the prefix cache. */
    for (int wave = 0; wave < 2; wave++) {
      run_all(e, g_specs, NREQ, got, 0);
      check_idle(e, cfgs[k].name);
      compare(cfgs[k].name, g_specs, g_ref, got, NREQ);
    }
    engine_stats st;
    engine_get_stats(e, &st);
    fprintf(stderr, "%s: %d in flight at most, preemptions %lld, cache hits %lld of %lld\n",
            cfgs[k].name, g_max_outstanding, (long long)st.preemptions,
            (long long)st.prefix_cache_hits, (long long)st.prefix_cache_queries);
    engine_destroy(e);
    CHECK_MSG(g_hazards == 0, "%s: %d block hazards", cfgs[k].name, g_hazards);
    CHECK_MSG(g_max_outstanding == cfgs[k].depth, "%s: at most %d micro-batches in flight",
              cfgs[k].name, g_max_outstanding);
    if (cfgs[k].kv_tokens < 2 * MAX_POS) CHECK_MSG(st.preemptions > 0, "%s", cfgs[k].name);
    if (cfgs[k].caching) CHECK_MSG(st.prefix_cache_hits > 0, "%s: no cache hits", cfgs[k].name);
  }
}

/* Cancels while micro-batches are in flight: no event after engine_cancel returns, every block
 * comes back, no block is handed on while its micro-batch computes, and the requests that follow
 * give the reference texts. */
static void test_cancel(void) {
  test_rng r = {test_seed(0xc0ffeeull)};
  enum { NQ = 16 };
  static req_spec specs[NQ];
  static req_out outs[NQ], got[NREQ];
  make_specs(specs, NQ, &r);
  for (int q = 0; q < NQ; q++) {
    specs[q].p.ignore_eos = 1;
    specs[q].p.max_tokens = MAX_POS;
  }
  for (int caching = 0; caching < 2; caching++) {
    g_hazards = 0;
    engine *e = make_engine(pf_create(2 + caching, -1, 150), 8, 24, 4, 6 * MAX_POS, caching);
    memset(outs, 0, sizeof outs);
    uint64_t ids[NQ];
    for (int q = 0; q < NQ; q++) submit(e, &specs[q], &outs[q], &ids[q]);
    for (int q = 0; q < NQ; q++) {
      int want = (int)(test_rng_next(&r) % 8);
      for (int spin = 0; spin < 200000 && events_now(&outs[q]) < want; spin++) usleep(50);
      engine_cancel(e, ids[q]);
      pthread_mutex_lock(&g_mu);
      outs[q].cancelled = 1;
      pthread_mutex_unlock(&g_mu);
    }
    check_idle(e, "cancel");
    int midway = 0;
    for (int q = 0; q < NQ; q++) {
      CHECK(outs[q].late_events == 0);
      midway += outs[q].n_events > 0 && outs[q].ch[0].finish == ENGINE_FINISH_NONE;
    }
    CHECK_MSG(midway > 0, "no request was cancelled mid-generation");
    ((pfake *)g_ex->impl)->delay_us = 0;
    run_all(e, g_specs, NREQ, got, 0);
    check_idle(e, "after cancels");
    compare("after cancels", g_specs, g_ref, got, NREQ);
    engine_destroy(e);
    CHECK_MSG(g_hazards == 0, "cancel: %d block hazards", g_hazards);
  }
}

/* A micro-batch fails: its requests and those of every micro-batch then in flight end with
 * ERROR, the rest go on, every block comes back and later requests give the reference texts. */
static void test_failure(void) {
  static req_out got[NREQ], again[NREQ];
  for (int fail_at = 3; fail_at < 40; fail_at += 12) {
    g_hazards = 0;
    engine *e = make_engine(pf_create(3, fail_at, 0), 64, 4096, 16, 64 * MAX_POS, 1);
    run_all(e, g_specs, NREQ, got, 0);
    check_idle(e, "failure");
    int errors = 0;
    for (int q = 0; q < NREQ; q++)
      for (int c = 0; c < g_specs[q].p.n; c++) {
        const choice_out *a = &g_ref[q].ch[c], *b = &got[q].ch[c];
        if (b->finish == ENGINE_FINISH_ERROR) {
          errors++;
          /* What came before the failure is the reference's beginning. */
          CHECK(b->n <= a->n && !memcmp(a->toks, b->toks, (size_t)b->n * sizeof *b->toks));
        } else {
          CHECK(b->n == a->n && !memcmp(a->toks, b->toks, (size_t)a->n * sizeof *a->toks));
        }
      }
    CHECK_MSG(errors > 0, "fail_at %d: no request failed", fail_at);
    run_all(e, g_specs, NREQ, again, 0);
    check_idle(e, "after failure");
    compare("after failure", g_specs, g_ref, again, NREQ);
    engine_destroy(e);
    CHECK_MSG(g_hazards == 0, "failure: %d block hazards", g_hazards);
  }
}

/* The workers lose their caches mid-pipeline: every live request fails, blocks come back, and
 * later requests give the reference texts (no cached block survives). */
static void test_kv_epoch(void) {
  static req_out got[NREQ], again[NREQ];
  engine *e = make_engine(pf_create(2, -1, 300), 64, 4096, 16, 64 * MAX_POS, 1);
  memset(got, 0, sizeof got);
  reset_done();
  int total = 0;
  for (int q = 0; q < NREQ; q++) {
    total += g_specs[q].p.n;
    submit(e, &g_specs[q], &got[q], NULL);
  }
  for (int spin = 0; spin < 200000 && events_now(&got[0]) < 2; spin++) usleep(50);
  __atomic_add_fetch(&g_ex->kv_epoch, 1, __ATOMIC_RELEASE);
  /* Read after the loss: a descheduled test thread can get here after the last request ended. */
  pthread_mutex_lock(&g_mu);
  int live = g_done < total;
  pthread_mutex_unlock(&g_mu);
  wait_done(total);
  check_idle(e, "kv epoch");
  int errors = 0;
  for (int q = 0; q < NREQ; q++) errors += got[q].ch[0].finish == ENGINE_FINISH_ERROR;
  CHECK_MSG(errors > 0 || !live, "requests were live at the cache loss, none failed");
  ((pfake *)g_ex->impl)->delay_us = 0;
  run_all(e, g_specs, NREQ, again, 0);
  check_idle(e, "after kv epoch");
  compare("after kv epoch", g_specs, g_ref, again, NREQ);
  engine_destroy(e);
}

/* Destroy with micro-batches in flight: every pending choice ends with ABORT. */
static void test_destroy_inflight(void) {
  static req_out got[8];
  engine *e = make_engine(pf_create(2, -1, 500), 16, 4096, 4, 16 * MAX_POS, 1);
  memset(got, 0, sizeof got);
  for (int q = 0; q < 8; q++) {
    req_spec s = g_specs[q];
    s.p.ignore_eos = 1;
    s.p.max_tokens = MAX_POS;
    submit(e, &s, &got[q], NULL);
  }
  for (int spin = 0; spin < 200000 && events_now(&got[7]) < 2; spin++) usleep(50);
  engine_destroy(e);
  for (int q = 0; q < 8; q++)
    for (int c = 0; c < g_specs[q].p.n; c++) CHECK(got[q].ch[c].finish == ENGINE_FINISH_ABORT);
}

int main(void) {
  test_rng r = {test_seed(0x9e7e11eull)};
  make_specs(g_specs, NREQ, &r);
  make_reference();
  test_differential();
  test_cancel();
  test_failure();
  test_kv_epoch();
  test_destroy_inflight();
  return test_finish("test_engine_pipe");
}
