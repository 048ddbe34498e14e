/* comm over TCP: rendezvous through rank 0, a full mesh of non-blocking sockets, and the
 * collectives on top of one progress loop (xfer) that moves every pending send and receive of a
 * step at once, so two ranks sending to each other never deadlock on full socket buffers.
 *
 * All-reduce gives every rank the bit-identical sum: small messages are exchanged directly and
 * every rank adds the contributions in rank order; large ones use a ring (reduce-scatter then
 * all-gather), where each chunk is summed once by one rank and copied to the others. */
#include "dist/comm_tcp.h"

#include <errno.h>
#include <stdarg.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "dist/net.h"
#include "util/log.h"

#define ADDR_MAX (WIRE_HOST_MAX + 16)

typedef struct {
  int *fd;                /* [size] connection to each rank; -1 for self */
  char (*addr)[ADDR_MAX]; /* [size] "host:port" of each rank, for error lines */
  int io_timeout_ms;
  size_t small_max_bytes;
  float *scratch;         /* receive staging, grown on demand */
  size_t scratch_cap;     /* floats */
  int failed;
  char fail_msg[TS_ERR_MSG_MAX];
} tcp_impl;

void comm_tcp_config_init(comm_tcp_config *cfg) {
  memset(cfg, 0, sizeof *cfg);
  cfg->listen_fd = -1;
  cfg->connect_timeout_ms = 60000;
  cfg->io_timeout_ms = 10000;
  cfg->small_max_bytes = 64 * 1024;
}

/* ---- failure handling ---- */

/* A failed collective leaves the peers mid-protocol, so the group is unusable: shut every
 * connection so the other ranks fail at once instead of waiting for their timeout. */
static int fail(comm *c, ts_err *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int fail(comm *c, ts_err *err, int code, const char *fmt, ...) {
  tcp_impl *t = c->impl;
  char line[TS_ERR_MSG_MAX];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(line, sizeof line, fmt, ap);
  va_end(ap);
  if (!t->failed) {
    t->failed = 1;
    snprintf(t->fail_msg, sizeof t->fail_msg, "%s", line);
    for (int r = 0; r < c->size; r++)
      if (t->fd[r] >= 0) shutdown(t->fd[r], SHUT_RDWR);
    LOG_E("comm rank %d: %s", c->rank, line);
  }
  return ts_errorf(err, code, "rank %d: %s", c->rank, line);
}

static int check_usable(comm *c, const char *what, ts_err *err) {
  tcp_impl *t = c->impl;
  if (t->failed)
    return ts_errorf(err, TS_ENET, "rank %d: %s: group failed earlier: %s", c->rank, what,
                     t->fail_msg);
  return 0;
}

static float *scratch(tcp_impl *t, size_t n) {
  if (n > t->scratch_cap) {
    float *p = realloc(t->scratch, (n ? n : 1) * sizeof *p);
    if (!p) return NULL;
    t->scratch = p;
    t->scratch_cap = n;
  }
  return t->scratch;
}

/* ---- the progress loop ---- */

typedef struct {
  int peer;
  int is_send;
  uint8_t *p;
  size_t left, total;
} xop;

/* Moves as much of op as the socket takes now. 1: progress, 0: would block, <0: failed. */
static int xop_try(comm *c, xop *op, const char *what, ts_err *err) {
  tcp_impl *t = c->impl;
  int fd = t->fd[op->peer], moved = 0;
  while (op->left > 0) {
    ssize_t k = op->is_send ? send(fd, op->p, op->left, MSG_NOSIGNAL | MSG_DONTWAIT)
                            : recv(fd, op->p, op->left, MSG_DONTWAIT);
    if (k > 0) {
      op->p += k;
      op->left -= (size_t)k;
      moved = 1;
      continue;
    }
    if (k == 0)
      return fail(c, err, TS_ENET, "%s: rank %d (%s) closed the connection (received %zu of %zu "
                  "bytes)", what, op->peer, t->addr[op->peer], op->total - op->left, op->total);
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) break;
    return fail(c, err, TS_ENET, "%s: %s rank %d (%s): %s", what,
                op->is_send ? "sending to" : "receiving from", op->peer, t->addr[op->peer],
                strerror(errno));
  }
  return moved;
}

/* Runs ops to completion; fails when no op moves a byte for io_timeout_ms. At most one send and
 * one receive per peer, so a peer's bytes arrive in the order the ops list them. */
