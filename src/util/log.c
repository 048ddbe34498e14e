/* stderr logger; one line per call, written with a single fprintf so threads do not interleave. */
#include "util/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static log_level g_level = LOG_INFO;

void log_set_level(log_level level) { g_level = level; }
log_level log_get_level(void) { return g_level; }

void log_init_from_env(void) {
  const char *s = getenv("TESSERA_LOG");
  if (!s) return;
  if (!strcmp(s, "debug")) g_level = LOG_DEBUG;
  else if (!strcmp(s, "info")) g_level = LOG_INFO;
  else if (!strcmp(s, "warn")) g_level = LOG_WARN;
  else if (!strcmp(s, "error")) g_level = LOG_ERROR;
  else if (!strcmp(s, "off")) g_level = LOG_OFF;
}

void log_msg(log_level level, const char *fmt, ...) {
  if (level < g_level) return;
  static const char *names[] = {"debug", "info", "warn", "error"};
  char line[2048];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(line, sizeof line, fmt, ap);
  va_end(ap);
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  struct tm tm;
  gmtime_r(&ts.tv_sec, &tm);
  fprintf(stderr, "%02d:%02d:%02d.%03ld tessera %s: %s\n", tm.tm_hour, tm.tm_min, tm.tm_sec,
          ts.tv_nsec / 1000000, names[level], line);
}
