/* JSON bodies of /v1/completions, /v1/chat/completions, /tokenize and /detokenize -> validated
 * requests. Field names, defaults and ranges follow vLLM's OpenAI server; unknown fields are
 * ignored (vLLM logs and ignores them). */
#include "server/request.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SRV_MAX_PROMPTS 1024
#define SRV_MAX_STOP 64

int srv_fail(srv_error *err, int status, const char *param, const char *fmt, ...) {
  if (!err) return -1;
  err->status = status;
  snprintf(err->param, sizeof err->param, "%s", param ? param : "");
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err->msg, sizeof err->msg, fmt, ap);
  va_end(ap);
  return -1;
}

/* A present field: absent and JSON null both read as "not given", as OpenAI's API treats them. */
static json_t *field(const json_t *o, const char *key) {
  json_t *v = json_object_get(o, key);
  return json_is_null(v) ? NULL : v;
}

static int get_bool(const json_t *o, const char *key, int *out, srv_error *err) {
  json_t *v = field(o, key);
  if (!v) return 0;
  if (!json_is_boolean(v)) return srv_fail(err, 400, key, "'%s' must be a boolean", key);
  *out = json_is_true(v);
  return 0;
}

/* Integers within [lo, hi]; a real with an integral value (e.g. 16.0) is accepted as pydantic does. */
static int get_int(const json_t *o, const char *key, long long lo, long long hi, long long *out,
                   int *given, srv_error *err) {
  json_t *v = field(o, key);
  if (given) *given = v != NULL;
  if (!v) return 0;
  long long x;
  if (json_is_integer(v)) {
    x = json_integer_value(v);
  } else if (json_is_real(v) && json_real_value(v) == floor(json_real_value(v)) &&
             fabs(json_real_value(v)) < 9e15) {
    x = (long long)json_real_value(v);
  } else {
    return srv_fail(err, 400, key, "'%s' must be an integer", key);
  }
  if (x < lo || x > hi)
    return srv_fail(err, 400, key, "'%s' must be in [%lld, %lld], got %lld", key, lo, hi, x);
  *out = x;
  return 0;
}

static int get_num(const json_t *o, const char *key, double lo, double hi, int lo_open,
                   double *out, srv_error *err) {
  json_t *v = field(o, key);
  if (!v) return 0;
  if (!json_is_number(v)) return srv_fail(err, 400, key, "'%s' must be a number", key);
  double x = json_number_value(v);
  if (!isfinite(x) || x < lo || x > hi || (lo_open && x == lo))
    return srv_fail(err, 400, key, "'%s' must be in %c%g, %g], got %g", key, lo_open ? '(' : '[',
                    lo, hi, x);
  *out = x;
  return 0;
}

static char *dup_n(const char *s, size_t n) {
  char *d = malloc(n + 1);
  if (!d) return NULL;
  memcpy(d, s, n);
  d[n] = 0;
  return d;
}

/* Reads an array of token ids in [0, vocab). */
static int get_ids(const json_t *a, const char *param, const srv_limits *lim, int32_t **out,
                   size_t *n_out, srv_error *err) {
  size_t n = json_array_size(a);
  int32_t *ids = malloc((n ? n : 1) * sizeof *ids);
  if (!ids) return srv_fail(err, 500, param, "out of memory");
  for (size_t i = 0; i < n; i++) {
    json_t *x = json_array_get(a, i);
    if (!json_is_integer(x)) {
      free(ids);
      return srv_fail(err, 400, param, "'%s' must hold integer token ids", param);
    }
    json_int_t id = json_integer_value(x);
    if (id < 0 || id >= lim->vocab_size) {
      free(ids);
      return srv_fail(err, 400, param, "token id %lld in '%s' is out of range [0, %d)",
                      (long long)id, param, lim->vocab_size);
    }
    ids[i] = (int32_t)id;
  }
  *out = ids;
  *n_out = n;
  return 0;
}

