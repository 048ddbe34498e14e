/* The engine on the real stories260K model (CPU backend, uni executor), differentially: 64
 * concurrent greedy requests give exactly the tokens each gives alone, and so do prefix caching,
 * chunked prefill and a KV cache small enough to force preemption; seeded sampling is the same
 * alone and in a batch; cancel frees every block; the streamed text equals tok_decode of the
 * tokens; stop strings cut across token boundaries. Every engine ends with all blocks free. */
#include <pthread.h>
#include <string.h>
#include <unistd.h>

#include "backend/backend.h"
#include "engine/engine.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"
#include "test_util.h"

#define MAX_OUT 256
#define MAX_TEXT 4096

static backend *g_be;
static model *g_m;
static tokenizer *g_tok;

/* ---- events ---- */

typedef struct {
  int32_t toks[MAX_OUT];
  int n;
  char text[MAX_TEXT];
  size_t text_len;
  engine_finish finish;
  int cached_tokens, completion_tokens, prompt_tokens;
} choice_out;

typedef struct {
  choice_out ch[4];
  int n_events;
  int cancelled;
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
  for (int i = 0; i < ev->n_tokens && c->n < MAX_OUT; i++) c->toks[c->n++] = ev->tokens[i];
  if (c->text_len + ev->text_len < MAX_TEXT) {
    memcpy(c->text + c->text_len, ev->text, ev->text_len);
    c->text_len += ev->text_len;
    c->text[c->text_len] = 0;
  }
  c->cached_tokens = ev->cached_tokens;
  c->completion_tokens = ev->completion_tokens;
  c->prompt_tokens = ev->prompt_tokens;
  o->n_events++;
  if (ev->finish != ENGINE_FINISH_NONE) {
    c->finish = ev->finish;
    g_done++;
    pthread_cond_broadcast(&g_cv);
  }
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

static int done_now(void) {
  pthread_mutex_lock(&g_mu);
  int d = g_done;
  pthread_mutex_unlock(&g_mu);
  return d;
}

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

static int g_max_model_len; /* 0: the model's */

static engine *make_engine(int max_seqs, int max_batched, int bs, int kv_tokens, int caching) {
  engine_config cfg = {0};
  cfg.max_model_len = g_max_model_len ? g_max_model_len : g_m->cfg.max_pos;
  cfg.max_num_seqs = max_seqs;
  cfg.max_num_batched_tokens = max_batched;
  cfg.block_size = bs;
  /* K and V, every layer, F32. */
  int64_t per_token = 2LL * g_m->cfg.n_layer * g_m->cfg.n_kv_head * g_m->cfg.head_dim * 4;
  cfg.kv_cache_bytes = per_token * kv_tokens;
  cfg.enable_prefix_caching = caching;
  cfg.seed = 99;
  engine *e = NULL;
  ts_err err;
  int rc = engine_create(&e, g_m, g_tok, &cfg, &err);
  CHECK_MSG(rc == 0, "%s", err.msg);
  return e;
}

/* ---- workloads ---- */

#define NREQ 64

typedef struct {
  int32_t prompt[160];
  int n_prompt;
  engine_request_params p;
} req_spec;

/* A random token: mostly word pieces, sometimes a byte-fallback token (ids 3..258 in the
 * stories260K vocabulary) so that prompts also end inside a byte group now and then. */
static int32_t rand_token(test_rng *r, int vocab) {
  if (test_rng_next(r) % 16 == 0) return 3 + (int32_t)(test_rng_next(r) % 256);
  return 259 + (int32_t)(test_rng_next(r) % (uint64_t)(vocab - 259));
}

static void make_specs(req_spec *specs, int n, test_rng *r, int vocab) {
  int32_t shared[2][160];
  for (int k = 0; k < 2; k++)
    for (int i = 0; i < 160; i++) shared[k][i] = rand_token(r, vocab);
  for (int q = 0; q < n; q++) {
    req_spec *s = &specs[q];
    s->n_prompt = 1 + (int)(test_rng_next(r) % 40);
    int base = (int)(test_rng_next(r) % 3);
    int keep = base < 2 ? (int)(test_rng_next(r) % (uint64_t)(s->n_prompt + 1)) : 0;
    s->prompt[0] = 1; /* BOS */
    for (int i = 1; i < s->n_prompt; i++)
      s->prompt[i] = i < keep ? shared[base][i] : rand_token(r, vocab);
    memset(&s->p, 0, sizeof s->p);
    sampling_params_default(&s->p.sampling);
    s->p.sampling.temperature = 0;
    s->p.n = 1;
    s->p.max_tokens = 1 + (int)(test_rng_next(r) % 16);
    s->p.ignore_eos = (int)(test_rng_next(r) % 2);
    s->p.skip_special_tokens = 1;
  }
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
    if (rc != 0) {
      pthread_mutex_lock(&g_mu);
      g_done += specs[q].p.n;
      pthread_mutex_unlock(&g_mu);
    } else if (one_at_a_time) {
      wait_done(target);
    }
  }
}

