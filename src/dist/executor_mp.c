/* The process executors (mp and ray): launching and joining the workers, shipping step plans,
 * collecting the last stage's logits, and the monitor thread that notices dead or silent workers
 * and restarts them or reports the failure once. Locking: mu serialises every use of the worker
 * sockets (steps, pings, KV set-up); health() reads only the atomic state and the reason under
 * reason_mu, so /health never waits for a step. */
#include "dist/executor_mp.h"

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "dist/launch.h"
#include "dist/net.h"
#include "dist/wire.h"
#include "dist/worker.h"
#include "model/model_files.h"
#include "util/log.h"

#define MP_IO_TIMEOUT_MS (30 * 1000)
#define MP_PING_EVERY_MS 1000
#define MP_RESTART_ATTEMPTS 3
#define MP_MAX_INFLIGHT 64

enum { MP_UP = 0, MP_DOWN = 1, MP_DEAD = 2 };

typedef struct {
  int fd;                 /* driver <-> worker socket, -1 when not joined */
  launch_child child;     /* mp: the process */
  char node[NET_HOST_MAX];
  char unit[64];
  wire_peer addr[2];      /* where it listens: [0] pipeline link, [1] tp group rendezvous */
  wire_info info;
  model_shard shard;
} mp_worker;

typedef struct {
  executor *ex;
  executor_ops ops;       /* mp's or ray's, plus device sampling when every worker offers it */
  executor_mp_config cfg;
  char *model_path, *layer_split, *device, *ray_address, *ray_key, *ray_env, *ray_strategy;
  char exe[PATH_MAX];
  model_config mcfg;
  uint64_t fingerprint;
  int world, result_rank;
  mp_worker *w;           /* [world] */
  char host[NET_HOST_MAX];
  int listen_fd, listen_port;
  uint8_t secret[WIRE_SECRET_LEN];
  char secret_env[2 * WIRE_SECRET_LEN + 32]; /* "TESSERA_SECRET=<hex>" */
  uint64_t group_id;
  wire_hello hello;       /* the driver's */
  launch_child launcher;  /* ray */
  char lbuf[4096];        /* partial line from the launcher's stdout */
  size_t lbuf_len;
  wire_buf out;
  wire_frame in;
  int kv_block_size, kv_n_blocks; /* for a relaunch */
  pthread_mutex_t mu;
  pthread_cond_t cv;
  pthread_t monitor;
  int monitor_started, stop;
  int state;              /* MP_*, atomic */
  pthread_mutex_t reason_mu;
  char reason[TS_ERR_MSG_MAX]; /* what health() says */
  char why[TS_ERR_MSG_MAX];    /* the failure itself */
  uint64_t ping_seq;
  int64_t next_ping_ms;
  /* Steps submitted and not yet collected, oldest at inflight_head (under mu). */
  uint64_t inflight_id[MP_MAX_INFLIGHT];
  int inflight_rows[MP_MAX_INFLIGHT];
  int inflight_head, n_inflight;
} mp_impl;

static int state_get(mp_impl *im) { return __atomic_load_n(&im->state, __ATOMIC_ACQUIRE); }
static void state_set(mp_impl *im, int s) { __atomic_store_n(&im->state, s, __ATOMIC_RELEASE); }

static const char *worker_kind(const mp_impl *im) {
  return im->cfg.launch == MP_LAUNCH_RAY ? "ray" : "mp";
}

/* Caller holds mu. The first failure wins; the monitor tears down and decides what next. */
static void mark_down(mp_impl *im, const char *why) {
  if (state_get(im) != MP_UP) return;
  pthread_mutex_lock(&im->reason_mu);
  snprintf(im->why, sizeof im->why, "%s", why);
  snprintf(im->reason, sizeof im->reason, "%.900s%s", why,
           im->cfg.restart_workers ? "; restarting the workers"
                                   : "; shutting down (--restart-workers relaunches them)");
  pthread_mutex_unlock(&im->reason_mu);
  state_set(im, MP_DOWN);
  LOG_E("%s executor: %s", worker_kind(im), why);
  pthread_cond_broadcast(&im->cv);
}

static void set_reason(mp_impl *im, const char *fmt, const char *a, const char *b) {
  pthread_mutex_lock(&im->reason_mu);
  snprintf(im->reason, sizeof im->reason, fmt, a, b);
  pthread_mutex_unlock(&im->reason_mu);
}

/* ---- launching ---- */

static uint64_t random_u64(void) {
  uint8_t b[WIRE_SECRET_LEN];
  uint64_t x = 0;
  if (wire_secret_random(b, NULL) == 0) memcpy(&x, b, sizeof x);
  if (!x) x = (uint64_t)net_now_ms() ^ ((uint64_t)getpid() << 32);
  return x;
}

/* The worker argv shared by both launchers; the mp launcher appends rank/unit/node itself. */
#define MP_MAX_ARGS 48
static int base_argv(mp_impl *im, const char **argv, char bufs[][300], int *n) {
  int k = 0;
  snprintf(bufs[0], 300, "%s:%d", im->host, im->listen_port);
  snprintf(bufs[1], 300, "%d", im->world);
  snprintf(bufs[2], 300, "%d", im->cfg.tp);
  snprintf(bufs[3], 300, "%d", im->cfg.pp);
  snprintf(bufs[4], 300, "%016llx", (unsigned long long)im->group_id);
  snprintf(bufs[5], 300, "%d", im->cfg.max_tokens);
  argv[k++] = im->exe;
  argv[k++] = "worker";
  argv[k++] = "--driver"; argv[k++] = bufs[0];
  argv[k++] = "--world-size"; argv[k++] = bufs[1];
  argv[k++] = "--tp"; argv[k++] = bufs[2];
  argv[k++] = "--pp"; argv[k++] = bufs[3];
  argv[k++] = "--model"; argv[k++] = im->model_path;
  argv[k++] = "--group"; argv[k++] = bufs[4];
  argv[k++] = "--device"; argv[k++] = im->device;
  argv[k++] = "--max-tokens"; argv[k++] = bufs[5];
  int threads = im->cfg.threads;
  if (threads <= 0 && im->cfg.launch == MP_LAUNCH_LOCAL) {
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    threads = cores > im->world ? (int)(cores / im->world) : 1;
  }
  if (threads > 0) {
    snprintf(bufs[6], 300, "%d", threads);
    argv[k++] = "--threads"; argv[k++] = bufs[6];
  }
  if (im->layer_split) {
    argv[k++] = "--layer-split"; argv[k++] = im->layer_split;
  }
  if (im->cfg.gpu_memory_utilization > 0) {
    snprintf(bufs[7], 300, "%.17g", im->cfg.gpu_memory_utilization);
    argv[k++] = "--gpu-memory-utilization"; argv[k++] = bufs[7];
  }
  argv[k] = NULL;
  *n = k;
  return 0;
}

