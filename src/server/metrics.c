/* Prometheus histograms and counters of the HTTP server, rendered together with engine_stats. */
#include "server/metrics.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define HIST_MAX_BUCKETS 24

typedef struct {
  const double *bounds; /* [n] upper bounds, ascending; +Inf is implicit */
  int n;
  long long counts[HIST_MAX_BUCKETS]; /* per bucket, not cumulative */
  long long total;
  double sum;
} histogram;

/* vLLM's buckets for these three metrics. */
static const double TTFT_BOUNDS[] = {0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5,
                                     0.75,  1.0,   2.5,  5.0,  7.5,  10.0, 20.0, 40.0, 80.0, 160.0};
static const double ITL_BOUNDS[] = {0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                                    0.5,  0.75,  1.0,  2.5,   5.0, 7.5,  10.0, 20.0, 40.0, 80.0};
static const double E2E_BOUNDS[] = {0.3,  0.5,  0.8,  1.0,  1.5,  2.0,   2.5,   5.0,
                                    10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0};

_Static_assert(sizeof TTFT_BOUNDS / sizeof TTFT_BOUNDS[0] < HIST_MAX_BUCKETS, "ttft buckets");
_Static_assert(sizeof ITL_BOUNDS / sizeof ITL_BOUNDS[0] < HIST_MAX_BUCKETS, "itl buckets");
_Static_assert(sizeof E2E_BOUNDS / sizeof E2E_BOUNDS[0] < HIST_MAX_BUCKETS, "e2e buckets");

struct srv_metrics {
  pthread_mutex_t lock;
  histogram ttft, itl, e2e;
  long long finished[5]; /* by engine_finish */
  long long http_2xx, http_4xx, http_5xx;
};

srv_metrics *srv_metrics_create(void) {
  srv_metrics *m = calloc(1, sizeof *m);
  if (!m) return NULL;
  pthread_mutex_init(&m->lock, NULL);
  m->ttft.bounds = TTFT_BOUNDS;
  m->ttft.n = (int)(sizeof TTFT_BOUNDS / sizeof TTFT_BOUNDS[0]);
  m->itl.bounds = ITL_BOUNDS;
  m->itl.n = (int)(sizeof ITL_BOUNDS / sizeof ITL_BOUNDS[0]);
  m->e2e.bounds = E2E_BOUNDS;
  m->e2e.n = (int)(sizeof E2E_BOUNDS / sizeof E2E_BOUNDS[0]);
  return m;
}

void srv_metrics_free(srv_metrics *m) {
  if (!m) return;
  pthread_mutex_destroy(&m->lock);
  free(m);
}

static void observe(srv_metrics *m, histogram *h, double x) {
  int b = 0;
  while (b < h->n && x > h->bounds[b]) b++;
  pthread_mutex_lock(&m->lock);
  h->counts[b]++;
  h->total++;
  h->sum += x;
  pthread_mutex_unlock(&m->lock);
}

void srv_metrics_ttft(srv_metrics *m, double s) { observe(m, &m->ttft, s); }
void srv_metrics_itl(srv_metrics *m, double s) { observe(m, &m->itl, s); }
void srv_metrics_e2e(srv_metrics *m, double s) { observe(m, &m->e2e, s); }

void srv_metrics_finished(srv_metrics *m, engine_finish why) {
  if ((int)why < 0 || (int)why >= 5) return;
  pthread_mutex_lock(&m->lock);
  m->finished[why]++;
  pthread_mutex_unlock(&m->lock);
}

void srv_metrics_http(srv_metrics *m, int status) {
  pthread_mutex_lock(&m->lock);
  if (status < 400) m->http_2xx++;
  else if (status < 500) m->http_4xx++;
  else m->http_5xx++;
  pthread_mutex_unlock(&m->lock);
}

typedef struct {
  char *buf;
  size_t len, cap;
  int oom;
} text;

static void put(text *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(text *t, const char *fmt, ...) {
  if (t->oom) return;
  for (;;) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(t->buf + t->len, t->cap - t->len, fmt, ap);
    va_end(ap);
    if (n < 0) {
      t->oom = 1;
      return;
    }
    if ((size_t)n < t->cap - t->len) {
      t->len += (size_t)n;
      return;
    }
    size_t cap = t->cap * 2 + (size_t)n + 1;
    char *b = realloc(t->buf, cap);
    if (!b) {
      t->oom = 1;
      return;
    }
    t->buf = b;
    t->cap = cap;
  }
}

