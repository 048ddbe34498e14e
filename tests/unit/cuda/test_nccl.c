/* comm_nccl between two ranks, one GPU each: forked processes bootstrapped over comm_tcp on
 * loopback run all-reduce, all-gather, broadcast and send/recv on random sizes from 1 to 10^6
 * floats, and compare with a serial computation over every rank's inputs (each rank can rebuild
 * the others' inputs from the shared seed). The argument checks that need no GPU run everywhere;
 * with fewer than two CUDA devices (or without NCCL) the rest prints
 * "skipped: fewer than 2 CUDA devices" and passes. TESSERA_TEST_SEED replays a run. */
#include <cuda_runtime.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../test_util.h"
#include "backend/backend.h"
#include "backend/cuda/backend_cuda.h"
#include "dist/comm_nccl.h"
#include "dist/comm_tcp.h"
#include "dist/net.h"

#define NR 2
#define N_OPS 12
#define MAX_N 1000000

enum { OP_ALL_REDUCE, OP_ALL_GATHER, OP_BROADCAST, OP_SEND_RECV, OP_KINDS };

typedef struct {
  int kind;
  size_t n; /* floats per rank */
  int root; /* broadcast root; send/recv: the sender first */
} op_spec;

static uint64_t g_seed;
static op_spec g_ops[N_OPS];

/* Rank r's input for op k: the same on every rank, so each can compute the expected result. */
static float *make_input(int k, int r, size_t n) {
  test_rng rng = {g_seed ^ (0x9e3779b97f4a7c15ull * (uint64_t)(k + 1)) ^
                  (0xbf58476d1ce4e5b9ull * (uint64_t)(r + 1))};
  if (!rng.s) rng.s = 1;
  float *p = malloc(n * sizeof *p);
  for (size_t i = 0; i < n; i++) p[i] = test_rng_float(&rng) * 4.0f;
  return p;
}

static void plan_ops(void) {
  test_rng rng = {g_seed ? g_seed : 1};
  for (int k = 0; k < N_OPS; k++) {
    op_spec *o = &g_ops[k];
    o->kind = k % OP_KINDS;
    /* The first of each kind is one element, the last of each 10^6; the rest anywhere between,
     * half of them small (up to 300) where NCCL picks other protocols. */
    if (k < OP_KINDS) o->n = 1;
    else if (k >= N_OPS - OP_KINDS) o->n = MAX_N;
    else if (test_rng_next(&rng) & 1) o->n = 1 + test_rng_next(&rng) % 300;
    else o->n = 1 + test_rng_next(&rng) % MAX_N;
    o->root = (int)(test_rng_next(&rng) % NR);
  }
}

