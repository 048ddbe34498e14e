/* tessera's logits against Hugging Face transformers (tests/golden/<preset>.json, written by
 * tools/golden_logits.py) on the tiny Qwen3, Qwen2, Llama and tied Llama checkpoints of
 * tools/gen_checkpoint.py, in HF f32 and GGUF f32 form: every golden row (positions past 1,000
 * included, reached by chunked prefill) matches the top-20 logits and the row's sum and sum of
 * squares within 1e-4 of the row's largest |logit|, and the 32-token greedy continuations agree
 * wherever transformers' top-2 margin is not a near-tie. */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "backend/backend.h"
#include "model/model.h"
#include "test_util.h"

#define CHUNK 256   /* prefill chunk (tokens per step) */
#define BLOCK 16
#define REL_TOL 1e-4

/* Sanitizer builds (-O0, instrumented) check memory, not numerics: there the test covers two
 * presets, one form each, and the first greedy steps, so it stays quick. */
#if defined(__SANITIZE_ADDRESS__)
#define GOLDEN_LIGHT 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define GOLDEN_LIGHT 1
#endif
#endif
#ifndef GOLDEN_LIGHT
#define GOLDEN_LIGHT 0
#endif

static int run_gen(const char *dir, const char *preset) {
  char cmd[8192];
  snprintf(cmd, sizeof cmd,
           "'%s/.venv/bin/python' '%s/tools/gen_checkpoint.py' %s '%s/%s' --dtype f32 --tokenizers "
           "'%s/tokenizers' --gguf '%s/%s.gguf' >/dev/null",
           TESSERA_SOURCE_DIR, TESSERA_SOURCE_DIR, preset, dir, preset, test_shared_dir(), dir,
           preset);
  int rc = system(cmd);
  CHECK_MSG(rc == 0, "generator failed (%d): %s", rc, cmd);
  return rc;
}

typedef struct {
  model *m;
  backend *be;
  kv_cache kv;
  int32_t *table;
  int V;
} runner;

/* Runs ids[from, to) of the one sequence; logits rows for the listed positions in [from, to). */
static int run_span(runner *r, const int32_t *ids, int from, int to, const int *want_pos,
                    int n_want, float *logits, int *n_out) {
  static int32_t pos[CHUNK], rows[CHUNK];
  int32_t seq_start[2] = {0, to - from}, ctx_len = to;
  int nr = 0;
  for (int i = from; i < to; i++) pos[i - from] = i;
  for (int k = 0; k < n_want; k++)
    if (want_pos[k] >= from && want_pos[k] < to) rows[nr++] = want_pos[k] - from;
  ts_batch b = {to - from, ids + from, pos, 1, seq_start, &ctx_len, r->kv.n_blocks, r->table,
                nr, rows};
  ts_err err = {0};
  int rc = model_forward(r->m, &r->kv, &b, NULL, NULL, logits, &err);
  CHECK_MSG(rc == 0, "forward: %s", err.msg);
  *n_out = nr;
  return rc;
}

static double row_maxabs(const float *x, int n) {
  double m = 0;
  for (int i = 0; i < n; i++) m = fabs(x[i]) > m ? fabs(x[i]) : m;
  return m;
}

static int argmax(const float *x, int n) {
  int b = 0;
  for (int i = 1; i < n; i++)
    if (x[i] > x[b]) b = i;
  return b;
}

static void check_row(const char *what, int pos, const float *row, int V, json_t *golden) {
  double mx = row_maxabs(row, V), tol = REL_TOL * mx;
  json_t *top = json_object_get(golden, "top");
  size_t i;
  json_t *e;
  double worst = 0;
  json_array_foreach(top, i, e) {
    int id = (int)json_integer_value(json_array_get(e, 0));
    double want = json_real_value(json_array_get(e, 1));
    double d = fabs(row[id] - want);
    worst = d > worst ? d : worst;
  }
  CHECK_MSG(worst <= tol, "%s pos %d: top-20 logits off by %g (tolerance %g)", what, pos, worst,
            tol);
  double sum = 0, sumsq = 0;
  for (int v = 0; v < V; v++) {
    sum += row[v];
    sumsq += (double)row[v] * row[v];
  }
  double want_sum = json_real_value(json_object_get(golden, "sum"));
  double want_sq = json_real_value(json_object_get(golden, "sumsq"));
  /* Per-element errors up to tol, independent in sign: the sum drifts like sqrt(V) * tol. */
  CHECK_MSG(fabs(sum - want_sum) <= tol * sqrt((double)V) * 4, "%s pos %d: sum %g vs %g", what,
            pos, sum, want_sum);
  CHECK_MSG(fabs(sumsq - want_sq) <= want_sq * 2 * REL_TOL, "%s pos %d: sumsq %g vs %g", what,
            pos, sumsq, want_sq);
  int am = argmax(row, V), want_am = (int)json_integer_value(json_object_get(golden, "argmax"));
  double margin = json_real_value(json_array_get(json_array_get(top, 0), 1)) -
                  json_real_value(json_array_get(json_array_get(top, 1), 1));
  CHECK_MSG(am == want_am || margin < 2 * tol, "%s pos %d: argmax %d vs %d (margin %g)", what,
            pos, am, want_am, margin);
}

