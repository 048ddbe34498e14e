/* libmicrohttpd glue: routes, per-request contexts, the engine event callback, SSE streaming,
 * and a watcher thread that notices clients hanging up while their request waits on the engine.
 *
 * Threads: MHD's epoll threads run the access handler, the SSE reader and the completion
 * callback; the engine thread runs on_event; the watcher thread runs watch_loop. A request context
 * is freed only in the completion callback, after every engine request it made is finished or
 * cancelled (engine_cancel guarantees no later callback). Lock order: server lock, then a context
 * lock; the engine thread takes context locks only. */
#include "server/http_server.h"

#include <errno.h>
#include <microhttpd.h>
#include <netdb.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "server/metrics.h"
#include "server/openai.h"
#include "server/request.h"
#include "template/jinja.h"
#include "tokenizer/tokenizer.h"
#include "util/log.h"

#define TESSERA_VERSION "0.1.0"

typedef enum {
  ROUTE_COMPLETIONS,
  ROUTE_CHAT,
  ROUTE_MODELS,
  ROUTE_HEALTH,
  ROUTE_METRICS,
  ROUTE_TOKENIZE,
  ROUTE_DETOKENIZE,
  ROUTE_VERSION,
  ROUTE_NOT_FOUND,
  ROUTE_BAD_METHOD,
} route;

typedef struct {
  char *buf;
  size_t len, cap;
} sbuf;

static int sb_add(sbuf *b, const char *s, size_t n) {
  if (b->len + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + n + 1) cap *= 2;
    char *p = realloc(b->buf, cap);
    if (!p) return -1;
    b->buf = p;
    b->cap = cap;
  }
  if (n) memcpy(b->buf + b->len, s, n);
  b->len += n;
  b->buf[b->len] = 0;
  return 0;
}

typedef struct {
  sbuf text;
  int tokens;
  engine_finish finish;
  json_t *logprobs; /* non-streaming: accumulated over the whole choice */
  int offset;       /* text_offset of the next token (completions logprobs) */
  int got_first;
  int echoed;       /* streaming echo with logprobs: the prompt chunk went out */
  double last_token;
} choice;

struct req_ctx;
typedef struct {
  struct req_ctx *ctx;
  int index;       /* prompt index */
  uint64_t id;     /* engine request id */
  int submitted;
  int live;        /* choices not finished yet */
  int prompt_tokens, cached_tokens;
  sample_result *plp; /* [prompt_tokens] prompt logprobs, copied from the engine's first event */
} sub;

typedef struct req_ctx {
  http_server *srv;
  struct MHD_Connection *conn;
  struct req_ctx *prev, *next; /* server's live list (generation requests only) */
  uint64_t serial;
  int in_list, watched;
  route rt;
  sbuf body;
  int too_big;
  int phase; /* 0: reading the body; 1: suspended until the engine is done; 2: replied */
  pthread_mutex_t lock;
  srv_request req;
  oai_prompt *prompts;
  int n_prompts;
  sub *subs;
  choice *choices;
  int n_choices, live_choices;
  sbuf out; /* SSE bytes not yet handed to MHD */
  size_t out_off;
  int suspended, done, aborted, failed;
  char fail_msg[256];
  char id[64];
  long long created;
  double t_start;
} req_ctx;

struct http_server {
  struct MHD_Daemon *d;
  engine *e;
  const tokenizer *tok;
  char *model_name, *model_path, *api_key;
  size_t max_body;
  jinja_template *tmpl;
  char no_tmpl[400];
  oai_model om;
  srv_limits lim;
  srv_metrics *metrics;
  pthread_mutex_t lock; /* live list, stopping */
  req_ctx *live;
  int n_live, stopping;
  uint64_t next_serial;
  int ep, wake;         /* watcher's epoll and its stop eventfd */
  pthread_t watcher;
  int watcher_started;
  long long created;
  int port;
};

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---- replies ---------------------------------------------------------------------------- */

static enum MHD_Result reply(req_ctx *c, unsigned status, const char *ctype, char *body,
                             size_t len) {
  c->phase = 2;
  struct MHD_Response *r =
      MHD_create_response_from_buffer(len, body ? body : (char *)"", body ? MHD_RESPMEM_MUST_FREE
                                                                          : MHD_RESPMEM_PERSISTENT);
  if (!r) {
    free(body);
    return MHD_NO;
  }
  if (ctype) MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
  if (status == 405) MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, c->rt == ROUTE_BAD_METHOD ? "GET, POST" : "GET");
  if (status == 401) MHD_add_response_header(r, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer");
  enum MHD_Result ok = MHD_queue_response(c->conn, status, r);
  MHD_destroy_response(r);
  srv_metrics_http(c->srv->metrics, (int)status);
  return ok;
}

static enum MHD_Result reply_json(req_ctx *c, unsigned status, json_t *j) {
  char *s = j ? json_dumps(j, JSON_COMPACT) : NULL;
  json_decref(j);
  if (!s) return MHD_NO;
  return reply(c, status, "application/json", s, strlen(s));
}

static enum MHD_Result reply_error(req_ctx *c, int status, const char *param, const char *msg) {
  char *s = oai_error_body(status, msg, param);
  if (!s) return MHD_NO;
  return reply(c, (unsigned)status, "application/json", s, strlen(s));
}