static int spawn_local(mp_impl *im, ts_err *err) {
  const char *argv[MP_MAX_ARGS];
  char bufs[8][300], rank[16], unit_env[96];
  int n;
  base_argv(im, argv, bufs, &n);
  int cuda = !strcmp(im->device, "cuda");
  for (int r = 0; r < im->world; r++) {
    mp_worker *w = &im->w[r];
    snprintf(rank, sizeof rank, "%d", r);
    snprintf(w->unit, sizeof w->unit, "%d", r);
    snprintf(w->node, sizeof w->node, "%s", im->host);
    argv[n] = "--rank"; argv[n + 1] = rank;
    argv[n + 2] = "--unit"; argv[n + 3] = w->unit;
    argv[n + 4] = "--node-ip"; argv[n + 5] = im->host;
    argv[n + 6] = NULL;
    snprintf(unit_env, sizeof unit_env, "%s=%d", cuda ? "CUDA_VISIBLE_DEVICES" : "TESSERA_CPU_DEVICES", r);
    const char *env[] = {im->secret_env, unit_env, NULL};
    launch_spec sp = {.argv = argv, .env_add = env, .die_with_parent = 1};
    if (launch_spawn(&sp, &w->child, err) < 0)
      return ts_err_prefix(err, "starting worker %d (%s)", r, im->exe);
  }
  return 0;
}

static int spawn_ray(mp_impl *im, ts_err *err) {
  const char *argv[MP_MAX_ARGS + 24];
  char bufs[8][300], nw[16], tmo[16], drv[NET_HOST_MAX + 16], pydir[PATH_MAX], pyenv[PATH_MAX + 32];
  int k = 0;
  const char *py = getenv("TESSERA_PYTHON");
  TS_TRY(launch_python_dir(im->exe, pydir, sizeof pydir, err));
  const char *old = getenv("PYTHONPATH");
  snprintf(pyenv, sizeof pyenv, "PYTHONPATH=%s%s%s", pydir, old && *old ? ":" : "",
           old && *old ? old : "");
  snprintf(nw, sizeof nw, "%d", im->world);
  snprintf(tmo, sizeof tmo, "%d", im->cfg.ray_placement_timeout_s > 0 ? im->cfg.ray_placement_timeout_s : 60);
  snprintf(drv, sizeof drv, "%s:%d", im->host, im->listen_port);
  argv[k++] = py && *py ? py : "python3";
  argv[k++] = "-m"; argv[k++] = "tessera_ray.launch";
  argv[k++] = "--address"; argv[k++] = im->ray_address ? im->ray_address : "auto";
  argv[k++] = "--num-workers"; argv[k++] = nw;
  argv[k++] = "--device-key"; argv[k++] = im->ray_key;
  argv[k++] = "--device-env"; argv[k++] = im->ray_env;
  argv[k++] = "--strategy"; argv[k++] = im->ray_strategy;
  argv[k++] = "--placement-timeout"; argv[k++] = tmo;
  argv[k++] = "--driver"; argv[k++] = drv;
  argv[k++] = "--secret-env"; argv[k++] = WORKER_SECRET_ENV;
  argv[k++] = "--";
  int n;
  base_argv(im, argv + k, bufs, &n);
  const char *env[] = {im->secret_env, pyenv, NULL};
  launch_spec sp = {.argv = argv, .env_add = env, .pipe_stdin = 1, .pipe_stdout = 1,
                    .die_with_parent = 1};
  if (launch_spawn(&sp, &im->launcher, err) < 0)
    return ts_err_prefix(err, "starting the Ray launcher (%s -m tessera_ray.launch)", argv[0]);
  net_set_nonblocking(im->launcher.stdout_fd, NULL);
  return 0;
}

/* Reads the launcher's stdout lines (PLACED <rank> <ip> <unit>, READY). 1 at EOF. */
static int read_launcher(mp_impl *im) {
  if (im->launcher.stdout_fd < 0) return 1;
  for (;;) {
    ssize_t got = read(im->launcher.stdout_fd, im->lbuf + im->lbuf_len,
                       sizeof im->lbuf - 1 - im->lbuf_len);
    if (got == 0) return 1;
    if (got < 0) return errno == EAGAIN || errno == EINTR ? 0 : 1;
    im->lbuf_len += (size_t)got;
    im->lbuf[im->lbuf_len] = 0;
    char *line = im->lbuf, *nl;
    while ((nl = strchr(line, '\n'))) {
      *nl = 0;
      int r;
      char ip[NET_HOST_MAX], unit[64];
      if (sscanf(line, "PLACED %d %255s %63s", &r, ip, unit) == 3 && r >= 0 && r < im->world) {
        snprintf(im->w[r].node, sizeof im->w[r].node, "%s", ip);
        snprintf(im->w[r].unit, sizeof im->w[r].unit, "%s", unit);
      } else if (!strcmp(line, "READY")) {
        LOG_I("ray executor: every worker is placed");
      } else if (*line) {
        LOG_I("ray launcher: %s", line);
      }
      line = nl + 1;
    }
    im->lbuf_len = strlen(line);
    memmove(im->lbuf, line, im->lbuf_len + 1);
    if (im->lbuf_len >= sizeof im->lbuf - 1) im->lbuf_len = 0; /* an absurd line: drop it */
  }
}

/* A launched process that ended before or while serving: names it in err. */
static int check_processes(mp_impl *im, ts_err *err) {
  int st;
  char how[64];
  if (im->cfg.launch == MP_LAUNCH_RAY) {
    int eof = read_launcher(im);
    if (launch_reap(&im->launcher, &st)) {
      launch_describe_status(st, how, sizeof how);
      return ts_errorf(err, TS_ENET, "the Ray launcher exited (%s)%s", how,
                       WIFEXITED(st) && WEXITSTATUS(st) ? "; its message is above" : "");
    }
    if (eof && im->launcher.stdout_fd >= 0) {
      close(im->launcher.stdout_fd);
      im->launcher.stdout_fd = -1;
    }
    return 0;
  }
  for (int r = 0; r < im->world; r++)
    if (im->w[r].child.pid > 0 && launch_reap(&im->w[r].child, &st)) {
      launch_describe_status(st, how, sizeof how);
      return ts_errorf(err, TS_ENET, "worker rank %d on %s exited (%s)", r, im->w[r].node, how);
    }
  return 0;
}