static int parse_prompts(const json_t *body, const srv_limits *lim, srv_request *r,
                         srv_error *err) {
  json_t *p = field(body, "prompt");
  if (!p) return srv_fail(err, 400, "prompt", "'prompt' is required");
  const json_t *items[SRV_MAX_PROMPTS];
  size_t n = 0;
  int single_ids = 0;
  if (json_is_string(p)) {
    items[n++] = p;
  } else if (json_is_array(p)) {
    size_t m = json_array_size(p);
    if (m == 0) return srv_fail(err, 400, "prompt", "'prompt' must not be empty");
    if (json_is_integer(json_array_get(p, 0))) {
      single_ids = 1;
      items[n++] = p;
    } else {
      if (m > SRV_MAX_PROMPTS)
        return srv_fail(err, 400, "prompt", "at most %d prompts per request", SRV_MAX_PROMPTS);
      for (size_t i = 0; i < m; i++) items[n++] = json_array_get(p, i);
    }
  } else {
    return srv_fail(err, 400, "prompt",
                    "'prompt' must be a string, a list of strings, a list of token ids or a "
                    "list of token id lists");
  }
  r->prompts = calloc(n, sizeof *r->prompts);
  if (!r->prompts) return srv_fail(err, 500, "prompt", "out of memory");
  r->n_prompts = (int)n;
  for (size_t i = 0; i < n; i++) {
    const json_t *it = items[i];
    srv_prompt *sp = &r->prompts[i];
    if (json_is_string(it)) {
      sp->text_len = json_string_length(it);
      sp->text = dup_n(json_string_value(it), sp->text_len);
      if (!sp->text) return srv_fail(err, 500, "prompt", "out of memory");
    } else if (json_is_array(it) && (single_ids || json_array_size(it) > 0)) {
      if (get_ids(it, "prompt", lim, &sp->ids, &sp->n_ids, err)) return -1;
    } else if (json_is_array(it)) {
      return srv_fail(err, 400, "prompt", "a token id prompt must not be empty");
    } else {
      return srv_fail(err, 400, "prompt", "every prompt in the list must be a string or token ids");
    }
  }
  return 0;
}

/* Copies messages, turning content part lists into one string (text parts joined by "\n", as
 * vLLM does for templates that expect string content). */
static int parse_messages(const json_t *body, const char *key, json_t **out, srv_error *err) {
  json_t *m = field(body, key);
  if (!m) return srv_fail(err, 400, key, "'%s' is required", key);
  if (!json_is_array(m) || json_array_size(m) == 0)
    return srv_fail(err, 400, key, "'%s' must be a non-empty list of messages", key);
  json_t *copy = json_array();
  if (!copy) return srv_fail(err, 500, key, "out of memory");
  size_t i;
  json_t *msg;
  json_array_foreach(m, i, msg) {
    if (!json_is_object(msg)) goto bad_msg;
    json_t *role = json_object_get(msg, "role");
    if (!json_is_string(role)) {
      json_decref(copy);
      return srv_fail(err, 400, key, "message %zu has no string 'role'", i);
    }
    json_t *c = json_object_get(msg, "content");
    json_t *nc = NULL;
    if (json_is_array(c)) {
      size_t total = 0, j;
      json_t *part;
      json_array_foreach(c, j, part) {
        json_t *type = json_object_get(part, "type");
        json_t *text = json_object_get(part, "text");
        if (!json_is_string(type) || strcmp(json_string_value(type), "text") != 0 ||
            !json_is_string(text)) {
          json_decref(copy);
          return srv_fail(err, 400, key,
                          "message %zu: only content parts of type 'text' are supported", i);
        }
        total += json_string_length(text) + 1;
      }
      char *buf = malloc(total + 1), *w = buf;
      if (!buf) goto oom;
      json_array_foreach(c, j, part) {
        json_t *text = json_object_get(part, "text");
        if (j) *w++ = '\n';
        memcpy(w, json_string_value(text), json_string_length(text));
        w += json_string_length(text);
      }
      nc = json_stringn_nocheck(buf, (size_t)(w - buf));
      free(buf);
      if (!nc) goto oom;
    } else if (c && !json_is_string(c) && !json_is_null(c)) {
      json_decref(copy);
      return srv_fail(err, 400, key, "message %zu: 'content' must be a string or a list of parts",
                      i);
    }
    json_t *mc = json_copy(msg);
    if (!mc) goto oom;
    if (nc) json_object_set_new(mc, "content", nc);
    json_array_append_new(copy, mc);
  }
  *out = copy;
  return 0;
bad_msg:
  json_decref(copy);
  return srv_fail(err, 400, key, "every message must be an object");
oom:
  json_decref(copy);
  return srv_fail(err, 500, key, "out of memory");
}

