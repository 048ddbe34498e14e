/* Errors as values: every fallible library call returns a ts_status (0 or a negative code) and
 * fills a ts_err with one human-readable line. Only main() turns an error into an exit code. */
#ifndef TESSERA_STATUS_H
#define TESSERA_STATUS_H

#include <stddef.h>

/* X-macro table: code name, value, short description. */
#define TS_STATUS_MAP(X)                                   \
  X(OK, 0, "ok")                                           \
  X(EINVAL, -1, "invalid argument")                        \
  X(ENOMEM, -2, "out of memory")                           \
  X(EIO, -3, "input/output error")                         \
  X(EFORMAT, -4, "malformed file or data")                 \
  X(EUNSUPPORTED, -5, "unsupported")                       \
  X(ENOTFOUND, -6, "not found")                            \
  X(ERANGE, -7, "value out of range")                      \
  X(ENET, -8, "network error")                             \
  X(ETIMEOUT, -9, "timed out")                             \
  X(EPROTO, -10, "protocol error")                         \
  X(ECANCELED, -11, "canceled")                            \
  X(EBUSY, -12, "resource busy")                           \
  X(EINTERNAL, -13, "internal error")

typedef enum {
#define TS_STATUS_ENUM(name, value, desc) TS_##name = value,
  TS_STATUS_MAP(TS_STATUS_ENUM)
#undef TS_STATUS_ENUM
} ts_status;

#define TS_ERR_MSG_MAX 1024

/* One error line. msg is empty when no error was recorded. */
typedef struct {
  int code;
  char msg[TS_ERR_MSG_MAX];
} ts_err;

/* Records code and a printf-style message in err (may be NULL) and returns code. */
int ts_errorf(ts_err *err, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* Prepends "prefix: " to an existing message (adds context while an error propagates up). */
int ts_err_prefix(ts_err *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
const char *ts_strerror(int code);
void ts_err_clear(ts_err *err);

/* Propagate a failing status unchanged. */
#define TS_TRY(expr)            \
  do {                          \
    int ts_try_rc_ = (expr);    \
    if (ts_try_rc_ < 0) return ts_try_rc_; \
  } while (0)

#endif
