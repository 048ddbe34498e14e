/* libFuzzer target: GGUF parsing, the typed getters, string arrays and the model config read
 * from GGUF metadata, on arbitrary bytes. */
#include <stdlib.h>

#include "model/config.h"
#include "model/gguf.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  gguf_file *g = NULL;
  ts_err err;
  if (gguf_parse(&g, data, size, "fuzz.gguf", &err) != TS_OK) return 0;
  for (uint64_t i = 0; i < g->n_kv; i++) {
    const gguf_kv *kv = &g->kv[i];
    uint64_t u;
    double d;
    int b;
    gguf_str s;
    gguf_get_u64(g, kv->key, &u);
    gguf_get_f64(g, kv->key, &d);
    gguf_get_bool(g, kv->key, &b);
    gguf_get_str(g, kv->key, &s);
    if (kv->type == GGUF_TYPE_ARRAY && kv->arr_type == GGUF_TYPE_STRING) {
      gguf_str *strs = malloc((kv->arr_len ? kv->arr_len : 1) * sizeof *strs);
      if (strs) gguf_arr_strs(g, kv, strs, &err);
      free(strs);
    }
  }
  for (uint64_t i = 0; i < g->n_tensors; i++) {
    const gguf_tensor *t = &g->tensors[i];
    /* Touch the first and last byte of each placed tensor: out-of-range views would fault. */
    volatile uint8_t sink = 0;
    if (t->nbytes) sink ^= ((const uint8_t *)t->data)[0] ^ ((const uint8_t *)t->data)[t->nbytes - 1];
    (void)sink;
  }
  model_config cfg;
  config_from_gguf(&cfg, g, &err);
  gguf_close(g);
  return 0;
}
