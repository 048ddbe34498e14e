/* The worker main loop: load the shard, join the driver and the comm groups, then serve INIT_KV,
 * STEP and PING until SHUTDOWN. Every wait is bounded or ends on EOF, so a worker whose driver or
 * neighbour vanished exits instead of hanging. */
#include "dist/worker.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dist/comm_nccl.h"
#include "dist/comm_tcp.h"
#include "dist/device_mem.h"
#include "dist/net.h"
#include "model/model.h"
#include "util/log.h"

/* Step waits: a stage may wait this long for its neighbour's hidden states. */
#define WORKER_STEP_TIMEOUT_MS (10 * 60 * 1000)
#define WORKER_SETUP_TIMEOUT_MS (120 * 1000)
#define WORKER_IO_TIMEOUT_MS (30 * 1000)
#define WORKER_MAX_QUEUE 64

int dist_stage_shard(const model_config *cfg, const char *layer_split, int tp_rank, int tp,
                     int pp_rank, int pp, model_shard *out, ts_err *err) {
  *out = model_shard_default(cfg, tp_rank, tp, pp_rank, pp);
  if (layer_split && *layer_split) {
    int counts[WORKER_MAX_PP], n = 0, sum = 0;
    const char *s = layer_split;
    while (*s) {
      char *end;
      errno = 0;
      long v = strtol(s, &end, 10);
      if (end == s || errno || v < 1 || v > 1 << 20 || n >= WORKER_MAX_PP)
        return ts_errorf(err, TS_EINVAL,
                         "--pipeline-layer-split '%s': expected %d positive layer counts "
                         "separated by commas",
                         layer_split, pp);
      counts[n++] = (int)v;
      sum += (int)v;
      s = *end == ',' ? end + 1 : end;
      if (*end && *end != ',')
        return ts_errorf(err, TS_EINVAL, "--pipeline-layer-split '%s': unexpected '%c'",
                         layer_split, *end);
    }
    if (n != pp || sum != cfg->n_layer)
      return ts_errorf(err, TS_EINVAL,
                       "--pipeline-layer-split '%s' gives %d stages and %d layers; the model has "
                       "%d layers over --pipeline-parallel-size %d",
                       layer_split, n, sum, cfg->n_layer, pp);
    int start = 0;
    for (int i = 0; i < pp_rank; i++) start += counts[i];
    out->layer_start = start;
    out->layer_end = start + counts[pp_rank];
  }
  return model_shard_validate(cfg, out, err);
}

typedef struct {
  const worker_config *cfg;
  int tp_rank, pp_rank;
  model *m;
  backend *be;
  comm *tp_comm;
  kv_cache kv;
  int kv_ready;
  int drv_fd;          /* the driver */
  int prev_fd;         /* previous stage, same tp rank (-1 on the first stage) */
  int next_fd;         /* next stage, same tp rank (-1 on the last stage) */
  int pp_listen_fd;    /* the previous stage connects here */
  int tp_listen_fd;    /* tp rank 0: the stage's all-reduce group rendezvous */
  int pp_port, tp_port;
  wire_hello hello;
  wire_buf out;
  wire_frame in, in_hidden;
  float *hidden_in;    /* [max_tokens][d_model] */
  float *hidden_out;   /* [max_tokens][d_model] */
  float *logits;       /* [max_tokens][vocab] (last stage) */
  int32_t *ids;        /* [max_tokens] ids sampled on the device (WIRE_STEP_SAMPLE) */
  /* Steps the driver sent while this stage waited for hidden states (pipelined steps), in order */
  wire_step queue[WORKER_MAX_QUEUE];
  int q_head, q_n;
} worker;

static int send_frame(worker *w, int fd, ts_err *err) {
  return wire_send(fd, &w->out, net_now_ms() + WORKER_IO_TIMEOUT_MS, err);
}

static int send_error(worker *w, uint64_t step_id, const ts_err *e) {
  wire_error we = {.step_id = step_id, .code = e->code ? e->code : TS_EINTERNAL};
  snprintf(we.message, sizeof we.message, "worker rank %d: %.900s", w->cfg->rank, e->msg);
  wire_buf_reset(&w->out);
  if (wire_encode_error(&w->out, &we, NULL) < 0) return -1;
  return send_frame(w, w->drv_fd, NULL);
}

