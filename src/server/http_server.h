/* The OpenAI-compatible HTTP server: libmicrohttpd threads parse requests, hand them to the engine
 * and stream results back; no HTTP thread ever waits on the engine (connections are suspended
 * and resumed from the engine's event callback). */
#ifndef TESSERA_HTTP_SERVER_H
#define TESSERA_HTTP_SERVER_H

#include <stddef.h>

#include "engine/engine.h"
#include "util/status.h"

struct tokenizer;

typedef struct {
  const char *host;              /* address to bind; NULL or "" = 0.0.0.0 */
  int port;                      /* 0 = any free port (see http_server_port) */
  const char *served_model_name; /* name clients use in "model" */
  const char *model_path;        /* shown as "root" in /v1/models */
  const char *api_key;           /* NULL = no authentication */
  const char *chat_template;     /* template text overriding the tokenizer's, or NULL */
  int max_model_len;
  size_t max_body_bytes;         /* larger bodies get 413; 0 = 32 MiB */
  int threads;                   /* HTTP threads; 0 = 2 */
} http_server_config;

typedef struct http_server http_server;

int http_server_start(http_server **out, const http_server_config *cfg, engine *e,
                      const struct tokenizer *tok, ts_err *err);
int http_server_port(const http_server *s);
/* Stops accepting, cancels what is still running, closes every connection and frees s. The
 * engine stays alive (the caller destroys it afterwards). */
void http_server_stop(http_server *s);

#endif