static enum MHD_Result reply_srv_error(req_ctx *c, const srv_error *e) {
  return reply_error(c, e->status ? e->status : 400, e->param, e->msg);
}

/* ---- responses of generation requests ------------------------------------------------------ */

static const char *finish_name(engine_finish f) {
  switch (f) {
    case ENGINE_FINISH_STOP: return "stop";
    case ENGINE_FINISH_LENGTH: return "length";
    case ENGINE_FINISH_ABORT: return "abort";
    case ENGINE_FINISH_ERROR: return "error";
    default: return NULL;
  }
}

static json_t *jstr(const char *s, size_t n) {
  json_t *j = json_stringn(s ? s : "", s ? n : 0);
  return j ? j : json_string("");
}

static json_t *usage_of(const req_ctx *c) {
  long long prompt = 0, completion = 0, cached = 0;
  for (int i = 0; i < c->n_prompts; i++) {
    prompt += c->subs[i].prompt_tokens ? c->subs[i].prompt_tokens : (long long)c->prompts[i].n_ids;
    cached += c->subs[i].cached_tokens;
  }
  for (int i = 0; i < c->n_choices; i++) completion += c->choices[i].tokens;
  return oai_usage(prompt, completion, cached);
}

static json_t *envelope(const req_ctx *c, const char *object) {
  return json_pack("{s:s, s:s, s:I, s:s}", "id", c->id, "object", object, "created",
                   (json_int_t)c->created, "model", c->srv->model_name);
}

static int is_chat(const req_ctx *c) { return c->req.kind == SRV_KIND_CHAT; }

/* Completions' echo with max_tokens 0: the prompt alone (the engine's one token is left out). */
static int echo_only(const req_ctx *c) {
  return !is_chat(c) && c->req.echo && c->req.max_tokens == 0;
}

/* Top entries shown in prompt_logprobs: the request's prompt_logprobs, else (echo) its logprobs. */
static int plp_top(const req_ctx *c) {
  return c->req.prompt_logprobs >= 0 ? c->req.prompt_logprobs : c->req.logprobs;
}

static json_t *plp_json(const req_ctx *c, const sub *sb) {
  json_t *j = sb->plp ? oai_prompt_logprobs_json(c->srv->tok, sb->plp, sb->prompt_tokens, plp_top(c))
                      : NULL;
  return j ? j : json_null();
}

/* Appends one SSE event "data: <json>\n\n" to c->out (ctx lock held). */
static void sse_json(req_ctx *c, json_t *j) {
  char *s = j ? json_dumps(j, JSON_COMPACT) : NULL;
  json_decref(j);
  if (!s) return;
  sb_add(&c->out, "data: ", 6);
  sb_add(&c->out, s, strlen(s));
  sb_add(&c->out, "\n\n", 2);
  free(s);
}

static void sse_chunk(req_ctx *c, int index, const char *text, size_t len, json_t *lp,
                      engine_finish fin, int role) {
  json_t *j = envelope(c, is_chat(c) ? "chat.completion.chunk" : "text_completion");
  json_t *ch;
  const char *fr = finish_name(fin);
  if (is_chat(c)) {
    json_t *delta = json_object();
    if (role) json_object_set_new(delta, "role", json_string("assistant"));
    if (role || len) json_object_set_new(delta, "content", jstr(text, len));
    ch = json_pack("{s:i, s:o, s:o, s:o}", "index", index, "delta", delta, "logprobs",
                   lp ? lp : json_null(), "finish_reason", fr ? json_string(fr) : json_null());
  } else {
    ch = json_pack("{s:i, s:o, s:o, s:o, s:n}", "index", index, "text", jstr(text, len),
                   "logprobs", lp ? lp : json_null(), "finish_reason",
                   fr ? json_string(fr) : json_null(), "stop_reason");
  }
  json_object_set_new(j, "choices", json_pack("[o]", ch));
  if (c->req.include_usage) json_object_set_new(j, "usage", json_null());
  sse_json(c, j);
}