/* Accepts one connection on the driver's port; 1 when it joined as a missing rank. */
static int accept_one(mp_impl *im, int64_t deadline_ms, int joining) {
  int fd;
  char who[NET_HOST_MAX + 8];
  if (net_accept(im->listen_fd, deadline_ms, &fd, who, sizeof who, NULL) < 0) return 0;
  wire_hello peer;
  ts_err e = {0};
  int64_t dl = net_now_ms() + 5000;
  if (dl > deadline_ms && joining) dl = deadline_ms;
  if (wire_handshake_accept(fd, &im->hello, &peer, dl, &e) < 0) {
    close(fd); /* wire_handshake_accept logged why */
    return 0;
  }
  const char *bad = NULL;
  if (!joining) bad = "every rank is already connected";
  else if (peer.role != WIRE_ROLE_WORKER) bad = "not a worker";
  else if (im->w[peer.rank].fd >= 0) bad = "its rank is already connected";
  else if (peer.tp_size != im->cfg.tp || peer.pp_size != im->cfg.pp ||
           peer.tp_rank != peer.rank % im->cfg.tp || peer.pp_rank != peer.rank / im->cfg.tp)
    bad = "its tp/pp layout differs";
  if (bad) {
    LOG_W("%s executor: dropped a connection from %s (rank %d): %s", worker_kind(im), who,
          peer.rank, bad);
    close(fd);
    return 0;
  }
  mp_worker *w = &im->w[peer.rank];
  w->fd = fd;
  snprintf(w->node, sizeof w->node, "%s", peer.host);
  LOG_D("%s executor: rank %d joined from %s", worker_kind(im), peer.rank, who);
  return 1;
}

static int recv_from(mp_impl *im, int r, int type, int64_t deadline_ms, ts_err *err) {
  int rc = wire_recv_frame(im->w[r].fd, &im->in, 0, deadline_ms, err);
  if (rc < 0) return ts_err_prefix(err, "worker rank %d on %s", r, im->w[r].node);
  if (im->in.type == WIRE_MSG_ERROR) {
    wire_error we;
    if (wire_decode_error(im->in.payload, im->in.len, &we, err) < 0) return TS_EPROTO;
    return ts_errorf(err, we.code < 0 ? we.code : TS_EINTERNAL, "%s", we.message);
  }
  if (im->in.type != type)
    return ts_errorf(err, TS_EPROTO, "worker rank %d sent %s, expected %s", r,
                     wire_msg_name(im->in.type), wire_msg_name(type));
  return 0;
}

static int send_to(mp_impl *im, int r, ts_err *err) {
  int rc = wire_send(im->w[r].fd, &im->out, net_now_ms() + MP_IO_TIMEOUT_MS, err);
  if (rc < 0) ts_err_prefix(err, "sending to worker rank %d on %s", r, im->w[r].node);
  return rc;
}

static void log_layout(mp_impl *im) {
  for (int r = 0; r < im->world; r++) {
    const mp_worker *w = &im->w[r];
    int t = r % im->cfg.tp, kvh = im->mcfg.n_kv_head / im->cfg.tp;
    LOG_I("%s executor: rank %d -> node %s, unit %s, device %s, stage %d layers [%d, %d), "
          "tp %d kv heads [%d, %d)%s",
          worker_kind(im), r, w->node, w->unit[0] ? w->unit : "-", im->device, r / im->cfg.tp,
          w->shard.layer_start, w->shard.layer_end, t, t * kvh, (t + 1) * kvh,
          r == im->result_rank ? ", returns logits" : "");
  }
}

/* Stops every worker process (or the launcher) and closes the sockets. */
static void teardown(mp_impl *im) {
  wire_buf_reset(&im->out);
  wire_encode_shutdown(&im->out, "driver shutting down", NULL);
  for (int r = 0; r < im->world; r++)
    if (im->w[r].fd >= 0) wire_send(im->w[r].fd, &im->out, net_now_ms() + 200, NULL);
  if (im->cfg.launch == MP_LAUNCH_LOCAL) {
    int64_t until = net_now_ms() + 2000;
    for (int r = 0; r < im->world; r++) {
      mp_worker *w = &im->w[r];
      while (w->child.pid > 0 && !launch_reap(&w->child, NULL) && net_now_ms() < until) {
        struct timespec ts = {0, 5 * 1000 * 1000};
        nanosleep(&ts, NULL);
      }
      launch_stop(&w->child, 0);
    }
  } else {
    /* Closing its stdin tells the launcher to stop its actors (which kill the workers). */
    if (im->launcher.stdin_fd >= 0) close(im->launcher.stdin_fd);
    im->launcher.stdin_fd = -1;
    int64_t until = net_now_ms() + 5000;
    while (im->launcher.pid > 0 && !launch_reap(&im->launcher, NULL) && net_now_ms() < until) {
      read_launcher(im);
      struct timespec ts = {0, 10 * 1000 * 1000};
      nanosleep(&ts, NULL);
    }
    launch_stop(&im->launcher, 1000);
    im->lbuf_len = 0;
  }
  for (int r = 0; r < im->world; r++)
    if (im->w[r].fd >= 0) {
      close(im->w[r].fd);
      im->w[r].fd = -1;
    }
}

