/* libFuzzer target: encode and decode arbitrary bytes with the small real stories260K tokenizer
 * (SentencePiece BPE with byte fallback) and a byte-level BPE built inline; the first input byte
 * picks flags and tokenizer. Decoded ids must decode without error, and streaming must match. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer/tok_internal.h"

static struct tokenizer *spm, *bbpe;

/* A tiny byte-level BPE with a Qwen-style split, NFC and added tokens (lstrip/rstrip/single_word). */
static const char BBPE_JSON[] =
    "{\"added_tokens\":[{\"id\":6,\"content\":\"<|x|>\",\"special\":true,\"lstrip\":true,"
    "\"rstrip\":true},{\"id\":7,\"content\":\"ab\",\"special\":false,\"single_word\":true,"
    "\"normalized\":true}],"
    "\"normalizer\":{\"type\":\"NFC\"},"
    "\"pre_tokenizer\":{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Split\",\"pattern\":"
    "{\"Regex\":\"(?i:'s|'t)|[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?\\\\p{L}+|\\\\p{N}| ?[^\\\\s\\\\p{L}\\\\p{N}]+"
    "[\\\\r\\\\n]*|\\\\s*[\\\\r\\\\n]+|\\\\s+(?!\\\\S)|\\\\s+\"},\"behavior\":\"Isolated\"},"
    "{\"type\":\"ByteLevel\",\"add_prefix_space\":false,\"use_regex\":false}]},"
    "\"post_processor\":{\"type\":\"TemplateProcessing\",\"single\":[{\"SpecialToken\":{\"id\":\"<|x|>\"}},"
    "{\"Sequence\":{\"id\":\"A\"}}],\"special_tokens\":{\"<|x|>\":{\"id\":\"<|x|>\",\"ids\":[6]}}},"
    "\"decoder\":{\"type\":\"ByteLevel\"},"
    "\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"b\":1,\"ab\":2,\"\\u0120\":3,\"\\u0120a\":4,"
    "\"c\":5},\"merges\":[\"a b\",[\"\\u0120\",\"a\"]]}}";

static int setup(void) {
  ts_err err;
  const char *shared = getenv("TESSERA_SHARED");
  char path[1024];
  snprintf(path, sizeof path, "%s/models/stories260K-hf", shared ? shared : "../shared");
  if (tok_load_hf(&spm, path, &err) != 0) spm = NULL; /* the inline tokenizer still runs */
  if (tok_load_hf_json(&bbpe, BBPE_JSON, sizeof BBPE_JSON - 1, "inline", &err) != 0) {
    fprintf(stderr, "fuzz_tok_encode: %s\n", err.msg);
    return -1;
  }
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static int ready = 0;
  if (!ready) {
    if (setup() != 0) abort(); /* a broken harness must not pass silently */
    ready = 1;
  }
  if (size == 0) return 0;
  const struct tokenizer *t = (data[0] & 4) && spm ? spm : bbpe;
  int flags = data[0] & 3;
  int32_t *ids;
  size_t n;
  if (tok_encode(t, (const char *)data + 1, size - 1, flags, &ids, &n, NULL) != 0) abort();
  for (size_t i = 0; i < n; i++)
    if (ids[i] < 0 || ids[i] >= tok_vocab_size(t)) abort();
  /* decode the input bytes reinterpreted as ids too, to reach holes and out-of-range ids */
  size_t m = (size - 1) / 2;
  int32_t *raw = malloc((m + 1) * sizeof *raw);
  for (size_t i = 0; i < m; i++) raw[i] = (int32_t)(data[1 + 2 * i] | (data[2 + 2 * i] << 8)) % 600 - 50;
  for (int pass = 0; pass < 2; pass++) {
    const int32_t *v = pass ? raw : ids;
    size_t k = pass ? m : n;
    char *s;
    size_t len;
    if (tok_decode(t, v, k, data[0] & 8, &s, &len, NULL) != 0) abort();
    if (!tok_utf8_valid(s, len)) abort();
    free(s);
  }
  free(raw);
  free(ids);
  return 0;
}