/* Engine thread: one event for one choice of one prompt. */
static void on_event(void *user, const engine_event *ev) {
  sub *sb = user;
  req_ctx *c = sb->ctx;
  http_server *s = c->srv;
  double t = now_s();
  pthread_mutex_lock(&c->lock);
  int ci = sb->index * c->req.n + ev->index;
  if (ev->index < 0 || ev->index >= c->req.n || c->choices[ci].finish != ENGINE_FINISH_NONE) {
    pthread_mutex_unlock(&c->lock);
    return;
  }
  choice *ch = &c->choices[ci];
  sb->prompt_tokens = ev->prompt_tokens;
  sb->cached_tokens = ev->cached_tokens;
  if (ev->prompt_logprobs && !sb->plp && ev->prompt_tokens > 0) {
    /* Copied as it is (JSON is built off the engine thread, except for a stream's echo). */
    sb->plp = malloc((size_t)ev->prompt_tokens * sizeof *sb->plp);
    if (sb->plp)
      memcpy(sb->plp, ev->prompt_logprobs, (size_t)ev->prompt_tokens * sizeof *sb->plp);
    else if (!c->failed) {
      c->failed = 1;
      snprintf(c->fail_msg, sizeof c->fail_msg, "out of memory for the prompt logprobs");
    }
  }
  const char *ev_text = ev->text;
  size_t ev_len = ev->text_len;
  if (echo_only(c)) ev_len = 0; /* the one token computed for the echo is not shown */
  if (ev->n_tokens > 0) {
    if (!ch->got_first) srv_metrics_ttft(s->metrics, t - c->t_start);
    else srv_metrics_itl(s->metrics, (t - ch->last_token) / ev->n_tokens);
    ch->got_first = 1;
    ch->last_token = t;
  }
  ch->tokens = ev->completion_tokens;
  json_t *lp = NULL;
  char *both = NULL;
  /* A stream's echo with logprobs opens with the prompt and its logprobs, then this event's, as
   * vLLM's first chunk does: they are known only now. */
  if (c->req.stream && c->req.echo && c->req.logprobs >= 0 && !ch->echoed &&
      ev->finish != ENGINE_FINISH_ERROR && (ev->n_tokens > 0 || ev->finish != ENGINE_FINISH_NONE)) {
    const oai_prompt *p = &c->prompts[sb->index];
    ch->echoed = 1;
    if (sb->plp)
      oai_prompt_logprobs_append(s->tok, sb->plp, sb->prompt_tokens, c->req.logprobs, &lp,
                                 &ch->offset);
    both = malloc(p->text_len + ev_len + 1);
    if (both) {
      memcpy(both, p->text ? p->text : "", p->text ? p->text_len : 0);
      memcpy(both + (p->text ? p->text_len : 0), ev_text ? ev_text : "", ev_len);
      ev_len += p->text ? p->text_len : 0;
      both[ev_len] = 0;
      ev_text = both;
    }
  }
  if (c->req.logprobs >= 0 && ev->samples && ev->n_tokens > 0 && !echo_only(c))
    oai_logprobs_append(s->tok, is_chat(c), ev->samples, ev->n_tokens, c->req.logprobs,
                        c->req.stream ? &lp : &ch->logprobs, &ch->offset);
  if (c->req.stream) {
    if (ev->finish == ENGINE_FINISH_ERROR) {
      json_decref(lp);
      char *e = oai_error_body(500, ev->error ? ev->error : "generation failed", NULL);
      if (e) {
        sb_add(&c->out, "data: ", 6);
        sb_add(&c->out, e, strlen(e));
        sb_add(&c->out, "\n\n", 2);
        free(e);
      }
    } else if (ev_len || lp || ev->finish != ENGINE_FINISH_NONE) {
      sse_chunk(c, ci, ev_text, ev_len, lp, ev->finish, 0);
    }
  } else {
    sb_add(&ch->text, ev_text ? ev_text : "", ev_text ? ev_len : 0);
  }
  free(both);
  if (ev->finish != ENGINE_FINISH_NONE) {
    ch->finish = ev->finish;
    sb->live--;
    c->live_choices--;
    srv_metrics_finished(s->metrics, ev->finish);
    if (ev->finish == ENGINE_FINISH_ERROR && !c->failed) {
      c->failed = 1;
      snprintf(c->fail_msg, sizeof c->fail_msg, "%s", ev->error ? ev->error : "generation failed");
    }
    if (c->live_choices == 0) {
      c->done = 1;
      srv_metrics_e2e(s->metrics, t - c->t_start);
      if (c->req.stream) {
        if (c->req.include_usage) {
          json_t *j = envelope(c, is_chat(c) ? "chat.completion.chunk" : "text_completion");
          json_object_set_new(j, "choices", json_array());
          json_object_set_new(j, "usage", usage_of(c));
          sse_json(c, j);
        }
        sb_add(&c->out, "data: [DONE]\n\n", 14);
      }
    }
  }
  struct MHD_Connection *resume = NULL;
  if (c->suspended && (c->done || c->req.stream)) {
    c->suspended = 0;
    resume = c->conn;
  }
  pthread_mutex_unlock(&c->lock);
  /* Safe after unlocking: a suspended connection cannot complete, so c stays alive. */
  if (resume) MHD_resume_connection(resume);
}

static ssize_t sse_reader(void *cls, uint64_t pos, char *buf, size_t max) {
  (void)pos;
  req_ctx *c = cls;
  pthread_mutex_lock(&c->lock);
  if (c->aborted) {
    pthread_mutex_unlock(&c->lock);
    return MHD_CONTENT_READER_END_WITH_ERROR;
  }
  if (c->out.len > c->out_off) {
    size_t n = c->out.len - c->out_off;
    if (n > max) n = max;
    memcpy(buf, c->out.buf + c->out_off, n);
    c->out_off += n;
    if (c->out_off == c->out.len) c->out.len = c->out_off = 0;
    pthread_mutex_unlock(&c->lock);
    return (ssize_t)n;
  }
  if (c->done) {
    pthread_mutex_unlock(&c->lock);
    return MHD_CONTENT_READER_END_OF_STREAM;
  }
  c->suspended = 1;
  MHD_suspend_connection(c->conn);
  pthread_mutex_unlock(&c->lock);
  return 0;
}

