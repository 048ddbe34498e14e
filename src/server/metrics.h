/* Server metrics in Prometheus text format: latency histograms observed by the server plus the
 * engine's gauges and counters (engine_stats), named as vLLM names them under "tessera:". */
#ifndef TESSERA_SERVER_METRICS_H
#define TESSERA_SERVER_METRICS_H

#include <stddef.h>

#include "engine/engine.h"

typedef struct srv_metrics srv_metrics;

srv_metrics *srv_metrics_create(void);
void srv_metrics_free(srv_metrics *m);

/* Thread-safe; called from the engine thread and the HTTP threads. */
void srv_metrics_ttft(srv_metrics *m, double seconds);
void srv_metrics_itl(srv_metrics *m, double seconds);
void srv_metrics_e2e(srv_metrics *m, double seconds);
void srv_metrics_finished(srv_metrics *m, engine_finish why);
void srv_metrics_http(srv_metrics *m, int status);

/* Renders every metric; *out is malloc'ed. Returns 0, or -1 when out of memory. */
int srv_metrics_render(srv_metrics *m, const engine_stats *st, int active_requests,
                       const char *model_name, char **out, size_t *len);

#endif
