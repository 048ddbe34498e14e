/* TCP socket helpers with deadlines: every blocking step is a poll() bounded by the caller's
 * deadline, so no call here can hang on a dead or silent peer. */
#include "dist/net.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

int64_t net_now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int remaining_ms(int64_t deadline_ms) {
  int64_t left = deadline_ms - net_now_ms();
  if (left < 0) return 0;
  return left > 1000000 ? 1000000 : (int)left;
}

int net_set_nonblocking(int fd, ts_err *err) {
  int fl = fcntl(fd, F_GETFL, 0);
  if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
    return ts_errorf(err, TS_ENET, "fcntl(O_NONBLOCK): %s", strerror(errno));
  return 0;
}

int net_set_nodelay(int fd, ts_err *err) {
  int one = 1;
  if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0)
    return ts_errorf(err, TS_ENET, "setsockopt(TCP_NODELAY): %s", strerror(errno));
  return 0;
}

const char *net_socket_error(int fd) {
  int e = 0;
  socklen_t len = sizeof e;
  if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &len) < 0) e = errno;
  return e ? strerror(e) : "connection closed";
}

static void format_addr(const struct sockaddr *sa, char *out, size_t len) {
  char host[NET_HOST_MAX] = "?";
  int port = 0;
  if (sa->sa_family == AF_INET) {
    const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
    inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
    port = ntohs(in->sin_port);
    snprintf(out, len, "%s:%d", host, port);
  } else if (sa->sa_family == AF_INET6) {
    const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
    inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
    port = ntohs(in6->sin6_port);
    snprintf(out, len, "[%s]:%d", host, port);
  } else {
    snprintf(out, len, "?");
  }
}

static int resolve(const char *host, int port, int passive, struct addrinfo **res, ts_err *err) {
  if (!host || !*host)
    return ts_errorf(err, TS_EINVAL, "no host given (a wildcard address must be asked for)");
  if (port < 0 || port > 65535) return ts_errorf(err, TS_EINVAL, "port %d out of range", port);
  char portstr[16];
  snprintf(portstr, sizeof portstr, "%d", port);
  struct addrinfo hints;
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV | (passive ? AI_PASSIVE : 0);
  int rc = getaddrinfo(host, portstr, &hints, res);
  if (rc != 0) return ts_errorf(err, TS_ENET, "resolve %s: %s", host, gai_strerror(rc));
  return 0;
}

int net_listen(const char *host, int port, int backlog, int *fd_out, int *port_out, ts_err *err) {
  struct addrinfo *res = NULL;
  TS_TRY(resolve(host, port, 1, &res, err));
  int fd = -1, last_errno = 0;
  for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
    fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) {
      last_errno = errno;
      continue;
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, backlog > 0 ? backlog : 16) == 0)
      break;
    last_errno = errno;
    close(fd);
    fd = -1;
  }
  freeaddrinfo(res);
  if (fd < 0)
    return ts_errorf(err, TS_ENET, "listen on %s:%d: %s", host, port, strerror(last_errno));
  if (net_set_nonblocking(fd, err) < 0) {
    close(fd);
    return TS_ENET;
  }
  if (port_out) {
    char h[NET_HOST_MAX];
    if (net_local_addr(fd, h, sizeof h, port_out, err) < 0) {
      close(fd);
      return TS_ENET;
    }
  }
  *fd_out = fd;
  return 0;
}

int net_accept(int listen_fd, int64_t deadline_ms, int *fd_out, char *peer_out, size_t peer_len,
               ts_err *err) {
  for (;;) {
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    int fd = accept4(listen_fd, (struct sockaddr *)&ss, &sl, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd >= 0) {
      if (net_set_nodelay(fd, err) < 0) {
        close(fd);
        return TS_ENET;
      }
      if (peer_out && peer_len) format_addr((struct sockaddr *)&ss, peer_out, peer_len);
      *fd_out = fd;
      return 0;
    }
    if (errno == EINTR || errno == ECONNABORTED) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK)
      return ts_errorf(err, TS_ENET, "accept: %s", strerror(errno));
    int left = remaining_ms(deadline_ms);
    if (left == 0) return ts_errorf(err, TS_ETIMEOUT, "no connection arrived before the deadline");
    struct pollfd p = {.fd = listen_fd, .events = POLLIN};
    if (poll(&p, 1, left) < 0 && errno != EINTR)
      return ts_errorf(err, TS_ENET, "poll: %s", strerror(errno));
  }
}

/* One non-blocking connect attempt bounded by the deadline: 0, or the errno that failed it. */
static int connect_once(const struct addrinfo *ai, int64_t deadline_ms, int *fd_out) {
  int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, ai->ai_protocol);
  if (fd < 0) return errno;
  if (connect(fd, ai->ai_addr, ai->ai_addrlen) < 0) {
    if (errno != EINPROGRESS) {
      int e = errno;
      close(fd);
      return e;
    }
    struct pollfd p = {.fd = fd, .events = POLLOUT};
    int rc;
    do rc = poll(&p, 1, remaining_ms(deadline_ms));
    while (rc < 0 && errno == EINTR);
    if (rc <= 0) {
      close(fd);
      return ETIMEDOUT;
    }
    int e = 0;
    socklen_t len = sizeof e;
    getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &len);
    if (e) {
      close(fd);
      return e;
    }
  }
  *fd_out = fd;
  return 0;
}

