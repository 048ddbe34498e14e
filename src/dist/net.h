/* Socket helpers for the distributed layer: TCP listen/accept/connect with deadlines, whole-buffer
 * send/recv that never hang past a deadline, and host:port parsing. Deadlines are absolute times
 * in milliseconds on the monotonic clock (net_now_ms() + timeout). Sends use MSG_NOSIGNAL so a
 * dead peer is an error value, never a SIGPIPE. */
#ifndef TESSERA_NET_H
#define TESSERA_NET_H

#include <stddef.h>
#include <stdint.h>

#include "util/status.h"

#define NET_HOST_MAX 256

int64_t net_now_ms(void);

/* Binds and listens on host:port (port 0: an ephemeral port, returned in *port_out). host must be
 * given: a wildcard address ("0.0.0.0", "::") binds everywhere only because the caller asked. */
int net_listen(const char *host, int port, int backlog, int *fd_out, int *port_out, ts_err *err);
/* Accepts one connection before the deadline (TS_ETIMEOUT after it). The new socket is
 * non-blocking with TCP_NODELAY; peer_out (may be NULL) gets "host:port" of the peer. */
int net_accept(int listen_fd, int64_t deadline_ms, int *fd_out, char *peer_out, size_t peer_len,
               ts_err *err);
/* Connects to host:port, retrying refused connections until the deadline (the listener may not be
 * up yet). The socket is non-blocking with TCP_NODELAY. */
int net_connect(const char *host, int port, int64_t deadline_ms, int *fd_out, ts_err *err);
/* Sends/receives exactly n bytes or fails: TS_ETIMEOUT at the deadline, TS_ENET on reset or EOF. */
int net_send_all(int fd, const void *buf, size_t n, int64_t deadline_ms, ts_err *err);
int net_recv_all(int fd, void *buf, size_t n, int64_t deadline_ms, ts_err *err);

int net_set_nonblocking(int fd, ts_err *err);
int net_set_nodelay(int fd, ts_err *err);
/* The local address of a socket (e.g. the interface that routes to a peer) as a numeric host. */
int net_local_addr(int fd, char *host, size_t host_len, int *port_out, ts_err *err);
/* "host:port", "[v6]:port". */
int net_parse_hostport(const char *s, char *host, size_t host_len, int *port_out, ts_err *err);
/* Pending socket error (SO_ERROR) as a string, for messages after POLLERR. */
const char *net_socket_error(int fd);

#endif