static int parse_stop(const json_t *body, const srv_limits *lim, srv_request *r, srv_error *err) {
  json_t *s = field(body, "stop");
  if (s) {
    size_t n = json_is_string(s) ? 1 : json_is_array(s) ? json_array_size(s) : (size_t)-1;
    if (n == (size_t)-1)
      return srv_fail(err, 400, "stop", "'stop' must be a string or a list of strings");
    if (n > SRV_MAX_STOP) return srv_fail(err, 400, "stop", "at most %d stop strings", SRV_MAX_STOP);
    r->stop = calloc(n ? n : 1, sizeof *r->stop);
    if (!r->stop) return srv_fail(err, 500, "stop", "out of memory");
    for (size_t i = 0; i < n; i++) {
      json_t *x = json_is_string(s) ? s : json_array_get(s, i);
      if (!json_is_string(x)) return srv_fail(err, 400, "stop", "every stop must be a string");
      if (json_string_length(x) == 0 || strlen(json_string_value(x)) != json_string_length(x))
        return srv_fail(err, 400, "stop", "stop strings must be non-empty and contain no NUL");
      r->stop[i] = dup_n(json_string_value(x), json_string_length(x));
      if (!r->stop[i]) return srv_fail(err, 500, "stop", "out of memory");
      r->n_stop = (int)i + 1;
    }
  }
  json_t *st = field(body, "stop_token_ids");
  if (st) {
    if (!json_is_array(st))
      return srv_fail(err, 400, "stop_token_ids", "'stop_token_ids' must be a list of token ids");
    size_t n;
    if (get_ids(st, "stop_token_ids", lim, &r->stop_token_ids, &n, err)) return -1;
    r->n_stop_token_ids = (int)n;
  }
  return 0;
}

static int parse_logit_bias(const json_t *body, const srv_limits *lim, srv_request *r,
                            srv_error *err) {
  json_t *b = field(body, "logit_bias");
  if (!b) return 0;
  if (!json_is_object(b))
    return srv_fail(err, 400, "logit_bias", "'logit_bias' must map token ids to numbers");
  size_t n = json_object_size(b);
  r->bias_ids = malloc((n ? n : 1) * sizeof *r->bias_ids);
  r->bias = malloc((n ? n : 1) * sizeof *r->bias);
  if (!r->bias_ids || !r->bias) return srv_fail(err, 500, "logit_bias", "out of memory");
  const char *k;
  json_t *v;
  json_object_foreach(b, k, v) {
    char *end;
    long long id = strtoll(k, &end, 10);
    if (!*k || *end || id < 0 || id >= lim->vocab_size)
      return srv_fail(err, 400, "logit_bias", "logit_bias key '%.40s' is not a token id in [0, %d)",
                      k, lim->vocab_size);
    if (!json_is_number(v) || !isfinite(json_number_value(v)) ||
        fabs(json_number_value(v)) > 100)
      return srv_fail(err, 400, "logit_bias", "logit_bias values must be numbers in [-100, 100]");
    r->bias_ids[r->n_bias] = (int32_t)id;
    r->bias[r->n_bias] = (float)json_number_value(v);
    r->n_bias++;
  }
  return 0;
}

