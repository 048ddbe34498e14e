/* Prompts for the engine (tokenization, chat templates, context checks) and the JSON pieces of
 * OpenAI responses. Mirrors vLLM: completions add special tokens, chat does not (the template
 * writes them), and an explicit max_tokens that overflows the context is a 400. */
#include "server/openai.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "template/jinja.h"
#include "tokenizer/tokenizer.h"
#include "util/status.h"

/* vLLM's default max_tokens for /v1/completions (chat defaults to the rest of the context). */
#define OAI_DEFAULT_COMPLETION_TOKENS 16

char *oai_error_body(int status, const char *msg, const char *param) {
  const char *type = status == 400   ? "BadRequestError"
                     : status == 401 ? "AuthenticationError"
                     : status == 404 ? "NotFoundError"
                     : status == 405 ? "MethodNotAllowedError"
                     : status == 413 ? "RequestTooLargeError"
                     : status == 503 ? "ServiceUnavailableError"
                                     : "InternalServerError";
  json_t *e = json_pack("{s:{s:s, s:s, s:o, s:i}}", "error", "message", msg ? msg : "", "type",
                        type, "param", param && *param ? json_string(param) : json_null(),
                        "code", status);
  if (!e) return NULL;
  char *s = json_dumps(e, JSON_COMPACT);
  json_decref(e);
  return s;
}

static int fit_context(const oai_model *m, const srv_request *r, oai_prompt *p, srv_error *err) {
  long long n = (long long)p->n_ids;
  if (n == 0) return srv_fail(err, 400, r->kind == SRV_KIND_CHAT ? "messages" : "prompt",
                              "the prompt is empty after tokenization");
  if (n >= m->max_model_len)
    return srv_fail(err, 400, r->kind == SRV_KIND_CHAT ? "messages" : "prompt",
                    "This model's maximum context length is %d tokens. However, your request has "
                    "%lld input tokens. Please reduce the length of the input.",
                    m->max_model_len, n);
  long long room = m->max_model_len - n;
  if (r->max_tokens > 0) {
    if (r->max_tokens > room)
      return srv_fail(err, 400, "max_tokens",
                      "This model's maximum context length is %d tokens. However, you requested "
                      "%lld tokens (%lld in the input, %d in the completion). Please reduce the "
                      "length of the input or completion.",
                      m->max_model_len, n + r->max_tokens, n, r->max_tokens);
    p->max_tokens = r->max_tokens;
  } else if (r->max_tokens == 0) {
    /* Echo of the prompt alone: the engine still computes one token (as vLLM does), which the
     * response leaves out. */
    p->max_tokens = 1;
  } else if (r->kind == SRV_KIND_COMPLETION) {
    p->max_tokens = (int)(room < OAI_DEFAULT_COMPLETION_TOKENS ? room : OAI_DEFAULT_COMPLETION_TOKENS);
  } else {
    p->max_tokens = (int)room;
  }
  if (r->min_tokens > p->max_tokens)
    return srv_fail(err, 400, "min_tokens", "'min_tokens' (%d) exceeds the tokens left (%d)",
                    r->min_tokens, p->max_tokens);
  return 0;
}

static int encode(const oai_model *m, const char *text, size_t len, int add_special,
                  const char *param, int32_t **ids, size_t *n, srv_error *err) {
  ts_err te = {0};
  int flags = TOK_PARSE_SPECIAL | (add_special ? TOK_ADD_SPECIAL : 0);
  if (tok_encode(m->tok, text, len, flags, ids, n, &te) < 0)
    return srv_fail(err, 400, param, "cannot tokenize the prompt: %s", te.msg);
  return 0;
}

