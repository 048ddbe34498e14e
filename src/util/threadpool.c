/* The persistent thread pool: a generation counter under one mutex wakes the workers for each job
 * and a pending counter tells the caller when the last chunk is done. */
#include "util/threadpool.h"

#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

struct threadpool {
  int n_threads; /* including the caller */
  pthread_t *threads;
  pthread_mutex_t mu;
  pthread_cond_t wake; /* workers wait here for a new generation */
  pthread_cond_t done; /* the caller waits here for pending == 0 */
  uint64_t generation;
  int pending;
  int stop;
  /* The current job, valid while pending > 0. */
  threadpool_fn fn;
  void *arg;
  int64_t n;
  int n_chunks;
};

typedef struct {
  threadpool *p;
  int index;
} worker_arg;

static void chunk_range(int64_t n, int n_chunks, int c, int64_t *start, int64_t *end) {
  int64_t base = n / n_chunks, rem = n % n_chunks;
  *start = c * base + (c < rem ? c : rem);
  *end = *start + base + (c < rem ? 1 : 0);
}

static void *worker_main(void *argp) {
  worker_arg wa = *(worker_arg *)argp;
  free(argp);
  threadpool *p = wa.p;
  uint64_t seen = 0;
  pthread_mutex_lock(&p->mu);
  for (;;) {
    while (!p->stop && p->generation == seen) pthread_cond_wait(&p->wake, &p->mu);
    if (p->stop) break;
    seen = p->generation;
    if (wa.index >= p->n_chunks) continue; /* this job needs fewer threads */
    threadpool_fn fn = p->fn;
    void *arg = p->arg;
    int64_t start, end;
    chunk_range(p->n, p->n_chunks, wa.index, &start, &end);
    pthread_mutex_unlock(&p->mu);
    fn(arg, start, end, wa.index);
    pthread_mutex_lock(&p->mu);
    if (--p->pending == 0) pthread_cond_signal(&p->done);
  }
  pthread_mutex_unlock(&p->mu);
  return NULL;
}

int threadpool_create(threadpool **out, int n_threads, ts_err *err) {
  *out = NULL;
  if (n_threads < 0) return ts_errorf(err, TS_EINVAL, "threads must be >= 0, got %d", n_threads);
  if (n_threads == 0) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    n_threads = n > 0 ? (int)n : 1;
  }
  threadpool *p = calloc(1, sizeof *p);
  if (!p) return ts_errorf(err, TS_ENOMEM, "out of memory creating a thread pool");
  p->n_threads = n_threads;
  pthread_mutex_init(&p->mu, NULL);
  pthread_cond_init(&p->wake, NULL);
  pthread_cond_init(&p->done, NULL);
  if (n_threads > 1) {
    p->threads = calloc((size_t)n_threads - 1, sizeof *p->threads);
    if (!p->threads) {
      threadpool_free(p);
      return ts_errorf(err, TS_ENOMEM, "out of memory creating a thread pool");
    }
  }
  for (int i = 1; i < n_threads; i++) {
    worker_arg *wa = malloc(sizeof *wa);
    int rc = wa ? 0 : -1;
    if (wa) {
      wa->p = p;
      wa->index = i;
      rc = pthread_create(&p->threads[i - 1], NULL, worker_main, wa);
      if (rc) free(wa);
    }
    if (rc) {
      p->n_threads = i; /* only the threads started so far are joined */
      threadpool_free(p);
      return ts_errorf(err, TS_ENOMEM, "cannot start worker thread %d of %d", i, n_threads);
    }
  }
  *out = p;
  return 0;
}

void threadpool_free(threadpool *p) {
  if (!p) return;
  pthread_mutex_lock(&p->mu);
  p->stop = 1;
  pthread_cond_broadcast(&p->wake);
  pthread_mutex_unlock(&p->mu);
  for (int i = 1; i < p->n_threads; i++) pthread_join(p->threads[i - 1], NULL);
  pthread_cond_destroy(&p->wake);
  pthread_cond_destroy(&p->done);
  pthread_mutex_destroy(&p->mu);
  free(p->threads);
  free(p);
}

int threadpool_size(const threadpool *p) { return p ? p->n_threads : 1; }

void threadpool_parallel_for(threadpool *p, int64_t n, int64_t min_chunk, threadpool_fn fn,
                             void *arg) {
  if (n <= 0) return;
  if (min_chunk < 1) min_chunk = 1;
  int64_t chunks = n / min_chunk;
  int n_chunks = p ? p->n_threads : 1;
  if (chunks < n_chunks) n_chunks = chunks < 1 ? 1 : (int)chunks;
  if (n_chunks == 1) {
    fn(arg, 0, n, 0);
    return;
  }
  pthread_mutex_lock(&p->mu);
  p->fn = fn;
  p->arg = arg;
  p->n = n;
  p->n_chunks = n_chunks;
  p->pending = n_chunks - 1;
  p->generation++;
  pthread_cond_broadcast(&p->wake);
  pthread_mutex_unlock(&p->mu);
  int64_t start, end;
  chunk_range(n, n_chunks, 0, &start, &end);
  fn(arg, start, end, 0);
  pthread_mutex_lock(&p->mu);
  while (p->pending > 0) pthread_cond_wait(&p->done, &p->mu);
  pthread_mutex_unlock(&p->mu);
}