static int xfer(comm *c, xop *ops, int nops, const char *what, ts_err *err) {
  tcp_impl *t = c->impl;
  struct pollfd pfd_stack[16];
  int idx_stack[32];
  struct pollfd *pfd = pfd_stack;
  int *idx = idx_stack;
  if (nops > 16) {
    pfd = malloc((size_t)nops * sizeof *pfd);
    idx = malloc((size_t)nops * 2 * sizeof *idx);
    if (!pfd || !idx) {
      free(pfd);
      free(idx);
      return fail(c, err, TS_ENOMEM, "%s: out of memory", what);
    }
  }
  int *map = idx, *ready = idx + nops; /* map: poll slot -> op; ready: op had an event */
  for (int i = 0; i < nops; i++) {
    ops[i].total = ops[i].left;
    ready[i] = 1; /* first round tries everything: small messages usually go at once */
  }
  int64_t last_progress = net_now_ms();
  int rc = 0;
  for (;;) {
    for (int i = 0; i < nops && rc == 0; i++) {
      if (ops[i].left == 0 || !ready[i]) continue;
      int m = xop_try(c, &ops[i], what, err);
      if (m < 0) rc = m;
      else if (m > 0) last_progress = net_now_ms();
    }
    if (rc < 0) break;
    int np = 0;
    for (int i = 0; i < nops; i++) {
      if (ops[i].left == 0) continue;
      pfd[np].fd = t->fd[ops[i].peer];
      pfd[np].events = ops[i].is_send ? POLLOUT : POLLIN;
      pfd[np].revents = 0;
      map[np++] = i;
    }
    if (np == 0) break;
    int64_t left_ms = last_progress + t->io_timeout_ms - net_now_ms();
    if (left_ms <= 0) {
      /* Blame a peer we wait to hear from before one we wait to write to. */
      const xop *op = &ops[map[0]];
      for (int k = 0; k < np; k++)
        if (!ops[map[k]].is_send) {
          op = &ops[map[k]];
          break;
        }
      rc = fail(c, err, TS_ETIMEOUT, "%s: no progress %s rank %d (%s) for %d ms (%zu of %zu "
                "bytes moved)", what, op->is_send ? "sending to" : "receiving from", op->peer,
                t->addr[op->peer], t->io_timeout_ms, op->total - op->left, op->total);
      break;
    }
    int pr = poll(pfd, (nfds_t)np, (int)left_ms);
    if (pr < 0 && errno != EINTR) {
      rc = fail(c, err, TS_ENET, "%s: poll: %s", what, strerror(errno));
      break;
    }
    for (int i = 0; i < nops; i++) ready[i] = 0;
    for (int k = 0; pr > 0 && k < np; k++)
      if (pfd[k].revents) ready[map[k]] = 1;
  }
  if (pfd != pfd_stack) {
    free(pfd);
    free(idx);
  }
  return rc;
}

static xop op_send(int peer, const void *p, size_t bytes) {
  return (xop){.peer = peer, .is_send = 1, .p = (uint8_t *)(uintptr_t)p, .left = bytes};
}
static xop op_recv(int peer, void *p, size_t bytes) {
  return (xop){.peer = peer, .is_send = 0, .p = p, .left = bytes};
}

/* ---- collectives ---- */

/* Direct exchange: every rank sends its buffer to every other rank, then sums all contributions
 * in rank order, so each rank performs the same float additions in the same order. */
static int all_reduce_direct(comm *c, float *buf, size_t n, ts_err *err) {
  tcp_impl *t = c->impl;
  int size = c->size, self = c->rank;
  float *in = scratch(t, n * (size_t)(size - 1));
  xop *ops = malloc((size_t)(2 * size) * sizeof *ops);
  if (!in || !ops) {
    free(ops);
    return fail(c, err, TS_ENOMEM, "all-reduce: out of memory for %zu floats", n);
  }
  int nops = 0;
  for (int r = 0; r < size; r++) {
    if (r == self) continue;
    float *slot = in + (size_t)(r < self ? r : r - 1) * n;
    ops[nops++] = op_send(r, buf, n * sizeof *buf);
    ops[nops++] = op_recv(r, slot, n * sizeof *buf);
  }
  int rc = xfer(c, ops, nops, "all-reduce", err);
  free(ops);
  if (rc < 0) return rc;
  enum { BLOCK = 256 };
  float acc[BLOCK];
  for (size_t i0 = 0; i0 < n; i0 += BLOCK) {
    size_t m = n - i0 < BLOCK ? n - i0 : BLOCK;
    for (int r = 0; r < size; r++) {
      const float *v = r == self ? buf + i0 : in + (size_t)(r < self ? r : r - 1) * n + i0;
      if (r == 0) memcpy(acc, v, m * sizeof *acc);
      else for (size_t i = 0; i < m; i++) acc[i] += v[i];
    }
    memcpy(buf + i0, acc, m * sizeof *acc);
  }
  return 0;
}

