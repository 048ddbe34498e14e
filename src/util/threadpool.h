/* A persistent pool of worker threads for data-parallel loops. Threads are created once; between
 * jobs they sleep on a condition variable. A job splits [0, n) into one contiguous chunk per
 * thread (static chunking) and the calling thread runs chunk 0 itself. */
#ifndef TESSERA_THREADPOOL_H
#define TESSERA_THREADPOOL_H

#include <stdint.h>

#include "util/status.h"

typedef struct threadpool threadpool;

/* Runs the items [start, end) of a job on thread `thread` (0 = the caller). */
typedef void (*threadpool_fn)(void *arg, int64_t start, int64_t end, int thread);

/* n_threads: total threads including the caller; 0 = one per online core. */
int threadpool_create(threadpool **out, int n_threads, ts_err *err);
void threadpool_free(threadpool *p);
int threadpool_size(const threadpool *p);

/* Calls fn over [0, n) split into at most threadpool_size() chunks; returns when all are done.
 * Chunks are never smaller than min_chunk items (so tiny loops stay on the caller). Not
 * reentrant: one job at a time, and fn must not call back into the same pool. */
void threadpool_parallel_for(threadpool *p, int64_t n, int64_t min_chunk, threadpool_fn fn,
                             void *arg);

#endif
