/* comm over NCCL: the unique-id handshake over the bootstrap group, ncclCommInitRank, and each
 * collective enqueued on the CUDA backend's stream. A failed NCCL call poisons the group: every
 * later call fails at once with the first error, and destroy aborts instead of draining. */
#include <nccl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/graph.cuh"

extern "C" {
#include "dist/comm_nccl.h"
}

typedef struct {
  ncclComm_t nccl;
  cuda_ctx *cu; /* the backend's context: device and stream */
  int broken;
  char first_err[512];
} nccl_impl;

/* What rank 0 broadcasts: whether it could make an id, and the id. */
typedef struct {
  int32_t ok;
  ncclUniqueId id;
} nccl_hello;

static int nccl_code(ncclResult_t r) {
  switch (r) {
    case ncclInvalidArgument:
    case ncclInvalidUsage: return TS_EINVAL;
    case ncclRemoteError:
    case ncclSystemError: return TS_ENET;
    default: return TS_EINTERNAL;
  }
}

/* Records the failing call, file and line; the group is unusable afterwards. */
static int nccl_check_at(comm *c, ncclResult_t r, const char *call, const char *file, int line,
                         ts_err *err) {
  if (r == ncclSuccess || r == ncclInProgress) return 0;
  nccl_impl *nc = (nccl_impl *)c->impl;
  const char *last = nc && nc->nccl ? ncclGetLastError(nc->nccl) : NULL;
  char msg[512];
  snprintf(msg, sizeof msg, "NCCL error %s in %s at %s:%d (rank %d of %d)%s%s; set NCCL_DEBUG=WARN "
           "for NCCL's own report",
           ncclGetErrorString(r), call, file, line, c->rank, c->size, last && *last ? ": " : "",
           last && *last ? last : "");
  if (nc && !nc->broken) {
    nc->broken = 1;
    snprintf(nc->first_err, sizeof nc->first_err, "%s", msg);
  }
  return ts_errorf(err, nccl_code(r), "%s", msg);
}
#define NCCL_CHECK(c, name, call, err) nccl_check_at((c), (call), (name), __FILE__, __LINE__, (err))

static int cuda_check_comm(comm *c, cudaError_t e, const char *call, const char *file, int line,
                           ts_err *err) {
  if (e == cudaSuccess) return 0;
  return ts_errorf(err, e == cudaErrorMemoryAllocation ? TS_ENOMEM : TS_EINTERNAL,
                   "CUDA error %s in %s at %s:%d (NCCL rank %d of %d)", cudaGetErrorName(e),
                   call, file, line, c->rank, c->size);
}
#define COMM_CUDA_CHECK(c, name, call, err) \
  cuda_check_comm((c), (call), (name), __FILE__, __LINE__, (err))

/* Before enqueuing: the group must be healthy, and the backend's queued work must be in stream
 * order (a step being captured or replayed as a CUDA graph launches only at its flush). */
static int enter(comm *c, const char *what, ts_err *err) {
  nccl_impl *nc = (nccl_impl *)c->impl;
  if (nc->broken)
    return ts_errorf(err, TS_EIO, "NCCL %s: the group failed earlier: %s", what, nc->first_err);
  if (nc->cu->gmode != CUDA_GRAPH_OFF && cuda_graph_flush(nc->cu) < 0)
    return ts_errorf(err, TS_EINTERNAL, "NCCL %s: %s", what, nc->cu->err_msg);
  return 0;
}

/* NCCL reports some failures (a peer gone, a network error) only afterwards. */
static int leave(comm *c, ts_err *err) {
  nccl_impl *nc = (nccl_impl *)c->impl;
  ncclResult_t async = ncclSuccess;
  if (NCCL_CHECK(c, "ncclCommGetAsyncError", ncclCommGetAsyncError(nc->nccl, &async), err) < 0)
    return -1;
  return NCCL_CHECK(c, "an earlier NCCL operation (async)", async, err);
}

