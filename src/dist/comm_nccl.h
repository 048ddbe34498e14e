/* Collectives over NCCL for one tensor-parallel group of CUDA workers (one process per GPU).
 * Rank 0 makes the NCCL unique id and hands it to the others over an existing group of the same
 * ranks (the TCP comm); every call is then enqueued on the rank's CUDA backend stream, ordered
 * with the backend's ops, and returns before the transfer completes (the backend's sync or a
 * download waits for it). Buffers are device pointers of that backend. NVLink multicast (NVLS)
 * is always forced off. Built only with the CUDA backend: without it, create fails. */
#ifndef TESSERA_COMM_NCCL_H
#define TESSERA_COMM_NCCL_H

#include "backend/backend.h"
#include "dist/comm.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  int rank, size;
  comm *bootstrap; /* the same ranks over TCP; used only during create (not taken over) */
  backend *be;     /* this rank's CUDA backend: its device and stream */
} comm_nccl_config;

/* Blocks until every rank has joined (NCCL's own bootstrap) or one fails. */
int comm_nccl_create(const comm_nccl_config *cfg, comm **out, ts_err *err);

/* 1 when this build can make NCCL groups (the CUDA backend and NCCL were compiled in). */
int comm_nccl_available(void);

#ifdef __cplusplus
}
#endif

#endif