/* Chunk c of a ring over n floats split size ways: [chunk_off(c), chunk_off(c+1)). */
static size_t chunk_off(size_t n, int size, int c) {
  size_t q = n / (size_t)size, rem = n % (size_t)size;
  return (size_t)c * q + ((size_t)c < rem ? (size_t)c : rem);
}

/* Ring: reduce-scatter leaves rank r owning the full sum of chunk r+1, all-gather passes each
 * owner's chunk around unchanged. Each rank sends and receives 2(size-1)/size of the buffer. */
static int all_reduce_ring(comm *c, float *buf, size_t n, ts_err *err) {
  tcp_impl *t = c->impl;
  int size = c->size, self = c->rank;
  int right = (self + 1) % size, left = (self + size - 1) % size;
  float *in = scratch(t, n / (size_t)size + 1);
  if (!in) return fail(c, err, TS_ENOMEM, "all-reduce: out of memory for %zu floats", n);
  for (int s = 0; s < size - 1; s++) {
    int sc = (self - s + size) % size, rc_ = (self - s - 1 + 2 * size) % size;
    size_t so = chunk_off(n, size, sc), sn = chunk_off(n, size, sc + 1) - so;
    size_t ro = chunk_off(n, size, rc_), rn = chunk_off(n, size, rc_ + 1) - ro;
    xop ops[2] = {op_send(right, buf + so, sn * sizeof *buf), op_recv(left, in, rn * sizeof *in)};
    TS_TRY(xfer(c, ops, 2, "all-reduce (ring reduce-scatter)", err));
    float *dst = buf + ro;
    for (size_t i = 0; i < rn; i++) dst[i] += in[i];
  }
  for (int s = 0; s < size - 1; s++) {
    int sc = (self + 1 - s + size) % size, rc_ = (self - s + size) % size;
    size_t so = chunk_off(n, size, sc), sn = chunk_off(n, size, sc + 1) - so;
    size_t ro = chunk_off(n, size, rc_), rn = chunk_off(n, size, rc_ + 1) - ro;
    xop ops[2] = {op_send(right, buf + so, sn * sizeof *buf),
                  op_recv(left, buf + ro, rn * sizeof *buf)};
    TS_TRY(xfer(c, ops, 2, "all-reduce (ring all-gather)", err));
  }
  return 0;
}

static int tcp_all_reduce(comm *c, float *buf, size_t n, ts_err *err) {
  TS_TRY(check_usable(c, "all-reduce", err));
  tcp_impl *t = c->impl;
  if (n == 0 || c->size == 1) return 0;
  if (n > SIZE_MAX / sizeof(float) / (size_t)c->size)
    return ts_errorf(err, TS_ERANGE, "all-reduce of %zu floats is too large", n);
  if (n * sizeof(float) <= t->small_max_bytes)
    return all_reduce_direct(c, buf, n, err);
  return all_reduce_ring(c, buf, n, err);
}

static int tcp_all_gather(comm *c, const float *in, size_t n_per_rank, float *out, ts_err *err) {
  TS_TRY(check_usable(c, "all-gather", err));
  int size = c->size, self = c->rank;
  if (n_per_rank > SIZE_MAX / sizeof(float) / (size_t)size)
    return ts_errorf(err, TS_ERANGE, "all-gather of %zu floats per rank is too large", n_per_rank);
  size_t bytes = n_per_rank * sizeof(float);
  float *mine = out + (size_t)self * n_per_rank;
  if (bytes && in != mine) memmove(mine, in, bytes);
  if (size == 1 || bytes == 0) return 0;
  xop *ops = malloc((size_t)(2 * size) * sizeof *ops);
  if (!ops) return fail(c, err, TS_ENOMEM, "all-gather: out of memory");
  int nops = 0;
  for (int r = 0; r < size; r++) {
    if (r == self) continue;
    ops[nops++] = op_send(r, mine, bytes);
    ops[nops++] = op_recv(r, out + (size_t)r * n_per_rank, bytes);
  }
  int rc = xfer(c, ops, nops, "all-gather", err);
  free(ops);
  return rc;
}