static void check_same(const char *what, const req_spec *specs, const req_out *ref,
                       const req_out *got, int n) {
  int bad = 0;
  for (int q = 0; q < n; q++)
    for (int c = 0; c < specs[q].p.n; c++) {
      const choice_out *a = &ref[q].ch[c], *b = &got[q].ch[c];
      int same = a->n == b->n && !memcmp(a->toks, b->toks, (size_t)a->n * sizeof *a->toks) &&
                 a->finish == b->finish && a->text_len == b->text_len &&
                 !memcmp(a->text, b->text, a->text_len);
      if (!same && bad++ < 3)
        fprintf(stderr, "%s: request %d choice %d differs (%d vs %d tokens)\n", what, q, c, a->n, b->n);
    }
  CHECK_MSG(bad == 0, "%s: %d choices differ from the same request alone", what, bad);
}

static void test_greedy_differential(void) {
  test_rng r = {test_seed(0x5151)};
  static req_spec specs[NREQ];
  static req_out ref[NREQ], got[NREQ];
  make_specs(specs, NREQ, &r, g_m->cfg.vocab_size);
  int total = NREQ;

  engine *e = make_engine(4, 512, 16, 4 * 512, 0);
  pthread_mutex_lock(&g_mu);
  g_done = 0;
  pthread_mutex_unlock(&g_mu);
  run_all(e, specs, NREQ, ref, 1);
  check_idle(e);
  engine_destroy(e);
  /* The streamed text is what the output adds to the decoded prompt (vLLM's rule: the output's
   * first word keeps its leading space); the finish reasons follow the limits. */
  int text_checked = 0;
  for (int q = 0; q < NREQ; q++) {
    const choice_out *c = &ref[q].ch[0];
    int32_t all[160 + MAX_OUT];
    memcpy(all, specs[q].prompt, (size_t)specs[q].n_prompt * sizeof *all);
    memcpy(all + specs[q].n_prompt, c->toks, (size_t)c->n * sizeof *all);
    char *full = NULL, *pre = NULL;
    size_t full_len = 0, pre_len = 0;
    ts_err err;
    CHECK(tok_decode(g_tok, all, (size_t)(specs[q].n_prompt + c->n), 1, &full, &full_len, &err) == 0);
    CHECK(tok_decode(g_tok, specs[q].prompt, (size_t)specs[q].n_prompt, 1, &pre, &pre_len, &err) == 0);
    /* Only where the prompt ends on a whole character that the output does not merge into. */
    if (full && pre && pre_len >= 3 && pre_len <= full_len && !memcmp(full, pre, pre_len) &&
        memcmp(pre + pre_len - 3, "\xef\xbf\xbd", 3)) {
      text_checked++;
      CHECK_MSG(c->text_len == full_len - pre_len && !memcmp(c->text, full + pre_len, c->text_len),
                "request %d: streamed '%s', expected '%s'", q, c->text, full + pre_len);
    }
    free(full);
    free(pre);
    CHECK(c->n >= 1 && c->n <= specs[q].p.max_tokens && c->completion_tokens == c->n);
    CHECK(c->prompt_tokens == specs[q].n_prompt);
    if (c->finish == ENGINE_FINISH_STOP) CHECK(!specs[q].p.ignore_eos && c->toks[c->n - 1] == 2);
    else CHECK(c->finish == ENGINE_FINISH_LENGTH && c->n == specs[q].p.max_tokens);
  }

  fprintf(stderr, "streamed text checked on %d requests\n", text_checked);
  CHECK_MSG(text_checked > NREQ / 4, "streamed text checked on only %d requests", text_checked);

  struct {
    const char *name;
    int max_seqs, max_batched, bs, kv_tokens, caching;
  } cfgs[] = {
      {"64 concurrent", 64, 512, 16, 64 * 160, 0},
      {"prefix caching", 64, 512, 16, 64 * 160, 1},
      {"chunked prefill", 64, 13, 8, 64 * 160, 0},
      /* A context of 64 holds every request here (prompt <= 40, output <= 16), so only the
       * cache size changes: 18 blocks of 4 for 64 requests. */
      {"tiny cache (preemption)", 64, 512, 4, 72, 0},
  };
  for (size_t k = 0; k < sizeof cfgs / sizeof cfgs[0]; k++) {
    g_max_model_len = cfgs[k].kv_tokens < 512 ? 64 : 0;
    e = make_engine(cfgs[k].max_seqs, cfgs[k].max_batched, cfgs[k].bs, cfgs[k].kv_tokens,
                    cfgs[k].caching);
    g_max_model_len = 0;
    int any_cached = 0;
    for (int wave = 0; wave < (cfgs[k].caching ? 2 : 1); wave++) {
      int target = done_now() + total;
      run_all(e, specs, NREQ, got, 0);
      wait_done(target);
      check_idle(e);
      check_same(cfgs[k].name, specs, ref, got, NREQ);
      for (int q = 0; q < NREQ; q++) any_cached |= got[q].ch[0].cached_tokens > 0;
    }
    engine_stats st;
    engine_get_stats(e, &st);
    fprintf(stderr, "%s: preemptions %lld, prefix cache %lld of %lld tokens\n", cfgs[k].name,
            (long long)st.preemptions, (long long)st.prefix_cache_hits,
            (long long)st.prefix_cache_queries);
    if (cfgs[k].kv_tokens < 1000) CHECK_MSG(st.preemptions > 0, "%s: no preemption", cfgs[k].name);
    if (cfgs[k].caching) CHECK_MSG(any_cached, "%s: no cached tokens", cfgs[k].name);
    else CHECK(!any_cached);
    engine_destroy(e);
  }
}

