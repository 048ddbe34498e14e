/* libFuzzer target: the safetensors header parser on arbitrary bytes; every parsed tensor's byte
 * range is touched so an out-of-bounds view faults under ASan. */
#include "model/safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  st_file *f = NULL;
  ts_err err;
  if (st_parse(&f, data, size, "fuzz.safetensors", &err) != TS_OK) return 0;
  volatile uint8_t sink = 0;
  for (int i = 0; i < f->n_tensors; i++) {
    const st_tensor *t = &f->tensors[i];
    if (st_find(f, t->name) == NULL) __builtin_trap();
    if (t->end > t->begin)
      sink ^= ((const uint8_t *)t->data)[0] ^ ((const uint8_t *)t->data)[t->end - t->begin - 1];
  }
  (void)sink;
  st_close(f);
  return 0;
}
