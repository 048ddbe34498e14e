/* The persistent thread pool. One 64-bit ticket holds the current job: generation (32 bits),
 * chunk count (16) and next unclaimed chunk (16). A thread claims a chunk with a CAS on the
 * ticket, so a claim can only succeed for the job the ticket names and only while chunks remain;
 * the job's fields (fn, arg, sizes) are read after a successful claim, when the caller cannot be
 * rewriting them (it waits for every claimed chunk to finish before the next job). Workers spin on
 * the ticket for a short while after each job and then sleep on a condition variable. */
#include "util/threadpool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

/* How long an idle worker polls for the next job before sleeping: longer than the gap between
 * two ops of a step, short enough not to burn a shared core between steps. */
#define SPIN_NS 200000
#define CHUNKS_PER_THREAD 4
#define MAX_CHUNKS 0xffff

#define T_GEN(t) ((uint32_t)((t) >> 32))
#define T_NCH(t) ((uint32_t)(((t) >> 16) & 0xffff))
#define T_IDX(t) ((uint32_t)((t)&0xffff))

struct threadpool {
  int n_threads; /* including the caller */
  pthread_t *threads;
  _Atomic uint64_t ticket;
  _Atomic int done;     /* chunks of the current job finished */
  _Atomic int sleepers; /* workers blocked (or about to block) on wake */
  _Atomic int stop;
  pthread_mutex_t mu;
  pthread_cond_t wake;
  /* The current job; written by the caller only while no chunk of it can be claimed. */
  threadpool_fn fn;
  void *arg;
  int64_t n, chunk;
};

typedef struct {
  threadpool *p;
  int index;
} worker_arg;

static int64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Claims and runs chunks of job `gen` until none is left; returns how many this thread ran. */
static int run_chunks(threadpool *p, uint32_t gen, int thread) {
  int ran = 0;
  uint64_t t = atomic_load_explicit(&p->ticket, memory_order_acquire);
  for (;;) {
    if (T_GEN(t) != gen || T_IDX(t) >= T_NCH(t)) return ran;
    if (!atomic_compare_exchange_weak_explicit(&p->ticket, &t, t + 1, memory_order_acq_rel,
                                               memory_order_acquire))
      continue;
    int64_t s = (int64_t)T_IDX(t) * p->chunk;
    int64_t e = s + p->chunk < p->n ? s + p->chunk : p->n;
    p->fn(p->arg, s, e, thread);
    atomic_fetch_add_explicit(&p->done, 1, memory_order_release);
    ran++;
    t = atomic_load_explicit(&p->ticket, memory_order_acquire);
  }
}

static void *worker_main(void *argp) {
  worker_arg wa = *(worker_arg *)argp;
  free(argp);
  threadpool *p = wa.p;
  uint32_t seen = T_GEN(atomic_load(&p->ticket));
  for (;;) {
    uint64_t t = atomic_load_explicit(&p->ticket, memory_order_acquire);
    if (T_GEN(t) == seen && !atomic_load_explicit(&p->stop, memory_order_relaxed)) {
      int64_t t0 = now_ns();
      for (int spins = 1;; spins++) {
        CPU_RELAX();
        t = atomic_load_explicit(&p->ticket, memory_order_acquire);
        if (T_GEN(t) != seen || atomic_load_explicit(&p->stop, memory_order_relaxed)) break;
        if ((spins & 255) == 0 && now_ns() - t0 > SPIN_NS) break;
      }
    }
    if (T_GEN(t) == seen && !atomic_load(&p->stop)) {
      pthread_mutex_lock(&p->mu);
      atomic_fetch_add(&p->sleepers, 1);
      /* seq_cst against the caller's ticket store then sleepers load: either it sees us
       * sleeping and broadcasts under the mutex, or we see its new ticket here. */
      while (T_GEN(atomic_load(&p->ticket)) == seen && !atomic_load(&p->stop))
        pthread_cond_wait(&p->wake, &p->mu);
      atomic_fetch_sub(&p->sleepers, 1);
      pthread_mutex_unlock(&p->mu);
    }
    if (atomic_load(&p->stop)) break;
    seen = T_GEN(atomic_load_explicit(&p->ticket, memory_order_acquire));
    run_chunks(p, seen, wa.index);
  }
  return NULL;
}

