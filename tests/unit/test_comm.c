/* comm collectives against a serial reference: the single-rank no-op group, and TCP groups of 2,
 * 3 and 4 ranks (threads on loopback) running all-reduce, all-gather, broadcast and send/recv on
 * random data of random sizes from 1 to 10^6 elements. Every rank must get the bit-identical
 * all-reduce result, within float reordering error of the exact sum. */
#include <pthread.h>
#include <string.h>
#include <unistd.h>

#include "dist/comm_tcp.h"
#include "dist/net.h"
#include "test_util.h"

enum { OP_ALL_REDUCE, OP_ALL_GATHER, OP_BROADCAST, OP_SENDRECV };
#define MAX_RANKS 4
#define MAX_OPS 32

typedef struct {
  int kind;
  size_t n;  /* floats (per rank for all-gather) */
  int root;  /* broadcast */
} op_spec;

typedef struct {
  int size, port, listen_fd, n_ops;
  size_t small_max_bytes;
  uint8_t secret[WIRE_SECRET_LEN];
  uint64_t group_id;
  op_spec ops[MAX_OPS];
  pthread_barrier_t bar;
  float *in[MAX_RANKS], *out[MAX_RANKS];
  int rc[MAX_RANKS];
  char msg[MAX_RANKS][TS_ERR_MSG_MAX];
  test_rng rng;
} group;

typedef struct {
  group *g;
  int rank;
} rank_arg;

static void fill_inputs(group *g, const op_spec *op) {
  size_t n_out = op->kind == OP_ALL_GATHER ? op->n * (size_t)g->size : op->n;
  for (int r = 0; r < g->size; r++) {
    g->in[r] = malloc((op->n ? op->n : 1) * sizeof(float));
    g->out[r] = malloc((n_out ? n_out : 1) * sizeof(float));
    float scale = (float)(1 + test_rng_next(&g->rng) % 1000);
    for (size_t i = 0; i < op->n; i++) g->in[r][i] = test_rng_float(&g->rng) * scale;
    for (size_t i = 0; i < n_out; i++) g->out[r][i] = -12345.0f;
  }
}

static void check_outputs(group *g, const op_spec *op) {
  int size = g->size;
  for (int r = 0; r < size; r++) CHECK_MSG(g->rc[r] == 0, "op %d rank %d: %s", op->kind, r, g->msg[r]);
  size_t bad = 0, diffr = 0;
  if (op->kind == OP_ALL_REDUCE) {
    for (size_t i = 0; i < op->n; i++) {
      double exact = 0, mag = 0;
      for (int r = 0; r < size; r++) {
        exact += g->in[r][i];
        mag += fabs(g->in[r][i]);
      }
      float got = g->out[0][i];
      if (fabs(got - exact) > mag * size * 1.2e-7 + 1e-30) bad++;
      for (int r = 1; r < size; r++)
        if (memcmp(&g->out[r][i], &got, sizeof got) != 0) diffr++;
    }
    CHECK_MSG(bad == 0, "all-reduce n=%zu ranks=%d: %zu elements off the exact sum", op->n, size, bad);
    CHECK_MSG(diffr == 0, "all-reduce n=%zu ranks=%d: %zu elements differ between ranks", op->n,
              size, diffr);
  } else if (op->kind == OP_ALL_GATHER) {
    for (int r = 0; r < size; r++)
      for (int s = 0; s < size; s++)
        if (memcmp(g->out[r] + (size_t)s * op->n, g->in[s], op->n * sizeof(float))) bad++;
    CHECK_MSG(bad == 0, "all-gather n=%zu ranks=%d: %zu blocks wrong", op->n, size, bad);
  } else if (op->kind == OP_BROADCAST) {
    for (int r = 0; r < size; r++)
      if (memcmp(g->in[r], g->in[op->root], op->n * sizeof(float))) bad++;
    CHECK_MSG(bad == 0, "broadcast n=%zu root=%d ranks=%d: %zu ranks wrong", op->n, op->root,
              size, bad);
  } else {
    for (int r = 0; r < size; r++)
      if (memcmp(g->out[r], g->in[(r + size - 1) % size], op->n * sizeof(float))) bad++;
    CHECK_MSG(bad == 0, "send/recv ring n=%zu ranks=%d: %zu ranks wrong", op->n, size, bad);
  }
}