/* The forward's all-reduce is one op of the step like the kernels around it: inside a decode
 * step's CUDA graph it is recorded on capture and skipped on replay (the graph runs it), so a
 * tensor-parallel step is one graph launch too. Every rank sees the same steps, so the ranks'
 * graphs hold the same collectives in the same order. */
static int nccl_all_reduce(comm *c, float *buf, size_t n, ts_err *err) {
  nccl_impl *nc = (nccl_impl *)c->impl;
  if (nc->broken)
    return ts_errorf(err, TS_EIO, "NCCL all-reduce: the group failed earlier: %s", nc->first_err);
  if (n == 0) return 0;
  if (cuda_graph_op(nc->cu, CUDA_OP_ALL_REDUCE, buf, NULL, NULL, (int64_t)n, 0)) return 0;
  TS_TRY(NCCL_CHECK(c, "ncclAllReduce",
                    ncclAllReduce(buf, buf, n, ncclFloat32, ncclSum, nc->nccl, nc->cu->stream),
                    err));
  return leave(c, err);
}

/* out [size][n_per_rank], rank-major (in may be out + rank * n_per_rank). */
static int nccl_all_gather(comm *c, const float *in, size_t n_per_rank, float *out, ts_err *err) {
  nccl_impl *nc = (nccl_impl *)c->impl;
  TS_TRY(enter(c, "all-gather", err));
  if (n_per_rank == 0) return 0;
  TS_TRY(NCCL_CHECK(c, "ncclAllGather",
                    ncclAllGather(in, out, n_per_rank, ncclFloat32, nc->nccl, nc->cu->stream),
                    err));
  return leave(c, err);
}

static int nccl_broadcast(comm *c, void *buf, size_t bytes, int root, ts_err *err) {
  nccl_impl *nc = (nccl_impl *)c->impl;
  if (root < 0 || root >= c->size)
    return ts_errorf(err, TS_EINVAL, "NCCL broadcast: root %d outside a group of %d", root,
                     c->size);
  TS_TRY(enter(c, "broadcast", err));
  if (bytes == 0) return 0;
  TS_TRY(NCCL_CHECK(c, "ncclBroadcast",
                    ncclBroadcast(buf, buf, bytes, ncclUint8, root, nc->nccl, nc->cu->stream),
                    err));
  return leave(c, err);
}

static int check_peer(comm *c, int peer, const char *what, ts_err *err) {
  if (peer < 0 || peer >= c->size || peer == c->rank)
    return ts_errorf(err, TS_EINVAL, "NCCL %s: peer %d is not another rank of a group of %d", what,
                     peer, c->size);
  return 0;
}

/* A send completes on the device only once the peer's matching recv is posted: two ranks that
 * send to each other must order their calls (one sends first, the other receives first). */
static int nccl_send(comm *c, const void *buf, size_t bytes, int peer, ts_err *err) {
  nccl_impl *nc = (nccl_impl *)c->impl;
  TS_TRY(check_peer(c, peer, "send", err));
  TS_TRY(enter(c, "send", err));
  if (bytes == 0) return 0;
  TS_TRY(NCCL_CHECK(c, "ncclSend", ncclSend(buf, bytes, ncclUint8, peer, nc->nccl, nc->cu->stream),
                    err));
  return leave(c, err);
}

static int nccl_recv(comm *c, void *buf, size_t bytes, int peer, ts_err *err) {
  nccl_impl *nc = (nccl_impl *)c->impl;
  TS_TRY(check_peer(c, peer, "recv", err));
  TS_TRY(enter(c, "recv", err));
  if (bytes == 0) return 0;
  TS_TRY(NCCL_CHECK(c, "ncclRecv", ncclRecv(buf, bytes, ncclUint8, peer, nc->nccl, nc->cu->stream),
                    err));
  return leave(c, err);
}

