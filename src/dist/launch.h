/* Process spawning and host addresses for the process executors: where this node can be reached
 * (the same rule on the driver and on every worker), where the tessera binary and the Ray
 * launcher live, and fork/exec of children with a chosen environment and pipes. */
#ifndef TESSERA_LAUNCH_H
#define TESSERA_LAUNCH_H

#include <stddef.h>
#include <sys/types.h>

#include "util/status.h"

/* This node's address as a numeric host: $TESSERA_HOST_IP when set; else loopback when
 * local_only (every process on this machine); else the local address of the interface that
 * routes to toward (a host name or address, NULL: the default route). */
int launch_host_addr(const char *toward, int local_only, char *out, size_t out_len, ts_err *err);

/* Absolute path of the running executable (/proc/self/exe). */
int launch_self_exe(char *out, size_t out_len, ts_err *err);

/* The python/ directory beside the build directory of exe ($TESSERA_PYTHONPATH overrides). */
int launch_python_dir(const char *exe, char *out, size_t out_len, ts_err *err);

typedef struct {
  const char *const *argv;   /* argv[0] is the program; NULL-terminated */
  const char *const *env_add;/* "NAME=VALUE" entries set (or replaced) in the child; NULL-ended */
  int pipe_stdin;            /* 1: *stdin_fd gets the write end of the child's stdin */
  int pipe_stdout;           /* 1: *stdout_fd gets the read end of the child's stdout */
  int die_with_parent;       /* SIGKILL the child when the spawning thread's process dies */
} launch_spec;

typedef struct {
  pid_t pid;
  int stdin_fd, stdout_fd;   /* -1 when not piped */
} launch_child;

/* Forks and execs (execvp when argv[0] has no '/'). File descriptors other than 0-2 and the
 * pipes are closed in the child. Only async-signal-safe calls run between fork and exec. */
int launch_spawn(const launch_spec *spec, launch_child *out, ts_err *err);
/* Non-blocking: 1 and the wait status in *status when the child has exited, 0 when it runs. */
int launch_reap(launch_child *c, int *status);
/* SIGTERM, up to grace_ms for it to exit, then SIGKILL; reaps it and closes its pipes. */
void launch_stop(launch_child *c, int grace_ms);
/* "exit code N" / "signal NAME" for a wait status. */
void launch_describe_status(int status, char *out, size_t len);

#endif
