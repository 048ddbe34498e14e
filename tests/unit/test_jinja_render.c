/* Chat-template render driver and self-test. With arguments it renders for the differential tests
 * in tests/py/test_jinja.py:
 *   test_jinja_render TEMPLATE CONTEXT.json       -> the output on stdout (error on stderr, exit 1)
 *   test_jinja_render --batch CASES.json          -> [{"out": ...} | {"error": ...}, ...] on stdout
 * where CASES.json is [{"template": "...", "context": {...}}, ...].
 * Without arguments (ctest) it renders every shared chat template over random conversations and
 * checks that each user message appears in the prompt. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "template/jinja.h"
#include "test_util.h"

static char *read_file(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  size_t cap = 1 << 16, n = 0;
  char *buf = malloc(cap);
  for (size_t r; buf && (r = fread(buf + n, 1, cap - n - 1, f)) > 0;) {
    n += r;
    if (cap - n < 2) {
      char *nb = realloc(buf, cap *= 2);
      if (!nb) {
        free(buf);
        buf = NULL;
      }
      buf = nb;
    }
  }
  fclose(f);
  if (buf) buf[n] = 0;
  *len = n;
  return buf;
}

static int render_one(const char *src, size_t len, const json_t *ctx, char **out, size_t *olen, ts_err *err) {
  jinja_template *t;
  int rc = jinja_parse(&t, src, len, err);
  if (rc < 0) return rc;
  rc = jinja_render(t, ctx, out, olen, err);
  jinja_free(t);
  return rc;
}

static int batch(const char *path) {
  json_error_t je;
  json_t *cases = json_load_file(path, 0, &je);
  if (!json_is_array(cases)) {
    fprintf(stderr, "cannot read %s: %s\n", path, je.text);
    return 2;
  }
  json_t *results = json_array();
  size_t i;
  json_t *c;
  json_array_foreach(cases, i, c) {
    json_t *tpl = json_object_get(c, "template");
    ts_err err = {0};
    char *out = NULL;
    size_t olen = 0;
    int rc = render_one(json_string_value(tpl), json_string_length(tpl), json_object_get(c, "context"), &out, &olen,
                        &err);
    json_t *r = json_object();
    if (rc < 0) json_object_set_new(r, "error", json_string(err.msg));
    else json_object_set_new(r, "out", json_stringn(out, olen));
    free(out);
    json_array_append_new(results, r);
  }
  char *s = json_dumps(results, JSON_COMPACT);
  fputs(s, stdout);
  free(s);
  json_decref(results);
  json_decref(cases);
  return 0;
}

static const char *WORDS[] = {"hello", "world", "Qu'est-ce", "\"quoted\"", "naïve", "日本語", "line\nbreak",
                              "tab\there", "emoji 🎉", "<think>", "back\\slash", "  spaced  "};

static json_t *rand_text(test_rng *r, char *buf, size_t cap) {
  size_t n = 1 + test_rng_next(r) % 5, len = 0;
  buf[0] = 0;
  for (size_t i = 0; i < n; i++) {
    const char *w = WORDS[test_rng_next(r) % (sizeof WORDS / sizeof *WORDS)];
    len += (size_t)snprintf(buf + len, cap - len, "%s%s", i ? " " : "", w);
  }
  /* A unique marker so the check below can find this message in the prompt. */
  snprintf(buf + len, cap - len, " #%llu", (unsigned long long)(test_rng_next(r) % 1000000));
  return json_string(buf);
}

static void self_test(void) {
  static const char *tpls[] = {"Qwen-Qwen2.5-7B-Instruct.jinja", "Qwen-Qwen3-0.6B.jinja",
                               "meta-llama-Llama-3.1-8B-Instruct.jinja", "meta-llama-Llama-3.2-3B-Instruct.jinja"};
  test_rng rng = {0x9E3779B97F4A7C15ull};
  for (size_t k = 0; k < sizeof tpls / sizeof *tpls; k++) {
    char path[1024];
    snprintf(path, sizeof path, "%s/templates/%s", test_shared_dir(), tpls[k]);
    size_t len;
    char *src = read_file(path, &len);
    CHECK_MSG(src != NULL, "cannot read %s", path);
    if (!src) continue;
    jinja_template *t;
    ts_err err = {0};
    int rc = jinja_parse(&t, src, len, &err);
    CHECK_MSG(rc == 0, "%s: %s", tpls[k], err.msg);
    for (int trial = 0; rc == 0 && trial < 20; trial++) {
      json_t *msgs = json_array();
      int n = 1 + (int)(test_rng_next(&rng) % 6);
      char texts[8][256];
      if (test_rng_next(&rng) % 2) {
        json_array_append_new(msgs, json_pack("{s:s,s:o}", "role", "system", "content", rand_text(&rng, texts[7], 256)));
      }
      for (int i = 0; i < n; i++) {
        const char *role = i % 2 ? "assistant" : "user";
        json_array_append_new(msgs, json_pack("{s:s,s:o}", "role", role, "content", rand_text(&rng, texts[i], 256)));
      }
      json_t *ctx = json_pack("{s:o,s:b,s:s,s:s,s:s}", "messages", msgs, "add_generation_prompt",
                              (int)(test_rng_next(&rng) % 2), "bos_token", "<s>", "eos_token", "</s>", "date_string",
                              "26 Jul 2024");
      char *out = NULL;
      size_t olen;
      rc = jinja_render(t, ctx, &out, &olen, &err);
      CHECK_MSG(rc == 0, "%s: %s", tpls[k], err.msg);
      for (int i = 0; rc == 0 && i < n; i += 2) {
        /* The llama templates trim content; look for the unique marker. */
        const char *mark = strrchr(texts[i], '#');
        CHECK_MSG(strstr(out, mark) != NULL, "%s: user message %d (%s) missing from prompt", tpls[k], i, mark);
      }
      free(out);
      json_decref(ctx);
      rc = 0;
    }
    if (rc == 0) jinja_free(t);
    free(src);
  }
}

int main(int argc, char **argv) {
  if (argc == 3 && !strcmp(argv[1], "--batch")) return batch(argv[2]);
  if (argc == 3) {
    size_t len;
    char *src = read_file(argv[1], &len);
    json_error_t je;
    json_t *ctx = json_load_file(argv[2], 0, &je);
    if (!src || !ctx) {
      fprintf(stderr, "cannot read %s or %s\n", argv[1], argv[2]);
      return 2;
    }
    ts_err err = {0};
    char *out;
    size_t olen;
    int rc = render_one(src, len, ctx, &out, &olen, &err);
    free(src);
    json_decref(ctx);
    if (rc < 0) {
      fprintf(stderr, "%s\n", err.msg);
      return 1;
    }
    fwrite(out, 1, olen, stdout);
    free(out);
    return 0;
  }
  self_test();
  return test_finish("test_jinja_render");
}
