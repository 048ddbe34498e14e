/* Collectives between the ranks of one group, behind one interface: a single-rank no-op, TCP (CPU
 * workers on any nodes) and NCCL (CUDA workers). The model calls comm and never knows whether it
 * is alone. Buffers are device pointers of the rank's backend. */
#ifndef TESSERA_COMM_H
#define TESSERA_COMM_H

#include <stddef.h>

#include "util/status.h"

typedef struct comm comm;

typedef struct comm_ops {
  const char *name;
  int (*all_reduce_sum_f32)(comm *c, float *buf, size_t n, ts_err *err);
  int (*all_gather_f32)(comm *c, const float *in, size_t n_per_rank, float *out, ts_err *err);
  int (*broadcast)(comm *c, void *buf, size_t bytes, int root, ts_err *err);
  int (*send)(comm *c, const void *buf, size_t bytes, int peer, ts_err *err);
  int (*recv)(comm *c, void *buf, size_t bytes, int peer, ts_err *err);
  void (*destroy)(comm *c);
} comm_ops;

struct comm {
  const comm_ops *ops;
  int rank;
  int size;
  /* 1 when a collective is queued in order with the backend's own work (NCCL on the CUDA
   * stream): the caller need not wait for its queued ops first. 0: buffers must be ready. */
  int stream_ordered;
  void *impl;
};

/* A group of one: every collective is a no-op (send/recv to self is an error). */
comm *comm_single(void);

static inline int comm_all_reduce_sum_f32(comm *c, float *buf, size_t n, ts_err *err) {
  return (!c || c->size == 1) ? 0 : c->ops->all_reduce_sum_f32(c, buf, n, err);
}
void comm_destroy(comm *c);

#endif
