/* tessera serve: loads a model and serves it behind the OpenAI-compatible HTTP API until SIGINT
 * or SIGTERM. Flags are named as vLLM's `vllm serve` names them. */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "backend/backend.h"
#include "cli/cli.h"
#include "dist/device_mem.h"
#include "dist/executor_mp.h"
#include "engine/engine.h"
#include "hub/hub.h"
#include "model/model.h"
#include "server/http_server.h"
#include "tokenizer/tokenizer.h"
#include "util/log.h"

typedef struct {
  const char *model;
  const char *host;
  int port;
  const char *served_model_name;
  int max_model_len;
  int max_num_seqs;
  int max_num_batched_tokens;
  long long kv_cache_memory;
  double gpu_memory_utilization;
  int block_size;
  int enable_prefix_caching;
  const char *api_key;
  long long seed;
  int threads;
  const char *device;
  const char *revision;
  const char *chat_template;
  int tp, pp;
  const char *executor;
  const char *layer_split;
  const char *ray_address, *ray_device_key, *ray_device_env, *ray_strategy;
  int ray_placement_timeout;
  int restart_workers;
} serve_opts;

static void usage(FILE *f) {
  fprintf(f,
          "usage: tessera serve MODEL [options]\n\n"
          "MODEL is a model directory, a .gguf file or a Hugging Face id.\n\n"
          "  --host ADDR                      address to listen on (default 0.0.0.0)\n"
          "  --port N                         port (default 8000; 0 = any free port)\n"
          "  --served-model-name NAME         name clients send as \"model\" (default MODEL)\n"
          "  --max-model-len N                context length (default: the model's)\n"
          "  --max-num-seqs N                 sequences per step (default 256)\n"
          "  --max-num-batched-tokens N       tokens per step (default max(2048, max-model-len))\n"
          "  --kv-cache-memory BYTES          KV-cache size (K/M/G suffixes; default: every\n"
          "                                   sequence at full length, at most 2 GiB)\n"
          "  --gpu-memory-utilization F       --device cuda: share of each GPU's memory to use;\n"
          "                                   the KV cache gets what the weights and activations\n"
          "                                   leave of it (default 0.9; --kv-cache-memory wins)\n"
          "  --block-size N                   tokens per KV block (default 16)\n"
          "  --enable-prefix-caching | --no-enable-prefix-caching   (default on)\n"
          "  --api-key KEY                    require 'Authorization: Bearer KEY' on /v1/*\n"
          "  --seed S                         seed for requests without one (default 0)\n"
          "  --threads N                      CPU threads (default: all cores)\n"
          "  --device cpu|cuda                (default cpu)\n"
          "  --revision R                     hub revision (default main)\n"
          "  --chat-template FILE             chat template overriding the model's\n"
          "  --tensor-parallel-size N         tensor-parallel workers per stage (default 1)\n"
          "  --pipeline-parallel-size N       pipeline stages (default 1)\n"
          "  --pipeline-layer-split A,B,...   layers per stage (default: even)\n"
          "  --distributed-executor-backend B uni (one process) | mp (worker processes on this\n"
          "                                   machine) | ray (workers on a Ray cluster); default\n"
          "                                   uni, or mp when T x P > 1\n"
          "  --restart-workers                relaunch every worker when one fails (default:\n"
          "                                   shut down)\n"
          "  --ray-address ADDR               Ray cluster (default auto)\n"
          "  --ray-device-key KEY             Ray resource per worker (default tessera_cpu or GPU)\n"
          "  --ray-device-env VAR             variable naming the worker's unit (default\n"
          "                                   TESSERA_CPU_DEVICES or CUDA_VISIBLE_DEVICES)\n"
          "  --ray-placement-strategy S       PACK | SPREAD (default PACK)\n"
          "  --ray-placement-timeout SECONDS  (default 60)\n");
}

static int parse_ll(const char *flag, const char *v, long long lo, long long hi, long long *out) {
  char *end;
  errno = 0;
  long long x = strtoll(v, &end, 10);
  long long mul = 1;
  if (end != v && *end && !end[1]) {
    switch (*end) {
      case 'k': case 'K': mul = 1LL << 10; end++; break;
      case 'm': case 'M': mul = 1LL << 20; end++; break;
      case 'g': case 'G': mul = 1LL << 30; end++; break;
      default: break;
    }
  }
  if (errno || end == v || *end || x < lo / mul || x > hi / mul) {
    fprintf(stderr, "tessera serve: %s expects a number in [%lld, %lld], got '%s'\n", flag, lo, hi,
            v);
    return -1;
  }
  *out = x * mul;
  return 0;
}

