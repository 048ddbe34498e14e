/* Prompt logprobs in the engine, over a fake executor whose logits row for position p hashes the
 * tokens of positions 0..p read back through the block tables it is given: a row computed over a
 * stale or skipped block, a prompt position left out or a row given to the wrong position changes
 * the numbers. Every request's prompt logprobs (and greedy output) must equal what this test
 * computes from its prompt alone, under chunked prefill, a logits row cap smaller than the prompt,
 * preemption (a KV cache of a few sequences), prefix caching, n > 1 and a pipelined executor. */
#include <math.h>
#include <pthread.h>
#include <string.h>
#include <unistd.h>

#include "dist/executor.h"
#include "engine/engine.h"
#include "test_util.h"

#define VOCAB 40
#define MAX_POS 192
#define MAX_PROMPT 120
#define MAX_GEN 8
#define NREQ 24
#define INFLIGHT 2
#define QROWS 512

/* ---- the fake executor ---- */

typedef struct {
  int n_blocks, bs;
  int32_t *tok, *pos; /* [n_blocks][bs] what each KV slot holds and for which position */
} fake;

static const uint64_t H0 = 1469598103934665603ull;

static uint64_t hash_tok(uint64_t h, int32_t t) { return test_mix64(h ^ (uint64_t)(uint32_t)t); }

/* Logits of a context whose hash is h, spread over [-4, 4). */
static void row_logits(uint64_t h, float *out) {
  for (int v = 0; v < VOCAB; v++)
    out[v] = (float)(test_mix64(h + (uint64_t)v) >> 58) * 0.125f - 4.0f +
             (float)(test_mix64(h * 3 + (uint64_t)v) >> 40) / 16777216.0f * 0.01f;
}

static int fake_init_kv(executor *ex, int bs, int64_t bytes, int n_blocks, int *out, ts_err *err) {
  fake *f = ex->impl;
  if (n_blocks <= 0) n_blocks = (int)(bytes / (ex->info.kv_bytes_per_token * bs));
  if (n_blocks <= 0) return ts_errorf(err, TS_ERANGE, "fake: no blocks");
  f->n_blocks = n_blocks;
  f->bs = bs;
  f->tok = malloc((size_t)n_blocks * bs * sizeof *f->tok);
  f->pos = malloc((size_t)n_blocks * bs * sizeof *f->pos);
  for (int i = 0; i < n_blocks * bs; i++) f->pos[i] = -1;
  *out = n_blocks;
  return 0;
}

/* Closed: steps wait, so that every request is queued before the second step (the same
 * scheduling pressure on every run, whatever the machine's speed). */
static pthread_mutex_t g_gate_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_gate_cv = PTHREAD_COND_INITIALIZER;
static int g_gate_closed;

static void gate_set(int closed) {
  pthread_mutex_lock(&g_gate_mu);
  g_gate_closed = closed;
  pthread_cond_broadcast(&g_gate_cv);
  pthread_mutex_unlock(&g_gate_mu);
}

static int fake_step(executor *ex, uint64_t step_id, const ts_batch *b, float *logits,
                     ts_err *err) {
  (void)step_id;
  fake *f = ex->impl;
  pthread_mutex_lock(&g_gate_mu);
  while (g_gate_closed) pthread_cond_wait(&g_gate_cv, &g_gate_mu);
  pthread_mutex_unlock(&g_gate_mu);
  int bs = f->bs;
  for (int s = 0; s < b->n_seqs; s++) {
    const int32_t *bt = b->block_table + (size_t)s * b->max_blocks;
    for (int i = b->seq_start[s]; i < b->seq_start[s + 1]; i++) {
      int p = b->pos[i], blk = bt[p / bs];
      if (p / bs >= b->max_blocks || blk < 0 || blk >= f->n_blocks)
        return ts_errorf(err, TS_EINVAL, "fake: bad block for position %d", p);
      f->tok[blk * bs + p % bs] = b->tokens[i];
      f->pos[blk * bs + p % bs] = p;
    }
  }
  for (int r = 0; r < b->n_logits; r++) {
    int i = b->logits_rows[r], s = 0;
    while (s < b->n_seqs && b->seq_start[s + 1] <= i) s++;
    if (s == b->n_seqs) return ts_errorf(err, TS_EINVAL, "fake: row %d outside the step", i);
    const int32_t *bt = b->block_table + (size_t)s * b->max_blocks;
    uint64_t h = H0;
    for (int p = 0; p <= b->pos[i]; p++) {
      int blk = bt[p / bs];
      if (f->pos[blk * bs + p % bs] != p)
        return ts_errorf(err, TS_EINVAL, "fake: stale KV at position %d", p);
      h = hash_tok(h, f->tok[blk * bs + p % bs]);
    }
    row_logits(h, logits + (size_t)r * VOCAB);
  }
  return 0;
}