static int launch_all(mp_impl *im, ts_err *err) {
  im->group_id = random_u64();
  im->hello.group_id = im->group_id;
  for (int r = 0; r < im->world; r++) {
    im->w[r].fd = -1;
    im->w[r].child = (launch_child){.pid = -1, .stdin_fd = -1, .stdout_fd = -1};
  }
  int rc = im->cfg.launch == MP_LAUNCH_RAY ? spawn_ray(im, err) : spawn_local(im, err);
  int timeout = im->cfg.start_timeout_ms > 0 ? im->cfg.start_timeout_ms : 120 * 1000;
  if (im->cfg.launch == MP_LAUNCH_RAY)
    timeout += 1000 * (im->cfg.ray_placement_timeout_s > 0 ? im->cfg.ray_placement_timeout_s : 60);
  int64_t deadline = net_now_ms() + timeout;
  int joined = 0;
  while (rc == 0 && joined < im->world) {
    if ((rc = check_processes(im, err)) < 0) break;
    if (__atomic_load_n(&im->stop, __ATOMIC_ACQUIRE)) {
      rc = ts_errorf(err, TS_ECANCELED, "shutting down while the workers were starting");
      break;
    }
    if (net_now_ms() > deadline) {
      char missing[256] = "";
      size_t off = 0;
      for (int r = 0; r < im->world && off < sizeof missing - 8; r++)
        if (im->w[r].fd < 0) off += (size_t)snprintf(missing + off, sizeof missing - off, " %d", r);
      rc = ts_errorf(err, TS_ETIMEOUT, "%d of %d workers joined within %d s; missing ranks:%s",
                     joined, im->world, timeout / 1000, missing);
      break;
    }
    struct pollfd p[2] = {{.fd = im->listen_fd, .events = POLLIN},
                          {.fd = im->launcher.stdout_fd, .events = POLLIN}};
    int np = im->launcher.stdout_fd >= 0 ? 2 : 1;
    if (poll(p, (nfds_t)np, 200) > 0 && (p[0].revents & POLLIN))
      joined += accept_one(im, deadline, 1);
  }
  /* Rendezvous: every worker's listen addresses to every worker. */
  int64_t dl = deadline + 60 * 1000;
  wire_peers all = {.n = 2 * im->world, .peers = calloc((size_t)(2 * im->world), sizeof(wire_peer))};
  if (rc == 0 && !all.peers) rc = ts_errorf(err, TS_ENOMEM, "out of memory");
  for (int r = 0; rc == 0 && r < im->world; r++) {
    if ((rc = recv_from(im, r, WIRE_MSG_PEERS, dl, err)) < 0) break;
    wire_peers p;
    if ((rc = wire_decode_peers(im->in.payload, im->in.len, &p, err)) < 0) break;
    if (p.n != 2) rc = ts_errorf(err, TS_EPROTO, "worker rank %d sent %d addresses", r, p.n);
    else memcpy(&all.peers[2 * r], p.peers, 2 * sizeof *p.peers);
    wire_peers_free(&p);
  }
  if (rc == 0) {
    wire_buf_reset(&im->out);
    rc = wire_encode_peers(&im->out, &all, err);
  }
  for (int r = 0; rc == 0 && r < im->world; r++) rc = send_to(im, r, err);
  free(all.peers);
  /* INFO arrives once each worker's groups and pipeline links are up. */
  for (int r = 0; rc == 0 && r < im->world; r++) {
    int64_t until = net_now_ms() + 200;
    for (;;) {
      rc = recv_from(im, r, WIRE_MSG_INFO, until < dl ? until : dl, err);
      if (rc != TS_ETIMEOUT || net_now_ms() >= dl) break;
      /* Still setting up: keep an eye on the processes while waiting. */
      if ((rc = check_processes(im, err)) < 0) break;
      if (__atomic_load_n(&im->stop, __ATOMIC_ACQUIRE)) {
        rc = ts_errorf(err, TS_ECANCELED, "shutting down while the workers were starting");
        break;
      }
      until = net_now_ms() + 200;
    }
    if (rc == 0) rc = wire_decode_info(im->in.payload, im->in.len, &im->w[r].info, err);
  }
  if (rc < 0) {
    teardown(im);
    return rc;
  }
  return 0;
}

static int init_kv_all(mp_impl *im, ts_err *err) {
  wire_init_kv k = {.block_size = im->kv_block_size, .n_blocks = im->kv_n_blocks};
  wire_buf_reset(&im->out);
  TS_TRY(wire_encode_init_kv(&im->out, &k, err));
  for (int r = 0; r < im->world; r++) TS_TRY(send_to(im, r, err));
  int64_t dl = net_now_ms() + 120 * 1000;
  for (int r = 0; r < im->world; r++) {
    TS_TRY(recv_from(im, r, WIRE_MSG_INIT_KV, dl, err));
    wire_init_kv a;
    TS_TRY(wire_decode_init_kv(im->in.payload, im->in.len, &a, err));
    if (a.n_blocks != k.n_blocks)
      return ts_errorf(err, TS_EPROTO, "worker rank %d allocated %d KV blocks, asked for %d", r,
                       a.n_blocks, k.n_blocks);
  }
  return 0;
}

/* ---- the monitor ---- */

/* Idle check under mu: no frame is expected from an idle worker, so a readable socket is EOF, an
 * error report or a stale answer. Every MP_PING_EVERY_MS, each worker must answer a ping. */
static void check_workers(mp_impl *im) {
  ts_err e = {0};
  if (check_processes(im, &e) < 0) {
    mark_down(im, e.msg);
    return;
  }
  for (int r = 0; r < im->world; r++) {
    struct pollfd p = {.fd = im->w[r].fd, .events = POLLIN};
    if (poll(&p, 1, 0) <= 0) continue;
    int rc = wire_recv_frame(im->w[r].fd, &im->in, 0, net_now_ms() + 1000, &e);
    if (rc < 0) {
      ts_err_prefix(&e, "worker rank %d on %s", r, im->w[r].node);
      mark_down(im, e.msg);
      return;
    }
    if (im->in.type == WIRE_MSG_ERROR) {
      wire_error we;
      if (wire_decode_error(im->in.payload, im->in.len, &we, &e) == 0) snprintf(e.msg, sizeof e.msg, "%s", we.message);
      mark_down(im, e.msg);
      return;
    }
  }
  if (net_now_ms() < im->next_ping_ms) return;
  const char *t = getenv("TESSERA_PING_TIMEOUT_MS");
  int timeout = t && atoi(t) > 0 ? atoi(t) : 5000;
  wire_ping p = {.seq = ++im->ping_seq, .time_ms = (uint64_t)net_now_ms()};
  wire_buf_reset(&im->out);
  wire_encode_ping(&im->out, WIRE_MSG_PING, &p, NULL);
  for (int r = 0; r < im->world; r++)
    if (send_to(im, r, &e) < 0) {
      mark_down(im, e.msg);
      return;
    }
  int64_t dl = net_now_ms() + timeout;
  for (int r = 0; r < im->world; r++) {
    for (;;) {
      int rc = recv_from(im, r, WIRE_MSG_PONG, dl, &e);
      if (rc == TS_ETIMEOUT) {
        snprintf(e.msg, sizeof e.msg, "worker rank %d on %s did not answer a ping within %d ms",
                 r, im->w[r].node, timeout);
      }
      if (rc < 0) {
        mark_down(im, e.msg);
        return;
      }
      wire_ping q;
      if (wire_decode_ping(im->in.payload, im->in.len, &q, NULL) == 0 && q.seq == p.seq) break;
    }
  }
  im->next_ping_ms = net_now_ms() + MP_PING_EVERY_MS;
}