static int parse_args(int argc, char **argv, serve_opts *o) {
  *o = (serve_opts){.host = "0.0.0.0", .port = 8000, .max_num_seqs = 256,
                    .kv_cache_memory = 0, .gpu_memory_utilization = DEVICE_MEM_UTILIZATION_DEFAULT,
                    .block_size = 16, .enable_prefix_caching = 1, .device = "cpu", .tp = 1,
                    .pp = 1, .ray_placement_timeout = 60};
  for (int i = 1; i < argc; i++) {
    char *a = argv[i];
    if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
      usage(stdout);
      return 1;
    }
    if (a[0] != '-') {
      if (o->model) {
        fprintf(stderr, "tessera serve: unexpected argument '%s'\n", a);
        return -1;
      }
      o->model = a;
      continue;
    }
    if (!strcmp(a, "--enable-prefix-caching")) {
      o->enable_prefix_caching = 1;
      continue;
    }
    if (!strcmp(a, "--no-enable-prefix-caching")) {
      o->enable_prefix_caching = 0;
      continue;
    }
    if (!strcmp(a, "--restart-workers")) {
      o->restart_workers = 1;
      continue;
    }
    /* Every other flag takes a value: "--flag value" or "--flag=value". */
    char name[64];
    const char *v;
    char *eq = strchr(a, '=');
    if (eq) {
      snprintf(name, sizeof name, "%.*s", (int)(eq - a), a);
      v = eq + 1;
    } else {
      snprintf(name, sizeof name, "%s", a);
      if (i + 1 >= argc) {
        fprintf(stderr, "tessera serve: %s needs a value\n", a);
        return -1;
      }
      v = argv[++i];
    }
    long long x;
#define INT_FLAG(flag, lo, hi, field)                              \
  if (!strcmp(name, flag)) {                                       \
    if (parse_ll(flag, v, lo, hi, &x) < 0) return -1;              \
    o->field = (int)x;                                             \
    continue;                                                      \
  }
    INT_FLAG("--port", 0, 65535, port)
    INT_FLAG("--max-model-len", 1, 1 << 24, max_model_len)
    INT_FLAG("--max-num-seqs", 1, 1 << 16, max_num_seqs)
    INT_FLAG("--max-num-batched-tokens", 1, 1 << 24, max_num_batched_tokens)
    INT_FLAG("--block-size", 1, 1024, block_size)
    INT_FLAG("--threads", 0, 4096, threads)
    INT_FLAG("--tensor-parallel-size", 1, 1024, tp)
    INT_FLAG("-tp", 1, 1024, tp)
    INT_FLAG("--pipeline-parallel-size", 1, 1024, pp)
    INT_FLAG("-pp", 1, 1024, pp)
    INT_FLAG("--ray-placement-timeout", 1, 86400, ray_placement_timeout)
#undef INT_FLAG
    if (!strcmp(name, "--kv-cache-memory")) {
      if (parse_ll(name, v, 1, 1LL << 50, &o->kv_cache_memory) < 0) return -1;
    } else if (!strcmp(name, "--gpu-memory-utilization")) {
      char *end;
      o->gpu_memory_utilization = strtod(v, &end);
      if (end == v || *end || !(o->gpu_memory_utilization > 0 && o->gpu_memory_utilization <= 1)) {
        fprintf(stderr, "tessera serve: %s expects a number in (0, 1], got '%s'\n", name, v);
        return -1;
      }
    } else if (!strcmp(name, "--seed")) {
      if (parse_ll(name, v, INT64_MIN / 2, INT64_MAX / 2, &o->seed) < 0) return -1;
    } else if (!strcmp(name, "--host")) {
      o->host = v;
    } else if (!strcmp(name, "--served-model-name")) {
      o->served_model_name = v;
    } else if (!strcmp(name, "--api-key")) {
      o->api_key = v;
    } else if (!strcmp(name, "--device")) {
      o->device = v;
    } else if (!strcmp(name, "--revision")) {
      o->revision = v;
    } else if (!strcmp(name, "--chat-template")) {
      o->chat_template = v;
    } else if (!strcmp(name, "--distributed-executor-backend")) {
      o->executor = v;
    } else if (!strcmp(name, "--pipeline-layer-split")) {
      o->layer_split = v;
    } else if (!strcmp(name, "--ray-address")) {
      o->ray_address = v;
    } else if (!strcmp(name, "--ray-device-key")) {
      o->ray_device_key = v;
    } else if (!strcmp(name, "--ray-device-env")) {
      o->ray_device_env = v;
    } else if (!strcmp(name, "--ray-placement-strategy")) {
      o->ray_strategy = v;
    } else {
      fprintf(stderr, "tessera serve: unknown option '%s' (see tessera serve --help)\n", name);
      return -1;
    }
  }
  if (!o->model) {
    fprintf(stderr, "tessera serve: MODEL is required (see tessera serve --help)\n");
    return -1;
  }
  if (!o->executor) o->executor = o->tp * o->pp > 1 ? "mp" : "uni";
  if (strcmp(o->executor, "uni") && strcmp(o->executor, "mp") && strcmp(o->executor, "ray")) {
    fprintf(stderr, "tessera serve: --distributed-executor-backend expects uni, mp or ray, got '%s'\n",
            o->executor);
    return -1;
  }
  if (!strcmp(o->executor, "uni") && o->tp * o->pp > 1) {
    fprintf(stderr,
            "tessera serve: --tensor-parallel-size %d --pipeline-parallel-size %d needs worker "
            "processes: use --distributed-executor-backend mp or ray\n",
            o->tp, o->pp);
    return -1;
  }
  if (o->ray_strategy && strcmp(o->ray_strategy, "PACK") && strcmp(o->ray_strategy, "SPREAD")) {
    fprintf(stderr, "tessera serve: --ray-placement-strategy expects PACK or SPREAD, got '%s'\n",
            o->ray_strategy);
    return -1;
  }
  return 0;
}