static enum MHD_Result reply_generation(req_ctx *c) {
  if (c->aborted) return MHD_NO;
  if (c->failed) return reply_error(c, 500, NULL, c->fail_msg);
  int chat = is_chat(c);
  json_t *j = envelope(c, chat ? "chat.completion" : "text_completion");
  json_t *choices = json_array();
  for (int i = 0; i < c->n_choices; i++) {
    choice *ch = &c->choices[i];
    const char *fr = finish_name(ch->finish);
    json_t *lp = ch->logprobs ? json_incref(ch->logprobs) : json_null();
    json_t *o;
    if (chat) {
      o = json_pack("{s:i, s:{s:s, s:o}, s:o, s:o, s:n}", "index", i, "message", "role",
                    "assistant", "content", jstr(ch->text.buf, ch->text.len), "logprobs", lp,
                    "finish_reason", fr ? json_string(fr) : json_null(), "stop_reason");
    } else {
      const oai_prompt *p = &c->prompts[i / c->req.n];
      const sub *sb = &c->subs[i / c->req.n];
      if (c->req.echo && c->req.logprobs >= 0) {
        /* The prompt's tokens come first; the generated ones' offsets move past its text. */
        json_t *both = NULL;
        int off = 0;
        if (sb->plp)
          oai_prompt_logprobs_append(c->srv->tok, sb->plp, sb->prompt_tokens, c->req.logprobs,
                                     &both, &off);
        if (both && ch->logprobs) {
          static const char *const keys[] = {"tokens", "token_logprobs", "top_logprobs"};
          for (int k = 0; k < 3; k++)
            json_array_extend(json_object_get(both, keys[k]), json_object_get(ch->logprobs, keys[k]));
          json_t *to = json_object_get(both, "text_offset");
          size_t x;
          json_t *v;
          json_array_foreach(json_object_get(ch->logprobs, "text_offset"), x, v)
            json_array_append_new(to, json_integer(json_integer_value(v) + off));
        }
        if (both) {
          json_decref(lp);
          lp = both;
        }
      }
      json_t *text;
      if (c->req.echo && p->text) {
        sbuf both = {0};
        sb_add(&both, p->text, p->text_len);
        if (!echo_only(c)) sb_add(&both, ch->text.buf ? ch->text.buf : "", ch->text.len);
        text = jstr(both.buf, both.len);
        free(both.buf);
      } else {
        text = jstr(ch->text.buf, ch->text.len);
      }
      o = json_pack("{s:i, s:o, s:o, s:o, s:n, s:o}", "index", i, "text", text, "logprobs", lp,
                    "finish_reason", fr ? json_string(fr) : json_null(), "stop_reason",
                    "prompt_logprobs", plp_json(c, sb));
    }
    json_array_append_new(choices, o);
  }
  json_object_set_new(j, "choices", choices);
  /* vLLM puts a chat request's prompt logprobs beside its choices, not in them. */
  if (chat) json_object_set_new(j, "prompt_logprobs", plp_json(c, &c->subs[0]));
  json_object_set_new(j, "usage", usage_of(c));
  return reply_json(c, 200, j);
}

/* ---- generation requests --------------------------------------------------------------- */

static void watch_fd(req_ctx *c) {
  const union MHD_ConnectionInfo *ci =
      MHD_get_connection_info(c->conn, MHD_CONNECTION_INFO_CONNECTION_FD);
  if (!ci) return;
  struct epoll_event ev = {.events = EPOLLRDHUP | EPOLLONESHOT, .data.u64 = c->serial};
  if (epoll_ctl(c->srv->ep, EPOLL_CTL_ADD, ci->connect_fd, &ev) == 0) c->watched = 1;
}

static enum MHD_Result handle_generation(req_ctx *c, srv_kind kind) {
  http_server *s = c->srv;
  srv_error err = {0};
  if (srv_request_parse(c->body.buf ? c->body.buf : "", c->body.len, kind, &s->lim, &c->req,
                        &err) < 0)
    return reply_srv_error(c, &err);
  if (c->req.model && strcmp(c->req.model, s->model_name) != 0) {
    char msg[300];
    snprintf(msg, sizeof msg, "The model `%.200s` does not exist.", c->req.model);
    return reply_error(c, 404, "model", msg);
  }
  if (oai_prompts(&s->om, &c->req, &c->prompts, &c->n_prompts, &err) < 0)
    return reply_srv_error(c, &err);
  c->n_choices = c->n_prompts * c->req.n;
  c->live_choices = c->n_choices;
  c->subs = calloc((size_t)c->n_prompts, sizeof *c->subs);
  c->choices = calloc((size_t)c->n_choices, sizeof *c->choices);
  if (!c->subs || !c->choices) return reply_error(c, 500, NULL, "out of memory");
  oai_request_id(c->id, sizeof c->id, kind == SRV_KIND_CHAT ? "chatcmpl-" : "cmpl-");
  c->created = (long long)time(NULL);

  pthread_mutex_lock(&s->lock);
  if (s->stopping) {
    pthread_mutex_unlock(&s->lock);
    return reply_error(c, 503, NULL, "the server is shutting down");
  }
  c->serial = ++s->next_serial;
  c->next = s->live;
  if (s->live) s->live->prev = c;
  s->live = c;
  s->n_live++;
  c->in_list = 1;
  watch_fd(c);
  pthread_mutex_unlock(&s->lock);