/* Pipelined: submit computes at once and queues the rows; collect hands them out in order. */
static float g_q[INFLIGHT][QROWS * VOCAB];
static int g_q_rows[INFLIGHT], g_q_rc[INFLIGHT], g_q_head, g_q_n;
static uint64_t g_q_id[INFLIGHT];

static int fake_submit(executor *ex, uint64_t id, const ts_batch *b, ts_err *err) {
  if (g_q_n == INFLIGHT || b->n_logits > QROWS)
    return ts_errorf(err, TS_EBUSY, "fake: too many steps or rows in flight");
  int slot = (g_q_head + g_q_n++) % INFLIGHT;
  g_q_rc[slot] = fake_step(ex, id, b, g_q[slot], err);
  g_q_rows[slot] = b->n_logits;
  g_q_id[slot] = id;
  return 0;
}

static int fake_collect(executor *ex, uint64_t *id, float *logits, ts_err *err) {
  (void)ex;
  if (g_q_n == 0) return ts_errorf(err, TS_EINVAL, "fake: nothing in flight");
  int slot = g_q_head;
  g_q_head = (g_q_head + 1) % INFLIGHT;
  g_q_n--;
  if (id) *id = g_q_id[slot];
  if (g_q_rc[slot] < 0) return ts_errorf(err, g_q_rc[slot], "fake: step failed");
  memcpy(logits, g_q[slot], (size_t)g_q_rows[slot] * VOCAB * sizeof(float));
  return 0;
}

static void fake_shutdown(executor *ex) {
  fake *f = ex->impl;
  free(f->tok);
  free(f->pos);
  free(f);
  free(ex);
}

static const executor_ops fake_ops = {
    .name = "fake", .init_kv = fake_init_kv, .execute_step = fake_step, .shutdown = fake_shutdown};
static const executor_pipeline_ops fake_pipe = {fake_submit, fake_collect};

static executor *fake_create(int pipelined) {
  executor *ex = calloc(1, sizeof *ex);
  ex->impl = calloc(1, sizeof(fake));
  ex->ops = &fake_ops;
  ex->info.vocab_size = VOCAB;
  ex->info.max_pos = MAX_POS;
  ex->info.max_tokens = 4096;
  ex->info.kv_bytes_per_token = 8;
  ex->info.bos_id = -1;
  if (pipelined) {
    ex->pipe = &fake_pipe;
    ex->info.max_inflight = INFLIGHT;
    g_q_head = g_q_n = 0;
  }
  return ex;
}

/* ---- requests and what they must give ---- */

typedef struct {
  int32_t prompt[MAX_PROMPT];
  int n_prompt, n, max_tokens, plp; /* plp: -1 none, else top k */
  /* Collected (under g_mu). */
  sample_result got[MAX_PROMPT];
  int have_plp, events_without_plp, events_with_plp;
  int32_t out[3][MAX_GEN];
  int n_out[3];
  engine_finish finish[3];
} req;

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_cv = PTHREAD_COND_INITIALIZER;
static int g_finished;

static void on_event(void *user, const engine_event *ev) {
  req *q = user;
  pthread_mutex_lock(&g_mu);
  if (ev->prompt_logprobs) {
    q->events_with_plp++;
    if (!q->have_plp) {
      memcpy(q->got, ev->prompt_logprobs, (size_t)q->n_prompt * sizeof *q->got);
      q->have_plp = 1;
    }
  } else if (ev->n_tokens > 0) {
    q->events_without_plp++;
  }
  for (int i = 0; i < ev->n_tokens && q->n_out[ev->index] < MAX_GEN; i++)
    q->out[ev->index][q->n_out[ev->index]++] = ev->tokens[i];
  if (ev->finish != ENGINE_FINISH_NONE) {
    q->finish[ev->index] = ev->finish;
    g_finished++;
    pthread_cond_broadcast(&g_cv);
  }
  pthread_mutex_unlock(&g_mu);
}