/* Seeded sampling: the same alone and in a batch; n > 1 choice i equals seed + i alone. */
static void test_seeded(void) {
  test_rng r = {test_seed(0x7a7a)};
  enum { NQ = 8 };
  static req_spec multi[NQ], single[NQ * 3];
  static req_out mo[NQ], so[NQ * 3];
  make_specs(multi, NQ, &r, g_m->cfg.vocab_size);
  int ns = 0;
  for (int q = 0; q < NQ; q++) {
    multi[q].p.n = 1 + (int)(test_rng_next(&r) % 3);
    multi[q].p.sampling.temperature = 0.8f;
    multi[q].p.sampling.top_p = 0.95f;
    multi[q].p.sampling.has_seed = 1;
    multi[q].p.sampling.seed = test_rng_next(&r);
    multi[q].p.max_tokens = 30;
    for (int c = 0; c < multi[q].p.n; c++) {
      single[ns] = multi[q];
      single[ns].p.n = 1;
      single[ns].p.sampling.seed = multi[q].p.sampling.seed + (uint64_t)c;
      ns++;
    }
  }
  engine *e = make_engine(32, 64, 8, 64 * 160, 1);
  run_all(e, single, ns, so, 1);
  int target = done_now() + ns;
  run_all(e, multi, NQ, mo, 0);
  wait_done(target);
  check_idle(e);
  int k = 0, bad = 0;
  for (int q = 0; q < NQ; q++)
    for (int c = 0; c < multi[q].p.n; c++, k++) {
      const choice_out *a = &so[k].ch[0], *b = &mo[q].ch[c];
      bad += a->n != b->n || memcmp(a->toks, b->toks, (size_t)a->n * sizeof *a->toks) ||
             a->text_len != b->text_len || memcmp(a->text, b->text, a->text_len);
    }
  CHECK_MSG(bad == 0, "%d seeded choices differ between alone and batched", bad);
  engine_destroy(e);
}