static void put_hist(text *t, const char *name, const char *help, const histogram *h,
                     const char *label) {
  put(t, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
  long long cum = 0;
  for (int b = 0; b < h->n; b++) {
    cum += h->counts[b];
    put(t, "%s_bucket{%s,le=\"%g\"} %lld\n", name, label, h->bounds[b], cum);
  }
  cum += h->counts[h->n];
  put(t, "%s_bucket{%s,le=\"+Inf\"} %lld\n", name, label, cum);
  put(t, "%s_sum{%s} %.9g\n%s_count{%s} %lld\n", name, label, h->sum, name, label, h->total);
}

static void put_one(text *t, const char *name, const char *type, const char *help,
                    const char *label, double v) {
  put(t, "# HELP %s %s\n# TYPE %s %s\n%s{%s} %.17g\n", name, help, name, type, name, label, v);
}

int srv_metrics_render(srv_metrics *m, const engine_stats *st, int active, const char *model,
                       char **out, size_t *len) {
  text t = {malloc(8192), 0, 8192, 0};
  if (!t.buf) return -1;
  char label[300];
  /* Prometheus label values escape backslash, quote and newline; a model name rarely has them. */
  size_t w = 0;
  w += (size_t)snprintf(label, sizeof label, "model_name=\"");
  for (const char *c = model; *c && w + 4 < sizeof label; c++) {
    if (*c == '"' || *c == '\\') label[w++] = '\\';
    if (*c == '\n') {
      label[w++] = '\\';
      label[w++] = 'n';
      continue;
    }
    label[w++] = *c;
  }
  label[w++] = '"';
  label[w] = 0;

  double usage = st->kv_blocks_total > 0
                     ? 1.0 - (double)st->kv_blocks_free / (double)st->kv_blocks_total
                     : 0.0;
  put_one(&t, "tessera:num_requests_running", "gauge", "Sequences in the running batch.", label,
          st->running);
  put_one(&t, "tessera:num_requests_waiting", "gauge", "Sequences waiting to be scheduled.",
          label, st->waiting);
  put_one(&t, "tessera:http_requests_active", "gauge", "Generation requests open on the server.",
          label, active);
  put_one(&t, "tessera:kv_cache_usage_perc", "gauge", "KV-cache usage (1 = full).", label, usage);
  put_one(&t, "tessera:kv_blocks_total", "gauge", "KV-cache blocks in total.", label,
          st->kv_blocks_total);
  put_one(&t, "tessera:kv_blocks_free", "gauge", "KV-cache blocks free (neither used nor cached).",
          label, st->kv_blocks_free);
  put_one(&t, "tessera:prompt_tokens_total", "counter", "Prompt tokens processed.", label,
          (double)st->prompt_tokens_total);
  put_one(&t, "tessera:generation_tokens_total", "counter", "Tokens generated.", label,
          (double)st->generation_tokens_total);
  put_one(&t, "tessera:prefix_cache_queries_total", "counter",
          "Prompt tokens looked up in the prefix cache.", label,
          (double)st->prefix_cache_queries);
  put_one(&t, "tessera:prefix_cache_hits_total", "counter",
          "Prompt tokens found in the prefix cache.", label, (double)st->prefix_cache_hits);
  put_one(&t, "tessera:num_preemptions_total", "counter", "Sequences preempted.", label,
          (double)st->preemptions);

  pthread_mutex_lock(&m->lock);
  static const char *const reasons[5] = {"none", "stop", "length", "abort", "error"};
  put(&t, "# HELP tessera:request_success_total Finished choices by finish reason.\n"
          "# TYPE tessera:request_success_total counter\n");
  for (int r = 1; r < 5; r++)
    put(&t, "tessera:request_success_total{%s,finished_reason=\"%s\"} %lld\n", label, reasons[r],
        m->finished[r]);
  put(&t, "# HELP tessera:http_responses_total HTTP responses by status class.\n"
          "# TYPE tessera:http_responses_total counter\n");
  put(&t, "tessera:http_responses_total{%s,status=\"2xx\"} %lld\n", label, m->http_2xx);
  put(&t, "tessera:http_responses_total{%s,status=\"4xx\"} %lld\n", label, m->http_4xx);
  put(&t, "tessera:http_responses_total{%s,status=\"5xx\"} %lld\n", label, m->http_5xx);
  put_hist(&t, "tessera:time_to_first_token_seconds", "Time to the first generated token.",
           &m->ttft, label);
  put_hist(&t, "tessera:inter_token_latency_seconds", "Time between generated tokens.", &m->itl,
           label);
  put_hist(&t, "tessera:e2e_request_latency_seconds", "Request latency from arrival to finish.",
           &m->e2e, label);
  pthread_mutex_unlock(&m->lock);
  if (t.oom) {
    free(t.buf);
    return -1;
  }
  *out = t.buf;
  *len = t.len;
  return 0;
}