  if (c->req.stream) {
    /* Chat streams open every choice with its role; echo opens with the prompt. */
    pthread_mutex_lock(&c->lock);
    for (int i = 0; i < c->n_choices; i++) {
      const oai_prompt *p = &c->prompts[i / c->req.n];
      if (kind == SRV_KIND_CHAT) sse_chunk(c, i, "", 0, NULL, ENGINE_FINISH_NONE, 1);
      else if (c->req.echo && p->text && c->req.logprobs < 0)
        sse_chunk(c, i, p->text, p->text_len, NULL, ENGINE_FINISH_NONE, 0);
    }
    pthread_mutex_unlock(&c->lock);
  }
  for (int i = 0; i < c->n_prompts; i++) {
    sub *sb = &c->subs[i];
    sb->ctx = c;
    sb->index = i;
    sb->live = c->req.n;
    engine_request_params p = {
        .sampling = c->req.sampling,
        .n = c->req.n,
        .max_tokens = c->prompts[i].max_tokens,
        .min_tokens = c->req.min_tokens,
        .ignore_eos = c->req.ignore_eos,
        .stop_token_ids = c->req.stop_token_ids,
        .n_stop_token_ids = c->req.n_stop_token_ids,
        .stop = (const char *const *)c->req.stop,
        .n_stop = c->req.n_stop,
        .include_stop_str_in_output = c->req.include_stop_str_in_output,
        .skip_special_tokens = c->req.skip_special_tokens,
        /* An echo with logprobs shows the prompt's logprobs too (vLLM asks for them the same
         * way); the engine computes the larger top list of the two. */
        .has_prompt_logprobs = c->req.prompt_logprobs >= 0 || (c->req.echo && c->req.logprobs >= 0),
        .prompt_logprobs = c->req.prompt_logprobs > (c->req.echo ? c->req.logprobs : -1)
                               ? c->req.prompt_logprobs
                               : c->req.logprobs,
    };
    ts_err te = {0};
    if (engine_submit(s->e, c->prompts[i].ids, c->prompts[i].n_ids, &p, on_event, sb, &sb->id,
                      &te) < 0) {
      /* Earlier prompts of this request are cancelled by the completion callback. */
      pthread_mutex_lock(&c->lock);
      sb->live = 0;
      c->aborted = 1;
      pthread_mutex_unlock(&c->lock);
      return reply_error(c, te.code == TS_EINTERNAL ? 500 : 400, "prompt",
                         te.msg[0] ? te.msg : "the engine rejected the request");
    }
    sb->submitted = 1;
  }
  if (c->req.stream) {
    struct MHD_Response *r = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16 * 1024,
                                                               sse_reader, c, NULL);
    if (!r) return MHD_NO;
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream");
    MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
    c->phase = 2;
    enum MHD_Result ok = MHD_queue_response(c->conn, 200, r);
    MHD_destroy_response(r);
    srv_metrics_http(s->metrics, 200);
    return ok;
  }
  pthread_mutex_lock(&c->lock);
  if (!c->done) {
    c->phase = 1;
    c->suspended = 1;
    MHD_suspend_connection(c->conn);
    pthread_mutex_unlock(&c->lock);
    return MHD_YES;
  }
  pthread_mutex_unlock(&c->lock);
  return reply_generation(c);
}

/* ---- other routes -------------------------------------------------------------------------- */

static enum MHD_Result handle_models(req_ctx *c) {
  http_server *s = c->srv;
  json_t *m = json_pack("{s:s, s:s, s:I, s:s, s:s, s:n, s:i}", "id", s->model_name, "object",
                        "model", "created", (json_int_t)s->created, "owned_by", "tessera", "root",
                        s->model_path, "parent", "max_model_len", s->lim.max_model_len);
  return reply_json(c, 200, json_pack("{s:s, s:[o]}", "object", "list", "data", m));
}

static enum MHD_Result handle_metrics(req_ctx *c) {
  http_server *s = c->srv;
  engine_stats st = {0};
  engine_get_stats(s->e, &st);
  pthread_mutex_lock(&s->lock);
  int active = s->n_live;
  pthread_mutex_unlock(&s->lock);
  char *text;
  size_t len;
  if (srv_metrics_render(s->metrics, &st, active, s->model_name, &text, &len) < 0)
    return reply_error(c, 500, NULL, "out of memory");
  return reply(c, 200, "text/plain; version=0.0.4; charset=utf-8", text, len);
}

static enum MHD_Result handle_tokenize(req_ctx *c, int detok) {
  http_server *s = c->srv;
  srv_tok_request tr;
  srv_error err = {0};
  if (srv_tokenize_parse(c->body.buf ? c->body.buf : "", c->body.len, detok, &s->lim, &tr, &err) <
      0)
    return reply_srv_error(c, &err);
  enum MHD_Result rc;
  ts_err te = {0};
  if (tr.model && strcmp(tr.model, s->model_name) != 0) {
    char msg[300];
    snprintf(msg, sizeof msg, "The model `%.200s` does not exist.", tr.model);
    rc = reply_error(c, 404, "model", msg);
  } else if (detok) {
    char *text = NULL;
    size_t len = 0;
    if (tok_decode(s->tok, tr.ids, tr.n_ids, 0, &text, &len, &te) < 0)
      rc = reply_error(c, 400, "tokens", te.msg);
    else
      rc = reply_json(c, 200, json_pack("{s:o}", "prompt", jstr(text, len)));
    free(text);
  } else {
    char *text = tr.prompt, *rendered = NULL;
    size_t len = tr.prompt_len;
    if (tr.messages) {
      if (oai_render_chat(&s->om, tr.messages, NULL, tr.template_kwargs, tr.add_generation_prompt,
                          0, &rendered, &len, &err) < 0) {
        srv_tok_request_free(&tr);
        return reply_srv_error(c, &err);
      }
      text = rendered;
    }
    int32_t *ids = NULL;
    size_t n = 0;
    int flags = TOK_PARSE_SPECIAL | (tr.add_special_tokens ? TOK_ADD_SPECIAL : 0);
    if (tok_encode(s->tok, text, len, flags, &ids, &n, &te) < 0) {
      rc = reply_error(c, 400, "prompt", te.msg);
    } else {
      json_t *a = json_array();
      for (size_t i = 0; i < n; i++) json_array_append_new(a, json_integer(ids[i]));
      rc = reply_json(c, 200,
                      json_pack("{s:I, s:i, s:o, s:n}", "count", (json_int_t)n, "max_model_len",
                                s->lim.max_model_len, "tokens", a, "token_strs"));
    }
    free(ids);
    free(rendered);
  }
  srv_tok_request_free(&tr);
  return rc;
}

