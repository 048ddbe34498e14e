/* Process executors: T x P worker processes (tensor x pipeline parallel), started on this machine
 * (mp) or placed on a Ray cluster by python/tessera_ray (ray). The driver (this process) keeps
 * tokenizer and scheduling; each worker owns one device, its shard of the weights and of the KV
 * cache. A monitor thread pings the workers and watches their sockets and processes; a dead or
 * silent worker turns health() into an error within seconds, fails the step in flight, and then
 * either every worker is relaunched (restart_workers) or on_fatal is called once. */
#ifndef TESSERA_EXECUTOR_MP_H
#define TESSERA_EXECUTOR_MP_H

#include "dist/executor.h"

typedef enum { MP_LAUNCH_LOCAL = 0, MP_LAUNCH_RAY = 1 } mp_launch_kind;

typedef struct {
  mp_launch_kind launch;
  const char *model_path;      /* resolved local path (same path on every node with Ray) */
  const char *worker_exe;      /* NULL: this executable */
  int tp, pp;
  const char *layer_split;     /* "3,2": layers per stage; NULL: even */
  const char *device;          /* cpu | cuda */
  int threads;                 /* per worker; 0: this machine's cores shared out (mp) */
  int max_tokens;              /* most tokens one step may carry */
  double gpu_memory_utilization; /* CUDA workers: share of each GPU to use (0: 0.9) */
  int restart_workers;
  int start_timeout_ms;        /* workers must join within this (0: 120 s; Ray adds placement) */
  const char *ray_address;     /* NULL: "auto" */
  const char *ray_device_key;  /* NULL: tessera_cpu / GPU by device */
  const char *ray_device_env;  /* NULL: TESSERA_CPU_DEVICES / CUDA_VISIBLE_DEVICES */
  const char *ray_strategy;    /* PACK | SPREAD (NULL: PACK) */
  int ray_placement_timeout_s; /* 0: 60 */
  /* Called once from the monitor thread when the workers failed and will not be restarted. */
  void (*on_fatal)(void *user, const char *msg);
  void *fatal_user;
} executor_mp_config;

/* Validates the layout against the model (T must divide the KV heads, ...), launches and joins
 * every worker, and returns an executor ready for init_kv. */
int executor_mp_create(executor **out, const executor_mp_config *cfg, ts_err *err);

#endif