static void *monitor_main(void *arg) {
  mp_impl *im = arg;
  pthread_mutex_lock(&im->mu);
  im->next_ping_ms = net_now_ms() + MP_PING_EVERY_MS;
  while (!im->stop) {
    int st = state_get(im);
    if (st == MP_UP) {
      struct timespec ts;
      clock_gettime(CLOCK_REALTIME, &ts);
      ts.tv_nsec += 200 * 1000 * 1000;
      if (ts.tv_nsec >= 1000000000) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000;
      }
      pthread_cond_timedwait(&im->cv, &im->mu, &ts);
      if (im->stop || state_get(im) != MP_UP) continue;
      if (im->n_inflight) continue; /* the results on the sockets belong to collect_step */
      check_workers(im);
      /* Strangers on the driver's port are handshaken (and logged) and dropped. */
      struct pollfd p = {.fd = im->listen_fd, .events = POLLIN};
      if (state_get(im) == MP_UP && poll(&p, 1, 0) > 0) accept_one(im, net_now_ms() + 2000, 0);
      continue;
    }
    if (st == MP_DEAD) {
      pthread_cond_wait(&im->cv, &im->mu);
      continue;
    }
    /* DOWN: steps fail fast on the state; the sockets are the monitor's now. */
    pthread_mutex_lock(&im->reason_mu);
    char why[TS_ERR_MSG_MAX];
    snprintf(why, sizeof why, "%s", im->why);
    pthread_mutex_unlock(&im->reason_mu);
    teardown(im);
    /* Steps still outstanding died with the workers: collect_step fails them at once instead of
     * waiting on relaunched workers for results that never come. */
    im->n_inflight = 0;
    if (im->cfg.restart_workers) {
      int ok = 0;
      for (int attempt = 1; attempt <= MP_RESTART_ATTEMPTS && !ok && !im->stop; attempt++) {
        LOG_W("%s executor: restarting all %d workers (attempt %d of %d)", worker_kind(im),
              im->world, attempt, MP_RESTART_ATTEMPTS);
        ts_err e = {0};
        pthread_mutex_unlock(&im->mu);
        int rc = launch_all(im, &e);
        if (rc == 0 && im->kv_block_size > 0) {
          rc = init_kv_all(im, &e);
          if (rc < 0) teardown(im);
        }
        pthread_mutex_lock(&im->mu);
        if (rc == 0) {
          ok = 1;
        } else {
          LOG_E("%s executor: restart failed: %s", worker_kind(im), e.msg);
          snprintf(why, sizeof why, "%s", e.msg);
        }
      }
      if (ok) {
        /* The new workers' caches are empty: the engine must drop what it thinks is there. */
        __atomic_add_fetch(&im->ex->kv_epoch, 1, __ATOMIC_ACQ_REL);
        log_layout(im);
        LOG_I("%s executor: every worker is back; requests that were in flight have failed",
              worker_kind(im));
        im->next_ping_ms = net_now_ms() + MP_PING_EVERY_MS;
        state_set(im, MP_UP);
        continue;
      }
    }
    set_reason(im, "%.900s%s", why,
               im->cfg.restart_workers ? "; the workers could not be restarted"
                                       : "; shutting down (--restart-workers relaunches them)");
    state_set(im, MP_DEAD);
    if (im->cfg.on_fatal) {
      char msg[TS_ERR_MSG_MAX];
      pthread_mutex_lock(&im->reason_mu);
      snprintf(msg, sizeof msg, "%s", im->reason);
      pthread_mutex_unlock(&im->reason_mu);
      pthread_mutex_unlock(&im->mu);
      im->cfg.on_fatal(im->cfg.fatal_user, msg);
      pthread_mutex_lock(&im->mu);
    }
  }
  pthread_mutex_unlock(&im->mu);
  return NULL;
}

/* ---- executor ops ---- */

static int mp_init_kv(executor *ex, int block_size, int64_t kv_cache_bytes, int n_blocks,
                      int *n_blocks_out, ts_err *err) {
  mp_impl *im = ex->impl;
  if (block_size <= 0) return ts_errorf(err, TS_EINVAL, "executor: block size %d must be > 0", block_size);
  if (im->kv_block_size > 0) return ts_errorf(err, TS_EINVAL, "executor: the KV cache is already allocated");
  int64_t per_block = ex->info.kv_bytes_per_token * block_size;
  if (n_blocks <= 0) {
    if (per_block <= 0) return ts_errorf(err, TS_EINVAL, "executor: the model has no KV heads");
    int64_t nb = kv_cache_bytes / per_block;
    n_blocks = (int)(nb > (1 << 30) ? (1 << 30) : nb);
  }
  if (n_blocks <= 0)
    return ts_errorf(err, TS_ERANGE,
                     "executor: %lld bytes of KV cache per worker hold no block of %d tokens "
                     "(%lld bytes); raise --kv-cache-memory",
                     (long long)kv_cache_bytes, block_size, (long long)per_block);
  pthread_mutex_lock(&im->mu);
  int rc;
  if (state_get(im) != MP_UP) {
    rc = ts_errorf(err, TS_ENET, "executor: the workers are down");
  } else {
    im->kv_block_size = block_size;
    im->kv_n_blocks = n_blocks;
    rc = init_kv_all(im, err);
    if (rc < 0) {
      im->kv_block_size = 0;
      mark_down(im, err->msg);
    }
  }
  pthread_mutex_unlock(&im->mu);
  if (rc == 0) *n_blocks_out = n_blocks;
  return rc;
}

/* A failure often shows first on a neighbour (an all-reduce peer or the next stage reports the
 * broken link). Name the worker that actually went away when one did: a process that exited, or
 * a socket at EOF, within a short look. */
static void blame_dead(mp_impl *im, ts_err *err) {
  char first[TS_ERR_MSG_MAX];
  snprintf(first, sizeof first, "%s", err->msg);
  int64_t until = net_now_ms() + 300;
  do {
    ts_err e = {0};
    if (check_processes(im, &e) < 0) {
      ts_errorf(err, TS_ENET, "%.400s (%.500s)", e.msg, first);
      return;
    }
    for (int r = 0; r < im->world; r++) {
      char c;
      if (im->w[r].fd >= 0 && recv(im->w[r].fd, &c, 1, MSG_PEEK | MSG_DONTWAIT) == 0) {
        ts_errorf(err, TS_ENET, "worker rank %d on %s closed its connection (%.700s)", r,
                  im->w[r].node, first);
        return;
      }
    }
    struct timespec ts = {0, 20 * 1000 * 1000};
    nanosleep(&ts, NULL);
  } while (net_now_ms() < until);
}

static int step_fail(mp_impl *im, ts_err *err, int rc) {
  blame_dead(im, err);
  mark_down(im, err->msg);
  return rc;
}

