/* Socket helpers and the comm rendezvous over IPv6: host:port parsing (plain, bracketed v6, and
 * malformed forms), listen/accept/connect deadlines, and a two-rank group on ::1 whose second rank
 * binds the address that routes to the master (skipped where the host has no IPv6 loopback). */
#include <pthread.h>
#include <string.h>
#include <unistd.h>

#include "dist/comm_tcp.h"
#include "dist/net.h"
#include "test_util.h"

static void test_parse(test_rng *r) {
  char host[64];
  int port = -1;
  ts_err err = {0};
  for (int k = 0; k < 50; k++) {
    int p = (int)(test_rng_next(r) % 65536);
    char s[96];
    snprintf(s, sizeof s, "10.%d.%d.%d:%d", (int)(test_rng_next(r) % 256),
             (int)(test_rng_next(r) % 256), (int)(test_rng_next(r) % 256), p);
    CHECK(net_parse_hostport(s, host, sizeof host, &port, &err) == 0 && port == p);
    CHECK(strncmp(s, host, strlen(host)) == 0 && s[strlen(host)] == ':');
    snprintf(s, sizeof s, "[fe80::%x]:%d", (unsigned)(test_rng_next(r) % 65536), p);
    CHECK(net_parse_hostport(s, host, sizeof host, &port, &err) == 0 && port == p);
    CHECK(strncmp(host, "fe80::", 6) == 0 && strchr(host, ']') == NULL);
  }
  const char *bad[] = {"", "host", "host:", ":80", "host:65536", "host:-1", "host:8x", "[::1]80",
                       "[::1", "h:1:"};
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
    CHECK_MSG(net_parse_hostport(bad[i], host, sizeof host, &port, &err) == TS_EINVAL, "%s", bad[i]);
  CHECK(net_parse_hostport("a-very-long-host-name.example:1", host, 8, &port, &err) == TS_EINVAL);
}

static void test_sockets(void) {
  ts_err err = {0};
  int lfd = -1, port = 0, fd = -1;
  /* No address: never a silent wildcard. */
  CHECK(net_listen(NULL, 0, 4, &lfd, &port, &err) == TS_EINVAL);
  CHECK(net_listen("", 0, 4, &lfd, &port, &err) == TS_EINVAL);
  CHECK(net_listen("127.0.0.1", 0, 4, &lfd, &port, &err) == 0 && port > 0);
  char host[NET_HOST_MAX];
  int p2 = 0;
  CHECK(net_local_addr(lfd, host, sizeof host, &p2, &err) == 0 && p2 == port &&
        strcmp(host, "127.0.0.1") == 0);
  /* Nobody connects: accept gives up at its deadline. */
  CHECK(net_accept(lfd, net_now_ms() + 30, &fd, NULL, 0, &err) == TS_ETIMEOUT);
  int cfd = -1, afd = -1;
  char peer[NET_HOST_MAX + 16];
  CHECK(net_connect("127.0.0.1", port, net_now_ms() + 2000, &cfd, &err) == 0);
  CHECK(net_accept(lfd, net_now_ms() + 2000, &afd, peer, sizeof peer, &err) == 0);
  CHECK(strncmp(peer, "127.0.0.1:", 10) == 0);
  char b = 'x', got = 0;
  CHECK(net_send_all(cfd, &b, 1, net_now_ms() + 1000, &err) == 0);
  CHECK(net_recv_all(afd, &got, 1, net_now_ms() + 1000, &err) == 0 && got == 'x');
  CHECK(net_recv_all(afd, &got, 1, net_now_ms() + 30, &err) == TS_ETIMEOUT);
  close(cfd);
  CHECK(net_recv_all(afd, &got, 1, net_now_ms() + 1000, &err) == TS_ENET);
  close(afd);
  close(lfd);
  /* The port is closed now: a connect keeps retrying until its deadline, then says so. */
  int rc = net_connect("127.0.0.1", port, net_now_ms() + 200, &cfd, &err);
  CHECK_MSG(rc == TS_ETIMEOUT || rc == TS_ENET, "%d %s", rc, err.msg);
  CHECK(strstr(err.msg, "connect to 127.0.0.1") != NULL);
}

typedef struct {
  int rank, port, lfd, rc;
  float v;
  char msg[TS_ERR_MSG_MAX];
} v6_arg;

static void *v6_rank(void *p) {
  v6_arg *a = p;
  comm_tcp_config cfg;
  comm_tcp_config_init(&cfg);
  cfg.rank = a->rank;
  cfg.size = 2;
  cfg.master_host = "::1";
  cfg.master_port = a->port;
  cfg.listen_fd = a->rank == 0 ? a->lfd : -1;
  cfg.group_id = 6;
  memset(cfg.secret, 0x5a, sizeof cfg.secret);
  cfg.connect_timeout_ms = 10000;
  ts_err err = {0};
  comm *c = NULL;
  a->rc = comm_tcp_create(&cfg, &c, &err);
  if (a->rc == 0) a->rc = comm_all_reduce_sum_f32(c, &a->v, 1, &err);
  snprintf(a->msg, sizeof a->msg, "%s", err.msg);
  comm_destroy(c);
  return NULL;
}

static void test_ipv6(test_rng *r) {
  ts_err err = {0};
  int lfd = -1, port = 0;
  if (net_listen("::1", 0, 4, &lfd, &port, &err) != 0) {
    fprintf(stderr, "no IPv6 loopback here (%s): skipping the IPv6 group\n", err.msg);
    return;
  }
  v6_arg a[2] = {{.rank = 0, .port = port, .lfd = lfd}, {.rank = 1, .port = port, .lfd = -1}};
  a[0].v = test_rng_float(r);
  a[1].v = test_rng_float(r);
  float want = a[0].v + a[1].v;
  pthread_t th[2];
  for (int k = 0; k < 2; k++) pthread_create(&th[k], NULL, v6_rank, &a[k]);
  for (int k = 0; k < 2; k++) pthread_join(th[k], NULL);
  for (int k = 0; k < 2; k++) {
    CHECK_MSG(a[k].rc == 0, "rank %d: %s", k, a[k].msg);
    CHECK(a[k].v == want);
  }
}

int main(void) {
  uint64_t seed = 0x8cb92ba72f3d8dd7ull ^ ((uint64_t)getpid() << 12);
  fprintf(stderr, "test_comm_net seed %llu\n", (unsigned long long)seed);
  test_rng r = {seed};
  test_parse(&r);
  test_sockets();
  test_ipv6(&r);
  return test_finish("test_comm_net");
}
