/* Collectives over TCP between ranks on any hosts (CPU workers). Rank 0 listens on the master
 * address; the others connect to it, prove they belong to the launch (per-launch secret and
 * group id, see dist/wire.h) and learn where each other listens; then every pair of ranks holds
 * one connection (a full mesh). A peer that dies or stalls fails the call within io_timeout_ms
 * with an error naming it, and poisons the group: every later call fails at once. */
#ifndef TESSERA_COMM_TCP_H
#define TESSERA_COMM_TCP_H

#include <stddef.h>
#include <stdint.h>

#include "dist/comm.h"
#include "dist/wire.h"

typedef struct {
  int rank, size;
  const char *master_host;   /* rank 0 listens here; the others connect here */
  int master_port;
  int listen_fd;             /* rank 0: an already-listening socket to use instead of binding
                                master_host:master_port (taken over and closed); -1: none */
  const char *bind_host;     /* ranks > 0: listener address; NULL: the local address of the
                                route to the master (never a wildcard unless given one) */
  int bind_port;             /* ranks > 0: 0 = ephemeral */
  uint64_t group_id;         /* this launch's group; set it and the secret per launch */
  uint64_t fingerprint;      /* optional: the model's fingerprint, 0 if unused */
  uint8_t secret[WIRE_SECRET_LEN];
  int connect_timeout_ms;    /* the whole rendezvous (default 60 s) */
  int io_timeout_ms;         /* a call fails when a peer makes no progress this long (10 s) */
  size_t small_max_bytes;    /* all-reduce: direct exchange up to this size, ring above (64 KiB) */
} comm_tcp_config;

void comm_tcp_config_init(comm_tcp_config *cfg);
/* Blocks until every rank has joined or the rendezvous deadline passes. */
int comm_tcp_create(const comm_tcp_config *cfg, comm **out, ts_err *err);

#endif
