/* A Jinja interpreter for chat templates: the subset that real model templates use (statements
 * if/for/set/macro, namespace, loop.*, slicing, filters, tests, string methods,
 * raise_exception). Output is byte-identical to Python's jinja2 for those templates. The render
 * context is a jansson object (messages, tools, add_generation_prompt, bos_token, eos_token and
 * any chat_template_kwargs). */
#ifndef TESSERA_JINJA_H
#define TESSERA_JINJA_H

#include <jansson.h>
#include <stddef.h>

#include "util/status.h"

typedef struct jinja_template jinja_template;

/* Parses src; an unsupported construct is an error naming it and its line. */
int jinja_parse(jinja_template **out, const char *src, size_t len, ts_err *err);
/* Renders with ctx; *out is malloc'ed and NUL-terminated. raise_exception() becomes an error
 * carrying its message. */
int jinja_render(const jinja_template *t, const json_t *ctx, char **out, size_t *len, ts_err *err);
void jinja_free(jinja_template *t);

#endif