static int parse_sampling(const json_t *body, srv_request *r, srv_error *err) {
  sampling_params *sp = &r->sampling;
  double x;
  long long i;
  int given;
  x = 1.0;
  if (get_num(body, "temperature", 0, 1e6, 0, &x, err)) return -1;
  sp->temperature = (float)x;
  x = 1.0;
  if (get_num(body, "top_p", 0, 1, 1, &x, err)) return -1;
  sp->top_p = (float)x;
  i = -1;
  if (get_int(body, "top_k", -1, 1 << 30, &i, NULL, err)) return -1;
  sp->top_k = (int)i;
  x = 0;
  if (get_num(body, "min_p", 0, 1, 0, &x, err)) return -1;
  sp->min_p = (float)x;
  x = 0;
  if (get_num(body, "presence_penalty", -2, 2, 0, &x, err)) return -1;
  sp->presence_penalty = (float)x;
  x = 0;
  if (get_num(body, "frequency_penalty", -2, 2, 0, &x, err)) return -1;
  sp->frequency_penalty = (float)x;
  x = 1;
  if (get_num(body, "repetition_penalty", 0, 1e6, 1, &x, err)) return -1;
  sp->repetition_penalty = (float)x;
  i = 0;
  if (get_int(body, "seed", INT64_MIN, INT64_MAX, &i, &given, err)) return -1;
  sp->seed = (uint64_t)i;
  sp->has_seed = given;
  return 0;
}

static int parse_common(const json_t *body, const srv_limits *lim, srv_request *r,
                        srv_error *err) {
  json_t *m = field(body, "model");
  if (m) {
    if (!json_is_string(m)) return srv_fail(err, 400, "model", "'model' must be a string");
    r->model = dup_n(json_string_value(m), json_string_length(m));
    if (!r->model) return srv_fail(err, 500, "model", "out of memory");
  }
  if (get_bool(body, "stream", &r->stream, err)) return -1;
  json_t *so = field(body, "stream_options");
  if (so) {
    if (!json_is_object(so))
      return srv_fail(err, 400, "stream_options", "'stream_options' must be an object");
    if (!r->stream)
      return srv_fail(err, 400, "stream_options",
                      "'stream_options' can only be given when 'stream' is true");
    if (get_bool(so, "include_usage", &r->include_usage, err)) return -1;
  }
  long long v = 1;
  if (get_int(body, "n", 1, lim->max_n, &v, NULL, err)) return -1;
  r->n = (int)v;
  json_t *bo = field(body, "best_of");
  if (bo && (!json_is_integer(bo) || json_integer_value(bo) != r->n))
    return srv_fail(err, 400, "best_of", "'best_of' other than n is not supported");
  int given = 0;
  v = -1;
  /* 0 passes here for completions' echo, which srv_request_parse checks once echo is read. */
  if (get_int(body, "max_tokens", r->kind == SRV_KIND_COMPLETION ? 0 : 1, lim->max_model_len, &v,
              &given, err))
    return -1;
  if (r->kind == SRV_KIND_CHAT && !given &&
      get_int(body, "max_completion_tokens", 1, lim->max_model_len, &v, &given, err))
    return -1;
  r->max_tokens = (int)v;
  v = 0;
  if (get_int(body, "min_tokens", 0, lim->max_model_len, &v, NULL, err)) return -1;
  r->min_tokens = (int)v;
  if (r->max_tokens > 0 && r->min_tokens > r->max_tokens)
    return srv_fail(err, 400, "min_tokens", "'min_tokens' must not exceed 'max_tokens'");
  if (get_bool(body, "ignore_eos", &r->ignore_eos, err)) return -1;
  r->skip_special_tokens = 1;
  if (get_bool(body, "skip_special_tokens", &r->skip_special_tokens, err)) return -1;
  if (get_bool(body, "include_stop_str_in_output", &r->include_stop_str_in_output, err)) return -1;
  json_t *user = field(body, "user");
  if (user && !json_is_string(user)) return srv_fail(err, 400, "user", "'user' must be a string");
  if (parse_stop(body, lim, r, err) || parse_logit_bias(body, lim, r, err) ||
      parse_sampling(body, r, err))
    return -1;
  r->sampling.n_logit_bias = r->n_bias;
  r->sampling.logit_bias_ids = r->bias_ids;
  r->sampling.logit_bias = r->bias;
  return 0;
}

