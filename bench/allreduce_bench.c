/* The cost of one all-reduce over TCP between local processes: by default the 1,024-float hidden
 * state of a decode step between two ranks on loopback. Prints p50/p99/mean in microseconds as
 * seen by rank 0 over many iterations (after a warm-up).
 *   allreduce_bench [--n FLOATS] [--ranks N] [--iters K] [--warmup W] [--small-max BYTES]
 * --small-max sets where the direct exchange hands over to the ring (default 64 KiB). */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "dist/comm_tcp.h"
#include "dist/net.h"

static double now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

static size_t g_small_max = 64 * 1024;

static int run_rank(int rank, int ranks, int port, int lfd, const uint8_t *secret, size_t n,
                    int iters, int warmup, int out_fd) {
  comm_tcp_config cfg;
  comm_tcp_config_init(&cfg);
  cfg.rank = rank;
  cfg.size = ranks;
  cfg.master_host = "127.0.0.1";
  cfg.master_port = port;
  cfg.listen_fd = rank == 0 ? lfd : -1;
  cfg.group_id = 0xbe4c;
  cfg.small_max_bytes = g_small_max;
  memcpy(cfg.secret, secret, WIRE_SECRET_LEN);
  ts_err err = {0};
  comm *c = NULL;
  if (comm_tcp_create(&cfg, &c, &err) < 0) {
    fprintf(stderr, "rank %d: %s\n", rank, err.msg);
    return 1;
  }
  float *buf = malloc(n * sizeof *buf);
  double *t = malloc((size_t)iters * sizeof *t);
  for (size_t i = 0; i < n; i++) buf[i] = (float)((i * 7 + (size_t)rank) % 13) * 0.01f;
  for (int it = 0; it < warmup + iters; it++) {
    double t0 = now_us();
    if (comm_all_reduce_sum_f32(c, buf, n, &err) < 0) {
      fprintf(stderr, "rank %d: %s\n", rank, err.msg);
      return 1;
    }
    if (it >= warmup) t[it - warmup] = now_us() - t0;
    /* Keep the values bounded so every iteration moves ordinary floats. */
    for (size_t i = 0; i < n; i++) buf[i] *= 1.0f / (float)ranks;
  }
  if (rank == 0 && write(out_fd, t, (size_t)iters * sizeof *t) < 0) return 1;
  comm_destroy(c);
  free(buf);
  free(t);
  return 0;
}

int main(int argc, char **argv) {
  size_t n = 1024;
  int ranks = 2, iters = 20000, warmup = 1000;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!strcmp(argv[i], "--n")) n = strtoull(argv[i + 1], NULL, 10);
    else if (!strcmp(argv[i], "--ranks")) ranks = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--iters")) iters = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--warmup")) warmup = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--small-max")) g_small_max = strtoull(argv[i + 1], NULL, 10);
    else {
      fprintf(stderr, "usage: %s [--n FLOATS] [--ranks N] [--iters K] [--warmup W] [--small-max BYTES]\n",
              argv[0]);
      return 2;
    }
  }
  if (n == 0 || ranks < 2 || ranks > 64 || iters < 1 || warmup < 0) {
    fprintf(stderr, "bad arguments\n");
    return 2;
  }
  ts_err err = {0};
  uint8_t secret[WIRE_SECRET_LEN];
  int lfd = -1, port = 0, pfd[2];
  if (wire_secret_random(secret, &err) < 0 || net_listen("127.0.0.1", 0, 64, &lfd, &port, &err) < 0 ||
      pipe(pfd) < 0) {
    fprintf(stderr, "setup: %s\n", err.msg);
    return 1;
  }
  pid_t pids[64];
  for (int r = 0; r < ranks; r++) {
    pids[r] = fork();
    if (pids[r] == 0) {
      close(pfd[0]);
      _exit(run_rank(r, ranks, port, lfd, secret, n, iters, warmup, pfd[1]));
    }
  }
  close(lfd);
  close(pfd[1]);
  double *t = malloc((size_t)iters * sizeof *t);
  size_t want = (size_t)iters * sizeof *t, got = 0;
  while (got < want) {
    ssize_t k = read(pfd[0], (char *)t + got, want - got);
    if (k <= 0) break;
    got += (size_t)k;
  }
  int failed = got != want;
  for (int r = 0; r < ranks; r++) {
    int st = 0;
    waitpid(pids[r], &st, 0);
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) failed = 1;
  }
  if (failed) {
    fprintf(stderr, "a rank failed\n");
    return 1;
  }
  double sum = 0;
  for (int i = 0; i < iters; i++) sum += t[i];
  qsort(t, (size_t)iters, sizeof *t, cmp_double);
  printf("all-reduce %zu floats (%zu bytes), %d ranks, %d iterations: p50 %.1f us, p99 %.1f us, "
         "mean %.1f us, min %.1f us\n", n, n * sizeof(float), ranks, iters, t[iters / 2],
         t[(size_t)((double)iters * 0.99)], sum / iters, t[0]);
  free(t);
  return 0;
}