static void worker_cleanup(worker *w) {
  if (w->kv_ready) kv_cache_free(&w->kv, w->be);
  if (w->tp_comm) comm_destroy(w->tp_comm);
  if (w->m) model_free(w->m);
  if (w->be) backend_destroy(w->be);
  int fds[] = {w->drv_fd, w->prev_fd, w->next_fd, w->pp_listen_fd, w->tp_listen_fd};
  for (size_t i = 0; i < sizeof fds / sizeof fds[0]; i++)
    if (fds[i] >= 0) close(fds[i]);
  wire_buf_free(&w->out);
  wire_frame_free(&w->in);
  wire_frame_free(&w->in_hidden);
  while (w->q_n > 0) {
    wire_step_free(&w->queue[w->q_head]);
    w->q_head = (w->q_head + 1) % WORKER_MAX_QUEUE;
    w->q_n--;
  }
  free(w->hidden_in);
  free(w->hidden_out);
  free(w->logits);
  free(w->ids);
}

/* Connects to the driver, proves membership, and tells it where this worker listens. */
static int join_driver(worker *w, ts_err *err) {
  const worker_config *c = w->cfg;
  char host[NET_HOST_MAX];
  int port;
  TS_TRY(net_parse_hostport(c->driver, host, sizeof host, &port, err));
  int64_t dl = net_now_ms() + WORKER_SETUP_TIMEOUT_MS;
  if (net_connect(host, port, dl, &w->drv_fd, err) < 0)
    return ts_err_prefix(err, "connecting to the driver at %s", c->driver);
  wire_hello drv;
  if (wire_handshake_connect(w->drv_fd, &w->hello, &drv, dl, err) < 0)
    return ts_err_prefix(err, "the driver at %s refused this worker", c->driver);
  if (drv.role != WIRE_ROLE_DRIVER)
    return ts_errorf(err, TS_EPROTO, "%s is not a tessera driver", c->driver);
  wire_peer mine[2] = {{.port = w->pp_port}, {.port = w->tp_port}};
  snprintf(mine[0].host, sizeof mine[0].host, "%s", c->node_ip);
  snprintf(mine[1].host, sizeof mine[1].host, "%s", c->node_ip);
  wire_peers p = {.n = 2, .peers = mine};
  wire_buf_reset(&w->out);
  TS_TRY(wire_encode_peers(&w->out, &p, err));
  return send_frame(w, w->drv_fd, err);
}

/* CUDA workers all-reduce device buffers through NCCL; the TCP group only hands out its id. */
static int use_nccl(worker *w, ts_err *err) {
  comm_nccl_config nc = {.rank = w->tp_rank, .size = w->cfg->tp, .bootstrap = w->tp_comm,
                         .be = w->be};
  comm *g = NULL;
  int rc = comm_nccl_create(&nc, &g, err);
  if (rc == 0) LOG_I("worker %d: tensor-parallel group of %d over NCCL", w->cfg->rank, nc.size);
  comm_destroy(w->tp_comm);
  w->tp_comm = g;
  return rc;
}