int oai_render_chat(const oai_model *m, const json_t *messages, const json_t *tools,
                    const json_t *kwargs, int add_generation_prompt, int continue_final_message,
                    char **text, size_t *len, srv_error *err) {
  if (!m->tmpl)
    return srv_fail(err, 400, "messages", "%s",
                    m->no_template_reason ? m->no_template_reason
                                          : "this model has no chat template; start the server "
                                            "with --chat-template FILE");
  const char *bos = tok_bos_token(m->tok), *eos = tok_eos_token(m->tok);
  json_t *ctx = json_object();
  if (!ctx) return srv_fail(err, 500, NULL, "out of memory");
  /* Request kwargs go first so that the fixed keys below win only where vLLM's do. */
  if (kwargs) json_object_update(ctx, (json_t *)kwargs);
  json_object_set(ctx, "messages", (json_t *)messages);
  if (!json_object_get(kwargs, "add_generation_prompt"))
    json_object_set_new(ctx, "add_generation_prompt", json_boolean(add_generation_prompt));
  if (!json_object_get(kwargs, "continue_final_message"))
    json_object_set_new(ctx, "continue_final_message", json_boolean(continue_final_message));
  if (tools && !json_object_get(kwargs, "tools")) json_object_set(ctx, "tools", (json_t *)tools);
  if (!json_object_get(kwargs, "bos_token")) json_object_set_new(ctx, "bos_token", json_string(bos ? bos : ""));
  if (!json_object_get(kwargs, "eos_token")) json_object_set_new(ctx, "eos_token", json_string(eos ? eos : ""));
  ts_err te = {0};
  char *out = NULL;
  size_t n = 0;
  int rc = jinja_render(m->tmpl, ctx, &out, &n, &te);
  json_decref(ctx);
  if (rc < 0) return srv_fail(err, 400, "messages", "chat template error: %s", te.msg);
  if (continue_final_message) {
    /* As vLLM: cut everything the template wrote after the final message's content, so the
     * model continues that message. */
    json_t *last = json_array_get(messages, json_array_size(messages) - 1);
    json_t *c = json_object_get(last, "content");
    const char *cs = json_string_value(c);
    size_t cl = json_string_length(c);
    char *hit = NULL;
    if (cs && cl > 0)
      for (char *p = out; (p = memmem(p, n - (size_t)(p - out), cs, cl)) != NULL; p++) hit = p;
    if (!hit) {
      free(out);
      return srv_fail(err, 400, "continue_final_message",
                      "the final message's content does not appear in the rendered prompt");
    }
    n = (size_t)(hit - out) + cl;
    out[n] = 0;
  }
  *text = out;
  *len = n;
  return 0;
}

int oai_prompts(const oai_model *m, const srv_request *r, oai_prompt **out, int *n_out,
                srv_error *err) {
  int n = r->kind == SRV_KIND_CHAT ? 1 : r->n_prompts;
  oai_prompt *p = calloc((size_t)n, sizeof *p);
  if (!p) return srv_fail(err, 500, NULL, "out of memory");
  if (r->kind == SRV_KIND_CHAT) {
    char *text;
    size_t len;
    if (oai_render_chat(m, r->messages, r->tools, r->template_kwargs, r->add_generation_prompt,
                        r->continue_final_message, &text, &len, err) < 0)
      goto fail;
    int rc = encode(m, text, len, r->add_special_tokens, "messages", &p[0].ids, &p[0].n_ids, err);
    free(text);
    if (rc < 0) goto fail;
  } else {
    for (int i = 0; i < n; i++) {
      const srv_prompt *sp = &r->prompts[i];
      if (sp->text) {
        if (encode(m, sp->text, sp->text_len, r->add_special_tokens, "prompt", &p[i].ids,
                   &p[i].n_ids, err) < 0)
          goto fail;
        if (r->echo) {
          p[i].text = strdup(sp->text);
          p[i].text_len = sp->text_len;
        }
      } else {
        p[i].ids = malloc(sp->n_ids * sizeof *p[i].ids);
        if (!p[i].ids) goto oom;
        memcpy(p[i].ids, sp->ids, sp->n_ids * sizeof *p[i].ids);
        p[i].n_ids = sp->n_ids;
        if (r->echo) {
          ts_err te = {0};
          if (tok_decode(m->tok, sp->ids, sp->n_ids, 0, &p[i].text, &p[i].text_len, &te) < 0) {
            srv_fail(err, 400, "prompt", "cannot decode the prompt: %s", te.msg);
            goto fail;
          }
        }
      }
      if (r->echo && !p[i].text) goto oom;
    }
  }
  for (int i = 0; i < n; i++)
    if (fit_context(m, r, &p[i], err) < 0) goto fail;
  *out = p;
  *n_out = n;
  return 0;
oom:
  srv_fail(err, 500, NULL, "out of memory");
fail:
  oai_prompts_free(p, n);
  return -1;
}