static int parse_kwargs(const json_t *body, json_t **out, srv_error *err) {
  json_t *k = field(body, "chat_template_kwargs");
  if (!k) return 0;
  if (!json_is_object(k))
    return srv_fail(err, 400, "chat_template_kwargs", "'chat_template_kwargs' must be an object");
  *out = json_incref(k);
  return 0;
}

static json_t *load_body(const char *body, size_t len, srv_error *err) {
  json_error_t je;
  /* jansson rejects \u0000 in strings by default, so every string is also a C string. */
  json_t *root = json_loadb(body, len, 0, &je);
  if (!root) {
    srv_fail(err, 400, NULL, "malformed JSON body: %s (line %d, column %d)", je.text, je.line,
             je.column);
    return NULL;
  }
  if (!json_is_object(root)) {
    json_decref(root);
    srv_fail(err, 400, NULL, "the request body must be a JSON object");
    return NULL;
  }
  return root;
}

int srv_request_parse(const char *body, size_t len, srv_kind kind, const srv_limits *lim,
                      srv_request *out, srv_error *err) {
  memset(out, 0, sizeof *out);
  out->kind = kind;
  out->logprobs = -1;
  out->prompt_logprobs = -1;
  out->add_generation_prompt = 1;
  out->add_special_tokens = kind == SRV_KIND_COMPLETION;
  json_t *root = load_body(body, len, err);
  if (!root) return -1;
  int rc = -1;
  if (parse_common(root, lim, out, err)) goto done;
  if (get_bool(root, "add_special_tokens", &out->add_special_tokens, err)) goto done;
  if (kind == SRV_KIND_COMPLETION) {
    if (parse_prompts(root, lim, out, err)) goto done;
    if (get_bool(root, "echo", &out->echo, err)) goto done;
    long long lp = -1;
    if (get_int(root, "logprobs", 0, lim->max_logprobs, &lp, NULL, err)) goto done;
    out->logprobs = (int)lp;
    if (field(root, "suffix")) {
      srv_fail(err, 400, "suffix", "'suffix' is not supported");
      goto done;
    }
    if (out->max_tokens == 0 && !out->echo) {
      srv_fail(err, 400, "max_tokens", "'max_tokens' must be at least 1 (0 only with 'echo')");
      goto done;
    }
    if ((long long)out->n_prompts * out->n > 4 * (long long)lim->max_n) {
      srv_fail(err, 400, "n", "too many choices: %d prompts x n=%d", out->n_prompts, out->n);
      goto done;
    }
  } else {
    if (parse_messages(root, "messages", &out->messages, err)) goto done;
    json_t *tools = field(root, "tools");
    if (tools) {
      if (!json_is_array(tools)) {
        srv_fail(err, 400, "tools", "'tools' must be a list");
        goto done;
      }
      out->tools = json_incref(tools);
    }
    if (parse_kwargs(root, &out->template_kwargs, err)) goto done;
    if (get_bool(root, "add_generation_prompt", &out->add_generation_prompt, err) ||
        get_bool(root, "continue_final_message", &out->continue_final_message, err))
      goto done;
    if (out->continue_final_message && out->add_generation_prompt) {
      srv_fail(err, 400, "continue_final_message",
               "'continue_final_message' needs 'add_generation_prompt' to be false");
      goto done;
    }
    int lp = 0;
    long long top = 0;
    int top_given = 0;
    if (get_bool(root, "logprobs", &lp, err) ||
        get_int(root, "top_logprobs", 0, lim->max_logprobs, &top, &top_given, err))
      goto done;
    if (top_given && top > 0 && !lp) {
      srv_fail(err, 400, "top_logprobs", "'top_logprobs' needs 'logprobs' to be true");
      goto done;
    }
    out->logprobs = lp ? (int)top : -1;
  }
  long long plp = -1;
  if (get_int(root, "prompt_logprobs", 0, lim->max_logprobs, &plp, NULL, err)) goto done;
  /* As vLLM: prompt logprobs come only with the whole response, never in a stream. */
  if (plp > 0 && out->stream) {
    srv_fail(err, 400, "prompt_logprobs", "'prompt_logprobs' are not available when 'stream' is true");
    goto done;
  }
  out->prompt_logprobs = (int)plp;
  out->sampling.logprobs = out->logprobs;
  rc = 0;
done:
  json_decref(root);
  if (rc) {
    srv_request_free(out);
    memset(out, 0, sizeof *out);
  }
  return rc;
}