/* Rendezvous: the stage's all-reduce group and the links to the neighbouring stages. */
static int join_peers(worker *w, ts_err *err) {
  const worker_config *c = w->cfg;
  int64_t dl = net_now_ms() + WORKER_SETUP_TIMEOUT_MS;
  TS_TRY(wire_recv_frame(w->drv_fd, &w->in, 0, dl, err));
  if (w->in.type != WIRE_MSG_PEERS)
    return ts_errorf(err, TS_EPROTO, "expected PEERS from the driver, got %s",
                     wire_msg_name(w->in.type));
  wire_peers all = {0};
  TS_TRY(wire_decode_peers(w->in.payload, w->in.len, &all, err));
  int rc = 0;
  if (all.n != 2 * c->world_size)
    rc = ts_errorf(err, TS_EPROTO, "PEERS lists %d addresses for %d ranks", all.n, c->world_size);
  if (rc == 0 && c->tp > 1) {
    int master = w->pp_rank * c->tp;
    comm_tcp_config cc;
    comm_tcp_config_init(&cc);
    cc.rank = w->tp_rank;
    cc.size = c->tp;
    cc.master_host = all.peers[2 * master + 1].host;
    cc.master_port = all.peers[2 * master + 1].port;
    cc.listen_fd = w->tp_rank == 0 ? w->tp_listen_fd : -1;
    if (w->tp_rank == 0) w->tp_listen_fd = -1; /* taken over by the group */
    cc.bind_host = c->node_ip;
    cc.group_id = c->group_id ^ (0x9e3779b97f4a7c15ull * (uint64_t)(w->pp_rank + 1));
    cc.fingerprint = w->hello.fingerprint;
    memcpy(cc.secret, c->secret, WIRE_SECRET_LEN);
    cc.connect_timeout_ms = WORKER_SETUP_TIMEOUT_MS;
    const char *t = getenv("TESSERA_COMM_TIMEOUT_MS");
    if (t && atoi(t) > 0) cc.io_timeout_ms = atoi(t);
    rc = comm_tcp_create(&cc, &w->tp_comm, err);
    if (rc == 0 && !strcmp(c->device, "cuda")) rc = use_nccl(w, err);
    if (rc < 0) ts_err_prefix(err, "tensor-parallel group of stage %d", w->pp_rank);
    else w->m->tp_comm = w->tp_comm;
  }
  /* Connect forward first, then accept from behind: the last stage only accepts, so the chain
   * resolves from the back without a cycle. */
  if (rc == 0 && w->pp_rank < c->pp - 1) {
    const wire_peer *nx = &all.peers[2 * (c->rank + c->tp)];
    rc = net_connect(nx->host, nx->port, dl, &w->next_fd, err);
    wire_hello peer;
    if (rc == 0) rc = wire_handshake_connect(w->next_fd, &w->hello, &peer, dl, err);
    if (rc == 0 && peer.rank != c->rank + c->tp)
      rc = ts_errorf(err, TS_EPROTO, "rank %d answered at rank %d's address", peer.rank,
                     c->rank + c->tp);
    if (rc < 0) ts_err_prefix(err, "linking to the next stage (%s:%d)", nx->host, nx->port);
  }
  if (rc == 0 && w->pp_rank > 0) {
    for (;;) {
      char who[NET_HOST_MAX + 8];
      rc = net_accept(w->pp_listen_fd, dl, &w->prev_fd, who, sizeof who, err);
      if (rc < 0) {
        ts_err_prefix(err, "waiting for stage %d", w->pp_rank - 1);
        break;
      }
      wire_hello peer;
      ts_err he = {0};
      if (wire_handshake_accept(w->prev_fd, &w->hello, &peer, dl, &he) == 0 &&
          peer.rank == c->rank - c->tp)
        break;
      LOG_W("worker %d: dropped a pipeline connection from %s: %s", c->rank, who,
            he.msg[0] ? he.msg : "wrong rank");
      close(w->prev_fd);
      w->prev_fd = -1;
    }
  }
  wire_peers_free(&all);
  return rc;
}

static int send_info(worker *w, ts_err *err) {
  const model *m = w->m;
  wire_info in = {.vocab_size = m->cfg.vocab_size,
                  .max_pos = m->cfg.max_pos,
                  .max_tokens = m->max_tokens,
                  .bos_id = m->cfg.bos_id,
                  .n_eos = m->cfg.n_eos < WIRE_MAX_EOS ? m->cfg.n_eos : WIRE_MAX_EOS};
  in.kv_bytes_per_token = model_kv_bytes(m, 1);
  for (int i = 0; i < in.n_eos; i++) in.eos_ids[i] = m->cfg.eos_ids[i];
  /* A device sampler needs the whole model in one stage (model_forward_sample). */
  in.can_sample = w->cfg->pp == 1 && w->be->ops->sample != NULL;
  /* After the weights, activations and NCCL's buffers: what is left of the GPU's share. */
  double util = w->cfg->gpu_memory_utilization > 0 ? w->cfg->gpu_memory_utilization
                                                   : DEVICE_MEM_UTILIZATION_DEFAULT;
  TS_TRY(device_kv_budget(w->be, util, &in.kv_bytes_limit, err));
  wire_buf_reset(&w->out);
  TS_TRY(wire_encode_info(&w->out, &in, err));
  return send_frame(w, w->drv_fd, err);
}

static int do_init_kv(worker *w, ts_err *err) {
  wire_init_kv k;
  TS_TRY(wire_decode_init_kv(w->in.payload, w->in.len, &k, err));
  if (w->kv_ready) return ts_errorf(err, TS_EINVAL, "the KV cache is already allocated");
  if (k.block_size <= 0 || k.n_blocks <= 0)
    return ts_errorf(err, TS_EINVAL, "INIT_KV asks for %d blocks of %d tokens", k.n_blocks,
                     k.block_size);
  const model *m = w->m;
  TS_TRY(kv_cache_create(&w->kv, w->be, m->w.n_layers, k.n_blocks, k.block_size,
                         m->cfg.n_kv_head / w->cfg->tp, m->cfg.head_dim, err));
  w->kv_ready = 1;
  wire_buf_reset(&w->out);
  TS_TRY(wire_encode_init_kv(&w->out, &k, err));
  return send_frame(w, w->drv_fd, err);
}