static route route_of(const char *method, const char *url) {
  static const struct {
    const char *path, *method;
    route r;
  } table[] = {
      {"/v1/completions", "POST", ROUTE_COMPLETIONS},
      {"/v1/chat/completions", "POST", ROUTE_CHAT},
      {"/v1/models", "GET", ROUTE_MODELS},
      {"/health", "GET", ROUTE_HEALTH},
      {"/metrics", "GET", ROUTE_METRICS},
      {"/tokenize", "POST", ROUTE_TOKENIZE},
      {"/detokenize", "POST", ROUTE_DETOKENIZE},
      {"/version", "GET", ROUTE_VERSION},
  };
  for (size_t i = 0; i < sizeof table / sizeof table[0]; i++)
    if (!strcmp(url, table[i].path))
      return strcmp(method, table[i].method) ? ROUTE_BAD_METHOD : table[i].r;
  return ROUTE_NOT_FOUND;
}

static int authorized(req_ctx *c) {
  const char *key = c->srv->api_key;
  if (!key) return 1;
  const char *h = MHD_lookup_connection_value(c->conn, MHD_HEADER_KIND, "Authorization");
  if (!h || strncmp(h, "Bearer ", 7) != 0) return 0;
  h += 7;
  size_t a = strlen(h), b = strlen(key);
  unsigned diff = (unsigned)(a ^ b);
  for (size_t i = 0; i < a && i < b; i++) diff |= (unsigned char)(h[i] ^ key[i]);
  return diff == 0;
}

static enum MHD_Result dispatch(req_ctx *c, const char *url) {
  switch (c->rt) {
    case ROUTE_NOT_FOUND: {
      char msg[300];
      snprintf(msg, sizeof msg, "no route for %.200s", url);
      return reply_error(c, 404, NULL, msg);
    }
    case ROUTE_BAD_METHOD: return reply_error(c, 405, NULL, "method not allowed for this route");
    default: break;
  }
  /* As vLLM: the key guards the /v1/ routes only; health, metrics and tokenize stay open. */
  if (!strncmp(url, "/v1/", 4) && !authorized(c))
    return reply_error(c, 401, NULL, "missing or invalid API key");
  if (c->too_big) {
    char msg[128];
    snprintf(msg, sizeof msg, "request body larger than %zu bytes", c->srv->max_body);
    return reply_error(c, 413, NULL, msg);
  }
  switch (c->rt) {
    case ROUTE_COMPLETIONS: return handle_generation(c, SRV_KIND_COMPLETION);
    case ROUTE_CHAT: return handle_generation(c, SRV_KIND_CHAT);
    case ROUTE_MODELS: return handle_models(c);
    case ROUTE_HEALTH: {
      /* 503 while a worker is dead or being restarted, so load balancers stop sending. */
      ts_err herr = {0};
      if (engine_health(c->srv->e, &herr) < 0) return reply_error(c, 503, NULL, herr.msg);
      return reply(c, 200, NULL, NULL, 0);
    }
    case ROUTE_METRICS: return handle_metrics(c);
    case ROUTE_TOKENIZE: return handle_tokenize(c, 0);
    case ROUTE_DETOKENIZE: return handle_tokenize(c, 1);
    case ROUTE_VERSION:
      return reply_json(c, 200, json_pack("{s:s}", "version", TESSERA_VERSION));
    default: return reply_error(c, 404, NULL, "not found");
  }
}