int net_connect(const char *host, int port, int64_t deadline_ms, int *fd_out, ts_err *err) {
  struct addrinfo *res = NULL;
  TS_TRY(resolve(host, port, 0, &res, err));
  int last = ETIMEDOUT;
  for (;;) {
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
      int fd = -1;
      last = connect_once(ai, deadline_ms, &fd);
      if (last == 0) {
        freeaddrinfo(res);
        if (net_set_nodelay(fd, err) < 0) {
          close(fd);
          return TS_ENET;
        }
        *fd_out = fd;
        return 0;
      }
    }
    /* The listener may simply not be up yet: retry refusals until the deadline. */
    if (remaining_ms(deadline_ms) == 0 || (last != ECONNREFUSED && last != ETIMEDOUT)) break;
    struct timespec nap = {0, 50 * 1000000};
    nanosleep(&nap, NULL);
  }
  freeaddrinfo(res);
  return ts_errorf(err, last == ETIMEDOUT ? TS_ETIMEOUT : TS_ENET, "connect to %s:%d: %s", host,
                   port, strerror(last));
}

int net_send_all(int fd, const void *buf, size_t n, int64_t deadline_ms, ts_err *err) {
  const char *p = buf;
  while (n > 0) {
    ssize_t k = send(fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (k > 0) {
      p += k;
      n -= (size_t)k;
      continue;
    }
    if (k < 0 && errno == EINTR) continue;
    if (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
      return ts_errorf(err, TS_ENET, "send: %s", strerror(errno));
    int left = remaining_ms(deadline_ms);
    if (left == 0) return ts_errorf(err, TS_ETIMEOUT, "send stalled: peer not reading");
    struct pollfd pf = {.fd = fd, .events = POLLOUT};
    if (poll(&pf, 1, left) < 0 && errno != EINTR)
      return ts_errorf(err, TS_ENET, "poll: %s", strerror(errno));
  }
  return 0;
}

int net_recv_all(int fd, void *buf, size_t n, int64_t deadline_ms, ts_err *err) {
  char *p = buf;
  while (n > 0) {
    ssize_t k = recv(fd, p, n, MSG_DONTWAIT);
    if (k > 0) {
      p += k;
      n -= (size_t)k;
      continue;
    }
    if (k == 0) return ts_errorf(err, TS_ENET, "peer closed the connection");
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK)
      return ts_errorf(err, TS_ENET, "recv: %s", strerror(errno));
    int left = remaining_ms(deadline_ms);
    if (left == 0) return ts_errorf(err, TS_ETIMEOUT, "recv stalled: peer sent nothing");
    struct pollfd pf = {.fd = fd, .events = POLLIN};
    if (poll(&pf, 1, left) < 0 && errno != EINTR)
      return ts_errorf(err, TS_ENET, "poll: %s", strerror(errno));
  }
  return 0;
}

int net_local_addr(int fd, char *host, size_t host_len, int *port_out, ts_err *err) {
  struct sockaddr_storage ss;
  socklen_t sl = sizeof ss;
  if (getsockname(fd, (struct sockaddr *)&ss, &sl) < 0)
    return ts_errorf(err, TS_ENET, "getsockname: %s", strerror(errno));
  const void *addr;
  int port;
  if (ss.ss_family == AF_INET) {
    addr = &((struct sockaddr_in *)&ss)->sin_addr;
    port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
  } else if (ss.ss_family == AF_INET6) {
    addr = &((struct sockaddr_in6 *)&ss)->sin6_addr;
    port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
  } else {
    return ts_errorf(err, TS_ENET, "socket is not TCP/IP");
  }
  if (host && host_len && !inet_ntop(ss.ss_family, addr, host, (socklen_t)host_len))
    return ts_errorf(err, TS_ENET, "inet_ntop: %s", strerror(errno));
  if (port_out) *port_out = port;
  return 0;
}

int net_parse_hostport(const char *s, char *host, size_t host_len, int *port_out, ts_err *err) {
  if (!s) return ts_errorf(err, TS_EINVAL, "no address given");
  const char *colon, *h = s;
  size_t hl;
  if (s[0] == '[') {
    const char *close_br = strchr(s, ']');
    if (!close_br || close_br[1] != ':')
      return ts_errorf(err, TS_EINVAL, "bad address '%s' (want [v6]:port)", s);
    h = s + 1;
    hl = (size_t)(close_br - h);
    colon = close_br + 1;
  } else {
    colon = strrchr(s, ':');
    if (!colon) return ts_errorf(err, TS_EINVAL, "bad address '%s' (want host:port)", s);
    hl = (size_t)(colon - s);
  }
  if (hl == 0 || hl >= host_len) return ts_errorf(err, TS_EINVAL, "bad host in '%s'", s);
  char *end = NULL;
  long port = strtol(colon + 1, &end, 10);
  if (!colon[1] || *end || port < 0 || port > 65535)
    return ts_errorf(err, TS_EINVAL, "bad port in '%s'", s);
  memcpy(host, h, hl);
  host[hl] = '\0';
  *port_out = (int)port;
  return 0;
}