static int answer_ping(worker *w, ts_err *err) {
  wire_ping p;
  TS_TRY(wire_decode_ping(w->in.payload, w->in.len, &p, err));
  p.status = 0;
  wire_buf_reset(&w->out);
  TS_TRY(wire_encode_ping(&w->out, WIRE_MSG_PONG, &p, err));
  return send_frame(w, w->drv_fd, err);
}

/* Waits for the previous stage while answering the driver's pings, so that the driver can tell a
 * waiting stage from a vanished one. */
static int recv_hidden(worker *w, const wire_step *st, ts_err *err) {
  int64_t deadline = net_now_ms() + WORKER_STEP_TIMEOUT_MS;
  for (;;) {
    struct pollfd p[2] = {{.fd = w->prev_fd, .events = POLLIN}, {.fd = w->drv_fd, .events = POLLIN}};
    int64_t left = deadline - net_now_ms();
    if (left <= 0) return ts_errorf(err, TS_ETIMEOUT, "no hidden states from stage %d", w->pp_rank - 1);
    int n = poll(p, 2, left > 1000 ? 1000 : (int)left);
    if (n < 0 && errno != EINTR) return ts_errorf(err, TS_ENET, "poll: %s", strerror(errno));
    if (n <= 0) continue;
    if (p[0].revents) break;
    if (p[1].revents) {
      if (wire_recv_frame(w->drv_fd, &w->in, 0, net_now_ms() + WORKER_IO_TIMEOUT_MS, err) < 0)
        return ts_err_prefix(err, "lost the driver");
      if (w->in.type == WIRE_MSG_STEP) {
        /* The next micro-batch, already on its way through the pipeline: keep it for later. */
        if (w->q_n == WORKER_MAX_QUEUE)
          return ts_errorf(err, TS_EBUSY, "more than %d steps in flight", WORKER_MAX_QUEUE);
        wire_step *q = &w->queue[(w->q_head + w->q_n) % WORKER_MAX_QUEUE];
        TS_TRY(wire_decode_step(w->in.payload, w->in.len, q, err));
        w->q_n++;
        continue;
      }
      if (w->in.type != WIRE_MSG_PING)
        return ts_errorf(err, TS_ECANCELED, "the driver sent %s during a step",
                         wire_msg_name(w->in.type));
      TS_TRY(answer_ping(w, err));
    }
  }
  TS_TRY(wire_recv_frame(w->prev_fd, &w->in_hidden, 0, net_now_ms() + WORKER_STEP_TIMEOUT_MS, err));
  if (w->in_hidden.type != WIRE_MSG_HIDDEN)
    return ts_errorf(err, TS_EPROTO, "expected HIDDEN from stage %d, got %s", w->pp_rank - 1,
                     wire_msg_name(w->in_hidden.type));
  wire_hidden h;
  TS_TRY(wire_decode_hidden(w->in_hidden.payload, w->in_hidden.len, &h, err));
  int rc = 0;
  if (h.step_id != st->step_id || h.n_tokens != st->batch.n_tokens ||
      h.dim != w->m->cfg.d_model || h.dtype != TS_F32)
    rc = ts_errorf(err, TS_EPROTO,
                   "hidden states for step %llu (%d x %d, dtype %d); expected step %llu (%d x %d)",
                   (unsigned long long)h.step_id, h.n_tokens, h.dim, h.dtype,
                   (unsigned long long)st->step_id, st->batch.n_tokens, w->m->cfg.d_model);
  else
    memcpy(w->hidden_in, h.data, (size_t)h.n_tokens * (size_t)h.dim * sizeof(float));
  wire_hidden_free(&h);
  return rc;
}

/* A step whose logits rows are sampled on this worker's device: only the ids go back. Every
 * tensor-parallel rank samples the same rows alike (draws depend on the row's seed and counter
 * alone); rank 0 answers. */