/* Caller holds mu. Ships the plan to every worker and queues it as outstanding. */
static int submit_locked(mp_impl *im, executor *ex, uint64_t step_id, const ts_batch *b,
                         const ts_sample_row *rows, ts_err *err) {
  if (state_get(im) != MP_UP) {
    pthread_mutex_lock(&im->reason_mu);
    int rc = ts_errorf(err, TS_ENET, "the workers are down: %.900s", im->reason);
    pthread_mutex_unlock(&im->reason_mu);
    return rc;
  }
  if (__atomic_load_n(&ex->kv_epoch, __ATOMIC_ACQUIRE) != ex->kv_epoch_seen)
    return ts_errorf(err, TS_ENET, "the workers were restarted; this step's KV cache is gone");
  if (im->n_inflight >= MP_MAX_INFLIGHT || im->n_inflight >= ex->info.max_inflight)
    return ts_errorf(err, TS_EBUSY, "%d steps are already in flight", im->n_inflight);
  wire_buf_reset(&im->out);
  TS_TRY(wire_encode_step(&im->out, step_id, rows ? WIRE_STEP_SAMPLE : 0, b, rows, err));
  for (int r = 0; r < im->world; r++) {
    int rc = send_to(im, r, err);
    if (rc < 0) return step_fail(im, err, rc);
  }
  int slot = (im->inflight_head + im->n_inflight) % MP_MAX_INFLIGHT;
  im->inflight_id[slot] = step_id;
  im->inflight_rows[slot] = b->n_logits;
  im->n_inflight++;
  return 0;
}

/* Caller holds mu. Takes the oldest outstanding step off the queue (even when it fails) and waits
 * for its result: logits rows, or with ids the token ids the workers sampled. */
static int collect_locked(mp_impl *im, executor *ex, uint64_t *step_id_out, float *logits,
                          int32_t *ids, ts_err *err) {
  if (im->n_inflight == 0) return ts_errorf(err, TS_EINVAL, "executor: no step in flight");
  uint64_t step_id = im->inflight_id[im->inflight_head];
  int n_logits = im->inflight_rows[im->inflight_head];
  im->inflight_head = (im->inflight_head + 1) % MP_MAX_INFLIGHT;
  im->n_inflight--;
  if (step_id_out) *step_id_out = step_id;
  int rc = 0;
  if (state_get(im) != MP_UP) {
    pthread_mutex_lock(&im->reason_mu);
    rc = ts_errorf(err, TS_ENET, "the workers are down: %.900s", im->reason);
    pthread_mutex_unlock(&im->reason_mu);
    return rc;
  }
  const char *t = getenv("TESSERA_STEP_TIMEOUT_MS");
  int64_t deadline = net_now_ms() + (t && atoi(t) > 0 ? atoi(t) : 10 * 60 * 1000);
  struct pollfd *p = calloc((size_t)im->world, sizeof *p);
  if (!p) return ts_errorf(err, TS_ENOMEM, "out of memory");
  /* Pings during the step: a worker answers whenever it is not computing, so one that stays
   * silent past step_ping_ms while its neighbours wait has vanished (no EOF from a lost node). */
  const char *spt = getenv("TESSERA_STEP_PING_TIMEOUT_MS");
  int64_t step_ping_ms = spt && atoi(spt) > 0 ? atoi(spt) : 30 * 1000;
  int64_t *ping_sent = calloc((size_t)im->world, sizeof *ping_sent); /* 0: none outstanding */
  int64_t next_ping = net_now_ms() + MP_PING_EVERY_MS;
  int done = 0;
  while (!done && rc == 0 && ping_sent) {
    int64_t now = net_now_ms();
    if (now >= next_ping) {
      for (int r = 0; r < im->world && rc == 0; r++) {
        if (ping_sent[r] && now - ping_sent[r] > step_ping_ms) {
          rc = step_fail(im, err, ts_errorf(err, TS_ETIMEOUT,
                                            "worker rank %d on %s answered no ping for %lld ms "
                                            "during step %llu",
                                            r, im->w[r].node, (long long)(now - ping_sent[r]),
                                            (unsigned long long)step_id));
        } else if (!ping_sent[r]) {
          wire_buf_reset(&im->out);
          wire_ping pg = {.seq = ++im->ping_seq, .time_ms = (uint64_t)now};
          wire_encode_ping(&im->out, WIRE_MSG_PING, &pg, NULL);
          if ((rc = send_to(im, r, err)) < 0) rc = step_fail(im, err, rc);
          ping_sent[r] = now;
        }
      }
      next_ping = now + MP_PING_EVERY_MS;
      if (rc < 0) break;
    }
    for (int r = 0; r < im->world; r++) p[r] = (struct pollfd){.fd = im->w[r].fd, .events = POLLIN};
    int64_t left = deadline - net_now_ms();
    if (left <= 0) {
      rc = step_fail(im, err, ts_errorf(err, TS_ETIMEOUT, "step %llu got no result within %s ms",
                                        (unsigned long long)step_id, t ? t : "600000"));
      break;
    }
    int n = poll(p, (nfds_t)im->world, left > 1000 ? 1000 : (int)left);
    if (n < 0 && errno != EINTR) {
      rc = step_fail(im, err, ts_errorf(err, TS_ENET, "poll: %s", strerror(errno)));
      break;
    }
    if (n <= 0) {
      /* A worker whose process ended shows up here even before its socket closes. */
      if ((rc = check_processes(im, err)) < 0) rc = step_fail(im, err, rc);
      continue;
    }
    for (int r = 0; r < im->world && rc == 0 && !done; r++) {
      if (!p[r].revents) continue;
      rc = wire_recv_frame(im->w[r].fd, &im->in, 0, net_now_ms() + MP_IO_TIMEOUT_MS, err);
      if (rc < 0) {
        ts_err_prefix(err, "worker rank %d on %s", r, im->w[r].node);
        rc = step_fail(im, err, rc);
        break;
      }
      if (im->in.type == WIRE_MSG_PONG) {
        ping_sent[r] = 0;
        continue;
      }
      if (im->in.type == WIRE_MSG_ERROR) {
        wire_error we;
        if (wire_decode_error(im->in.payload, im->in.len, &we, err) == 0)
          ts_errorf(err, we.code < 0 ? we.code : TS_EINTERNAL, "%s", we.message);
        rc = step_fail(im, err, TS_EINTERNAL);
        break;
      }
      if (im->in.type != WIRE_MSG_RESULT || r != im->result_rank) {
        rc = step_fail(im, err, ts_errorf(err, TS_EPROTO, "worker rank %d sent an unexpected %s",
                                          r, wire_msg_name(im->in.type)));
        break;
      }
      wire_result res;
      if ((rc = wire_decode_result(im->in.payload, im->in.len, &res, err)) < 0) {
        rc = step_fail(im, err, rc);
        break;
      }
      int want = ids ? WIRE_RESULT_TOKENS : WIRE_RESULT_LOGITS;
      if (res.step_id != step_id || res.kind != want || res.n_rows != n_logits ||
          (!ids && res.vocab != ex->info.vocab_size)) {
        rc = step_fail(im, err, ts_errorf(err, TS_EPROTO,
                                          "worker rank %d answered step %llu with %d rows of %d; "
                                          "expected step %llu, %d rows of %d",
                                          r, (unsigned long long)res.step_id, res.n_rows, res.vocab,
                                          (unsigned long long)step_id, n_logits,
                                          ex->info.vocab_size));
      } else if (ids) {
        for (int i = 0; i < res.n_rows && rc == 0; i++)
          if (res.tokens[i] < 0 || res.tokens[i] >= ex->info.vocab_size)
            rc = step_fail(im, err, ts_errorf(err, TS_EPROTO, "worker rank %d sampled token %d "
                                              "outside the vocabulary of %d", r, res.tokens[i],
                                              ex->info.vocab_size));
        if (rc == 0) memcpy(ids, res.tokens, (size_t)res.n_rows * sizeof *ids);
        done = 1;
      } else {
        memcpy(logits, res.logits, (size_t)res.n_rows * (size_t)res.vocab * sizeof *logits);
        done = 1;
      }
      wire_result_free(&res);
    }
  }
  if (!ping_sent && rc == 0) rc = ts_errorf(err, TS_ENOMEM, "out of memory");
  free(ping_sent);
  free(p);
  return rc;
}

