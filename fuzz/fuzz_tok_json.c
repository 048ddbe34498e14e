/* libFuzzer target: tokenizer.json loading from arbitrary bytes, then a short encode/decode with
 * whatever loaded. */
#include <stdint.h>
#include <stdlib.h>

#include "tokenizer/tok_internal.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  struct tokenizer *t;
  ts_err err;
  if (tok_load_hf_json(&t, (const char *)data, size, "fuzz.json", &err) != 0) return 0;
  static const char text[] = "Hello world <s> 123 \xC3\xA9\xE2\x96\x81 \xFF";
  int32_t *ids;
  size_t n;
  if (tok_encode(t, text, sizeof text - 1, TOK_ADD_SPECIAL | TOK_PARSE_SPECIAL, &ids, &n, NULL) == 0) {
    char *s;
    if (tok_decode(t, ids, n, 0, &s, NULL, NULL) == 0) free(s);
    free(ids);
  }
  tok_free(t);
  return 0;
}
