/* Status codes and the error-message buffer. */
#include "util/status.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

int ts_errorf(ts_err *err, int code, const char *fmt, ...) {
  if (err) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->msg, sizeof err->msg, fmt, ap);
    va_end(ap);
    err->code = code;
  }
  return code;
}

int ts_err_prefix(ts_err *err, const char *fmt, ...) {
  if (!err) return 0;
  char old[TS_ERR_MSG_MAX];
  memcpy(old, err->msg, sizeof old);
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(err->msg, sizeof err->msg, fmt, ap);
  va_end(ap);
  if (n >= 0 && (size_t)n + 2 < sizeof err->msg) {
    size_t used = (size_t)n;
    memcpy(err->msg + used, ": ", 3);
    used += 2;
    size_t room = sizeof err->msg - used - 1, oldlen = strlen(old);
    if (oldlen > room) oldlen = room;
    memcpy(err->msg + used, old, oldlen);
    err->msg[used + oldlen] = '\0';
  }
  return err->code;
}

const char *ts_strerror(int code) {
  switch (code) {
#define TS_STATUS_CASE(name, value, desc) \
  case value:                             \
    return desc;
    TS_STATUS_MAP(TS_STATUS_CASE)
#undef TS_STATUS_CASE
  }
  return "unknown error";
}

void ts_err_clear(ts_err *err) {
  if (err) {
    err->code = 0;
    err->msg[0] = '\0';
  }
}
