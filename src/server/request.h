/* The request layer of the OpenAI API: a JSON body (bytes) becomes a validated srv_request, or an
 * HTTP status with one error line. Pure: no tokenizer, no engine, no globals, so it can be fuzzed
 * on arbitrary bytes. Limits that depend on the model arrive as plain numbers in srv_limits. */
#ifndef TESSERA_SERVER_REQUEST_H
#define TESSERA_SERVER_REQUEST_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/sampling.h"

typedef enum { SRV_KIND_COMPLETION = 0, SRV_KIND_CHAT } srv_kind;

/* An HTTP-level error: status (400, 404, ...), the offending field (may be empty) and a message. */
typedef struct {
  int status;
  char param[64];
  char msg[512];
} srv_error;

typedef struct {
  int vocab_size;    /* token ids must be in [0, vocab_size) */
  int max_model_len; /* prompt + completion tokens */
  int max_logprobs;  /* upper bound of logprobs / top_logprobs */
  int max_n;         /* upper bound of n */
} srv_limits;

/* One prompt of a completion request: text or token ids (exactly one of the two). */
typedef struct {
  char *text;        /* NUL-terminated, or NULL */
  size_t text_len;
  int32_t *ids;      /* [n_ids], or NULL */
  size_t n_ids;
} srv_prompt;

typedef struct {
  srv_kind kind;
  char *model;                 /* NULL when absent */
  /* completion */
  srv_prompt *prompts;         /* [n_prompts] */
  int n_prompts;
  int echo;
  /* chat */
  json_t *messages;            /* normalised: content is always a string (or null) */
  json_t *tools;               /* NULL when absent */
  json_t *template_kwargs;     /* chat_template_kwargs, NULL when absent */
  int add_generation_prompt;
  int continue_final_message;
  int add_special_tokens;      /* chat: default 0 (as vLLM); completion: default 1 */
  /* both */
  int stream;
  int include_usage;
  int n;
  int max_tokens;              /* -1: not given (the server picks the default); 0: completions
                                  with echo only: the prompt comes back, nothing generated */
  int min_tokens;
  int ignore_eos;
  int skip_special_tokens;
  int include_stop_str_in_output;
  char **stop;                 /* [n_stop] NUL-terminated */
  int n_stop;
  int32_t *stop_token_ids;     /* [n_stop_token_ids] */
  int n_stop_token_ids;
  int32_t *bias_ids;           /* [n_bias] */
  float *bias;                 /* [n_bias] */
  int n_bias;
  int logprobs;                /* -1: none; k: sampled token plus top k */
  int prompt_logprobs;         /* vLLM's extra: -1: none; k: each prompt token plus the top k */
  sampling_params sampling;    /* bias pointers point into this request */
} srv_request;

/* Parses and validates body. On success returns 0 and fills *out (free with srv_request_free);
 * on failure returns -1, fills *err and leaves *out empty (safe to free). */
int srv_request_parse(const char *body, size_t len, srv_kind kind, const srv_limits *lim,
                      srv_request *out, srv_error *err);
void srv_request_free(srv_request *r);

/* Parses a /tokenize or /detokenize body into its parts (same error conventions). */
typedef struct {
  char *model;
  char *prompt;        /* /tokenize with a prompt, or NULL */
  size_t prompt_len;
  json_t *messages;    /* /tokenize with messages (normalised), or NULL */
  json_t *template_kwargs;
  int add_generation_prompt;
  int add_special_tokens;
  int32_t *ids;        /* /detokenize */
  size_t n_ids;
} srv_tok_request;

int srv_tokenize_parse(const char *body, size_t len, int detokenize, const srv_limits *lim,
                       srv_tok_request *out, srv_error *err);
void srv_tok_request_free(srv_tok_request *r);

/* Fills err (status, param may be NULL) and returns -1. */
int srv_fail(srv_error *err, int status, const char *param, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#endif
