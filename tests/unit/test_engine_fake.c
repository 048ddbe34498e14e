/* Engine over a fake executor whose "model" reads its whole context back through the block tables
 * it is given: the logits of a row are a hash of every token in the sequence's KV blocks (checked
 * against the positions written there). A wrong block table, a stale prefix-cache block, a lost
 * preempted token or a badly chunked prefill changes the output, so each scheduling feature is
 * tested differentially: outputs under load, preemption, chunking and prefix caching must equal
 * the outputs of each request run alone. */
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

/* ---- the fake executor ---- */

typedef struct {
  int n_blocks, block_size;
  int32_t *tok; /* [n_blocks][block_size] */
  int32_t *pos; /* [n_blocks][block_size] */
  int fail_at_step; /* -1: never */
  int delay_us;     /* per step, so that other threads can act mid-generation */
  long tokens_computed;
} fake_impl;

static int fake_init_kv(executor *ex, int block_size, int64_t bytes, int n_blocks, int *out,
                        ts_err *err) {
  fake_impl *f = ex->impl;
  if (n_blocks <= 0) n_blocks = (int)(bytes / (ex->info.kv_bytes_per_token * block_size));
  if (n_blocks <= 0) return ts_errorf(err, TS_ERANGE, "fake: no blocks");
  f->n_blocks = n_blocks;
  f->block_size = block_size;
  f->tok = malloc((size_t)n_blocks * block_size * sizeof *f->tok);
  f->pos = malloc((size_t)n_blocks * block_size * sizeof *f->pos);
  for (int i = 0; i < n_blocks * block_size; i++) f->pos[i] = -1;
  *out = n_blocks;
  return 0;
}