static int argmax_lowest(const float *x) {
  int best = 0;
  for (int v = 1; v < VOCAB; v++)
    if (x[v] > x[best]) best = v;
  return best;
}

/* Checks q against its prompt alone: log-softmax in double, the rank and the top k (ties: lowest
 * id first), and the greedy continuation. */
static void check_req(const req *q) {
  float l[VOCAB];
  uint64_t h = H0;
  for (int i = 0; i < q->n_prompt; i++) {
    h = hash_tok(h, q->prompt[i]);
    if (q->plp < 0 || i + 1 >= q->n_prompt) continue;
    row_logits(h, l);
    int32_t t = q->prompt[i + 1];
    double mx = l[argmax_lowest(l)], sum = 0;
    for (int v = 0; v < VOCAB; v++) sum += exp((double)l[v] - mx);
    double lse = mx + log(sum);
    const sample_result *g = &q->got[i + 1];
    CHECK_MSG(g->token == t && fabs(g->logprob - (l[t] - lse)) < 1e-5,
              "position %d: token %d logprob %g, want %d %g", i + 1, g->token, g->logprob, t,
              l[t] - lse);
    int rank = 0;
    for (int v = 0; v < VOCAB; v++) rank += l[v] >= l[t];
    CHECK_MSG(g->rank == rank, "position %d: rank %d, want %d", i + 1, g->rank, rank);
    CHECK_MSG(g->n_top == q->plp, "position %d: %d top entries, want %d", i + 1, g->n_top, q->plp);
    int used[VOCAB] = {0};
    for (int j = 0; j < g->n_top && j < q->plp; j++) {
      int best = -1;
      for (int v = 0; v < VOCAB; v++)
        if (!used[v] && (best < 0 || l[v] > l[best])) best = v;
      used[best] = 1;
      CHECK_MSG(g->top_ids[j] == best && fabs(g->top_logprobs[j] - (l[best] - lse)) < 1e-5,
                "position %d top %d: id %d, want %d", i + 1, j, g->top_ids[j], best);
    }
  }
  if (q->plp >= 0) {
    CHECK_MSG(q->have_plp && q->events_without_plp == 0 && q->got[0].token == q->prompt[0],
              "prompt logprobs missing from %d events", q->events_without_plp);
  } else {
    CHECK(!q->have_plp && q->events_with_plp == 0);
  }
  /* Greedy continuation, identical for every choice. */
  int32_t seq[MAX_PROMPT + MAX_GEN];
  memcpy(seq, q->prompt, (size_t)q->n_prompt * sizeof *seq);
  for (int g = 0; g < q->max_tokens; g++) {
    uint64_t hh = H0;
    for (int i = 0; i < q->n_prompt + g; i++) hh = hash_tok(hh, seq[i]);
    row_logits(hh, l);
    seq[q->n_prompt + g] = argmax_lowest(l);
  }
  for (int c = 0; c < q->n; c++) {
    CHECK_MSG(q->finish[c] == ENGINE_FINISH_LENGTH && q->n_out[c] == q->max_tokens,
              "choice %d: finish %d after %d tokens", c, q->finish[c], q->n_out[c]);
    CHECK(memcmp(q->out[c], seq + q->n_prompt, (size_t)q->n_out[c] * sizeof *seq) == 0);
  }
}

static req g_reqs[NREQ];

static void make_reqs(test_rng *r) {
  int32_t base[2][MAX_PROMPT];
  for (int k = 0; k < 2; k++)
    for (int i = 0; i < MAX_PROMPT; i++) base[k][i] = (int32_t)(test_rng_next(r) % VOCAB);
  for (int i = 0; i < NREQ; i++) {
    req *q = &g_reqs[i];
    memset(q, 0, sizeof *q);
    /* The first few are long, unshared and generate the most: with a KV cache for about one
     * of them, two running at once preempt. */
    int lead = i < 4;
    q->n_prompt = lead ? MAX_PROMPT - (int)(test_rng_next(r) % 16)
                       : 1 + (int)(test_rng_next(r) % MAX_PROMPT);
    int b = lead ? 2 : (int)(test_rng_next(r) % 3);
    int keep = b < 2 ? (int)(test_rng_next(r) % (q->n_prompt + 1)) : 0;
    for (int j = 0; j < q->n_prompt; j++)
      q->prompt[j] = j < keep ? base[b][j] : (int32_t)(test_rng_next(r) % VOCAB);
    q->n = 1 + (int)(test_rng_next(r) % 3);
    q->max_tokens = lead ? MAX_GEN : 1 + (int)(test_rng_next(r) % MAX_GEN);
    q->plp = lead || test_rng_next(r) % 3 ? (int)(test_rng_next(r) % (SAMPLING_MAX_LOGPROBS + 1))
                                          : -1;
  }
}