/* --chat-template: a file, or (as vLLM allows) the template text itself. */
static char *read_template(const char *arg) {
  FILE *f = fopen(arg, "rb");
  if (!f) {
    if (strstr(arg, "{%") || strstr(arg, "{{")) return strdup(arg);
    fprintf(stderr, "tessera serve: cannot open --chat-template %s: %s\n", arg, strerror(errno));
    return NULL;
  }
  char *buf = NULL;
  size_t len = 0, cap = 0;
  for (;;) {
    if (len + 4096 + 1 > cap) {
      cap = cap ? cap * 2 : 8192;
      char *p = realloc(buf, cap);
      if (!p) break;
      buf = p;
    }
    size_t n = fread(buf + len, 1, cap - len - 1, f);
    len += n;
    if (n == 0) break;
  }
  fclose(f);
  if (buf) buf[len] = 0;
  return buf;
}

static void raise_fd_limit(void) {
  /* 1,000 concurrent clients need more than the usual 1,024 descriptors. */
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0) LOG_W("cannot raise the open-file limit");
  }
}

/* The executor gave up on its workers: the main thread shuts the server down. */
static char g_fatal_msg[TS_ERR_MSG_MAX];
static void on_workers_fatal(void *user, const char *msg) {
  (void)user;
  snprintf(g_fatal_msg, sizeof g_fatal_msg, "%s", msg);
  kill(getpid(), SIGUSR1);
}