static int mp_execute_step(executor *ex, uint64_t step_id, const ts_batch *b, float *logits,
                           ts_err *err) {
  mp_impl *im = ex->impl;
  pthread_mutex_lock(&im->mu);
  int rc = im->n_inflight ? ts_errorf(err, TS_EBUSY, "executor: steps are in flight")
                          : submit_locked(im, ex, step_id, b, NULL, err);
  if (rc == 0) rc = collect_locked(im, ex, NULL, logits, NULL, err);
  pthread_mutex_unlock(&im->mu);
  return rc;
}

/* Offered only when every worker can sample on its device (one pipeline stage). */
static int mp_execute_step_sample(executor *ex, uint64_t step_id, const ts_batch *b,
                                  const ts_sample_row *rows, int32_t *ids, ts_err *err) {
  mp_impl *im = ex->impl;
  pthread_mutex_lock(&im->mu);
  int rc = im->n_inflight ? ts_errorf(err, TS_EBUSY, "executor: steps are in flight")
                          : submit_locked(im, ex, step_id, b, rows, err);
  if (rc == 0) rc = collect_locked(im, ex, NULL, NULL, ids, err);
  pthread_mutex_unlock(&im->mu);
  return rc;
}

static int mp_submit_step(executor *ex, uint64_t step_id, const ts_batch *b, ts_err *err) {
  mp_impl *im = ex->impl;
  pthread_mutex_lock(&im->mu);
  int rc = submit_locked(im, ex, step_id, b, NULL, err);
  pthread_mutex_unlock(&im->mu);
  return rc;
}

static int mp_collect_step(executor *ex, uint64_t *step_id, float *logits, ts_err *err) {
  mp_impl *im = ex->impl;
  pthread_mutex_lock(&im->mu);
  int rc = collect_locked(im, ex, step_id, logits, NULL, err);
  pthread_mutex_unlock(&im->mu);
  return rc;
}

static int mp_health(executor *ex, ts_err *err) {
  mp_impl *im = ex->impl;
  if (state_get(im) == MP_UP) return 0;
  pthread_mutex_lock(&im->reason_mu);
  int rc = ts_errorf(err, TS_ENET, "%s", im->reason);
  pthread_mutex_unlock(&im->reason_mu);
  return rc;
}

static void mp_free(mp_impl *im) {
  if (im->listen_fd >= 0) close(im->listen_fd);
  wire_buf_free(&im->out);
  wire_frame_free(&im->in);
  free(im->w);
  free(im->model_path);
  free(im->layer_split);
  free(im->device);
  free(im->ray_address);
  free(im->ray_key);
  free(im->ray_env);
  free(im->ray_strategy);
  pthread_mutex_destroy(&im->mu);
  pthread_mutex_destroy(&im->reason_mu);
  pthread_cond_destroy(&im->cv);
  free(im);
}

static void mp_shutdown(executor *ex) {
  mp_impl *im = ex->impl;
  if (im->monitor_started) {
    pthread_mutex_lock(&im->mu);
    __atomic_store_n(&im->stop, 1, __ATOMIC_RELEASE); /* also read by a relaunch, without mu */
    pthread_cond_broadcast(&im->cv);
    pthread_mutex_unlock(&im->mu);
    pthread_join(im->monitor, NULL);
  }
  teardown(im);
  mp_free(im);
  free(ex);
}

static const executor_ops mp_ops = {
    .name = "mp",
    .init_kv = mp_init_kv,
    .execute_step = mp_execute_step,
    .health = mp_health,
    .shutdown = mp_shutdown,
};

static const executor_ops ray_ops = {
    .name = "ray",
    .init_kv = mp_init_kv,
    .execute_step = mp_execute_step,
    .health = mp_health,
    .shutdown = mp_shutdown,
};

static const executor_pipeline_ops mp_pipe_ops = {
    .submit_step = mp_submit_step,
    .collect_step = mp_collect_step,
};

static char *dup_or_null(const char *s) { return s ? strdup(s) : NULL; }