void oai_prompts_free(oai_prompt *p, int n) {
  if (!p) return;
  for (int i = 0; i < n; i++) {
    free(p[i].ids);
    free(p[i].text);
  }
  free(p);
}

char *oai_token_text(const struct tokenizer *tok, int32_t id) {
  char *s = NULL, *two = NULL;
  size_t len, len2;
  ts_err te = {0};
  if (tok_decode(tok, &id, 1, 0, &s, &len, &te) < 0 || !s) {
    free(s);
    const char *piece = tok_piece(tok, id);
    return strdup(piece ? piece : "");
  }
  /* A token decoded alone loses what decoders strip at the start of a text (SentencePiece's
   * leading space); decoded after a copy of itself it shows its text inside a sequence. */
  int32_t pair[2] = {id, id};
  if (tok_decode(tok, pair, 2, 0, &two, &len2, &te) == 0 && two && len2 >= len &&
      memcmp(two, s, len) == 0) {
    memmove(two, two + len, len2 - len + 1);
    free(s);
    return two;
  }
  free(two);
  return s;
}

/* Characters (code points) in a UTF-8 string, as Python's len() counts them for text_offset. */
static int utf8_chars(const char *s) {
  int n = 0;
  for (; *s; s++) n += ((unsigned char)*s & 0xC0) != 0x80;
  return n;
}

static json_t *bytes_of(const char *s) {
  json_t *a = json_array();
  for (; *s; s++) json_array_append_new(a, json_integer((unsigned char)*s));
  return a;
}

int oai_logprobs_append(const struct tokenizer *tok, int chat, const sample_result *s, int n,
                        int top_k, json_t **lp, int *offset) {
  if (!*lp) {
    *lp = chat ? json_pack("{s:[]}", "content")
               : json_pack("{s:[], s:[], s:[], s:[]}", "tokens", "token_logprobs", "top_logprobs",
                           "text_offset");
    if (!*lp) return -1;
  }
  for (int i = 0; i < n; i++) {
    char *t = oai_token_text(tok, s[i].token);
    if (!t) return -1;
    int k = s[i].n_top < top_k ? s[i].n_top : top_k;
    if (chat) {
      json_t *tops = json_array();
      for (int j = 0; j < k; j++) {
        char *tt = oai_token_text(tok, s[i].top_ids[j]);
        if (!tt) continue;
        json_array_append_new(tops, json_pack("{s:s, s:f, s:o}", "token", tt, "logprob",
                                              (double)s[i].top_logprobs[j], "bytes", bytes_of(tt)));
        free(tt);
      }
      json_array_append_new(json_object_get(*lp, "content"),
                            json_pack("{s:s, s:f, s:o, s:o}", "token", t, "logprob",
                                      (double)s[i].logprob, "bytes", bytes_of(t), "top_logprobs",
                                      tops));
    } else {
      json_array_append_new(json_object_get(*lp, "tokens"), json_string(t));
      json_array_append_new(json_object_get(*lp, "token_logprobs"), json_real(s[i].logprob));
      json_t *tops = json_object();
      /* The sampled token is always among the top entries, as vLLM reports it. */
      json_object_set_new(tops, t, json_real(s[i].logprob));
      for (int j = 0; j < k; j++) {
        char *tt = oai_token_text(tok, s[i].top_ids[j]);
        if (!tt) continue;
        json_object_set_new(tops, tt, json_real(s[i].top_logprobs[j]));
        free(tt);
      }
      json_array_append_new(json_object_get(*lp, "top_logprobs"), tops);
      json_array_append_new(json_object_get(*lp, "text_offset"), json_integer(*offset));
      *offset += utf8_chars(t);
    }
    free(t);
  }
  return 0;
}

