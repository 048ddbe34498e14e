/* Tokenizer unit tests: tok_stream against tok_decode on random id sequences (every shared
 * tokenizer), the stories260K GGUF vocabulary against its tokenizer.json twin on random strings,
 * config accessors, and load errors. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_util.h"
#include "tokenizer/tokenizer.h"

static tokenizer *load(const char *rel) {
  char path[1024];
  snprintf(path, sizeof path, "%s/%s", test_shared_dir(), rel);
  tokenizer *t = NULL;
  ts_err err = {0};
  int rc = tok_load_path(&t, path, &err);
  CHECK_MSG(rc == 0, "%s: %s", rel, err.msg);
  return rc ? NULL : t;
}

/* Random ids, biased towards byte tokens / specials so incomplete UTF-8 and skipping happen. */
static size_t random_ids(test_rng *r, const tokenizer *t, int32_t *ids, size_t max) {
  size_t n = test_rng_next(r) % max;
  int v = tok_vocab_size(t);
  for (size_t i = 0; i < n; i++) {
    uint64_t k = test_rng_next(r) % 10;
    if (k == 0) ids[i] = (int32_t)(v - 1 - (int)(test_rng_next(r) % 300)); /* added tokens */
    else if (k == 1) ids[i] = (int32_t)(3 + test_rng_next(r) % 256);       /* SPM bytes */
    else if (k == 2) ids[i] = (int32_t)(test_rng_next(r) % 256);           /* BPE single bytes */
    else if (k == 3) ids[i] = (int32_t)(v + (int)(test_rng_next(r) % 5));  /* out of range */
    else ids[i] = (int32_t)(test_rng_next(r) % (uint64_t)v);
    if (ids[i] < 0) ids[i] = 0;
  }
  return n;
}

static void check_stream(const char *name, const tokenizer *t, uint64_t seed) {
  test_rng r = {seed};
  int32_t ids[64];
  int mismatches = 0;
  for (int iter = 0; iter < 3000; iter++) {
    size_t n = random_ids(&r, t, ids, 64);
    int skip = (int)(test_rng_next(&r) & 1);
    char *full;
    size_t full_len;
    ts_err err = {0};
    if (tok_decode(t, ids, n, skip, &full, &full_len, &err)) {
      CHECK_MSG(0, "%s: %s", name, err.msg);
      return;
    }
    tok_stream *s;
    CHECK(tok_stream_create(&s, t, skip) == 0);
    char *acc = malloc(full_len + 1024);
    size_t acc_len = 0;
    int complete = 1;
    for (size_t i = 0; i <= n; i++) {
      const char *p;
      size_t l;
      int rc = i < n ? tok_stream_push(s, ids[i], &p, &l) : tok_stream_flush(s, &p, &l);
      CHECK(rc == 0);
      /* each piece is complete UTF-8 on its own */
      char *tmp = malloc(l + 1);
      memcpy(tmp, p, l);
      for (size_t q = 0; q < l;) {
        unsigned c = (unsigned char)tmp[q];
        size_t need = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
        if (q + need > l) complete = 0;
        q += need;
      }
      free(tmp);
      if (acc_len + l <= full_len + 1000) memcpy(acc + acc_len, p, l);
      acc_len += l;
    }
    if (acc_len != full_len || memcmp(acc, full, full_len) || !complete) mismatches++;
    tok_stream_free(s);
    free(acc);
    free(full);
  }
  CHECK_MSG(mismatches == 0, "%s: %d stream/decode mismatches", name, mismatches);
}

/* Random text over a small alphabet that exercises spaces, bytes and specials. */
static size_t random_text(test_rng *r, char *buf, size_t cap) {
  static const char *parts[] = {"Once", " upon", " a", " time", ",", " ", "  ", "\n", "Lily",
                                "'s", " ball", "\xC3\xA9", "\xE6\x97\xA5\xE6\x9C\xAC", "\xF0\x9F\x98\x80",
                                "<s>", "</s>", "<unk>", "12", "!", "x", "\t", "\xE2\x96\x81"};
  size_t n = 0, k = test_rng_next(r) % 20;
  for (size_t i = 0; i < k; i++) {
    const char *p = parts[test_rng_next(r) % (sizeof parts / sizeof parts[0])];
    size_t l = strlen(p);
    if (n + l >= cap) break;
    memcpy(buf + n, p, l);
    n += l;
  }
  if (n + 1 < cap && test_rng_next(r) % 8 == 0) buf[n++] = (char)(0x80 + test_rng_next(r) % 0x80);
  buf[n] = '\0';
  return n;
}

