/* libFuzzer target: config.json and generation_config.json parsing on arbitrary text. */
#include "model/config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  model_config cfg;
  ts_err err;
  if (config_from_hf_json(&cfg, (const char *)data, size, "config.json", &err) == TS_OK) {
    model_shard s = model_shard_default(&cfg, 0, 2, 1, 2);
    model_shard_validate(&cfg, &s, &err);
  }
  config_apply_generation_json(&cfg, (const char *)data, size, "generation_config.json", &err);
  return 0;
}
