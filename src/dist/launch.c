/* Process spawning and host address resolution for the process executors. */
#include "dist/launch.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "dist/net.h"

extern char **environ;

int launch_host_addr(const char *toward, int local_only, char *out, size_t out_len, ts_err *err) {
  const char *env = getenv("TESSERA_HOST_IP");
  if (env && *env) {
    snprintf(out, out_len, "%s", env);
    return 0;
  }
  if (local_only) {
    snprintf(out, out_len, "127.0.0.1");
    return 0;
  }
  /* A UDP connect sends nothing: it only asks the kernel which interface routes there. */
  const char *target = toward && *toward ? toward : "192.0.2.1"; /* TEST-NET-1: any routed host */
  struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_DGRAM}, *res = NULL;
  int g = getaddrinfo(target, "9", &hints, &res);
  if (g != 0)
    return ts_errorf(err, TS_ENET, "cannot resolve %s: %s (set TESSERA_HOST_IP)", target,
                     gai_strerror(g));
  int rc = TS_ENET;
  for (struct addrinfo *ai = res; ai && rc < 0; ai = ai->ai_next) {
    int fd = socket(ai->ai_family, SOCK_DGRAM, 0);
    if (fd < 0) continue;
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0 &&
        net_local_addr(fd, out, out_len, NULL, NULL) == 0)
      rc = 0;
    close(fd);
  }
  freeaddrinfo(res);
  if (rc < 0)
    return ts_errorf(err, TS_ENET, "no interface routes to %s (set TESSERA_HOST_IP)", target);
  return 0;
}

int launch_self_exe(char *out, size_t out_len, ts_err *err) {
  ssize_t n = readlink("/proc/self/exe", out, out_len - 1);
  if (n <= 0 || (size_t)n >= out_len - 1)
    return ts_errorf(err, TS_EIO, "cannot find the tessera executable (/proc/self/exe): %s",
                     n < 0 ? strerror(errno) : "path too long");
  out[n] = 0;
  return 0;
}

int launch_python_dir(const char *exe, char *out, size_t out_len, ts_err *err) {
  const char *env = getenv("TESSERA_PYTHONPATH");
  if (env && *env) {
    snprintf(out, out_len, "%s", env);
    return 0;
  }
  /* exe is <repo>/<build dir>/tessera: the package is <repo>/python. */
  char buf[PATH_MAX];
  snprintf(buf, sizeof buf, "%s", exe);
  for (int up = 0; up < 2; up++) {
    char *slash = strrchr(buf, '/');
    if (!slash) return ts_errorf(err, TS_EINVAL, "cannot place the python/ directory beside %s", exe);
    *slash = 0;
  }
  int n = snprintf(out, out_len, "%s/python", buf[0] ? buf : "");
  if (n < 0 || (size_t)n >= out_len) return ts_errorf(err, TS_ERANGE, "python path too long");
  return 0;
}

/* Builds the child's environment before fork: the parent's, with env_add replacing or adding. */
static char **build_env(const char *const *add) {
  size_t n_env = 0, n_add = 0;
  while (environ && environ[n_env]) n_env++;
  while (add && add[n_add]) n_add++;
  char **env = calloc(n_env + n_add + 1, sizeof *env);
  if (!env) return NULL;
  size_t k = 0;
  for (size_t i = 0; i < n_env; i++) {
    int replaced = 0;
    for (size_t j = 0; j < n_add && !replaced; j++) {
      const char *eq = strchr(add[j], '=');
      size_t len = eq ? (size_t)(eq - add[j]) : strlen(add[j]);
      replaced = !strncmp(environ[i], add[j], len) && environ[i][len] == '=';
    }
    if (!replaced) env[k++] = environ[i];
  }
  for (size_t j = 0; j < n_add; j++) env[k++] = (char *)add[j];
  env[k] = NULL;
  return env;
}

static void close_pipe(int p[2]) {
  if (p[0] >= 0) close(p[0]);
  if (p[1] >= 0) close(p[1]);
}

int launch_spawn(const launch_spec *spec, launch_child *out, ts_err *err) {
  out->pid = -1;
  out->stdin_fd = out->stdout_fd = -1;
  int in_p[2] = {-1, -1}, out_p[2] = {-1, -1};
  if ((spec->pipe_stdin && pipe2(in_p, O_CLOEXEC) < 0) ||
      (spec->pipe_stdout && pipe2(out_p, O_CLOEXEC) < 0)) {
    close_pipe(in_p);
    close_pipe(out_p);
    return ts_errorf(err, TS_EIO, "pipe: %s", strerror(errno));
  }
  char **env = build_env(spec->env_add);
  if (!env) {
    close_pipe(in_p);
    close_pipe(out_p);
    return ts_errorf(err, TS_ENOMEM, "out of memory for a child's environment");
  }
  const char *prog = spec->argv[0];
  int search = strchr(prog, '/') == NULL;
  pid_t parent = getpid();
  pid_t pid = fork();
  if (pid == 0) {
    /* Child: async-signal-safe calls only (the parent has threads). */
    if (spec->die_with_parent) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != parent) _exit(127);
    }
    if (in_p[0] >= 0) dup2(in_p[0], 0);
    if (out_p[1] >= 0) dup2(out_p[1], 1);
    syscall(SYS_close_range, 3u, ~0u, 0u);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    signal(SIGPIPE, SIG_DFL);
    if (search)
      execvpe(prog, (char *const *)spec->argv, env);
    else
      execve(prog, (char *const *)spec->argv, env);
    static const char msg[] = "tessera: cannot execute a child process\n";
    ssize_t w = write(2, msg, sizeof msg - 1);
    (void)w;
    _exit(127);
  }
  int e = errno;
  free(env);
  if (pid < 0) {
    close_pipe(in_p);
    close_pipe(out_p);
    return ts_errorf(err, TS_EIO, "fork: %s", strerror(e));
  }
  if (in_p[0] >= 0) close(in_p[0]);
  if (out_p[1] >= 0) close(out_p[1]);
  out->pid = pid;
  out->stdin_fd = in_p[1];
  out->stdout_fd = out_p[0];
  return 0;
}

int launch_reap(launch_child *c, int *status) {
  if (c->pid <= 0) return 1;
  int st = 0;
  pid_t r = waitpid(c->pid, &st, WNOHANG);
  if (r == c->pid) {
    c->pid = -1;
    if (status) *status = st;
    return 1;
  }
  if (r < 0 && errno == ECHILD) {
    c->pid = -1;
    if (status) *status = 0;
    return 1;
  }
  return 0;
}

void launch_stop(launch_child *c, int grace_ms) {
  if (c->stdin_fd >= 0) close(c->stdin_fd);
  c->stdin_fd = -1;
  if (c->pid > 0) {
    kill(c->pid, SIGTERM);
    int64_t until = net_now_ms() + grace_ms;
    while (!launch_reap(c, NULL) && net_now_ms() < until) {
      struct timespec ts = {0, 10 * 1000 * 1000};
      nanosleep(&ts, NULL);
    }
    if (c->pid > 0) {
      kill(c->pid, SIGKILL);
      waitpid(c->pid, NULL, 0);
      c->pid = -1;
    }
  }
  if (c->stdout_fd >= 0) close(c->stdout_fd);
  c->stdout_fd = -1;
}

void launch_describe_status(int status, char *out, size_t len) {
  if (WIFEXITED(status))
    snprintf(out, len, "exit code %d", WEXITSTATUS(status));
  else if (WIFSIGNALED(status))
    snprintf(out, len, "signal %s", strsignal(WTERMSIG(status)));
  else
    snprintf(out, len, "status %d", status);
}