void srv_request_free(srv_request *r) {
  if (!r) return;
  free(r->model);
  for (int i = 0; i < r->n_prompts; i++) {
    free(r->prompts[i].text);
    free(r->prompts[i].ids);
  }
  free(r->prompts);
  json_decref(r->messages);
  json_decref(r->tools);
  json_decref(r->template_kwargs);
  if (r->stop)
    for (int i = 0; i < r->n_stop; i++) free(r->stop[i]);
  free(r->stop);
  free(r->stop_token_ids);
  free(r->bias_ids);
  free(r->bias);
  memset(r, 0, sizeof *r);
}

int srv_tokenize_parse(const char *body, size_t len, int detokenize, const srv_limits *lim,
                       srv_tok_request *out, srv_error *err) {
  memset(out, 0, sizeof *out);
  json_t *root = load_body(body, len, err);
  if (!root) return -1;
  int rc = -1;
  json_t *m = field(root, "model");
  if (m) {
    if (!json_is_string(m)) {
      srv_fail(err, 400, "model", "'model' must be a string");
      goto done;
    }
    out->model = dup_n(json_string_value(m), json_string_length(m));
  }
  if (detokenize) {
    json_t *t = field(root, "tokens");
    if (!json_is_array(t)) {
      srv_fail(err, 400, "tokens", "'tokens' must be a list of token ids");
      goto done;
    }
    if (get_ids(t, "tokens", lim, &out->ids, &out->n_ids, err)) goto done;
  } else if (field(root, "messages")) {
    out->add_generation_prompt = 1;
    if (parse_messages(root, "messages", &out->messages, err) ||
        parse_kwargs(root, &out->template_kwargs, err) ||
        get_bool(root, "add_generation_prompt", &out->add_generation_prompt, err) ||
        get_bool(root, "add_special_tokens", &out->add_special_tokens, err))
      goto done;
  } else {
    json_t *p = field(root, "prompt");
    if (!json_is_string(p)) {
      srv_fail(err, 400, "prompt", "'prompt' (a string) or 'messages' is required");
      goto done;
    }
    out->prompt_len = json_string_length(p);
    out->prompt = dup_n(json_string_value(p), out->prompt_len);
    out->add_special_tokens = 1;
    if (get_bool(root, "add_special_tokens", &out->add_special_tokens, err)) goto done;
  }
  rc = 0;
done:
  json_decref(root);
  if (rc) srv_tok_request_free(out);
  return rc;
}

void srv_tok_request_free(srv_tok_request *r) {
  if (!r) return;
  free(r->model);
  free(r->prompt);
  json_decref(r->messages);
  json_decref(r->template_kwargs);
  free(r->ids);
  memset(r, 0, sizeof *r);
}