int executor_mp_create(executor **out, const executor_mp_config *cfg, ts_err *err) {
  *out = NULL;
  if (cfg->tp < 1 || cfg->pp < 1 || cfg->tp * cfg->pp > 1024)
    return ts_errorf(err, TS_EINVAL, "tensor-parallel %d x pipeline-parallel %d workers is not a "
                     "valid layout", cfg->tp, cfg->pp);
  model_files *mf;
  TS_TRY(model_files_open(&mf, cfg->model_path, err));
  model_config mcfg = *model_files_config(mf);
  uint64_t fp = model_files_fingerprint(mf);
  model_files_close(mf);
  int world = cfg->tp * cfg->pp;
  executor *ex = calloc(1, sizeof *ex);
  mp_impl *im = calloc(1, sizeof *im);
  mp_worker *w = calloc((size_t)world, sizeof *w);
  if (!ex || !im || !w) {
    free(ex);
    free(im);
    free(w);
    return ts_errorf(err, TS_ENOMEM, "executor: out of memory");
  }
  im->ex = ex;
  im->cfg = *cfg;
  im->mcfg = mcfg;
  im->fingerprint = fp;
  im->world = world;
  im->w = w;
  im->result_rank = (cfg->pp - 1) * cfg->tp;
  im->listen_fd = -1;
  im->launcher = (launch_child){.pid = -1, .stdin_fd = -1, .stdout_fd = -1};
  int cuda = cfg->device && !strcmp(cfg->device, "cuda");
  im->model_path = strdup(cfg->model_path);
  im->layer_split = cfg->layer_split && *cfg->layer_split ? strdup(cfg->layer_split) : NULL;
  im->device = strdup(cfg->device ? cfg->device : "cpu");
  im->ray_address = dup_or_null(cfg->ray_address);
  im->ray_key = strdup(cfg->ray_device_key ? cfg->ray_device_key : cuda ? "GPU" : "tessera_cpu");
  im->ray_env = strdup(cfg->ray_device_env ? cfg->ray_device_env
                                           : cuda ? "CUDA_VISIBLE_DEVICES" : "TESSERA_CPU_DEVICES");
  im->ray_strategy = strdup(cfg->ray_strategy ? cfg->ray_strategy : "PACK");
  pthread_mutex_init(&im->mu, NULL);
  pthread_mutex_init(&im->reason_mu, NULL);
  pthread_cond_init(&im->cv, NULL);
  wire_buf_init(&im->out);
  ex->ops = cfg->launch == MP_LAUNCH_RAY ? &ray_ops : &mp_ops;
  ex->pipe = &mp_pipe_ops;
  ex->impl = im;
  int rc = 0;
  if (!im->model_path || !im->device || !im->ray_key || !im->ray_env || !im->ray_strategy)
    rc = ts_errorf(err, TS_ENOMEM, "executor: out of memory");
  /* Every shard is checked here, so a bad layout is one clear line before anything starts. */
  for (int r = 0; rc == 0 && r < world; r++) {
    rc = dist_stage_shard(&mcfg, im->layer_split, r % cfg->tp, cfg->tp, r / cfg->tp, cfg->pp,
                          &w[r].shard, err);
    if (rc < 0)
      ts_err_prefix(err, "--tensor-parallel-size %d --pipeline-parallel-size %d", cfg->tp, cfg->pp);
  }
  if (rc == 0 && cfg->worker_exe) snprintf(im->exe, sizeof im->exe, "%s", cfg->worker_exe);
  else if (rc == 0) rc = launch_self_exe(im->exe, sizeof im->exe, err);
  if (rc == 0) rc = wire_secret_random(im->secret, err);
  if (rc == 0) {
    char hex[2 * WIRE_SECRET_LEN + 1];
    wire_secret_to_hex(im->secret, hex);
    snprintf(im->secret_env, sizeof im->secret_env, "%s=%s", WORKER_SECRET_ENV, hex);
    /* With Ray, the address the cluster reaches us on: the route toward its head when given. */
    char toward[NET_HOST_MAX] = "";
    const char *ra = im->ray_address;
    if (cfg->launch == MP_LAUNCH_RAY && ra && strcmp(ra, "auto")) {
      if (!strncmp(ra, "ray://", 6)) ra += 6;
      int port;
      if (net_parse_hostport(ra, toward, sizeof toward, &port, NULL) < 0)
        snprintf(toward, sizeof toward, "%s", ra);
    }
    rc = launch_host_addr(toward[0] ? toward : NULL, cfg->launch == MP_LAUNCH_LOCAL, im->host,
                          sizeof im->host, err);
  }
  if (rc == 0) rc = net_listen(im->host, 0, 256, &im->listen_fd, &im->listen_port, err);
  if (rc == 0) {
    LOG_I("%s executor: %d workers (tp %d x pp %d) join the driver at %s:%d", worker_kind(im),
          world, cfg->tp, cfg->pp, im->host, im->listen_port);
    im->hello = (wire_hello){.role = WIRE_ROLE_DRIVER, .fingerprint = fp, .rank = 0,
                             .world_size = world, .tp_size = cfg->tp, .pp_size = cfg->pp,
                             .port = im->listen_port};
    memcpy(im->hello.secret, im->secret, WIRE_SECRET_LEN);
    snprintf(im->hello.host, sizeof im->hello.host, "%s", im->host);
    rc = launch_all(im, err);
  }
  if (rc < 0) {
    mp_free(im);
    free(ex);
    return rc;
  }
  const wire_info *ri = &w[im->result_rank].info;
  ex->info.vocab_size = ri->vocab_size;
  ex->info.max_pos = ri->max_pos;
  ex->info.bos_id = ri->bos_id;
  ex->info.n_eos = ri->n_eos < MODEL_MAX_EOS ? ri->n_eos : MODEL_MAX_EOS;
  for (int i = 0; i < ex->info.n_eos; i++) ex->info.eos_ids[i] = ri->eos_ids[i];
  ex->info.max_tokens = ri->max_tokens;
  for (int r = 0; r < world; r++) {
    if (w[r].info.max_tokens < ex->info.max_tokens) ex->info.max_tokens = w[r].info.max_tokens;
    if (w[r].info.kv_bytes_per_token > ex->info.kv_bytes_per_token)
      ex->info.kv_bytes_per_token = w[r].info.kv_bytes_per_token;
    int64_t lim = w[r].info.kv_bytes_limit;
    if (lim > 0 && (ex->info.kv_bytes_limit == 0 || lim < ex->info.kv_bytes_limit))
      ex->info.kv_bytes_limit = lim;
  }
  ex->info.max_inflight = cfg->pp < MP_MAX_INFLIGHT ? cfg->pp : MP_MAX_INFLIGHT;
  int can_sample = 1;
  for (int r = 0; r < world; r++) can_sample &= w[r].info.can_sample;
  im->ops = *ex->ops;
  if (can_sample) im->ops.execute_step_sample = mp_execute_step_sample;
  ex->ops = &im->ops;
  log_layout(im);
  if (pthread_create(&im->monitor, NULL, monitor_main, im) != 0) {
    teardown(im);
    mp_free(im);
    free(ex);
    return ts_errorf(err, TS_EINTERNAL, "executor: cannot start the monitor thread");
  }
  im->monitor_started = 1;
  *out = ex;
  return 0;
}