/* Runs op k on this rank and checks its output; returns the number of mismatches. */
static int run_op(comm *c, backend *be, int k) {
  const op_spec *o = &g_ops[k];
  int rank = c->rank;
  size_t n = o->n, out_n = o->kind == OP_ALL_GATHER ? n * NR : n;
  float *in[NR];
  for (int r = 0; r < NR; r++) in[r] = make_input(k, r, n);
  float *dev_in = be->ops->alloc(be->ctx, n * sizeof(float));
  float *dev_out = be->ops->alloc(be->ctx, out_n * sizeof(float));
  float *got = malloc(out_n * sizeof(float));
  float *want = malloc(out_n * sizeof(float));
  CHECK(dev_in && dev_out && got && want);
  be->ops->upload(be->ctx, dev_in, in[rank], n * sizeof(float));
  ts_err err = {0};
  int rc = 0;
  float *result = dev_in;
  switch (o->kind) {
    case OP_ALL_REDUCE:
      rc = c->ops->all_reduce_sum_f32(c, dev_in, n, &err);
      for (size_t i = 0; i < n; i++) {
        float s = 0;
        for (int r = 0; r < NR; r++) s += in[r][i];
        want[i] = s;
      }
      break;
    case OP_ALL_GATHER:
      rc = c->ops->all_gather_f32(c, dev_in, n, dev_out, &err);
      result = dev_out;
      for (int r = 0; r < NR; r++) memcpy(want + (size_t)r * n, in[r], n * sizeof(float));
      break;
    case OP_BROADCAST:
      rc = c->ops->broadcast(c, dev_in, n * sizeof(float), o->root, &err);
      memcpy(want, in[o->root], n * sizeof(float));
      break;
    case OP_SEND_RECV: {
      /* A ring: the root sends first and receives second, the others the other way round. */
      int right = (rank + 1) % NR, left = (rank + NR - 1) % NR;
      size_t bytes = n * sizeof(float);
      if (rank == o->root) {
        rc = c->ops->send(c, dev_in, bytes, right, &err);
        if (rc == 0) rc = c->ops->recv(c, dev_out, bytes, left, &err);
      } else {
        rc = c->ops->recv(c, dev_out, bytes, left, &err);
        if (rc == 0) rc = c->ops->send(c, dev_in, bytes, right, &err);
      }
      result = dev_out;
      memcpy(want, in[left], bytes);
      break;
    }
  }
  CHECK_MSG(rc == 0, "rank %d op %d (kind %d, n %zu): %s", rank, k, o->kind, n, err.msg);
  int bad = 0;
  if (rc == 0) {
    ts_err se = {0};
    CHECK_MSG(be->ops->sync(be->ctx, &se) == 0, "rank %d sync: %s", rank, se.msg);
    be->ops->download(be->ctx, got, result, out_n * sizeof(float));
    for (size_t i = 0; i < out_n; i++) {
      /* Two ranks: each sum is one addition, so it is exact; the slack is for larger groups. */
      float tol = o->kind == OP_ALL_REDUCE ? 1e-6f * (fabsf(want[i]) + 8.0f) : 0.0f;
      if (!(fabsf(got[i] - want[i]) <= tol)) {
        if (bad < 3)
          fprintf(stderr, "rank %d op %d (kind %d, n %zu): [%zu] = %g, want %g\n", rank, k,
                  o->kind, n, i, got[i], want[i]);
        bad++;
      }
    }
    CHECK_MSG(bad == 0, "rank %d op %d (kind %d, n %zu): %d of %zu wrong", rank, k, o->kind, n,
              bad, out_n);
  }
  be->ops->free(be->ctx, dev_in);
  be->ops->free(be->ctx, dev_out);
  for (int r = 0; r < NR; r++) free(in[r]);
  free(got);
  free(want);
  return bad;
}

static int rank_main(int rank, int listen_fd, int port, uint64_t group_id) {
  alarm(240); /* a hung collective fails the test instead of stalling it */
  backend *be = NULL;
  ts_err err = {0};
  CHECK_MSG(backend_cuda_create(&be, rank, &err) == 0, "rank %d: %s", rank, err.msg);
  if (!be) return test_finish("test_nccl rank");
  comm_tcp_config tc;
  comm_tcp_config_init(&tc);
  tc.rank = rank;
  tc.size = NR;
  tc.master_host = "127.0.0.1";
  tc.master_port = port;
  tc.listen_fd = rank == 0 ? listen_fd : -1;
  if (rank != 0) close(listen_fd);
  tc.bind_host = "127.0.0.1";
  tc.group_id = group_id;
  for (int i = 0; i < WIRE_SECRET_LEN; i++) tc.secret[i] = (uint8_t)(group_id >> (i % 8 * 8)) ^ (uint8_t)i;
  tc.connect_timeout_ms = 30000;
  comm *boot = NULL, *c = NULL;
  CHECK_MSG(comm_tcp_create(&tc, &boot, &err) == 0, "rank %d bootstrap: %s", rank, err.msg);
  if (boot) {
    comm_nccl_config nc = {.rank = rank, .size = NR, .bootstrap = boot, .be = be};
    CHECK_MSG(comm_nccl_create(&nc, &c, &err) == 0, "rank %d comm_nccl_create: %s", rank,
              err.msg);
    comm_destroy(boot);
  }
  if (c) {
    CHECK(c->rank == rank && c->size == NR && !strcmp(c->ops->name, "nccl"));
    for (int k = 0; k < N_OPS; k++) run_op(c, be, k);
    /* Bad arguments are refused before NCCL sees them, and leave the group usable. */
    ts_err e = {0};
    float *d = be->ops->alloc(be->ctx, 16);
    CHECK(c->ops->send(c, d, 16, rank, &e) == TS_EINVAL);
    CHECK(c->ops->recv(c, d, 16, NR, &e) == TS_EINVAL);
    CHECK(c->ops->broadcast(c, d, 16, NR, &e) == TS_EINVAL);
    CHECK(c->ops->broadcast(c, d, 16, -1, &e) == TS_EINVAL);
    be->ops->free(be->ctx, d);
    run_op(c, be, N_OPS - OP_KINDS); /* one more 10^6 all-reduce after the refusals */
    comm_destroy(c);
  }
  backend_destroy(be);
  char name[32];
  snprintf(name, sizeof name, "test_nccl rank %d", rank);
  return test_finish(name);
}