static int fake_step(executor *ex, uint64_t step_id, const ts_batch *b, float *logits,
                     ts_err *err) {
  fake_impl *f = ex->impl;
  if (f->delay_us) usleep((useconds_t)f->delay_us);
  if (f->fail_at_step >= 0 && (int)step_id == f->fail_at_step)
    return ts_errorf(err, TS_ENET, "fake: worker 1 died");
  int bs = f->block_size;
  f->tokens_computed += b->n_tokens;
  if (b->n_tokens <= 0 || b->n_seqs <= 0) return ts_errorf(err, TS_EINVAL, "fake: empty step");
  int row = 0;
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
    if (row < b->n_logits &&
        b->logits_rows[row] == b->seq_start[s + 1] - 1) {
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

static fake_impl g_last_stats;

static void fake_shutdown(executor *ex) {
  fake_impl *f = ex->impl;
  g_last_stats = *f;
  free(f->tok);
  free(f->pos);
  free(f);
  free(ex);
}

static const executor_ops fake_ops = {
    .name = "fake", .init_kv = fake_init_kv, .execute_step = fake_step, .shutdown = fake_shutdown};

/* Pipelined variant: submit runs the micro-batch at once (on a copy of nothing: the plan is read
 * during the call, as a real executor serialises it) and queues its logits; collect returns them
 * in submission order. */
#define FAKE_MAX_INFLIGHT 3
static float fake_q[FAKE_MAX_INFLIGHT][4096 * 48];
static int fake_q_rows[FAKE_MAX_INFLIGHT], fake_q_rc[FAKE_MAX_INFLIGHT];
static uint64_t fake_q_id[FAKE_MAX_INFLIGHT];
static int fake_q_head, fake_q_n, fake_max_outstanding;

static int fake_submit(executor *ex, uint64_t step_id, const ts_batch *b, ts_err *err) {
  if (fake_q_n == FAKE_MAX_INFLIGHT) return ts_errorf(err, TS_EBUSY, "fake: too many steps in flight");
  int slot = (fake_q_head + fake_q_n) % FAKE_MAX_INFLIGHT;
  fake_q_rc[slot] = fake_step(ex, step_id, b, fake_q[slot], err);
  fake_q_rows[slot] = b->n_logits;
  fake_q_id[slot] = step_id;
  fake_q_n++;
  if (fake_q_n > fake_max_outstanding) fake_max_outstanding = fake_q_n;
  return 0;
}

static int fake_collect(executor *ex, uint64_t *step_id, float *logits, ts_err *err) {
  (void)ex;
  if (fake_q_n == 0) return ts_errorf(err, TS_EINVAL, "fake: nothing to collect");
  int slot = fake_q_head;
  fake_q_head = (fake_q_head + 1) % FAKE_MAX_INFLIGHT;
  fake_q_n--;
  if (step_id) *step_id = fake_q_id[slot];
  if (fake_q_rc[slot] < 0) return ts_errorf(err, fake_q_rc[slot], "fake: step failed");
  memcpy(logits, fake_q[slot], (size_t)fake_q_rows[slot] * VOCAB * sizeof(float));
  return 0;
}

static const executor_pipeline_ops fake_pipe_ops = {fake_submit, fake_collect};
static int g_pipelined;

static int g_delay_us;
static executor *g_last_ex;

static fake_impl *g_last_fake = &g_last_stats;

static executor *fake_create(int fail_at_step) {
  executor *ex = calloc(1, sizeof *ex);
  fake_impl *f = calloc(1, sizeof *f);
  f->fail_at_step = fail_at_step;
  f->delay_us = g_delay_us;
  ex->ops = &fake_ops;
  ex->impl = f;
  ex->info.vocab_size = VOCAB;
  ex->info.max_pos = MAX_POS;
  ex->info.max_tokens = 4096;
  ex->info.kv_bytes_per_token = 8;
  ex->info.bos_id = 1;
  ex->info.n_eos = 1;
  ex->info.eos_ids[0] = EOS_ID;
  if (g_pipelined) {
    ex->pipe = &fake_pipe_ops;
    ex->info.max_inflight = FAKE_MAX_INFLIGHT;
  }
  g_last_ex = ex;
  return ex;
}

/* ---- collecting events ---- */

typedef struct {
  int32_t toks[MAX_OUT];
  int n;
  engine_finish finish;
  int events_after_finish;
  int prompt_tokens, cached_tokens, completion_tokens;
} choice_out;

typedef struct {
  pthread_mutex_t *mu;
  pthread_cond_t *cv;
  int *n_done;
  choice_out ch[8];
  int n_events;
  int cancelled; /* set before engine_cancel returns: no event may come after */
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
  c->prompt_tokens = ev->prompt_tokens;
  c->cached_tokens = ev->cached_tokens;
  c->completion_tokens = ev->completion_tokens;
  o->n_events++;
  if (ev->finish != ENGINE_FINISH_NONE) {
    c->finish = ev->finish;
    g_done++;
    pthread_cond_broadcast(&g_cv);
  }
  pthread_mutex_unlock(&g_mu);
}

static int done_now(void) {
  pthread_mutex_lock(&g_mu);
  int d = g_done;
  pthread_mutex_unlock(&g_mu);
  return d;
}

static int events_now(const req_out *o) {
  pthread_mutex_lock(&g_mu);
  int n = o->n_events;
  pthread_mutex_unlock(&g_mu);
  return n;
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

/* Waits until the engine has nothing left and checks that every block is free. */
static void check_idle(engine *e) {
  engine_stats st;
  for (int i = 0; i < 20000; i++) {
    engine_get_stats(e, &st);
    if (st.running == 0 && st.waiting == 0 && st.kv_blocks_free == st.kv_blocks_total) break;
    usleep(500);
  }
  CHECK_MSG(st.running == 0 && st.waiting == 0, "running %d waiting %d", st.running, st.waiting);
  CHECK_MSG(st.kv_blocks_free == st.kv_blocks_total, "%d of %d blocks free", st.kv_blocks_free,
            st.kv_blocks_total);
}

/* ---- workloads ---- */

#define NREQ 64

typedef struct {
  int32_t prompt[200];
  int n_prompt;
  engine_request_params p;
} req_spec;

static void make_specs(req_spec *specs, int n, test_rng *r) {
  int32_t shared[3][200];
  for (int k = 0; k < 3; k++)
    for (int i = 0; i < 200; i++) shared[k][i] = 3 + (int32_t)(test_rng_next(r) % (VOCAB - 3));
  for (int q = 0; q < n; q++) {
    req_spec *s = &specs[q];
    s->n_prompt = 1 + (int)(test_rng_next(r) % 120);
    int base = (int)(test_rng_next(r) % 4); /* 3: no shared prefix */
    int keep = base < 3 ? (int)(test_rng_next(r) % (s->n_prompt + 1)) : 0;
    for (int i = 0; i < s->n_prompt; i++)
      s->prompt[i] = i < keep ? shared[base][i] : 3 + (int32_t)(test_rng_next(r) % (VOCAB - 3));
    memset(&s->p, 0, sizeof s->p);
    sampling_params_default(&s->p.sampling);
    s->p.sampling.temperature = 0;
    s->p.n = 1;
    s->p.max_tokens = 1 + (int)(test_rng_next(r) % 100);
    s->p.ignore_eos = (int)(test_rng_next(r) % 4 == 0);
    s->p.min_tokens = (int)(test_rng_next(r) % 3 == 0) * (int)(test_rng_next(r) % 10);
  }
}

static engine *make_engine(int max_seqs, int max_batched, int bs, int n_blocks_tokens,
                           int caching, int fail_at_step) {
  engine_config cfg = {0};
  cfg.max_model_len = MAX_POS;
  cfg.max_num_seqs = max_seqs;
  cfg.max_num_batched_tokens = max_batched;
  cfg.block_size = bs;
  cfg.kv_cache_bytes = (int64_t)n_blocks_tokens * 8;
  cfg.enable_prefix_caching = caching;
  cfg.seed = 1234;
  engine *e = NULL;
  ts_err err;
  int rc = engine_create_with_executor(&e, fake_create(fail_at_step), NULL, &cfg, &err);
  CHECK_MSG(rc == 0, "%s", err.msg);
  return e;
}

static void run_all(engine *e, req_spec *specs, int n, req_out *outs, int one_at_a_time) {
  memset(outs, 0, (size_t)n * sizeof *outs);
  for (int q = 0; q < n; q++) {
    int target = done_now() + specs[q].p.n;
    uint64_t id;
    ts_err err;
    int rc = engine_submit(e, specs[q].prompt, (size_t)specs[q].n_prompt, &specs[q].p, on_event,
                           &outs[q], &id, &err);
    CHECK_MSG(rc == 0, "%s", err.msg);
    if (rc == 0 && one_at_a_time) wait_done(target);
    else if (rc != 0) {
      pthread_mutex_lock(&g_mu);
      g_done += specs[q].p.n;
      pthread_mutex_unlock(&g_mu);
    }
  }
}

static int total_choices(req_spec *specs, int n) {
  int t = 0;
  for (int q = 0; q < n; q++) t += specs[q].p.n;
  return t;
}

static void check_same(const char *what, req_spec *specs, req_out *ref, req_out *got, int n) {
  int bad = 0;
  for (int q = 0; q < n; q++)
    for (int c = 0; c < specs[q].p.n; c++) {
      choice_out *a = &ref[q].ch[c], *b = &got[q].ch[c];
      int same = a->n == b->n && !memcmp(a->toks, b->toks, (size_t)a->n * sizeof *a->toks) &&
                 a->finish == b->finish;
      if (!same && bad++ < 3)
        fprintf(stderr, "%s: request %d choice %d differs (%d vs %d tokens, finish %d vs %d)\n",
                what, q, c, a->n, b->n, a->finish, b->finish);
      CHECK(b->events_after_finish == 0);
      CHECK(b->completion_tokens == b->n);
    }
  CHECK_MSG(bad == 0, "%s: %d choices differ", what, bad);
}

static void test_differential(void) {
  test_rng r = {test_seed(0xfeed5eedull)};
  static req_spec specs[NREQ];
  static req_out ref[NREQ], got[NREQ];
  make_specs(specs, NREQ, &r);
  /* Some greedy requests with several choices: they share prompt blocks, and every choice must
   * still equal the same request alone (greedy choices are all the same). */
  for (int q = 0; q < NREQ; q++)
    if (test_rng_next(&r) % 4 == 0) specs[q].p.n = 2 + (int)(test_rng_next(&r) % 3);
  int total = total_choices(specs, NREQ);

  /* Reference: one request at a time, roomy cache, no caching, whole prefill in one step. */
  engine *e = make_engine(8, 4096, 16, 64 * MAX_POS, 0, -1);
  reset_done();
  run_all(e, specs, NREQ, ref, 1);
  check_idle(e);
  engine_destroy(e);
  for (int q = 0; q < NREQ; q++) {
    for (int k = 1; k < specs[q].p.n; k++)
      CHECK(ref[q].ch[k].n == ref[q].ch[0].n &&
            !memcmp(ref[q].ch[k].toks, ref[q].ch[0].toks, (size_t)ref[q].ch[0].n * sizeof(int32_t)));
    choice_out *c = &ref[q].ch[0];
    CHECK(c->finish == ENGINE_FINISH_STOP || c->finish == ENGINE_FINISH_LENGTH);
    CHECK(c->n <= specs[q].p.max_tokens && c->n >= 1);
    if (c->finish == ENGINE_FINISH_LENGTH)
      CHECK(c->n == specs[q].p.max_tokens || specs[q].n_prompt + c->n == MAX_POS);
    if (c->finish == ENGINE_FINISH_STOP) CHECK(c->toks[c->n - 1] == EOS_ID && !specs[q].p.ignore_eos);
    if (!specs[q].p.ignore_eos)
      for (int i = 0; i < c->n && i < specs[q].p.min_tokens; i++) CHECK(c->toks[i] != EOS_ID);
    CHECK(c->prompt_tokens == specs[q].n_prompt);
  }

  struct {
    const char *name;
    int max_seqs, max_batched, bs, kv_tokens, caching, pipelined;
  } cfgs[] = {
      {"concurrent", 64, 4096, 16, 64 * MAX_POS, 0, 0},
      {"prefix caching", 64, 4096, 16, 64 * MAX_POS, 1, 0},
      {"chunked prefill", 64, 7, 4, 64 * MAX_POS, 1, 0},
      {"tiny cache (preemption)", 64, 512, 8, MAX_POS + 64, 0, 0},
      {"tiny cache + caching", 32, 33, 2, MAX_POS + 10, 1, 0},
      {"few seqs", 3, 64, 16, 8 * MAX_POS, 1, 0},
      {"pipelined micro-batches", 64, 97, 4, 64 * MAX_POS, 1, 1},
      {"pipelined + tiny cache", 16, 64, 4, MAX_POS + 40, 0, 1},
  };
  for (size_t k = 0; k < sizeof cfgs / sizeof cfgs[0]; k++) {
    g_pipelined = cfgs[k].pipelined;
    fake_max_outstanding = 0;
    e = make_engine(cfgs[k].max_seqs, cfgs[k].max_batched, cfgs[k].bs, cfgs[k].kv_tokens,
                    cfgs[k].caching, -1);
    g_pipelined = 0;
    /* Two waves: the second finds the first's blocks in the prefix cache. */
    int any_cached = 0;
    for (int wave = 0; wave < 2; wave++) {
      reset_done();
      run_all(e, specs, NREQ, got, 0);
      wait_done(total);
      check_idle(e);
      check_same(cfgs[k].name, specs, ref, got, NREQ);
      for (int q = 0; q < NREQ; q++) any_cached |= got[q].ch[0].cached_tokens > 0;
    }
    engine_stats st;
    engine_get_stats(e, &st);
    fprintf(stderr, "%s: preemptions %lld, cache hits %lld of %lld\n", cfgs[k].name,
            (long long)st.preemptions, (long long)st.prefix_cache_hits,
            (long long)st.prefix_cache_queries);
    if (cfgs[k].kv_tokens < 2 * MAX_POS) CHECK_MSG(st.preemptions > 0, "%s", cfgs[k].name);
    if (cfgs[k].pipelined)
      CHECK_MSG(fake_max_outstanding > 1, "%s: never more than one micro-batch in flight",
                cfgs[k].name);
    if (cfgs[k].caching)
      CHECK_MSG(any_cached && st.prefix_cache_hits > 0, "%s: no cached tokens", cfgs[k].name);
    else
      CHECK(!any_cached && st.prefix_cache_hits == 0);
    engine_destroy(e);
  }
}

/* n > 1 with seeds: choice i of (seed S, n) equals the request (seed S + i, n = 1) alone; the
 * choices share the prompt blocks and the whole thing runs beside other requests. */
static void test_n_seeded(void) {
  test_rng r = {test_seed(0xabcdef12345ull)};
  enum { NQ = 6 };
  static req_spec multi[NQ], single[NQ * 4];
  static req_out mo[NQ], so[NQ * 4];
  make_specs(multi, NQ, &r);
  int ns = 0;
  for (int q = 0; q < NQ; q++) {
    multi[q].p.n = 2 + (int)(test_rng_next(&r) % 3);
    multi[q].p.sampling.temperature = 0.7f + (float)(test_rng_next(&r) % 5) * 0.2f;
    multi[q].p.sampling.has_seed = 1;
    multi[q].p.sampling.seed = test_rng_next(&r);
    multi[q].p.ignore_eos = 0;
    for (int c = 0; c < multi[q].p.n; c++) {
      single[ns] = multi[q];
      single[ns].p.n = 1;
      single[ns].p.sampling.seed = multi[q].p.sampling.seed + (uint64_t)c;
      ns++;
    }
  }
  for (int caching = 0; caching < 2; caching++) {
    engine *e = make_engine(16, 4096, 4, 32 * MAX_POS, caching, -1);
    reset_done();
    run_all(e, single, ns, so, 1);
    run_all(e, multi, NQ, mo, 0);
    wait_done(ns * 2);
    check_idle(e);
    int k = 0, bad = 0, differ = 0;
    for (int q = 0; q < NQ; q++)
      for (int c = 0; c < multi[q].p.n; c++, k++) {
        choice_out *a = &so[k].ch[0], *b = &mo[q].ch[c];
        if (a->n != b->n || memcmp(a->toks, b->toks, (size_t)a->n * sizeof *a->toks)) bad++;
        if (c > 0) {
          choice_out *z = &mo[q].ch[0];
          differ += z->n != b->n || memcmp(z->toks, b->toks, (size_t)b->n * sizeof *b->toks);
        }
      }
    CHECK_MSG(bad == 0, "caching %d: %d seeded choices differ from the same seed alone", caching, bad);
    CHECK_MSG(differ > 0, "all choices identical: seeds are not per choice");
    engine_destroy(e);
  }
}

/* Cancel mid-generation: blocks are freed, no event after engine_cancel returns. */
static void test_cancel(void) {
  test_rng r = {test_seed(0x1234ull)};
  enum { NQ = 16 };
  static req_spec specs[NQ];
  static req_out outs[NQ];
  make_specs(specs, NQ, &r);
  for (int q = 0; q < NQ; q++) {
    specs[q].p.ignore_eos = 1;
    specs[q].p.max_tokens = MAX_POS;
    specs[q].p.n = 1 + q % 3;
  }
  g_delay_us = 100;
  engine *e = make_engine(8, 16, 4, 4 * MAX_POS, 1, -1);
  g_delay_us = 0;
  memset(outs, 0, sizeof outs);
  reset_done();
  uint64_t ids[NQ];
  for (int q = 0; q < NQ; q++) {
    ts_err err;
    CHECK(engine_submit(e, specs[q].prompt, (size_t)specs[q].n_prompt, &specs[q].p, on_event,
                        &outs[q], &ids[q], &err) == 0);
  }
  /* Cancel each once it has produced a few events (some while still waiting). */
  for (int q = 0; q < NQ; q++) {
    int want = (int)(test_rng_next(&r) % 6);
    for (int spin = 0; spin < 200000 && events_now(&outs[q]) < want; spin++) usleep(50);
    engine_cancel(e, ids[q]);
    pthread_mutex_lock(&g_mu);
    outs[q].cancelled = 1;
    pthread_mutex_unlock(&g_mu);
  }
  check_idle(e);
  int midway = 0;
  for (int q = 0; q < NQ; q++) {
    CHECK(outs[q].late_events == 0);
    midway += outs[q].n_events > 0 && outs[q].ch[0].finish == ENGINE_FINISH_NONE;
  }
  CHECK_MSG(midway > 0, "no request was cancelled mid-generation");
  engine_cancel(e, 999999); /* unknown id: harmless */
  engine_destroy(e);
}

/* A failed step ends its requests with ERROR and the engine keeps serving; destroy aborts the rest. */
static void test_errors(void) {
  test_rng r = {test_seed(0x777ull)};
  enum { NQ = 4 };
  static req_spec specs[NQ];
  static req_out outs[NQ];
  make_specs(specs, NQ, &r);
  /* 1 ms a step: the last request below cannot finish its 200+ steps before engine_destroy. */
  g_delay_us = 1000;
  engine *e = make_engine(8, 4096, 4, 8 * MAX_POS, 0, 3);
  g_delay_us = 0;
  ts_err err;
  uint64_t id;
  CHECK(engine_submit(e, specs[0].prompt, 0, &specs[0].p, on_event, &outs[0], &id, &err) != 0);
  static int32_t longp[MAX_POS];
  for (int i = 0; i < MAX_POS; i++) longp[i] = 5;
  CHECK(engine_submit(e, longp, MAX_POS, &specs[0].p, on_event, &outs[0], &id, &err) == TS_ERANGE);
  int32_t badtok = VOCAB + 3;
  CHECK(engine_submit(e, &badtok, 1, &specs[0].p, on_event, &outs[0], &id, &err) == TS_ERANGE);
  memset(outs, 0, sizeof outs);
  reset_done();
  specs[0].p.ignore_eos = 1;
  specs[0].p.max_tokens = 50;
  CHECK(engine_submit(e, specs[0].prompt, (size_t)specs[0].n_prompt, &specs[0].p, on_event,
                      &outs[0], &id, &err) == 0);
  wait_done(1);
  CHECK(outs[0].ch[0].finish == ENGINE_FINISH_ERROR);
  check_idle(e);
  /* Still serving. */
  CHECK(engine_submit(e, specs[1].prompt, (size_t)specs[1].n_prompt, &specs[1].p, on_event,
                      &outs[1], &id, &err) == 0);
  wait_done(2);
  CHECK(outs[1].ch[0].finish == ENGINE_FINISH_STOP || outs[1].ch[0].finish == ENGINE_FINISH_LENGTH);
  /* Pending at destroy: aborted. */
  specs[2].p.ignore_eos = 1;
  specs[2].p.max_tokens = MAX_POS;
  specs[2].n_prompt = 20;
  specs[2].p.n = 2;
  CHECK(engine_submit(e, specs[2].prompt, (size_t)specs[2].n_prompt, &specs[2].p, on_event,
                      &outs[2], &id, &err) == 0);
  engine_destroy(e);
  CHECK(outs[2].ch[0].finish == ENGINE_FINISH_ABORT && outs[2].ch[1].finish == ENGINE_FINISH_ABORT);
}

/* stop_token_ids end a choice (unless min_tokens is not reached yet). */
static void test_stop_ids(void) {
  test_rng r = {test_seed(0x4242ull)};
  enum { NQ = 8 };
  static req_spec specs[NQ];
  static req_out outs[NQ];
  make_specs(specs, NQ, &r);
  engine *e = make_engine(8, 4096, 8, 8 * MAX_POS, 0, -1);
  int32_t stop_ids[4];
  for (int q = 0; q < NQ; q++) {
    for (int k = 0; k < 4; k++) stop_ids[k] = 3 + (int32_t)(test_rng_next(&r) % (VOCAB - 3));
    specs[q].p.stop_token_ids = stop_ids;
    specs[q].p.n_stop_token_ids = 4;
    specs[q].p.max_tokens = 150;
    specs[q].p.min_tokens = q % 2 ? 5 : 0;
    memset(&outs[q], 0, sizeof outs[q]);
    reset_done();
    uint64_t id;
    ts_err err;
    CHECK(engine_submit(e, specs[q].prompt, (size_t)specs[q].n_prompt, &specs[q].p, on_event,
                        &outs[q], &id, &err) == 0);
    wait_done(1);
    choice_out *c = &outs[q].ch[0];
    for (int i = 0; i + 1 < c->n; i++)
      for (int k = 0; k < 4; k++) CHECK(c->toks[i] != stop_ids[k]);
    for (int i = 0; i < c->n && i < specs[q].p.min_tokens; i++)
      for (int k = 0; k < 4; k++) CHECK(c->toks[i] != stop_ids[k]);
    if (c->finish == ENGINE_FINISH_STOP) {
      int hit = c->toks[c->n - 1] == EOS_ID && !specs[q].p.ignore_eos;
      for (int k = 0; k < 4; k++) hit |= c->toks[c->n - 1] == stop_ids[k];
      CHECK(hit);
    }
  }
  check_idle(e);
  engine_destroy(e);
}

/* n > 1 without prefix caching: the choices share the prompt's blocks, so the prompt is computed
 * about once, not n times. */
static void test_n_shares_prompt(void) {
  test_rng r = {test_seed(0x5a5a)};
  static req_spec spec[1];
  static req_out out[1];
  make_specs(spec, 1, &r);
  spec[0].n_prompt = 200;
  for (int i = 0; i < 200; i++) spec[0].prompt[i] = 3 + (int32_t)(test_rng_next(&r) % (VOCAB - 3));
  spec[0].p.n = 4;
  spec[0].p.max_tokens = 5;
  spec[0].p.ignore_eos = 1;
  spec[0].p.sampling.temperature = 1.0f;
  engine *e = make_engine(8, 4096, 4, 8 * MAX_POS, 0, -1);
  reset_done();
  run_all(e, spec, 1, out, 0);
  wait_done(4);
  check_idle(e);
  for (int c = 0; c < 4; c++) CHECK(out[0].ch[c].n == 5 && out[0].ch[c].finish == ENGINE_FINISH_LENGTH);
  engine_stats st;
  engine_get_stats(e, &st);
  CHECK(st.prompt_tokens_total == 200 && st.generation_tokens_total == 20);
  engine_destroy(e);
  fprintf(stderr, "n=4 computed %ld tokens\n", g_last_fake->tokens_computed);
  CHECK_MSG(g_last_fake->tokens_computed < 2 * 200, "computed %ld tokens for a 200-token prompt, n=4",
            g_last_fake->tokens_computed);
}

/* The workers lose their KV caches mid-run: live requests fail, every block is free, the prefix
 * cache is forgotten, and later requests are served normally. */
static void test_kv_epoch(void) {
  test_rng r = {test_seed(0xe90c)};
  static req_spec specs[4];
  static req_out outs[4];
  make_specs(specs, 4, &r);
  for (int q = 0; q < 4; q++) {
    specs[q].n_prompt = 40;
    specs[q].p.ignore_eos = 1;
    specs[q].p.max_tokens = 200;
    specs[q].p.n = 1;
  }
  g_delay_us = 100;
  engine *e = make_engine(8, 4096, 4, 8 * MAX_POS, 1, -1);
  g_delay_us = 0;
  reset_done();
  run_all(e, specs, 2, outs, 0);
  for (int spin = 0; spin < 200000 && events_now(&outs[1]) < 3; spin++) usleep(50);
  executor *ex = g_last_ex;
  __atomic_add_fetch(&ex->kv_epoch, 1, __ATOMIC_RELEASE);
  wait_done(2);
  CHECK(outs[0].ch[0].finish == ENGINE_FINISH_ERROR && outs[1].ch[0].finish == ENGINE_FINISH_ERROR);
  check_idle(e);
  /* The same prompt again: nothing cached survives; then it is served in full. */
  specs[0].p.max_tokens = 3;
  run_all(e, specs, 1, outs, 1);
  CHECK(outs[0].ch[0].finish == ENGINE_FINISH_LENGTH && outs[0].ch[0].n == 3);
  CHECK(outs[0].ch[0].cached_tokens == 0);
  run_all(e, specs, 1, outs, 1);
  CHECK(outs[0].ch[0].cached_tokens > 0);
  check_idle(e);
  engine_destroy(e);
}

int main(void) {
  test_differential();
  test_n_shares_prompt();
  test_kv_epoch();
  test_n_seeded();
  test_cancel();
  test_errors();
  test_stop_ids();
  return test_finish("test_engine_fake");
}
