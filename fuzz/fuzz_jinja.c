/* libFuzzer target for the chat-template engine: parse arbitrary bytes as a template and render
 * it over a fixed chat context, under small output, memory, step and depth limits so no input can
 * hang the fuzzer or exhaust its stack. */
#include <stdint.h>
#include <stdlib.h>

#include "template/jinja_internal.h"

static json_t *g_ctx;

static json_t *make_ctx(void) {
  json_error_t je;
  return json_loads(
      "{\"messages\": ["
      "{\"role\": \"system\", \"content\": \"You are helpful.\"},"
      "{\"role\": \"user\", \"content\": \"Hi <think> \\u00e9 \\\"q\\\"\\n\"},"
      "{\"role\": \"assistant\", \"content\": \"<think>\\nr\\n</think>\\n\\nok\", \"reasoning_content\": null,"
      " \"tool_calls\": [{\"type\": \"function\", \"function\": {\"name\": \"f\", \"arguments\": {\"a\": 1.5, \"b\": [true, null]}}}]},"
      "{\"role\": \"tool\", \"content\": \"{\\\"r\\\": 2}\"},"
      "{\"role\": \"user\", \"content\": \"\"}],"
      "\"tools\": [{\"type\": \"function\", \"function\": {\"name\": \"f\", \"parameters\": {\"type\": \"object\"}}}],"
      "\"add_generation_prompt\": true, \"enable_thinking\": false, \"bos_token\": \"<s>\", \"eos_token\": \"</s>\"}",
      0, &je);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (!g_ctx) g_ctx = make_ctx();
  if (size > 1 << 16) return 0;
  jinja_template *t = NULL;
  ts_err err = {0};
  if (jinja_parse(&t, (const char *)data, size, &err) < 0) return 0;
  jinja_limits lim = {.max_output = 1 << 20, .max_memory = 64u << 20, .max_steps = 200000, .max_depth = 16};
  char *out = NULL;
  size_t len = 0;
  if (jinja_render_limited(t, g_ctx, &lim, &out, &len, &err) == 0) {
    /* The output must be the length it claims and NUL-terminated. */
    if (out[len] != 0) abort();
  }
  free(out);
  jinja_free(t);
  return 0;
}