/* Counted in a child: the parent must not initialise CUDA before it forks the ranks. */
static int count_devices(void) {
  pid_t pid = fork();
  if (pid == 0) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) n = 0;
    _exit(n > 100 ? 100 : n);
  }
  int st = 0;
  if (pid < 0 || waitpid(pid, &st, 0) != pid || !WIFEXITED(st)) return 0;
  return WEXITSTATUS(st);
}

/* Needs no GPU: groups over a backend that is not CUDA, or malformed, are refused. */
static void test_refusals(void) {
  backend *cpu = NULL;
  ts_err err = {0};
  CHECK_MSG(backend_create(&cpu, "cpu", 1, &err) == 0, "%s", err.msg);
  comm *c = (comm *)0x1;
  comm_nccl_config nc = {.rank = 0, .size = 1, .bootstrap = NULL, .be = cpu};
  CHECK(comm_nccl_create(&nc, &c, &err) < 0 && c == NULL);
  CHECK_MSG(strstr(err.msg, comm_nccl_available() ? "CUDA backend" : "without NCCL") != NULL,
            "%s", err.msg);
  nc.rank = 3;
  nc.size = 2;
  c = (comm *)0x1;
  CHECK(comm_nccl_create(&nc, &c, &err) < 0 && c == NULL);
  backend_destroy(cpu);
}

int main(void) {
  signal(SIGPIPE, SIG_IGN);
  const char *s = getenv("TESSERA_TEST_SEED");
  g_seed = s ? strtoull(s, NULL, 0) : ((uint64_t)time(NULL) << 20) ^ (uint64_t)getpid();
  fprintf(stderr, "test_nccl: seed %llu (TESSERA_TEST_SEED replays)\n",
          (unsigned long long)g_seed);
  plan_ops();
  test_refusals();
  int nd = comm_nccl_available() ? count_devices() : 0;
  if (nd < NR) {
    printf("skipped: fewer than %d CUDA devices (%d%s)\n", NR, nd,
           comm_nccl_available() ? "" : ", built without NCCL");
    return test_finish("test_nccl");
  }
  int listen_fd = -1, port = 0;
  ts_err err = {0};
  CHECK_MSG(net_listen("127.0.0.1", 0, 16, &listen_fd, &port, &err) == 0, "%s", err.msg);
  if (listen_fd < 0) return test_finish("test_nccl");
  uint64_t group_id = g_seed * 0x9e3779b97f4a7c15ull + 1;
  fflush(stdout);
  fflush(stderr);
  pid_t pids[NR];
  for (int r = 0; r < NR; r++) {
    pids[r] = fork();
    if (pids[r] == 0) _exit(rank_main(r, listen_fd, port, group_id));
    CHECK(pids[r] > 0);
  }
  close(listen_fd);
  for (int r = 0; r < NR; r++) {
    int st = 0;
    if (pids[r] <= 0) continue;
    CHECK(waitpid(pids[r], &st, 0) == pids[r]);
    CHECK_MSG(WIFEXITED(st) && WEXITSTATUS(st) == 0, "rank %d ended with status %d", r, st);
  }
  for (int k = 0; k < N_OPS; k++)
    fprintf(stderr, "test_nccl: op %d kind %d n %zu root %d\n", k, g_ops[k].kind, g_ops[k].n,
            g_ops[k].root);
  return test_finish("test_nccl");
}