static int tcp_broadcast(comm *c, void *buf, size_t bytes, int root, ts_err *err) {
  TS_TRY(check_usable(c, "broadcast", err));
  if (root < 0 || root >= c->size)
    return ts_errorf(err, TS_EINVAL, "broadcast root %d outside a group of %d", root, c->size);
  if (bytes == 0 || c->size == 1) return 0;
  if (c->rank != root) {
    xop op = op_recv(root, buf, bytes);
    return xfer(c, &op, 1, "broadcast", err);
  }
  xop *ops = malloc((size_t)c->size * sizeof *ops);
  if (!ops) return fail(c, err, TS_ENOMEM, "broadcast: out of memory");
  int nops = 0;
  for (int r = 0; r < c->size; r++)
    if (r != root) ops[nops++] = op_send(r, buf, bytes);
  int rc = xfer(c, ops, nops, "broadcast", err);
  free(ops);
  return rc;
}

static int check_peer(comm *c, int peer, const char *what, ts_err *err) {
  if (peer < 0 || peer >= c->size || peer == c->rank)
    return ts_errorf(err, TS_EINVAL, "rank %d: %s peer %d is not another rank of a group of %d",
                     c->rank, what, peer, c->size);
  return 0;
}

static int tcp_send(comm *c, const void *buf, size_t bytes, int peer, ts_err *err) {
  TS_TRY(check_usable(c, "send", err));
  TS_TRY(check_peer(c, peer, "send", err));
  xop op = op_send(peer, buf, bytes);
  return bytes ? xfer(c, &op, 1, "send", err) : 0;
}

static int tcp_recv(comm *c, void *buf, size_t bytes, int peer, ts_err *err) {
  TS_TRY(check_usable(c, "recv", err));
  TS_TRY(check_peer(c, peer, "recv", err));
  xop op = op_recv(peer, buf, bytes);
  return bytes ? xfer(c, &op, 1, "recv", err) : 0;
}

static void tcp_destroy(comm *c) {
  if (!c) return;
  tcp_impl *t = c->impl;
  if (t) {
    for (int r = 0; t->fd && r < c->size; r++)
      if (t->fd[r] >= 0) close(t->fd[r]);
    free(t->fd);
    free(t->addr);
    free(t->scratch);
    free(t);
  }
  free(c);
}

static const comm_ops tcp_ops = {
    .name = "tcp",
    .all_reduce_sum_f32 = tcp_all_reduce,
    .all_gather_f32 = tcp_all_gather,
    .broadcast = tcp_broadcast,
    .send = tcp_send,
    .recv = tcp_recv,
    .destroy = tcp_destroy,
};

/* ---- rendezvous ---- */

static void local_hello(const comm_tcp_config *cfg, wire_hello *h) {
  memset(h, 0, sizeof *h);
  h->role = WIRE_ROLE_PEER;
  h->fingerprint = cfg->fingerprint;
  h->group_id = cfg->group_id;
  memcpy(h->secret, cfg->secret, WIRE_SECRET_LEN);
  h->rank = cfg->rank;
  h->world_size = cfg->size;
  h->tp_size = h->pp_size = 1;
}

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* Accepts connections until `want` ranks from accept_from..size-1 have joined; strays (bad
 * secret, wrong group, duplicate or unexpected rank) are logged and dropped. */
