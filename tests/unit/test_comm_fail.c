/* comm failure paths: a peer killed or stalled in the middle of a stream of collectives makes the
 * others fail (within the I/O timeout, never a hang) with an error naming a peer, and poisons the
 * group; strays (garbage, wrong secret, wrong group or world size, silence) are turned away at
 * rendezvous while the right rank still joins; a rendezvous nobody answers times out. */
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "dist/comm_tcp.h"
#include "dist/net.h"
#include "test_util.h"

typedef struct {
  int rc, rc_again, iterations;
  char msg[600], msg_again[300];
} child_report;

static void base_config(comm_tcp_config *cfg, int rank, int size, int port, uint64_t group) {
  comm_tcp_config_init(cfg);
  cfg->rank = rank;
  cfg->size = size;
  cfg->master_host = "127.0.0.1";
  cfg->master_port = port;
  cfg->group_id = group;
  for (int i = 0; i < WIRE_SECRET_LEN; i++) cfg->secret[i] = (uint8_t)(group >> (i % 8) ^ (uint64_t)i);
  cfg->connect_timeout_ms = 10000;
}

/* Child: join, signal readiness after a few collectives, then loop until a collective fails. */
static void child_main(int rank, int size, int port, int lfd, uint64_t group, size_t n,
                       int victim, int report_fd, int ready_fd) {
  alarm(60); /* a hang would fail the test through the exit status, not block ctest */
  comm_tcp_config cfg;
  base_config(&cfg, rank, size, port, group);
  cfg.listen_fd = rank == 0 ? lfd : -1;
  if (rank != 0) close(lfd);
  cfg.io_timeout_ms = 1500;
  child_report rep;
  memset(&rep, 0, sizeof rep);
  ts_err err = {0};
  comm *c = NULL;
  rep.rc = comm_tcp_create(&cfg, &c, &err);
  float *buf = calloc(n, sizeof *buf);
  for (int it = 0; rep.rc == 0 && it < 1000000; it++) {
    for (size_t i = 0; i < n; i++) buf[i] = (float)(rank + 1);
    rep.rc = comm_all_reduce_sum_f32(c, buf, n, &err);
    rep.iterations = it + 1;
    if (rank == victim && it == 20) {
      char b = 1;
      if (write(ready_fd, &b, 1) != 1) break;
    }
  }
  snprintf(rep.msg, sizeof rep.msg, "%.590s", err.msg);
  if (c) {
    ts_err again = {0};
    rep.rc_again = comm_all_reduce_sum_f32(c, buf, n, &again);
    snprintf(rep.msg_again, sizeof rep.msg_again, "%.290s", again.msg);
  }
  if (write(report_fd, &rep, sizeof rep) != (ssize_t)sizeof rep) _exit(3);
  comm_destroy(c);
  free(buf);
  _exit(0);
}

/* Three ranks stream all-reduces of n floats; rank 2 is killed (or stopped) mid-stream. */
static void test_dead_peer(int stop_instead, size_t n, uint64_t group) {
  const int size = 3, victim = 2;
  int lfd = -1, port = 0;
  ts_err err = {0};
  CHECK(net_listen("127.0.0.1", 0, 16, &lfd, &port, &err) == 0);
  int rep_pipe[2], ready_pipe[2];
  CHECK(pipe(rep_pipe) == 0 && pipe(ready_pipe) == 0);
  pid_t pid[3];
  for (int r = 0; r < size; r++) {
    pid[r] = fork();
    if (pid[r] == 0) {
      close(rep_pipe[0]);
      close(ready_pipe[0]);
      child_main(r, size, port, lfd, group, n, victim, rep_pipe[1], ready_pipe[1]);
    }
  }
  close(lfd);
  close(rep_pipe[1]);
  close(ready_pipe[1]);
  char b = 0;
  CHECK(read(ready_pipe[0], &b, 1) == 1);
  int64_t t0 = net_now_ms();
  kill(pid[victim], stop_instead ? SIGSTOP : SIGKILL);
  /* Survivors report in any order; the victim never reports. */
  child_report rep[2];
  int named_victim = 0, timed_out = 0;
  for (int k = 0; k < 2; k++) {
    ssize_t got = read(rep_pipe[0], &rep[k], sizeof rep[k]);
    CHECK(got == (ssize_t)sizeof rep[k]);
    if (got != (ssize_t)sizeof rep[k]) break;
    fprintf(stderr, "  survivor after %lld ms, %d iterations: %s\n",
            (long long)(net_now_ms() - t0), rep[k].iterations, rep[k].msg);
    CHECK(rep[k].rc == TS_ENET || rep[k].rc == TS_ETIMEOUT);
    CHECK(rep[k].iterations > 20);
    if (strstr(rep[k].msg, "rank 2 (")) named_victim = 1;
    if (strstr(rep[k].msg, "no progress")) timed_out = 1;
    /* Each survivor names the peer whose connection failed it, with its address. */
    CHECK_MSG(strstr(rep[k].msg, "rank 0 (") || strstr(rep[k].msg, "rank 1 (") ||
              strstr(rep[k].msg, "rank 2 ("), "%s", rep[k].msg);
    /* The group is poisoned: later calls fail at once and say why. */
    CHECK(rep[k].rc_again == TS_ENET);
    CHECK_MSG(strstr(rep[k].msg_again, "failed earlier") != NULL, "%s", rep[k].msg_again);
  }
  /* The first failure names the victim, except a stall in the ring, where a survivor that waits
   * on the other survivor may time out first (and correctly blames its silent neighbour). */
  if (!stop_instead || n * sizeof(float) <= 64 * 1024) CHECK(named_victim);
  if (stop_instead) CHECK(timed_out);
  if (stop_instead) kill(pid[victim], SIGKILL);
  for (int r = 0; r < size; r++) {
    int st = 0;
    waitpid(pid[r], &st, 0);
    if (r != victim) CHECK_MSG(WIFEXITED(st) && WEXITSTATUS(st) == 0, "rank %d status %d", r, st);
  }
  close(rep_pipe[0]);
  close(ready_pipe[0]);
}

