/* tessera worker: one distributed worker process, started by the mp executor or the Ray launcher
 * (internal flags; see dist/worker.h). The launch secret comes from the environment
 * (TESSERA_SECRET, or the variable --secret-env names), never from the command line. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "dist/worker.h"
#include "util/log.h"

static void usage(FILE *f) {
  fprintf(f,
          "usage: tessera worker --driver HOST:PORT --rank R --world-size N --tp T --pp P\n"
          "                      --model PATH --group HEX [--device cpu|cuda] [--unit U]\n"
          "                      [--node-ip IP] [--threads N] [--layer-split a,b,...]\n"
          "                      [--max-tokens N] [--secret-env NAME]\n"
          "                      [--gpu-memory-utilization F]\n\n"
          "Started by 'tessera serve --distributed-executor-backend mp|ray'; the launch secret\n"
          "is read from $TESSERA_SECRET (or the variable --secret-env names).\n");
}

static int parse_int(const char *flag, const char *v, int lo, int hi, int *out) {
  char *end;
  errno = 0;
  long x = strtol(v, &end, 10);
  if (errno || end == v || *end || x < lo || x > hi) {
    fprintf(stderr, "tessera worker: %s expects a number in [%d, %d], got '%s'\n", flag, lo, hi, v);
    return -1;
  }
  *out = (int)x;
  return 0;
}

int cmd_worker(int argc, char **argv) {
  signal(SIGPIPE, SIG_IGN);
  worker_config c = {.device = "cpu", .node_ip = "127.0.0.1", .max_tokens = 2048, .rank = -1};
  const char *secret_env = WORKER_SECRET_ENV, *group = NULL;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
      usage(stdout);
      return 0;
    }
    if (i + 1 >= argc) {
      fprintf(stderr, "tessera worker: %s needs a value (see tessera worker --help)\n", a);
      return 2;
    }
    const char *v = argv[++i];
    int bad = 0;
    if (!strcmp(a, "--driver")) c.driver = v;
    else if (!strcmp(a, "--rank")) bad = parse_int(a, v, 0, 1 << 20, &c.rank);
    else if (!strcmp(a, "--world-size")) bad = parse_int(a, v, 1, 1 << 20, &c.world_size);
    else if (!strcmp(a, "--tp")) bad = parse_int(a, v, 1, 1 << 16, &c.tp);
    else if (!strcmp(a, "--pp")) bad = parse_int(a, v, 1, WORKER_MAX_PP, &c.pp);
    else if (!strcmp(a, "--model")) c.model_path = v;
    else if (!strcmp(a, "--device")) c.device = v;
    else if (!strcmp(a, "--unit")) c.unit = v;
    else if (!strcmp(a, "--node-ip")) c.node_ip = v;
    else if (!strcmp(a, "--threads")) bad = parse_int(a, v, 0, 4096, &c.threads);
    else if (!strcmp(a, "--layer-split")) c.layer_split = v;
    else if (!strcmp(a, "--max-tokens")) bad = parse_int(a, v, 1, 1 << 24, &c.max_tokens);
    else if (!strcmp(a, "--gpu-memory-utilization")) {
      char *end;
      c.gpu_memory_utilization = strtod(v, &end);
      bad = *end || !(c.gpu_memory_utilization > 0 && c.gpu_memory_utilization <= 1);
      if (bad) fprintf(stderr, "tessera worker: %s expects a number in (0, 1], got '%s'\n", a, v);
    }
    else if (!strcmp(a, "--secret-env")) secret_env = v;
    else if (!strcmp(a, "--group")) group = v;
    else {
      fprintf(stderr, "tessera worker: unknown option '%s' (see tessera worker --help)\n", a);
      return 2;
    }
    if (bad) return 2;
  }
  if (!c.driver || c.rank < 0 || !c.world_size || !c.tp || !c.pp || !c.model_path || !group) {
    fprintf(stderr, "tessera worker: --driver, --rank, --world-size, --tp, --pp, --model and "
                    "--group are required (see tessera worker --help)\n");
    return 2;
  }
  char *end;
  errno = 0;
  c.group_id = strtoull(group, &end, 16);
  if (errno || end == group || *end) {
    fprintf(stderr, "tessera worker: --group expects a hex number, got '%s'\n", group);
    return 2;
  }
  ts_err err = {0};
  const char *hex = getenv(secret_env);
  if (!hex || !*hex) {
    fprintf(stderr, "tessera worker: the launch secret is missing: set $%s\n", secret_env);
    return 2;
  }
  if (wire_secret_from_hex(hex, c.secret, &err) < 0) {
    fprintf(stderr, "tessera worker: $%s: %s\n", secret_env, err.msg);
    return 2;
  }
  if (worker_run(&c, &err) < 0) {
    fprintf(stderr, "tessera worker %d: %s\n", c.rank, err.msg[0] ? err.msg : ts_strerror(err.code));
    return 1;
  }
  return 0;
}