static int accept_peers(comm *c, const comm_tcp_config *cfg, int lfd, int want, int min_rank,
                        wire_peer *table, int64_t deadline, ts_err *err) {
  tcp_impl *t = c->impl;
  wire_hello me;
  local_hello(cfg, &me);
  while (want > 0) {
    int fd = -1;
    char who[ADDR_MAX];
    int rc = net_accept(lfd, deadline, &fd, who, sizeof who, err);
    if (rc < 0)
      return ts_err_prefix(err, "rank %d: waiting for %d more rank(s) to join", cfg->rank, want);
    wire_hello ph;
    ts_err herr = {0};
    /* A silent stray must not hold up the rendezvous for long. */
    int64_t hs_deadline = min64(deadline, net_now_ms() + cfg->io_timeout_ms);
    if (wire_handshake_accept(fd, &me, &ph, hs_deadline, &herr) < 0) {
      close(fd);
      continue;
    }
    if (ph.rank < min_rank || t->fd[ph.rank] >= 0) {
      LOG_W("comm rank %d: dropped connection from %s: rank %d unexpected or already joined",
            cfg->rank, who, ph.rank);
      close(fd);
      continue;
    }
    t->fd[ph.rank] = fd;
    if (table) {
      snprintf(table[ph.rank].host, sizeof table[ph.rank].host, "%s", ph.host);
      table[ph.rank].port = ph.port;
    }
    /* Name a rank by where it listens (stable across its connections) when it says so. */
    if (ph.port > 0 && ph.host[0])
      snprintf(t->addr[ph.rank], ADDR_MAX, "%.*s:%d", WIRE_HOST_MAX - 1, ph.host, (int)ph.port);
    else
      snprintf(t->addr[ph.rank], ADDR_MAX, "%s", who);
    want--;
  }
  return 0;
}

static int rendezvous_root(comm *c, const comm_tcp_config *cfg, int64_t deadline, ts_err *err) {
  tcp_impl *t = c->impl;
  int lfd = cfg->listen_fd;
  if (lfd < 0) TS_TRY(net_listen(cfg->master_host, cfg->master_port, 64, &lfd, NULL, err));
  wire_peers peers = {.n = c->size, .peers = calloc((size_t)c->size, sizeof(wire_peer))};
  if (!peers.peers) {
    close(lfd);
    return ts_errorf(err, TS_ENOMEM, "out of memory");
  }
  int rc = accept_peers(c, cfg, lfd, c->size - 1, 1, peers.peers, deadline, err);
  close(lfd);
  wire_buf b;
  wire_buf_init(&b);
  if (rc == 0) rc = wire_encode_peers(&b, &peers, err);
  for (int r = 1; rc == 0 && r < c->size; r++) {
    rc = wire_send(t->fd[r], &b, deadline, err);
    if (rc < 0) ts_err_prefix(err, "sending the peer table to rank %d (%s)", r, t->addr[r]);
  }
  wire_buf_free(&b);
  wire_peers_free(&peers);
  return rc;
}

static int rendezvous_member(comm *c, const comm_tcp_config *cfg, int64_t deadline,
                             ts_err *err) {
  tcp_impl *t = c->impl;
  int self = c->rank, fd0 = -1, lfd = -1, rc;
  snprintf(t->addr[0], ADDR_MAX, "%s:%d", cfg->master_host ? cfg->master_host : "?",
           cfg->master_port);
  rc = net_connect(cfg->master_host, cfg->master_port, deadline, &fd0, err);
  if (rc < 0) return ts_err_prefix(err, "rank %d: joining rank 0", self);
  t->fd[0] = fd0;
  char host[WIRE_HOST_MAX];
  if (cfg->bind_host) snprintf(host, sizeof host, "%s", cfg->bind_host);
  else TS_TRY(net_local_addr(fd0, host, sizeof host, NULL, err));
  int port = 0;
  TS_TRY(net_listen(host, cfg->bind_port, 64, &lfd, &port, err));
  wire_hello me, ph;
  local_hello(cfg, &me);
  me.port = port;
  snprintf(me.host, sizeof me.host, "%s", host);
  rc = wire_handshake_connect(fd0, &me, &ph, deadline, err);
  if (rc == 0 && ph.rank != 0) rc = ts_errorf(err, TS_EPROTO, "master says it is rank %d", ph.rank);
  wire_frame f = {0};
  wire_peers peers = {0};
  if (rc == 0) rc = wire_recv_frame(fd0, &f, 0, deadline, err);
  if (rc == 0 && f.type != WIRE_MSG_PEERS)
    rc = ts_errorf(err, TS_EPROTO, "expected PEERS from rank 0, got %s", wire_msg_name(f.type));
  if (rc == 0) rc = wire_decode_peers(f.payload, f.len, &peers, err);
  wire_frame_free(&f);
  if (rc == 0 && peers.n != c->size)
    rc = ts_errorf(err, TS_EPROTO, "peer table has %d ranks, expected %d", peers.n, c->size);
  if (rc < 0) {
    close(lfd);
    wire_peers_free(&peers);
    return ts_err_prefix(err, "rank %d: joining rank 0", self);
  }
  /* Connect down, accept up: rank r waits only on lower ranks, which never wait on it. */
  for (int r = 1; rc == 0 && r < self; r++) {
    int fd = -1;
    snprintf(t->addr[r], ADDR_MAX, "%s:%d", peers.peers[r].host, peers.peers[r].port);
    rc = net_connect(peers.peers[r].host, peers.peers[r].port, deadline, &fd, err);
    if (rc == 0) {
      t->fd[r] = fd;
      rc = wire_handshake_connect(fd, &me, &ph, deadline, err);
    }
    if (rc == 0 && ph.rank != r)
      rc = ts_errorf(err, TS_EPROTO, "%s answered as rank %d", t->addr[r], ph.rank);
    if (rc < 0) ts_err_prefix(err, "rank %d: connecting to rank %d", self, r);
  }
  wire_peers_free(&peers);
  if (rc == 0) rc = accept_peers(c, cfg, lfd, c->size - 1 - self, self + 1, NULL, deadline, err);
  close(lfd);
  return rc;
}