static void nccl_destroy(comm *c) {
  if (!c) return;
  nccl_impl *nc = (nccl_impl *)c->impl;
  if (nc && nc->nccl) {
    /* A broken group may have peers that never answer: abort rather than wait for them. */
    if (nc->broken) ncclCommAbort(nc->nccl);
    else ncclCommDestroy(nc->nccl);
  }
  free(nc);
  free(c);
}

static const comm_ops g_nccl_ops = {
    "nccl",         nccl_all_reduce, nccl_all_gather, nccl_broadcast,
    nccl_send,      nccl_recv,       nccl_destroy,
};

extern "C" int comm_nccl_available(void) { return 1; }

extern "C" int comm_nccl_create(const comm_nccl_config *cfg, comm **out, ts_err *err) {
  *out = NULL;
  if (!cfg || cfg->size < 1 || cfg->rank < 0 || cfg->rank >= cfg->size)
    return ts_errorf(err, TS_EINVAL, "NCCL: rank %d outside a group of %d", cfg ? cfg->rank : -1,
                     cfg ? cfg->size : 0);
  if (!cfg->be || !cfg->be->ops || strcmp(cfg->be->ops->name, "cuda") != 0)
    return ts_errorf(err, TS_EINVAL, "NCCL needs the CUDA backend (--device cuda), not '%s'",
                     cfg->be && cfg->be->ops ? cfg->be->ops->name : "none");
  if (cfg->size > 1 && (!cfg->bootstrap || cfg->bootstrap->rank != cfg->rank ||
                        cfg->bootstrap->size != cfg->size))
    return ts_errorf(err, TS_EINVAL,
                     "NCCL: the bootstrap group must hold the same %d ranks (rank %d)", cfg->size,
                     cfg->rank);
  /* NVLink multicast can take a shared host's GPUs out of service: off, whatever the caller's
   * environment says. Set before NCCL reads its parameters (at the first init). */
  setenv("NCCL_NVLS_ENABLE", "0", 1);

  comm *c = (comm *)calloc(1, sizeof *c);
  nccl_impl *nc = (nccl_impl *)calloc(1, sizeof *nc);
  if (!c || !nc) {
    free(c);
    free(nc);
    return ts_errorf(err, TS_ENOMEM, "NCCL: out of memory");
  }
  c->ops = &g_nccl_ops;
  c->rank = cfg->rank;
  c->size = cfg->size;
  c->impl = nc;
  c->stream_ordered = 1;
  nc->cu = (cuda_ctx *)cfg->be->ctx;

  int rc = COMM_CUDA_CHECK(c, "cudaSetDevice", cudaSetDevice(nc->cu->device), err);
  nccl_hello h;
  memset(&h, 0, sizeof h);
  if (rc == 0 && cfg->rank == 0) {
    ts_err ie;
    ts_err_clear(&ie);
    h.ok = NCCL_CHECK(c, "ncclGetUniqueId", ncclGetUniqueId(&h.id), &ie) == 0;
    if (!h.ok) rc = ts_errorf(err, ie.code, "%s", ie.msg);
  }
  /* Rank 0 broadcasts even after a failure, so that the others stop waiting. */
  if ((rc == 0 || cfg->rank == 0) && cfg->size > 1) {
    ts_err be;
    ts_err_clear(&be);
    if (cfg->bootstrap->ops->broadcast(cfg->bootstrap, &h, sizeof h, 0, &be) < 0 && rc == 0)
      rc = ts_errorf(err, be.code, "NCCL: handing out the unique id: %s", be.msg);
    if (rc == 0 && !h.ok)
      rc = ts_errorf(err, TS_EINTERNAL, "NCCL: rank 0 could not create the group's unique id");
  }
  if (rc == 0)
    rc = NCCL_CHECK(c, "ncclCommInitRank", ncclCommInitRank(&nc->nccl, cfg->size, h.id, cfg->rank),
                    err);
  if (rc < 0) {
    nc->broken = 1;
    nccl_destroy(c);
    return rc;
  }
  nc->broken = 0;
  *out = c;
  return 0;
}