static int do_step_sample(worker *w, wire_step *st, ts_err *err) {
  const ts_batch *b = &st->batch;
  if (w->cfg->pp != 1 || !w->be->ops->sample)
    return ts_errorf(err, TS_EPROTO, "a sampled step reached a worker that cannot sample");
  for (int i = 0; i < b->n_logits; i++)
    for (int k = 0; k < st->rows[i].n_penalty; k++)
      if (st->rows[i].penalty_ids[k] >= w->m->cfg.vocab_size)
        return ts_errorf(err, TS_EPROTO, "sampling row %d names token %d outside the vocabulary",
                         i, st->rows[i].penalty_ids[k]);
  TS_TRY(model_forward_sample(w->m, &w->kv, b, st->rows, w->ids, err));
  if (w->tp_rank != 0) return 0;
  wire_result r = {.step_id = st->step_id, .kind = WIRE_RESULT_TOKENS, .n_rows = b->n_logits,
                   .tokens = w->ids};
  wire_buf_reset(&w->out);
  TS_TRY(wire_encode_result(&w->out, &r, err));
  return send_frame(w, w->drv_fd, err);
}

static int do_step(worker *w, wire_step *st, ts_err *err) {
  const ts_batch *b = &st->batch;
  model *m = w->m;
  TS_TRY(wire_batch_validate(b, err));
  if (!w->kv_ready) return ts_errorf(err, TS_EINVAL, "step before INIT_KV");
  if (b->n_tokens > m->max_tokens)
    return ts_errorf(err, TS_EINVAL, "step of %d tokens exceeds max_tokens %d", b->n_tokens,
                     m->max_tokens);
  int first = w->prev_fd < 0, last = w->next_fd < 0;
  if (st->flags & WIRE_STEP_SAMPLE) return do_step_sample(w, st, err);
  if (!first) TS_TRY(recv_hidden(w, st, err));
  TS_TRY(model_forward(m, &w->kv, b, first ? NULL : w->hidden_in, last ? NULL : w->hidden_out,
                       last ? w->logits : NULL, err));
  if (!last) {
    wire_hidden h = {.step_id = st->step_id, .n_tokens = b->n_tokens, .dim = m->cfg.d_model,
                     .dtype = TS_F32, .data = w->hidden_out};
    wire_buf_reset(&w->out);
    TS_TRY(wire_encode_hidden(&w->out, &h, err));
    if (send_frame(w, w->next_fd, err) < 0) return ts_err_prefix(err, "sending to the next stage");
    return 0;
  }
  if (w->tp_rank != 0) return 0; /* every tp rank holds the same logits; one answers */
  wire_result r = {.step_id = st->step_id, .kind = WIRE_RESULT_LOGITS, .n_rows = b->n_logits,
                   .vocab = m->cfg.vocab_size, .logits = w->logits};
  wire_buf_reset(&w->out);
  TS_TRY(wire_encode_result(&w->out, &r, err));
  return send_frame(w, w->drv_fd, err);
}

static void run_step(worker *w, wire_step *st, int decoded, const ts_err *derr) {
  ts_err e = {0};
  int rc = decoded < 0 ? (e = *derr, decoded) : do_step(w, st, &e);
  uint64_t id = decoded < 0 ? 0 : st->step_id;
  wire_step_free(st);
  if (rc < 0) {
    /* The group is in an unknown state now (a neighbour may wait on us): report and let the
     * driver decide; it stops or restarts every worker. */
    LOG_E("worker %d: step %llu failed: %s", w->cfg->rank, (unsigned long long)id, e.msg);
    send_error(w, id, &e);
  }
}

static int serve_driver(worker *w, ts_err *err) {
  for (;;) {
    if (w->q_n > 0) {
      wire_step st = w->queue[w->q_head];
      w->q_head = (w->q_head + 1) % WORKER_MAX_QUEUE;
      w->q_n--;
      run_step(w, &st, 0, NULL);
      continue;
    }
    /* Idle: the driver pings every second or so; an hour of silence means it is gone. */
    int rc = wire_recv_frame(w->drv_fd, &w->in, 0, net_now_ms() + 3600 * 1000, err);
    if (rc < 0) return ts_err_prefix(err, "lost the driver");
    switch (w->in.type) {
      case WIRE_MSG_PING:
        TS_TRY(answer_ping(w, err));
        break;
      case WIRE_MSG_INIT_KV: {
        ts_err e = {0};
        if (do_init_kv(w, &e) < 0) {
          LOG_E("worker %d: %s", w->cfg->rank, e.msg);
          send_error(w, 0, &e);
        }
        break;
      }
      case WIRE_MSG_STEP: {
        wire_step st;
        ts_err e = {0};
        run_step(w, &st, wire_decode_step(w->in.payload, w->in.len, &st, &e), &e);
        break;
      }
      case WIRE_MSG_SHUTDOWN:
        LOG_I("worker %d: shutting down at the driver's request", w->cfg->rank);
        return 0;
      default:
        return ts_errorf(err, TS_EPROTO, "unexpected %s from the driver",
                         wire_msg_name(w->in.type));
    }
  }
}