static enum MHD_Result on_access(void *cls, struct MHD_Connection *conn, const char *url,
                                 const char *method, const char *version, const char *upload,
                                 size_t *upload_size, void **con_cls) {
  (void)version;
  http_server *s = cls;
  req_ctx *c = *con_cls;
  if (!c) {
    c = calloc(1, sizeof *c);
    if (!c) return MHD_NO;
    c->srv = s;
    c->conn = conn;
    c->rt = route_of(method, url);
    c->t_start = now_s();
    pthread_mutex_init(&c->lock, NULL);
    *con_cls = c;
    const char *cl = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Content-Length");
    if (cl && strtoull(cl, NULL, 10) > s->max_body) {
      c->too_big = 1;
      return dispatch(c, url);
    }
    return MHD_YES;
  }
  if (*upload_size) {
    if (!c->too_big && c->body.len + *upload_size > s->max_body) {
      c->too_big = 1;
      free(c->body.buf);
      memset(&c->body, 0, sizeof c->body);
    }
    if (!c->too_big && sb_add(&c->body, upload, *upload_size) < 0) c->too_big = 1;
    *upload_size = 0;
    return MHD_YES;
  }
  if (c->phase == 0) return dispatch(c, url);
  if (c->phase == 1) {
    c->phase = 2;
    return reply_generation(c);
  }
  return MHD_YES;
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe) {
  (void)conn;
  (void)toe;
  http_server *s = cls;
  req_ctx *c = *con_cls;
  if (!c) return;
  *con_cls = NULL;
  if (c->in_list) {
    pthread_mutex_lock(&s->lock);
    if (c->prev) c->prev->next = c->next;
    else s->live = c->next;
    if (c->next) c->next->prev = c->prev;
    s->n_live--;
    if (c->watched) {
      const union MHD_ConnectionInfo *ci =
          MHD_get_connection_info(c->conn, MHD_CONNECTION_INFO_CONNECTION_FD);
      if (ci) epoll_ctl(s->ep, EPOLL_CTL_DEL, ci->connect_fd, NULL);
    }
    pthread_mutex_unlock(&s->lock);
  }
  /* A client that went away (or a request that failed half-way) frees its engine work now. */
  for (int i = 0; c->subs && i < c->n_prompts; i++) {
    pthread_mutex_lock(&c->lock);
    int live = c->subs[i].submitted && c->subs[i].live > 0;
    pthread_mutex_unlock(&c->lock);
    if (live) engine_cancel(s->e, c->subs[i].id);
  }
  for (int i = 0; c->choices && i < c->n_choices; i++) {
    free(c->choices[i].text.buf);
    json_decref(c->choices[i].logprobs);
  }
  free(c->choices);
  for (int i = 0; c->subs && i < c->n_prompts; i++) free(c->subs[i].plp);
  free(c->subs);
  oai_prompts_free(c->prompts, c->n_prompts);
  srv_request_free(&c->req);
  free(c->body.buf);
  free(c->out.buf);
  pthread_mutex_destroy(&c->lock);
  free(c);
}

/* ---- the disconnect watcher ---------------------------------------------------------------- */

/* Marks c aborted (server lock held). Returns the connection to resume once the server lock is
 * released (MHD_resume_connection takes MHD's own locks), or NULL. */
static struct MHD_Connection *abort_ctx(req_ctx *c) {
  pthread_mutex_lock(&c->lock);
  c->aborted = 1;
  c->done = 1;
  struct MHD_Connection *resume = NULL;
  if (c->suspended) {
    c->suspended = 0;
    resume = c->conn;
  }
  pthread_mutex_unlock(&c->lock);
  return resume;
}

static void *watch_loop(void *arg) {
  http_server *s = arg;
  struct epoll_event evs[64];
  for (;;) {
    int n = epoll_wait(s->ep, evs, 64, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      return NULL;
    }
    for (int i = 0; i < n; i++) {
      if (evs[i].data.u64 == 0) return NULL; /* the stop eventfd */
      struct MHD_Connection *resume = NULL;
      pthread_mutex_lock(&s->lock);
      for (req_ctx *c = s->live; c; c = c->next)
        if (c->serial == evs[i].data.u64) {
          LOG_D("client of request %s went away; cancelling it", c->id);
          resume = abort_ctx(c);
          break;
        }
      pthread_mutex_unlock(&s->lock);
      /* A suspended connection cannot complete, so its context outlives the unlock. */
      if (resume) MHD_resume_connection(resume);
    }
  }
}

/* ---- lifecycle ----------------------------------------------------------------------------- */

int http_server_port(const http_server *s) { return s->port; }

static int bind_address(const http_server_config *cfg, struct sockaddr_storage *ss,
                        socklen_t *sl, ts_err *err) {
  const char *host = cfg->host && *cfg->host ? cfg->host : "0.0.0.0";
  char port[16];
  snprintf(port, sizeof port, "%d", cfg->port);
  struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                           .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
  struct addrinfo *res = NULL;
  int rc = getaddrinfo(host, port, &hints, &res);
  if (rc != 0 || !res)
    return ts_errorf(err, TS_EINVAL, "cannot resolve --host %s: %s", host, gai_strerror(rc));
  memcpy(ss, res->ai_addr, res->ai_addrlen);
  *sl = res->ai_addrlen;
  freeaddrinfo(res);
  return 0;
}

static void server_free(http_server *s) {
  if (s->watcher_started) {
    uint64_t one = 1;
    if (write(s->wake, &one, sizeof one) < 0) LOG_W("cannot wake the watcher thread");
    pthread_join(s->watcher, NULL);
  }
  if (s->ep >= 0) close(s->ep);
  if (s->wake >= 0) close(s->wake);
  if (s->tmpl) jinja_free(s->tmpl);
  srv_metrics_free(s->metrics);
  pthread_mutex_destroy(&s->lock);
  free(s->model_name);
  free(s->model_path);
  free(s->api_key);
  free(s);
}