/* ---- rendezvous rejections ---- */

typedef struct {
  int lfd, port, rc;
  uint64_t group;
  char msg[TS_ERR_MSG_MAX];
  float sum;
} root_arg;

static void *root_main(void *p) {
  root_arg *a = p;
  comm_tcp_config cfg;
  base_config(&cfg, 0, 2, a->port, a->group);
  cfg.listen_fd = a->lfd;
  cfg.connect_timeout_ms = 30000;
  cfg.io_timeout_ms = 500; /* how long a silent stray may hold the rendezvous */
  ts_err err = {0};
  comm *c = NULL;
  a->rc = comm_tcp_create(&cfg, &c, &err);
  snprintf(a->msg, sizeof a->msg, "%s", err.msg);
  if (a->rc == 0) {
    a->sum = 2.5f;
    a->rc = comm_all_reduce_sum_f32(c, &a->sum, 1, &err);
  }
  comm_destroy(c);
  return NULL;
}

static int join(int rank, int size, int port, uint64_t group, const uint8_t *secret, ts_err *err,
                comm **out) {
  comm_tcp_config cfg;
  base_config(&cfg, rank, size, port, group);
  if (secret) memcpy(cfg.secret, secret, WIRE_SECRET_LEN);
  cfg.connect_timeout_ms = 5000;
  return comm_tcp_create(&cfg, out, err);
}