int comm_tcp_create(const comm_tcp_config *cfg, comm **out, ts_err *err) {
  *out = NULL;
  /* The listening socket is ours from here on, whatever happens. */
  int own_lfd = cfg->rank == 0 ? cfg->listen_fd : -1;
  if (cfg->size < 1 || cfg->size > WIRE_MAX_PEERS || cfg->rank < 0 || cfg->rank >= cfg->size ||
      (own_lfd < 0 && cfg->size > 1 && (!cfg->master_host || !*cfg->master_host))) {
    if (own_lfd >= 0) close(own_lfd);
    return ts_errorf(err, TS_EINVAL, "bad comm group: rank %d of %d, master %s", cfg->rank,
                     cfg->size, cfg->master_host ? cfg->master_host : "(none)");
  }
  comm *c = calloc(1, sizeof *c);
  tcp_impl *t = calloc(1, sizeof *t);
  int *fds = malloc((size_t)cfg->size * sizeof *fds);
  char(*addr)[ADDR_MAX] = calloc((size_t)cfg->size, sizeof *addr);
  if (!c || !t || !fds || !addr) {
    free(c), free(t), free(fds), free(addr);
    if (own_lfd >= 0) close(own_lfd);
    return ts_errorf(err, TS_ENOMEM, "out of memory");
  }
  for (int r = 0; r < cfg->size; r++) fds[r] = -1;
  t->fd = fds;
  t->addr = addr;
  c->impl = t;
  c->ops = &tcp_ops;
  c->rank = cfg->rank;
  c->size = cfg->size;
  t->io_timeout_ms = cfg->io_timeout_ms > 0 ? cfg->io_timeout_ms : 10000;
  t->small_max_bytes = cfg->small_max_bytes;
  snprintf(t->addr[cfg->rank], ADDR_MAX, "self");
  static const uint8_t zero_secret[WIRE_SECRET_LEN];
  if (cfg->size > 1 && wire_secret_equal(cfg->secret, zero_secret))
    LOG_W("comm rank %d: the launch secret is all zeros; any process that knows the group id "
          "can join", cfg->rank);
  int64_t deadline = net_now_ms() + (cfg->connect_timeout_ms > 0 ? cfg->connect_timeout_ms : 60000);
  int rc = 0;
  if (cfg->size > 1)
    rc = cfg->rank == 0 ? rendezvous_root(c, cfg, deadline, err)
                        : rendezvous_member(c, cfg, deadline, err);
  else if (own_lfd >= 0)
    close(own_lfd);
  if (rc < 0) {
    tcp_destroy(c);
    return rc;
  }
  for (int r = 0; r < c->size; r++) {
    if (t->fd[r] < 0) continue;
    if ((rc = net_set_nonblocking(t->fd[r], err)) < 0 || (rc = net_set_nodelay(t->fd[r], err)) < 0) {
      tcp_destroy(c);
      return rc;
    }
  }
  LOG_D("comm rank %d of %d: connected", c->rank, c->size);
  *out = c;
  return 0;
}