int threadpool_create(threadpool **out, int n_threads, ts_err *err) {
  *out = NULL;
  if (n_threads < 0) return ts_errorf(err, TS_EINVAL, "threads must be >= 0, got %d", n_threads);
  if (n_threads == 0) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    n_threads = n > 0 ? (int)n : 1;
  }
  if (n_threads > 4096)
    return ts_errorf(err, TS_EINVAL, "threads must be <= 4096, got %d", n_threads);
  threadpool *p = calloc(1, sizeof *p);
  if (!p) return ts_errorf(err, TS_ENOMEM, "out of memory creating a thread pool");
  p->n_threads = n_threads;
  atomic_init(&p->ticket, 0);
  atomic_init(&p->done, 0);
  atomic_init(&p->sleepers, 0);
  atomic_init(&p->stop, 0);
  pthread_mutex_init(&p->mu, NULL);
  pthread_cond_init(&p->wake, NULL);
  if (n_threads > 1) {
    p->threads = calloc((size_t)n_threads - 1, sizeof *p->threads);
    if (!p->threads) {
      p->n_threads = 1;
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
  atomic_store(&p->stop, 1);
  pthread_cond_broadcast(&p->wake);
  pthread_mutex_unlock(&p->mu);
  for (int i = 1; i < p->n_threads; i++) pthread_join(p->threads[i - 1], NULL);
  pthread_cond_destroy(&p->wake);
  pthread_mutex_destroy(&p->mu);
  free(p->threads);
  free(p);
}

int threadpool_size(const threadpool *p) { return p ? p->n_threads : 1; }

void threadpool_parallel_for(threadpool *p, int64_t n, int64_t min_chunk, threadpool_fn fn,
                             void *arg) {
  if (n <= 0) return;
  if (min_chunk < 1) min_chunk = 1;
  int threads = p ? p->n_threads : 1;
  if (threads == 1 || n < 2 * min_chunk) {
    fn(arg, 0, n, 0);
    return;
  }
  /* A few chunks per thread, each a whole number of min_chunk. */
  int64_t want = (int64_t)threads * CHUNKS_PER_THREAD;
  if (want > MAX_CHUNKS) want = MAX_CHUNKS;
  int64_t chunk = (n + want - 1) / want;
  chunk = (chunk + min_chunk - 1) / min_chunk * min_chunk;
  int64_t n_chunks = (n + chunk - 1) / chunk;
  if (n_chunks < 2) {
    fn(arg, 0, n, 0);
    return;
  }
  p->fn = fn;
  p->arg = arg;
  p->n = n;
  p->chunk = chunk;
  atomic_store_explicit(&p->done, 0, memory_order_relaxed);
  uint32_t gen = T_GEN(atomic_load_explicit(&p->ticket, memory_order_relaxed)) + 1;
  /* seq_cst: ordered before the sleepers load (see worker_main). */
  atomic_store(&p->ticket, ((uint64_t)gen << 32) | ((uint64_t)n_chunks << 16));
  if (atomic_load(&p->sleepers) > 0) {
    pthread_mutex_lock(&p->mu);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
  }
  run_chunks(p, gen, 0);
  /* Chunks a worker claimed and is still running: wait, yielding the core after a while so a
   * worker sharing it with us can finish. */
  for (int spins = 0; atomic_load_explicit(&p->done, memory_order_acquire) < n_chunks; spins++) {
    if (spins < 4096)
      CPU_RELAX();
    else
      sched_yield();
  }
}