int worker_run(const worker_config *c, ts_err *err) {
  worker w = {.cfg = c, .drv_fd = -1, .prev_fd = -1, .next_fd = -1, .pp_listen_fd = -1,
              .tp_listen_fd = -1};
  wire_buf_init(&w.out);
  int rc = 0;
  if (c->tp < 1 || c->pp < 1 || c->world_size != c->tp * c->pp || c->rank < 0 ||
      c->rank >= c->world_size) {
    rc = ts_errorf(err, TS_EINVAL, "rank %d of world %d does not fit tp %d x pp %d", c->rank,
                   c->world_size, c->tp, c->pp);
    goto out;
  }
  w.tp_rank = c->rank % c->tp;
  w.pp_rank = c->rank / c->tp;
  model_files *mf = NULL;
  if ((rc = model_files_open(&mf, c->model_path, err)) < 0) goto out;
  model_config cfg = *model_files_config(mf);
  uint64_t fp = model_files_fingerprint(mf);
  model_files_close(mf);
  model_shard shard;
  if ((rc = dist_stage_shard(&cfg, c->layer_split, w.tp_rank, c->tp, w.pp_rank, c->pp, &shard,
                             err)) < 0)
    goto out;
  if ((rc = backend_create(&w.be, c->device, c->threads, err)) < 0) goto out;
  if ((rc = model_load(&w.m, c->model_path, &shard, w.be, c->max_tokens, err)) < 0) goto out;
  LOG_I("worker rank %d (tp %d/%d, pp %d/%d) on node %s, unit %s, device %s: layers [%d, %d), "
        "kv heads [%d, %d)",
        c->rank, w.tp_rank, c->tp, w.pp_rank, c->pp, c->node_ip, c->unit ? c->unit : "-",
        c->device, shard.layer_start, shard.layer_end, w.tp_rank * cfg.n_kv_head / c->tp,
        (w.tp_rank + 1) * cfg.n_kv_head / c->tp);
  size_t T = (size_t)w.m->max_tokens, d = (size_t)cfg.d_model;
  w.hidden_in = malloc(T * d * sizeof(float));
  w.hidden_out = malloc(T * d * sizeof(float));
  w.logits = malloc(T * (size_t)cfg.vocab_size * sizeof(float));
  w.ids = malloc(T * sizeof *w.ids);
  if (!w.hidden_in || !w.hidden_out || !w.logits || !w.ids) {
    rc = ts_errorf(err, TS_ENOMEM, "out of memory for step buffers of %zu tokens", T);
    goto out;
  }
  /* Listeners on this node's address only, before anyone is told where they are. */
  if (w.pp_rank > 0 &&
      (rc = net_listen(c->node_ip, 0, 16, &w.pp_listen_fd, &w.pp_port, err)) < 0)
    goto out;
  if (w.tp_rank == 0 && c->tp > 1 &&
      (rc = net_listen(c->node_ip, 0, 64, &w.tp_listen_fd, &w.tp_port, err)) < 0)
    goto out;
  w.hello = (wire_hello){.role = WIRE_ROLE_WORKER, .fingerprint = fp, .group_id = c->group_id,
                         .rank = c->rank, .world_size = c->world_size, .tp_rank = w.tp_rank,
                         .tp_size = c->tp, .pp_rank = w.pp_rank, .pp_size = c->pp,
                         .port = w.pp_port};
  memcpy(w.hello.secret, c->secret, WIRE_SECRET_LEN);
  snprintf(w.hello.host, sizeof w.hello.host, "%s", c->node_ip);
  if ((rc = join_driver(&w, err)) < 0) goto out;
  if ((rc = join_peers(&w, err)) < 0) goto out;
  if ((rc = send_info(&w, err)) < 0) goto out;
  rc = serve_driver(&w, err);
out:
  worker_cleanup(&w);
  return rc;
}