static void check_gguf_twin(const tokenizer *hf, const tokenizer *gg) {
  CHECK(tok_vocab_size(hf) == tok_vocab_size(gg));
  CHECK(tok_bos_id(hf) == tok_bos_id(gg));
  CHECK(tok_eos_id(hf) == tok_eos_id(gg));
  for (int i = 0; i < tok_vocab_size(hf); i++)
    CHECK_MSG(!strcmp(tok_piece(hf, i), tok_piece(gg, i)), "piece %d differs", i);
  test_rng r = {0x9e3779b97f4a7c15ULL};
  int diffs = 0;
  for (int iter = 0; iter < 5000; iter++) {
    char text[512];
    size_t n = random_text(&r, text, sizeof text);
    int flags = (int)(test_rng_next(&r) % 4);
    int32_t *a, *b;
    size_t na, nb;
    CHECK(tok_encode(hf, text, n, flags, &a, &na, NULL) == 0);
    CHECK(tok_encode(gg, text, n, flags, &b, &nb, NULL) == 0);
    if (na != nb || memcmp(a, b, na * sizeof *a)) {
      if (diffs++ < 3) fprintf(stderr, "gguf/hf differ on '%s' (flags %d)\n", text, flags);
    }
    char *da, *db;
    CHECK(tok_decode(hf, a, na, 0, &da, NULL, NULL) == 0);
    CHECK(tok_decode(gg, a, na, 0, &db, NULL, NULL) == 0);
    CHECK(!strcmp(da, db));
    free(da);
    free(db);
    free(a);
    free(b);
  }
  CHECK_MSG(diffs == 0, "%d strings encode differently", diffs);
}

static void check_accessors(void) {
  tokenizer *q = load("tokenizers/qwen3");
  if (q) {
    CHECK(tok_bos_id(q) == -1);
    CHECK(tok_eos_token(q) && !strcmp(tok_eos_token(q), "<|im_end|>"));
    CHECK(tok_chat_template(q) && strstr(tok_chat_template(q), "im_start"));
    CHECK(tok_is_special(q, 151643) && !tok_is_special(q, 151657)); /* <tool_call> is not */
    int32_t *ids;
    size_t n;
    CHECK(tok_encode(q, "<|im_start|>", 12, TOK_PARSE_SPECIAL | TOK_ADD_SPECIAL, &ids, &n, NULL) == 0);
    CHECK(n == 1 && ids[0] == 151644);
    free(ids);
    tok_free(q);
  }
  tokenizer *s = load("models/stories260K-hf");
  if (s) {
    const int32_t *eos;
    CHECK(tok_eos_ids(s, &eos) == 1 && eos[0] == 2);
    CHECK(tok_bos_id(s) == 1 && !strcmp(tok_bos_token(s), "<s>"));
    CHECK(tok_piece(s, 5000) == NULL);
    tok_free(s);
  }
  tokenizer *t = NULL;
  ts_err err = {0};
  char path[1024];
  snprintf(path, sizeof path, "%s/no-such-dir", test_shared_dir());
  CHECK(tok_load_path(&t, path, &err) != 0 && strstr(err.msg, "no-such-dir"));
  snprintf(path, sizeof path, "%s/models", test_shared_dir());
  CHECK(tok_load_path(&t, path, &err) != 0 && strstr(err.msg, "tokenizer.json"));
}

int main(void) {
  const char *dirs[] = {"tokenizers/qwen3", "tokenizers/llama3", "models/stories260K-hf",
                        "models/stories260K/stories260K.gguf"};
  for (size_t i = 0; i < sizeof dirs / sizeof dirs[0]; i++) {
    tokenizer *t = load(dirs[i]);
    if (t) check_stream(dirs[i], t, 0x1234567ULL + i);
    tok_free(t);
  }
  tokenizer *hf = load("models/stories260K-hf");
  tokenizer *gg = load("models/stories260K/stories260K.gguf");
  if (hf && gg) check_gguf_twin(hf, gg);
  tok_free(hf);
  tok_free(gg);
  check_accessors();
  return test_finish("test_tok");
}