static int run_op(comm *c, group *g, const op_spec *op, int rank, ts_err *err) {
  switch (op->kind) {
  case OP_ALL_REDUCE:
    memcpy(g->out[rank], g->in[rank], op->n * sizeof(float));
    return comm_all_reduce_sum_f32(c, g->out[rank], op->n, err);
  case OP_ALL_GATHER:
    return c->ops->all_gather_f32(c, g->in[rank], op->n, g->out[rank], err);
  case OP_BROADCAST:
    return c->ops->broadcast(c, g->in[rank], op->n * sizeof(float), op->root, err);
  default: {
    /* A ring of sends: even ranks send first, odd ranks receive first; both orders must work
     * for messages larger than the socket buffers. */
    int right = (rank + 1) % g->size, left = (rank + g->size - 1) % g->size;
    size_t bytes = op->n * sizeof(float);
    if (rank % 2 == 0) {
      TS_TRY(c->ops->send(c, g->in[rank], bytes, right, err));
      return c->ops->recv(c, g->out[rank], bytes, left, err);
    }
    float *tmp = malloc(bytes ? bytes : 1);
    int rc = c->ops->recv(c, tmp, bytes, left, err);
    if (rc == 0) rc = c->ops->send(c, g->in[rank], bytes, right, err);
    if (rc == 0) memcpy(g->out[rank], tmp, bytes);
    free(tmp);
    return rc;
  }
  }
}

static void *rank_main(void *p) {
  rank_arg *a = p;
  group *g = a->g;
  comm_tcp_config cfg;
  comm_tcp_config_init(&cfg);
  cfg.rank = a->rank;
  cfg.size = g->size;
  cfg.master_host = "127.0.0.1";
  cfg.master_port = g->port;
  cfg.listen_fd = a->rank == 0 ? g->listen_fd : -1;
  cfg.bind_host = a->rank % 2 ? "127.0.0.1" : NULL; /* both the given and the routed address */
  cfg.group_id = g->group_id;
  memcpy(cfg.secret, g->secret, WIRE_SECRET_LEN);
  cfg.connect_timeout_ms = 20000;
  cfg.small_max_bytes = g->small_max_bytes;
  ts_err err = {0};
  comm *c = NULL;
  int crc = comm_tcp_create(&cfg, &c, &err);
  g->rc[a->rank] = crc;
  snprintf(g->msg[a->rank], sizeof g->msg[a->rank], "%s", err.msg);
  pthread_barrier_wait(&g->bar);
  for (int k = 0; k < g->n_ops; k++) {
    if (a->rank == 0) fill_inputs(g, &g->ops[k]);
    pthread_barrier_wait(&g->bar);
    ts_err e = {0};
    g->rc[a->rank] = crc < 0 ? crc : run_op(c, g, &g->ops[k], a->rank, &e);
    if (crc == 0) snprintf(g->msg[a->rank], sizeof g->msg[a->rank], "%s", e.msg);
    pthread_barrier_wait(&g->bar);
    if (a->rank == 0) {
      check_outputs(g, &g->ops[k]);
      for (int r = 0; r < g->size; r++) free(g->in[r]), free(g->out[r]);
    }
    pthread_barrier_wait(&g->bar);
  }
  comm_destroy(c);
  return NULL;
}

static size_t rand_between(test_rng *r, size_t lo, size_t hi) {
  return lo + (size_t)(test_rng_next(r) % (hi - lo + 1));
}