int http_server_start(http_server **out, const http_server_config *cfg, engine *e,
                      const struct tokenizer *tok, ts_err *err) {
  *out = NULL;
  http_server *s = calloc(1, sizeof *s);
  if (!s) return ts_errorf(err, TS_ENOMEM, "out of memory");
  s->ep = s->wake = -1;
  pthread_mutex_init(&s->lock, NULL);
  s->e = e;
  s->tok = tok;
  s->model_name = strdup(cfg->served_model_name ? cfg->served_model_name : "model");
  s->model_path = strdup(cfg->model_path ? cfg->model_path : "");
  s->api_key = cfg->api_key && *cfg->api_key ? strdup(cfg->api_key) : NULL;
  s->max_body = cfg->max_body_bytes ? cfg->max_body_bytes : (size_t)32 << 20;
  s->created = (long long)time(NULL);
  s->metrics = srv_metrics_create();
  if (!s->model_name || !s->model_path || !s->metrics) {
    server_free(s);
    return ts_errorf(err, TS_ENOMEM, "out of memory");
  }
  s->lim = (srv_limits){.vocab_size = tok_vocab_size(tok),
                        .max_model_len = cfg->max_model_len,
                        .max_logprobs = SAMPLING_MAX_LOGPROBS,
                        .max_n = 128};

  const char *tsrc = cfg->chat_template ? cfg->chat_template : tok_chat_template(tok);
  if (!tsrc) {
    snprintf(s->no_tmpl, sizeof s->no_tmpl,
             "this model has no chat template; use /v1/completions or start the server with "
             "--chat-template FILE");
  } else {
    ts_err te = {0};
    if (jinja_parse(&s->tmpl, tsrc, strlen(tsrc), &te) < 0) {
      s->tmpl = NULL;
      LOG_W("chat template unusable, chat requests will fail: %s", te.msg);
      snprintf(s->no_tmpl, sizeof s->no_tmpl, "the model's chat template cannot be used: %.300s",
               te.msg);
    }
  }
  s->om = (oai_model){.tok = tok, .tmpl = s->tmpl, .no_template_reason = s->no_tmpl,
                      .max_model_len = cfg->max_model_len};

  s->ep = epoll_create1(EPOLL_CLOEXEC);
  s->wake = eventfd(0, EFD_CLOEXEC);
  struct epoll_event wev = {.events = EPOLLIN, .data.u64 = 0};
  if (s->ep < 0 || s->wake < 0 || epoll_ctl(s->ep, EPOLL_CTL_ADD, s->wake, &wev) < 0 ||
      pthread_create(&s->watcher, NULL, watch_loop, s) != 0) {
    server_free(s);
    return ts_errorf(err, TS_EINTERNAL, "cannot start the disconnect watcher: %s",
                     strerror(errno));
  }
  s->watcher_started = 1;

  struct sockaddr_storage ss;
  socklen_t sl;
  if (bind_address(cfg, &ss, &sl, err) < 0) {
    server_free(s);
    return err ? err->code : TS_EINVAL;
  }
  unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME;
  if (ss.ss_family == AF_INET6) flags |= MHD_USE_IPv6;
  unsigned threads = cfg->threads > 0 ? (unsigned)cfg->threads : 2;
  s->d = MHD_start_daemon(flags, (uint16_t)cfg->port, NULL, NULL, on_access, s,
                          MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss,
                          MHD_OPTION_THREAD_POOL_SIZE, threads,
                          MHD_OPTION_CONNECTION_LIMIT, (unsigned)16384,
                          MHD_OPTION_LISTEN_BACKLOG_SIZE, (unsigned)4096,
                          MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)600,
                          MHD_OPTION_LISTENING_ADDRESS_REUSE, (unsigned)1,
                          MHD_OPTION_NOTIFY_COMPLETED, on_completed, s, MHD_OPTION_END);
  if (!s->d) {
    server_free(s);
    return ts_errorf(err, TS_ENET, "cannot listen on %s:%d (address in use or not allowed?)",
                     cfg->host && *cfg->host ? cfg->host : "0.0.0.0", cfg->port);
  }
  const union MHD_DaemonInfo *di = MHD_get_daemon_info(s->d, MHD_DAEMON_INFO_LISTEN_FD);
  s->port = cfg->port;
  if (di) {
    struct sockaddr_storage bound;
    socklen_t bl = sizeof bound;
    if (getsockname(di->listen_fd, (struct sockaddr *)&bound, &bl) == 0)
      s->port = ntohs(bound.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&bound)->sin6_port
                                                  : ((struct sockaddr_in *)&bound)->sin_port);
  }
  *out = s;
  return 0;
}

void http_server_stop(http_server *s) {
  if (!s) return;
  pthread_mutex_lock(&s->lock);
  s->stopping = 1;
  size_t n_resume = 0;
  struct MHD_Connection **resume = calloc((size_t)s->n_live + 1, sizeof *resume);
  for (req_ctx *c = s->live; c; c = c->next) {
    struct MHD_Connection *r = abort_ctx(c);
    if (r && resume) resume[n_resume++] = r;
  }
  pthread_mutex_unlock(&s->lock);
  for (size_t i = 0; i < n_resume; i++) MHD_resume_connection(resume[i]);
  free(resume);
  /* MHD must not stop while a connection is suspended: wait for the aborted ones to close. */
  for (int i = 0; i < 500; i++) {
    pthread_mutex_lock(&s->lock);
    int n = s->n_live;
    pthread_mutex_unlock(&s->lock);
    if (n == 0) break;
    struct timespec ts = {0, 10 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }
  MHD_stop_daemon(s->d);
  server_free(s);
}
