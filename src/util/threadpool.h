/* A persistent pool of worker threads for data-parallel loops. Threads are created once; a job
 * is cut into a few chunks per thread which the caller and the workers claim one at a time from
 * an atomic counter (dynamic chunking), so a thread that the OS deschedules delays a job by at
 * most one chunk: the others take what it has not started. Between jobs the workers spin briefly
 * (jobs of one model step follow each other within microseconds) and then sleep. */
#ifndef TESSERA_THREADPOOL_H
#define TESSERA_THREADPOOL_H

#include <stdint.h>

#include "util/status.h"

typedef struct threadpool threadpool;

/* Runs the items [start, end) of a job on thread `thread` (0 = the caller, else 1..size-1; at
 * most one call runs on a given thread index at a time, so per-thread scratch is safe). */
typedef void (*threadpool_fn)(void *arg, int64_t start, int64_t end, int thread);

/* n_threads: total threads including the caller; 0 = one per online core. */
int threadpool_create(threadpool **out, int n_threads, ts_err *err);
void threadpool_free(threadpool *p);
int threadpool_size(const threadpool *p);

/* Calls fn over [0, n) in chunks; returns when all are done. Every chunk but the last is a
 * multiple of min_chunk items (so kernels with a natural tile keep whole tiles), and a loop of
 * fewer than 2 * min_chunk items runs on the caller alone. Which thread runs which chunk is not
 * fixed: fn's result must not depend on it. Not reentrant: one job at a time, and fn must not
 * call back into the same pool. */
void threadpool_parallel_for(threadpool *p, int64_t n, int64_t min_chunk, threadpool_fn fn,
                             void *arg);

#endif