int cmd_serve(int argc, char **argv) {
  serve_opts o;
  int prc = parse_args(argc, argv, &o);
  if (prc) return prc > 0 ? 0 : 2;

  /* Signals go to sigwait below, not to whichever thread happens to run. */
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGUSR1);
  pthread_sigmask(SIG_BLOCK, &sigs, NULL);
  signal(SIGPIPE, SIG_IGN);
  raise_fd_limit();

  int rc = 1;
  ts_err err = {0};
  char path[4096];
  char *tmpl = NULL;
  backend *be = NULL;
  model *m = NULL;
  tokenizer *tok = NULL;
  engine *e = NULL;
  http_server *srv = NULL;
  model_files *mf = NULL;

  hub_options ho = {.revision = o.revision, .progress = 1};
  if (hub_resolve(o.model, &ho, path, sizeof path, &err) < 0) goto fail;
  if (o.chat_template && !(tmpl = read_template(o.chat_template))) goto done;
  if (model_files_open(&mf, path, &err) < 0) goto fail;
  model_config cfg = *model_files_config(mf);
  model_files_close(mf);
  mf = NULL;
  /* Activation buffers are sized for one step; the engine clamps its own limits to this. */
  int step_tokens = o.max_num_batched_tokens;
  if (step_tokens <= 0) {
    int ctx = o.max_model_len > 0 ? o.max_model_len : cfg.max_pos;
    step_tokens = ctx > 2048 ? ctx : 2048;
  }

  int distributed = strcmp(o.executor, "uni") != 0;
  executor *ex = NULL;
  if (distributed) {
    executor_mp_config mc = {.launch = strcmp(o.executor, "ray") ? MP_LAUNCH_LOCAL : MP_LAUNCH_RAY,
                             .model_path = path,
                             .tp = o.tp,
                             .pp = o.pp,
                             .layer_split = o.layer_split,
                             .device = o.device,
                             .threads = o.threads,
                             .max_tokens = step_tokens,
                             .gpu_memory_utilization = o.gpu_memory_utilization,
                             .restart_workers = o.restart_workers,
                             .ray_address = o.ray_address,
                             .ray_device_key = o.ray_device_key,
                             .ray_device_env = o.ray_device_env,
                             .ray_strategy = o.ray_strategy,
                             .ray_placement_timeout_s = o.ray_placement_timeout,
                             .on_fatal = on_workers_fatal};
    if (executor_mp_create(&ex, &mc, &err) < 0) goto fail;
  } else {
    if (backend_create(&be, o.device, o.threads, &err) < 0) goto fail;
    model_shard shard = model_shard_default(&cfg, 0, 1, 0, 1);
    if (model_load(&m, path, &shard, be, step_tokens, &err) < 0) goto fail;
  }
  if (tok_load_path(&tok, path, &err) < 0) {
    executor_shutdown(ex);
    goto fail;
  }
  engine_config ec = {.max_model_len = o.max_model_len,
                      .max_num_seqs = o.max_num_seqs,
                      .max_num_batched_tokens = o.max_num_batched_tokens,
                      .block_size = o.block_size,
                      .kv_cache_bytes = o.kv_cache_memory,
                      .enable_prefix_caching = o.enable_prefix_caching,
                      .seed = (uint64_t)o.seed};
  /* On a GPU (vLLM's rule) the KV cache takes the device memory the model left within
   * --gpu-memory-utilization, unless --kv-cache-memory says how much. */
  if (ec.kv_cache_bytes <= 0 && distributed) {
    ec.kv_cache_bytes = ex->info.kv_bytes_limit;
  } else if (ec.kv_cache_bytes <= 0 &&
             device_kv_budget(be, o.gpu_memory_utilization, &ec.kv_cache_bytes, &err) < 0) {
    goto fail;
  }
  if (distributed ? engine_create_with_executor(&e, ex, tok, &ec, &err) < 0
                  : engine_create(&e, m, tok, &ec, &err) < 0)
    goto fail;
  engine_get_config(e, &ec); /* the limits it settled on (model defaults filled in) */

  http_server_config hc = {.host = o.host,
                           .port = o.port,
                           .served_model_name = o.served_model_name ? o.served_model_name : o.model,
                           .model_path = path,
                           .api_key = o.api_key,
                           .chat_template = tmpl,
                           .max_model_len = ec.max_model_len};
  if (http_server_start(&srv, &hc, e, tok, &err) < 0) goto fail;
  fprintf(stderr, "tessera serve: serving %s as '%s' on http://%s:%d (max_model_len %d)\n", path,
          hc.served_model_name, o.host, http_server_port(srv), ec.max_model_len);
  fflush(stderr);

  int sig = 0;
  sigwait(&sigs, &sig);
  if (sig == SIGUSR1) {
    /* Keep answering a little longer (/health 503, the failed requests' errors), then stop. */
    const char *g = getenv("TESSERA_FAULT_GRACE_MS");
    long grace = g && atol(g) >= 0 ? atol(g) : 2000;
    fprintf(stderr, "tessera serve: worker failure: %s\n", g_fatal_msg);
    fflush(stderr);
    struct timespec ts = {grace / 1000, (grace % 1000) * 1000000L};
    nanosleep(&ts, NULL);
    fprintf(stderr, "tessera serve: shutting down after a worker failure\n");
    rc = 1;
    goto done;
  }
  fprintf(stderr, "tessera serve: %s, shutting down\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
  rc = 0;
  goto done;
fail:
  fprintf(stderr, "tessera serve: %s\n", err.msg[0] ? err.msg : ts_strerror(err.code));
done:
  if (srv) http_server_stop(srv);
  if (e) engine_destroy(e);
  if (tok) tok_free(tok);
  if (m) model_free(m);
  if (be) backend_destroy(be);
  free(tmpl);
  return rc;
}