int oai_prompt_logprobs_append(const struct tokenizer *tok, const sample_result *plp, int n,
                                int top_k, json_t **lp, int *offset) {
  if (n <= 0) return 0;
  if (!*lp) {
    *lp = json_pack("{s:[], s:[], s:[], s:[]}", "tokens", "token_logprobs", "top_logprobs",
                    "text_offset");
    if (!*lp) return -1;
  }
  /* The first prompt token has nothing before it: no logprob and no top list, as in vLLM. */
  char *t = oai_token_text(tok, plp[0].token);
  if (!t) return -1;
  json_array_append_new(json_object_get(*lp, "tokens"), json_string(t));
  json_array_append_new(json_object_get(*lp, "token_logprobs"), json_null());
  json_array_append_new(json_object_get(*lp, "top_logprobs"), json_null());
  json_array_append_new(json_object_get(*lp, "text_offset"), json_integer(*offset));
  *offset += utf8_chars(t);
  free(t);
  return oai_logprobs_append(tok, 0, plp + 1, n - 1, top_k, lp, offset);
}

/* vLLM clamps -inf (a masked token) to the value OpenAI uses for it. */
static double clamp_lp(float x) { return x > -9999.0f ? (double)x : -9999.0; }

static json_t *plp_entry(const struct tokenizer *tok, float logprob, int rank, int32_t id) {
  char *t = oai_token_text(tok, id);
  json_t *o = json_pack("{s:f, s:i, s:s}", "logprob", clamp_lp(logprob), "rank", rank,
                        "decoded_token", t ? t : "");
  free(t);
  return o;
}

json_t *oai_prompt_logprobs_json(const struct tokenizer *tok, const sample_result *plp, int n,
                                 int top_k) {
  json_t *a = json_array();
  if (!a) return NULL;
  for (int i = 0; i < n; i++) {
    if (i == 0) {
      json_array_append_new(a, json_null());
      continue;
    }
    const sample_result *s = &plp[i];
    json_t *o = json_object();
    char key[16];
    /* The prompt token first with its rank, then the top k ranked 1..k (a top token that is the
     * prompt token keeps its first entry). */
    snprintf(key, sizeof key, "%d", (int)s->token);
    json_object_set_new(o, key, plp_entry(tok, s->logprob, s->rank, s->token));
    int k = s->n_top < top_k ? s->n_top : top_k;
    for (int j = 0; j < k; j++) {
      snprintf(key, sizeof key, "%d", (int)s->top_ids[j]);
      if (!json_object_get(o, key))
        json_object_set_new(o, key, plp_entry(tok, s->top_logprobs[j], j + 1, s->top_ids[j]));
    }
    json_array_append_new(a, o);
  }
  return a;
}

json_t *oai_usage(long long prompt, long long completion, long long cached) {
  return json_pack("{s:I, s:I, s:I, s:{s:I}}", "prompt_tokens", (json_int_t)prompt,
                   "completion_tokens", (json_int_t)completion, "total_tokens",
                   (json_int_t)(prompt + completion), "prompt_tokens_details", "cached_tokens",
                   (json_int_t)cached);
}

void oai_request_id(char *out, size_t cap, const char *prefix) {
  /* Unique, not secret: a counter mixed with the start time through splitmix64. */
  static _Atomic unsigned long long counter;
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  unsigned long long x = (unsigned long long)ts.tv_nsec ^ ((unsigned long long)ts.tv_sec << 30);
  x += 0x9E3779B97F4A7C15ULL * ++counter;
  unsigned long long h[2];
  for (int i = 0; i < 2; i++) {
    unsigned long long z = (x += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    h[i] = z ^ (z >> 31);
  }
  snprintf(out, cap, "%s%016llx%016llx", prefix, h[0], h[1]);
}