static void check_model(const char *path, const char *what, json_t *golden, backend *be) {
  runner r = {0};
  r.be = be;
  ts_err err = {0};
  if (model_load(&r.m, path, NULL, be, CHUNK, &err) != 0) {
    CHECK_MSG(0, "%s: %s", what, err.msg);
    return;
  }
  r.V = r.m->cfg.vocab_size;
  int max_len = 0;
  size_t pi;
  json_t *prompt;
  json_t *prompts = json_object_get(golden, "prompts"), *greedy = json_object_get(golden, "greedy");
  json_array_foreach(prompts, pi, prompt) {
    int n = (int)json_array_size(json_object_get(prompt, "ids"));
    max_len = n > max_len ? n : max_len;
  }
  int cap = max_len + 40, n_blocks = (cap + BLOCK - 1) / BLOCK;
  CHECK(kv_cache_create(&r.kv, be, r.m->w.n_layers, n_blocks, BLOCK, r.m->cfg.n_kv_head,
                        r.m->cfg.head_dim, &err) == 0);
  r.table = malloc(sizeof(int32_t) * n_blocks);
  for (int i = 0; i < n_blocks; i++) r.table[i] = n_blocks - 1 - i; /* not the identity */
  int32_t *ids = malloc(sizeof(int32_t) * cap);
  float *logits = malloc(sizeof(float) * (size_t)r.V * CHUNK);
  json_array_foreach(prompts, pi, prompt) {
    json_t *jids = json_object_get(prompt, "ids"), *rows = json_object_get(prompt, "rows");
    int n = (int)json_array_size(jids), n_want = (int)json_array_size(rows);
    for (int i = 0; i < n; i++) ids[i] = (int32_t)json_integer_value(json_array_get(jids, i));
    int want_pos[65];
    if (n_want > 64) n_want = 64;
    for (int k = 0; k < n_want; k++)
      want_pos[k] = (int)json_integer_value(json_object_get(json_array_get(rows, k), "pos"));
    /* Prefill in chunks, checking each golden row where its chunk produces it; the last
     * position's logits start the greedy continuation. */
    int n_pos = n_want, has_last = 0;
    for (int k = 0; k < n_want; k++) has_last |= want_pos[k] == n - 1;
    if (!has_last) want_pos[n_pos++] = n - 1;
    float *last = malloc(sizeof(float) * r.V);
    for (int from = 0; from < n; from += CHUNK) {
      int to = from + CHUNK < n ? from + CHUNK : n, got;
      if (run_span(&r, ids, from, to, want_pos, n_pos, logits, &got)) break;
      int j = 0;
      for (int k = 0; k < n_pos; k++) {
        if (want_pos[k] < from || want_pos[k] >= to) continue;
        const float *row = logits + (size_t)j++ * r.V;
        if (k < n_want) check_row(what, want_pos[k], row, r.V, json_array_get(rows, k));
        if (want_pos[k] == n - 1) memcpy(last, row, sizeof(float) * r.V);
      }
    }
    json_t *g = json_array_get(greedy, pi);
    json_t *gids = json_object_get(g, "ids"), *margins = json_object_get(g, "margins");
    size_t steps = json_array_size(gids);
    if (GOLDEN_LIGHT && steps > 4) steps = 4;
    for (size_t s = 0; s < steps; s++) {
      int want = (int)json_integer_value(json_array_get(gids, s));
      int am = argmax(last, r.V);
      double margin = json_real_value(json_array_get(margins, s));
      if (am != want) {
        /* Only a near-tie in transformers may flip; after it the continuations diverge. */
        CHECK_MSG(margin < 2 * REL_TOL * row_maxabs(last, r.V),
                  "%s prompt %zu greedy step %zu: %d vs %d (margin %g)", what, pi, s, am, want,
                  margin);
        break;
      }
      ids[n + s] = want;
      int one = n + (int)s, got;
      if (s + 1 < steps && run_span(&r, ids, one, one + 1, &one, 1, last, &got))
        break;
    }
    free(last);
  }
  free(ids);
  free(logits);
  free(r.table);
  kv_cache_free(&r.kv, be);
  model_free(r.m);
}

int main(void) {
  const char *presets[] = {"tiny-qwen3", "tiny-qwen2", "tiny-llama", "tiny-llama-tied"};
  char dir[1024];
  snprintf(dir, sizeof dir, "%s/tmp-golden-logits-%d", TESSERA_BINARY_DIR, (int)getpid());
  mkdir(dir, 0755);
  backend *be = NULL;
  ts_err err = {0};
  CHECK(backend_create(&be, "cpu", 0, &err) == 0);
  for (size_t i = 0; i < sizeof presets / sizeof presets[0]; i++) {
    if (GOLDEN_LIGHT && i % 2) continue;
    char gpath[2048], hf[2048], gg[2048], what[256];
    snprintf(gpath, sizeof gpath, "%s/tests/golden/%s.json", TESSERA_SOURCE_DIR, presets[i]);
    json_error_t jerr;
    json_t *golden = json_load_file(gpath, 0, &jerr);
    CHECK_MSG(golden != NULL, "%s: %s", gpath, jerr.text);
    if (!golden || run_gen(dir, presets[i])) {
      json_decref(golden);
      continue;
    }
    snprintf(hf, sizeof hf, "%s/%s", dir, presets[i]);
    snprintf(gg, sizeof gg, "%s/%s.gguf", dir, presets[i]);
    if (!GOLDEN_LIGHT || i == 0) {
      snprintf(what, sizeof what, "%s (hf)", presets[i]);
      check_model(hf, what, golden, be);
    }
    if (!GOLDEN_LIGHT || i != 0) {
      snprintf(what, sizeof what, "%s (gguf)", presets[i]);
      check_model(gg, what, golden, be);
    }
    json_decref(golden);
  }
  backend_destroy(be);
  char cmd[1200];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
  if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", dir);
  return test_finish("test_golden_logits");
}
