/* The OpenAI layer between a parsed request and the engine: prompt building (tokenization and
 * chat-template rendering), context-length checks, and the JSON pieces of responses (errors,
 * logprobs, usage). Shared by the HTTP routes; touches no sockets. */
#ifndef TESSERA_SERVER_OPENAI_H
#define TESSERA_SERVER_OPENAI_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/sampling.h"
#include "server/request.h"

struct tokenizer;
struct jinja_template;

typedef struct {
  const struct tokenizer *tok;
  const struct jinja_template *tmpl; /* NULL: chat requests fail with 400 */
  const char *no_template_reason;    /* why tmpl is NULL (shown to the client) */
  int max_model_len;
} oai_model;

/* One engine submission: prompt ids and, for echo, the prompt text. */
typedef struct {
  int32_t *ids;
  size_t n_ids;
  char *text;       /* the prompt as text (echo), NUL-terminated, or NULL */
  size_t text_len;
  int max_tokens;   /* resolved against the context length */
} oai_prompt;

/* Builds the prompts of r (one per completion prompt, one for chat) and resolves max_tokens. */
int oai_prompts(const oai_model *m, const srv_request *r, oai_prompt **out, int *n_out,
                srv_error *err);
void oai_prompts_free(oai_prompt *p, int n);

/* Renders messages with the chat template. *text is malloc'ed. */
int oai_render_chat(const oai_model *m, const json_t *messages, const json_t *tools,
                    const json_t *kwargs, int add_generation_prompt, int continue_final_message,
                    char **text, size_t *len, srv_error *err);

/* {"error": {"message", "type", "param", "code"}} as a malloc'ed string. */
char *oai_error_body(int status, const char *msg, const char *param);

/* The text of one token as logprobs show it (malloc'ed). */
char *oai_token_text(const struct tokenizer *tok, int32_t id);

/* Appends the logprobs of n samples to lp, creating it on first use (*lp == NULL).
 * Completions: {"tokens", "token_logprobs", "top_logprobs", "text_offset"}; *offset advances by
 * the characters of each token. Chat: {"content": [{"token", "logprob", "bytes",
 * "top_logprobs"}]}. */
int oai_logprobs_append(const struct tokenizer *tok, int chat, const sample_result *s, int n,
                        int top_k, json_t **lp, int *offset);

/* The same for the prompt tokens of an echo: plp [n] as the engine reports prompt logprobs (entry
 * 0, the first token, comes with null logprob and null top_logprobs). Completions only. */
int oai_prompt_logprobs_append(const struct tokenizer *tok, const sample_result *plp, int n,
                                int top_k, json_t **lp, int *offset);

/* vLLM's prompt_logprobs: [null, {"<id>": {"logprob", "rank", "decoded_token"}, ...}, ...], one
 * entry per prompt token holding that token and the top_k of its position. */
json_t *oai_prompt_logprobs_json(const struct tokenizer *tok, const sample_result *plp, int n,
                                 int top_k);

/* {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details"}. */
json_t *oai_usage(long long prompt, long long completion, long long cached);

/* Random hex request id with a prefix, e.g. "cmpl-1f0c...". */
void oai_request_id(char *out, size_t cap, const char *prefix);

#endif