static void run(const char *name, const engine_config *cfg, int pipelined, test_rng *r) {
  make_reqs(r);
  engine *e;
  ts_err err = {0};
  int rc = engine_create_with_executor(&e, fake_create(pipelined), NULL, cfg, &err);
  CHECK_MSG(rc == 0, "%s: %s", name, err.msg);
  if (rc < 0) return;
  pthread_mutex_lock(&g_mu);
  g_finished = 0;
  pthread_mutex_unlock(&g_mu);
  gate_set(1);
  int want = 0;
  for (int i = 0; i < NREQ; i++) {
    req *q = &g_reqs[i];
    engine_request_params p;
    memset(&p, 0, sizeof p);
    sampling_params_default(&p.sampling);
    p.sampling.temperature = 0;
    p.n = q->n;
    p.max_tokens = q->max_tokens;
    p.has_prompt_logprobs = q->plp >= 0;
    p.prompt_logprobs = q->plp;
    uint64_t id;
    rc = engine_submit(e, q->prompt, (size_t)q->n_prompt, &p, on_event, q, &id, &err);
    CHECK_MSG(rc == 0, "%s: submit %d: %s", name, i, err.msg);
    if (rc == 0) want += q->n;
  }
  gate_set(0);
  pthread_mutex_lock(&g_mu);
  while (g_finished < want) pthread_cond_wait(&g_cv, &g_mu);
  pthread_mutex_unlock(&g_mu);
  for (int i = 0; i < NREQ; i++) check_req(&g_reqs[i]);
  engine_stats st;
  for (int i = 0; i < 2000; i++) {
    engine_get_stats(e, &st);
    if (st.running == 0 && st.waiting == 0 && st.kv_blocks_free == st.kv_blocks_total) break;
    usleep(500);
  }
  CHECK_MSG(st.kv_blocks_free == st.kv_blocks_total, "%s: %d of %d blocks free", name,
            st.kv_blocks_free, st.kv_blocks_total);
  if (!strcmp(name, "preempt")) CHECK_MSG(st.preemptions > 0, "%s: no preemption", name);
  engine_destroy(e);
}

static void test_bad_k(void) {
  engine *e;
  ts_err err = {0};
  engine_config cfg = {.max_num_seqs = 2};
  CHECK(engine_create_with_executor(&e, fake_create(0), NULL, &cfg, &err) == 0);
  engine_request_params p;
  memset(&p, 0, sizeof p);
  sampling_params_default(&p.sampling);
  p.n = 1;
  p.has_prompt_logprobs = 1;
  p.prompt_logprobs = SAMPLING_MAX_LOGPROBS + 1;
  int32_t prompt[3] = {1, 2, 3};
  uint64_t id;
  CHECK(engine_submit(e, prompt, 3, &p, on_event, NULL, &id, &err) == TS_ERANGE);
  engine_destroy(e);
}

int main(void) {
  test_rng r = {test_seed(0x706c6f67)};
  /* Small steps and a KV cache for a few sequences: chunked prefill and preemption. */
  engine_config small = {.max_model_len = MAX_PROMPT + 16, .max_num_seqs = 4,
                         .max_num_batched_tokens = 48, .block_size = 4,
                         .kv_cache_bytes = 40 * 4 * 8, .enable_prefix_caching = 1};
  run("preempt", &small, 0, &r);
  /* Steps hold whole prompts but only 64 logits rows: prompts chunked by rows. */
  engine_config rows = {.max_model_len = MAX_POS, .max_num_seqs = 2, .max_num_batched_tokens = 256,
                        .block_size = 4, .enable_prefix_caching = 1};
  run("rows", &rows, 0, &r);
  engine_config wide = {.max_model_len = MAX_POS, .max_num_seqs = 8, .max_num_batched_tokens = 40,
                        .block_size = 4, .kv_cache_bytes = 120 * 4 * 8, .enable_prefix_caching = 1};
  run("pipelined", &wide, 1, &r);
  run("pipelined-small", &small, 1, &r);
  test_bad_k();
  return test_finish("test_engine_plog");
}