static void test_strays(uint64_t group, test_rng *rng) {
  root_arg a = {.group = group};
  ts_err err = {0};
  CHECK(net_listen("127.0.0.1", 0, 16, &a.lfd, &a.port, &err) == 0);
  pthread_t th;
  pthread_create(&th, NULL, root_main, &a);

  /* Garbage from something that is not a tessera peer: dropped. */
  int fd = -1;
  CHECK(net_connect("127.0.0.1", a.port, net_now_ms() + 5000, &fd, &err) == 0);
  char junk[64];
  for (size_t i = 0; i < sizeof junk; i++) junk[i] = (char)test_rng_next(rng);
  CHECK(net_send_all(fd, junk, sizeof junk, net_now_ms() + 5000, &err) == 0);
  char sink[4096];
  int rc = 0;
  while ((rc = net_recv_all(fd, sink, 1, net_now_ms() + 5000, &err)) == 0) {
  }
  CHECK_MSG(rc == TS_ENET, "stray garbage: %d %s", rc, err.msg); /* closed, not timed out */
  close(fd);

  /* A wrong secret (one random bit flipped), a foreign group and a wrong world size. */
  comm_tcp_config good;
  base_config(&good, 1, 2, a.port, group);
  uint8_t bad_secret[WIRE_SECRET_LEN];
  memcpy(bad_secret, good.secret, sizeof bad_secret);
  uint64_t bit = test_rng_next(rng) % (8 * WIRE_SECRET_LEN);
  bad_secret[bit / 8] ^= (uint8_t)(1u << (bit % 8));
  comm *c = NULL;
  ts_err e1 = {0}, e2 = {0}, e3 = {0};
  CHECK(join(1, 2, a.port, group, bad_secret, &e1, &c) == TS_EPROTO && c == NULL);
  CHECK_MSG(strstr(e1.msg, "wrong launch secret") != NULL, "%s", e1.msg);
  CHECK(join(1, 2, a.port, group ^ 1, NULL, &e2, &c) == TS_EPROTO && c == NULL);
  CHECK_MSG(strstr(e2.msg, "wrong launch secret") != NULL || strstr(e2.msg, "group id") != NULL,
            "%s", e2.msg);
  comm_tcp_config wrong;
  base_config(&wrong, 1, 3, a.port, group);
  wrong.connect_timeout_ms = 5000;
  CHECK(comm_tcp_create(&wrong, &c, &e3) == TS_EPROTO && c == NULL);
  CHECK_MSG(strstr(e3.msg, "world size") != NULL, "%s", e3.msg);

  /* A silent connection: held only for the root's I/O timeout. */
  int silent = -1;
  CHECK(net_connect("127.0.0.1", a.port, net_now_ms() + 5000, &silent, &err) == 0);

  /* The right rank still joins, and the group works. */
  ts_err e4 = {0};
  CHECK_MSG(join(1, 2, a.port, group, NULL, &e4, &c) == 0, "%s", e4.msg);
  float v = 4.0f;
  if (c) CHECK(comm_all_reduce_sum_f32(c, &v, 1, &e4) == 0);
  pthread_join(th, NULL);
  CHECK_MSG(a.rc == 0, "root: %s", a.msg);
  CHECK(v == 6.5f && a.sum == 6.5f);
  comm_destroy(c);
  if (silent >= 0) close(silent);
}

static void test_rendezvous_timeouts(uint64_t group) {
  /* Nobody joins rank 0. */
  int lfd = -1, port = 0;
  ts_err err = {0};
  CHECK(net_listen("127.0.0.1", 0, 16, &lfd, &port, &err) == 0);
  comm_tcp_config cfg;
  base_config(&cfg, 0, 2, port, group);
  cfg.listen_fd = lfd;
  cfg.connect_timeout_ms = 300;
  comm *c = NULL;
  CHECK(comm_tcp_create(&cfg, &c, &err) == TS_ETIMEOUT && c == NULL);
  CHECK_MSG(strstr(err.msg, "1 more rank") != NULL, "%s", err.msg);
  /* Nobody listens for rank 1 (the port was just closed). */
  base_config(&cfg, 1, 2, port, group);
  cfg.connect_timeout_ms = 300;
  ts_err e2 = {0};
  int rc = comm_tcp_create(&cfg, &c, &e2);
  CHECK_MSG((rc == TS_ETIMEOUT || rc == TS_ENET) && c == NULL, "%d %s", rc, e2.msg);
  CHECK_MSG(strstr(e2.msg, "joining rank 0") != NULL, "%s", e2.msg);
  /* Bad arguments. */
  base_config(&cfg, 2, 2, port, group);
  CHECK(comm_tcp_create(&cfg, &c, &err) == TS_EINVAL);
  base_config(&cfg, 1, 2, port, group);
  cfg.master_host = NULL;
  CHECK(comm_tcp_create(&cfg, &c, &err) == TS_EINVAL);
}

int main(void) {
  signal(SIGPIPE, SIG_DFL); /* MSG_NOSIGNAL must make a dead peer an error, not a signal */
  uint64_t seed = 0x2545f4914f6cdd1dull ^ ((uint64_t)getpid() << 16);
  fprintf(stderr, "test_comm_fail seed %llu\n", (unsigned long long)seed);
  test_rng rng = {seed};
  test_rendezvous_timeouts(test_rng_next(&rng));
  test_strays(test_rng_next(&rng), &rng);
  /* Small (direct exchange) and large (ring) all-reduces; killed and stopped peers. */
  test_dead_peer(0, 1 + test_rng_next(&rng) % 1000, test_rng_next(&rng));
  test_dead_peer(0, 100000 + test_rng_next(&rng) % 200000, test_rng_next(&rng));
  test_dead_peer(1, 1 + test_rng_next(&rng) % 1000, test_rng_next(&rng));
  test_dead_peer(1, 100000 + test_rng_next(&rng) % 200000, test_rng_next(&rng));
  return test_finish("test_comm_fail");
}