/* small_max_bytes 0 sends every all-reduce around the ring, down to chunks of no elements. */
static void test_group(int size, size_t small_max_bytes, uint64_t seed) {
  group *g = calloc(1, sizeof *g);
  g->size = size;
  g->small_max_bytes = small_max_bytes;
  g->rng.s = seed;
  g->group_id = test_rng_next(&g->rng);
  for (int i = 0; i < WIRE_SECRET_LEN; i++) g->secret[i] = (uint8_t)test_rng_next(&g->rng);
  ts_err err = {0};
  CHECK(net_listen("127.0.0.1", 0, 16, &g->listen_fd, &g->port, &err) == 0);
  test_rng *r = &g->rng;
  /* Sizes straddle the direct/ring switch (16384 floats = 64 KiB) and reach 10^6. */
  size_t reduce_sizes[] = {1, 2, (size_t)size - 1, rand_between(r, 3, 300), 16384, 16385,
                           rand_between(r, 16386, 200000), 1000000};
  int n = 0;
  for (size_t i = 0; i < sizeof reduce_sizes / sizeof *reduce_sizes; i++)
    g->ops[n++] = (op_spec){OP_ALL_REDUCE, reduce_sizes[i], 0};
  g->ops[n++] = (op_spec){OP_ALL_GATHER, 1, 0};
  g->ops[n++] = (op_spec){OP_ALL_GATHER, rand_between(r, 2, 5000), 0};
  g->ops[n++] = (op_spec){OP_ALL_GATHER, rand_between(r, 100000, 1000000 / (size_t)size), 0};
  g->ops[n++] = (op_spec){OP_BROADCAST, rand_between(r, 1, 50), (int)(test_rng_next(r) % (uint64_t)size)};
  g->ops[n++] = (op_spec){OP_BROADCAST, rand_between(r, 100000, 1000000), (int)(test_rng_next(r) % (uint64_t)size)};
  g->ops[n++] = (op_spec){OP_SENDRECV, rand_between(r, 1, 100), 0};
  g->ops[n++] = (op_spec){OP_SENDRECV, rand_between(r, 300000, 1000000), 0};
  g->ops[n++] = (op_spec){OP_ALL_REDUCE, rand_between(r, 1, 1000000), 0}; /* still usable after */
  g->n_ops = n;
  pthread_barrier_init(&g->bar, NULL, (unsigned)size);
  pthread_t th[MAX_RANKS];
  rank_arg args[MAX_RANKS];
  for (int k = 0; k < size; k++) {
    args[k] = (rank_arg){g, k};
    pthread_create(&th[k], NULL, rank_main, &args[k]);
  }
  for (int k = 0; k < size; k++) pthread_join(th[k], NULL);
  pthread_barrier_destroy(&g->bar);
  free(g);
}

static void test_single(void) {
  comm *c = comm_single();
  CHECK(c && c->size == 1 && c->rank == 0);
  test_rng r = {0x1234567ull ^ (uint64_t)getpid()};
  float buf[64], copy[64], gathered[64];
  for (int i = 0; i < 64; i++) copy[i] = buf[i] = test_rng_float(&r);
  ts_err err = {0};
  CHECK(comm_all_reduce_sum_f32(c, buf, 64, &err) == 0);
  CHECK(memcmp(buf, copy, sizeof buf) == 0);
  CHECK(c->ops->all_gather_f32(c, buf, 64, gathered, &err) == 0);
  CHECK(memcmp(gathered, copy, sizeof buf) == 0);
  CHECK(c->ops->broadcast(c, buf, sizeof buf, 0, &err) == 0);
  CHECK(c->ops->broadcast(c, buf, sizeof buf, 1, &err) == TS_EINVAL);
  CHECK(c->ops->send(c, buf, 4, 0, &err) == TS_EINVAL);
  CHECK(c->ops->recv(c, buf, 4, 0, &err) == TS_EINVAL);
  CHECK(strstr(err.msg, "group of one") != NULL);
  comm_destroy(c);
  comm_destroy(NULL);
  /* A NULL comm is a group of one for the inline all-reduce. */
  CHECK(comm_all_reduce_sum_f32(NULL, buf, 64, &err) == 0);
}

int main(void) {
  test_single();
  uint64_t seed = 0x9e3779b97f4a7c15ull ^ ((uint64_t)getpid() << 20);
  fprintf(stderr, "test_comm seed %llu\n", (unsigned long long)seed);
  for (int size = 2; size <= 4; size++) test_group(size, 64 * 1024, seed + (uint64_t)size);
  test_group(3, 0, seed + 99);
  return test_finish("test_comm");
}
