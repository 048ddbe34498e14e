/* Logging to stderr with a level set once at start (TESSERA_LOG=debug|info|warn|error). stdout
 * belongs to the command's output (generated text, JSON), never to logs. */
#ifndef TESSERA_LOG_H
#define TESSERA_LOG_H

typedef enum { LOG_DEBUG = 0, LOG_INFO = 1, LOG_WARN = 2, LOG_ERROR = 3, LOG_OFF = 4 } log_level;

void log_set_level(log_level level);
log_level log_get_level(void);
void log_init_from_env(void);
void log_msg(log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define LOG_D(...) log_msg(LOG_DEBUG, __VA_ARGS__)
#define LOG_I(...) log_msg(LOG_INFO, __VA_ARGS__)
#define LOG_W(...) log_msg(LOG_WARN, __VA_ARGS__)
#define LOG_E(...) log_msg(LOG_ERROR, __VA_ARGS__)

#endif