static void test_cancel(void) {
  test_rng r = {test_seed(0xcafe)};
  enum { NQ = 12 };
  static req_spec specs[NQ];
  static req_out outs[NQ];
  make_specs(specs, NQ, &r, g_m->cfg.vocab_size);
  engine *e = make_engine(4, 8, 4, 8 * 512, 1);
  memset(outs, 0, sizeof outs);
  uint64_t ids[NQ];
  for (int q = 0; q < NQ; q++) {
    specs[q].p.ignore_eos = 1;
    specs[q].p.max_tokens = 400;
    specs[q].p.n = 1 + q % 2;
    ts_err err;
    CHECK(engine_submit(e, specs[q].prompt, (size_t)specs[q].n_prompt, &specs[q].p, on_event,
                        &outs[q], &ids[q], &err) == 0);
  }
  for (int q = 0; q < NQ; q++) {
    int want = 1 + (int)(test_rng_next(&r) % 5);
    for (int spin = 0; spin < 400000 && events_now(&outs[q]) < want && q < 4; spin++) usleep(25);
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
  CHECK_MSG(midway > 0, "nothing was cancelled mid-generation");
  engine_destroy(e);
}

/* Stop strings: take a greedy continuation's text, pick a stop string that spans a token
 * boundary, and check that the same request with that stop ends right before it (or right after
 * it with include_stop_str_in_output). */
static void test_stop_strings(void) {
  test_rng r = {test_seed(0x5709)};
  enum { NQ = 12 };
  static req_spec specs[NQ];
  static req_out base[NQ], got[NQ];
  make_specs(specs, NQ, &r, g_m->cfg.vocab_size);
  engine *e = make_engine(16, 64, 8, 32 * 512, 1);
  for (int q = 0; q < NQ; q++) {
    specs[q].p.ignore_eos = 1;
    specs[q].p.max_tokens = 40;
  }
  int target = done_now() + NQ;
  run_all(e, specs, NQ, base, 0);
  wait_done(target);
  int tested = 0;
  static char stops[NQ][32];
  const char *stop_ptr[NQ][1];
  size_t expect_len[NQ];
  for (int q = 0; q < NQ; q++) {
    const choice_out *c = &base[q].ch[0];
    /* Byte offset where token j's text starts: decode the prefix. */
    int j = 2 + (int)(test_rng_next(&r) % (uint64_t)(c->n > 4 ? c->n - 3 : 1));
    if (j >= c->n) continue;
    char *pre = NULL;
    size_t pre_len = 0;
    ts_err err;
    if (tok_decode(g_tok, c->toks, (size_t)j, 1, &pre, &pre_len, &err) < 0) continue;
    free(pre);
    if (pre_len < 2 || pre_len + 2 > c->text_len) continue;
    size_t from = pre_len - 2, len = 4;
    if (from + len > c->text_len) len = c->text_len - from;
    memcpy(stops[q], c->text + from, len);
    stops[q][len] = 0;
    /* The first occurrence decides. */
    const char *first = strstr(c->text, stops[q]);
    size_t at = (size_t)(first - c->text);
    int include = q % 2;
    expect_len[q] = at + (include ? len : 0);
    stop_ptr[q][0] = stops[q];
    specs[q].p.stop = stop_ptr[q];
    specs[q].p.n_stop = 1;
    specs[q].p.include_stop_str_in_output = include;
    tested++;
  }
  target = done_now() + NQ;
  run_all(e, specs, NQ, got, 0);
  wait_done(target);
  for (int q = 0; q < NQ; q++) {
    if (!specs[q].p.n_stop) continue;
    const choice_out *b = &base[q].ch[0], *c = &got[q].ch[0];
    CHECK_MSG(c->finish == ENGINE_FINISH_STOP, "request %d: stop string '%s' not hit", q, stops[q]);
    CHECK_MSG(c->text_len == expect_len[q] && !memcmp(c->text, b->text, c->text_len),
              "request %d: '%s' with stop '%s' gave '%s'", q, b->text, stops[q], c->text);
    CHECK(c->n <= b->n && !memcmp(c->toks, b->toks, (size_t)c->n * sizeof *c->toks));
  }
  CHECK_MSG(tested >= NQ / 2, "only %d stop-string cases", tested);
  check_idle(e);
  engine_destroy(e);
}

int main(void) {
  char path[1024];
  snprintf(path, sizeof path, "%s/models/stories260K-hf", test_shared_dir());
  ts_err err;
  if (backend_create(&g_be, "cpu", 1, &err) < 0 || model_load(&g_m, path, NULL, g_be, 512, &err) < 0 ||
      tok_load_path(&g_tok, path, &err) < 0) {
    fprintf(stderr, "cannot load %s: %s\n", path, err.msg);
    return 1;
  }
  test_greedy_differential();
  test_seeded();
  test_cancel();
  test_stop_strings();
  tok_free(g_tok);
  model_free(g_m);
  backend_destroy(g_be);
  return test_finish("test_engine_model");
}
