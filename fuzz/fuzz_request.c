/* libFuzzer target: the request layer (JSON body -> validated srv_request) on arbitrary bytes.
 * The first byte picks the route (completion, chat, tokenize, detokenize); the rest is the body.
 * Checks the invariants the HTTP layer relies on, not just the absence of crashes. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "server/request.h"

static void check(int cond) {
  if (!cond) __builtin_trap();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1) return 0;
  int which = data[0] & 3;
  const char *body = (const char *)data + 1;
  size_t len = size - 1;
  srv_limits lim = {.vocab_size = 512, .max_model_len = 256, .max_logprobs = 20, .max_n = 16};
  srv_error err;
  memset(&err, 0, sizeof err);
  if (which < 2) {
    srv_request r;
    int rc = srv_request_parse(body, len, which ? SRV_KIND_CHAT : SRV_KIND_COMPLETION, &lim, &r,
                               &err);
    if (rc == 0) {
      check(r.n >= 1 && r.n <= lim.max_n);
      check(r.max_tokens == -1 || (r.max_tokens >= 1 && r.max_tokens <= lim.max_model_len) ||
            (r.max_tokens == 0 && which == 0 && r.echo));
      check(r.logprobs >= -1 && r.logprobs <= lim.max_logprobs);
      check(r.prompt_logprobs >= -1 && r.prompt_logprobs <= lim.max_logprobs);
      check(!r.stream || r.prompt_logprobs <= 0);
      check(r.sampling.temperature >= 0 && r.sampling.top_p > 0 && r.sampling.top_p <= 1);
      check(r.sampling.repetition_penalty > 0);
      for (int i = 0; i < r.n_stop; i++) check(r.stop[i] && r.stop[i][0]);
      for (int i = 0; i < r.n_bias; i++)
        check(r.bias_ids[i] >= 0 && r.bias_ids[i] < lim.vocab_size);
      for (int i = 0; i < r.n_stop_token_ids; i++)
        check(r.stop_token_ids[i] >= 0 && r.stop_token_ids[i] < lim.vocab_size);
      if (which == 0) {
        check(r.n_prompts >= 1 && r.prompts);
        for (int i = 0; i < r.n_prompts; i++) {
          const srv_prompt *p = &r.prompts[i];
          check((p->text != NULL) != (p->ids != NULL));
          if (p->text) check(strlen(p->text) == p->text_len);
          for (size_t j = 0; p->ids && j < p->n_ids; j++)
            check(p->ids[j] >= 0 && p->ids[j] < lim.vocab_size);
        }
      } else {
        check(json_is_array(r.messages) && json_array_size(r.messages) > 0);
        size_t i;
        json_t *m;
        json_array_foreach(r.messages, i, m) {
          json_t *c = json_object_get(m, "content");
          check(json_is_string(json_object_get(m, "role")));
          check(!c || json_is_string(c) || json_is_null(c));
        }
      }
    } else {
      check(err.status >= 400 && err.status < 600 && err.msg[0]);
    }
    srv_request_free(&r);
  } else {
    srv_tok_request t;
    int rc = srv_tokenize_parse(body, len, which == 3, &lim, &t, &err);
    if (rc == 0 && which == 3)
      for (size_t j = 0; j < t.n_ids; j++) check(t.ids[j] >= 0 && t.ids[j] < lim.vocab_size);
    if (rc == 0 && which == 2) check(t.prompt || t.messages);
    if (rc != 0) check(err.status >= 400 && err.msg[0]);
    srv_tok_request_free(&t);
  }
  return 0;
}
