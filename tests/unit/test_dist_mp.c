/* The mp executor against the uni executor on stories260K: the same random plans (interleaved
 * prefill chunks and decode steps of several sequences over shuffled KV blocks) give the same
 * logits within fp32 tolerance with real worker processes for tp 2, pp 2 (even and uneven layer
 * splits), tp 2 x pp 2 and pp 3, also with several pipelined steps in flight; a layout whose tp does not divide the KV heads fails at start with one
 * clear line; pipeline layer splits and host address resolution on random inputs. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend/backend.h"
#include "dist/executor_mp.h"
#include "dist/launch.h"
#include "dist/worker.h"
#include "model/model.h"
#include "test_util.h"

static test_rng rng;
static int rnd(int lo, int hi) { return lo + (int)(test_rng_next(&rng) % (uint64_t)(hi - lo + 1)); }

/* ---- layer splits ---- */

static void test_layer_split(void) {
  model_config cfg = {.n_layer = 0, .n_head = 8, .n_kv_head = 4, .d_ff = 64};
  for (int it = 0; it < 200; it++) {
    cfg.n_layer = rnd(1, 40);
    int pp = rnd(1, cfg.n_layer < 8 ? cfg.n_layer : 8);
    int counts[8], left = cfg.n_layer;
    char split[128];
    size_t off = 0;
    for (int s = 0; s < pp; s++) {
      counts[s] = s == pp - 1 ? left : rnd(1, left - (pp - 1 - s));
      left -= counts[s];
      off += (size_t)snprintf(split + off, sizeof split - off, s ? ",%d" : "%d", counts[s]);
    }
    int start = 0;
    for (int s = 0; s < pp; s++) {
      model_shard sh;
      ts_err err = {0};
      int rc = dist_stage_shard(&cfg, split, 0, 2, s, pp, &sh, &err);
      CHECK_MSG(rc == 0, "%s: %s", split, err.msg);
      CHECK(sh.layer_start == start && sh.layer_end == start + counts[s]);
      start += counts[s];
      /* No split: the even default. */
      model_shard ev, def = model_shard_default(&cfg, 1, 2, s, pp);
      CHECK(dist_stage_shard(&cfg, NULL, 1, 2, s, pp, &ev, &err) == 0);
      CHECK(ev.layer_start == def.layer_start && ev.layer_end == def.layer_end);
    }
    /* A split that does not add up, has the wrong number of stages or is not numbers. */
    char bad[160];
    model_shard sh;
    ts_err err = {0};
    snprintf(bad, sizeof bad, "%s,%d", split, rnd(1, 3));
    CHECK(dist_stage_shard(&cfg, bad, 0, 1, 0, pp, &sh, &err) < 0 && strstr(err.msg, "layer"));
    snprintf(bad, sizeof bad, "%sx", split);
    CHECK(dist_stage_shard(&cfg, bad, 0, 1, 0, pp, &sh, &err) < 0);
    CHECK(dist_stage_shard(&cfg, "0", 0, 1, 0, 1, &sh, &err) < 0);
  }
  model_shard sh;
  ts_err err = {0};
  cfg.n_layer = 5;
  CHECK(dist_stage_shard(&cfg, NULL, 0, 3, 0, 1, &sh, &err) < 0 && strstr(err.msg, "divide"));
}

static void test_host_addr(void) {
  char out[256];
  ts_err err = {0};
  for (int it = 0; it < 5; it++) {
    char ip[32];
    snprintf(ip, sizeof ip, "10.%d.%d.%d", rnd(0, 255), rnd(0, 255), rnd(1, 254));
    setenv("TESSERA_HOST_IP", ip, 1);
    CHECK(launch_host_addr(NULL, it & 1, out, sizeof out, &err) == 0 && !strcmp(out, ip));
  }
  unsetenv("TESSERA_HOST_IP");
  CHECK(launch_host_addr(NULL, 1, out, sizeof out, &err) == 0 && !strcmp(out, "127.0.0.1"));
  /* Toward loopback the route is the loopback interface. */
  CHECK(launch_host_addr("127.0.0.1", 0, out, sizeof out, &err) == 0 && !strcmp(out, "127.0.0.1"));
}

/* Children with a chosen environment, piped stdout and exit statuses. */
static void test_spawn(void) {
  ts_err err = {0};
  char val[64], env[96], want[96];
  snprintf(val, sizeof val, "%llx", (unsigned long long)test_rng_next(&rng));
  snprintf(env, sizeof env, "TS_SPAWN_TEST=%s", val);
  const char *argv[] = {"sh", "-c", "printf '%s' \"$TS_SPAWN_TEST\"; exit 3", NULL};
  const char *add[] = {env, NULL};
  launch_spec sp = {.argv = argv, .env_add = add, .pipe_stdout = 1};
  launch_child c;
  CHECK(launch_spawn(&sp, &c, &err) == 0 && c.pid > 0 && c.stdout_fd >= 0);
  char got[96] = "";
  size_t n = 0;
  ssize_t r;
  while ((r = read(c.stdout_fd, got + n, sizeof got - 1 - n)) > 0) n += (size_t)r;
  got[n] = 0;
  CHECK_MSG(!strcmp(got, val), "child saw '%s', expected '%s'", got, val);
  int st = -1;
  for (int i = 0; i < 500 && !launch_reap(&c, &st); i++) usleep(10000);
  launch_describe_status(st, want, sizeof want);
  CHECK_MSG(!strcmp(want, "exit code 3"), "%s", want);
  close(c.stdout_fd);
  /* A child that ignores nothing is stopped by launch_stop and reaped. */
  const char *sleeper[] = {"sleep", "30", NULL};
  launch_spec sp2 = {.argv = sleeper};
  CHECK(launch_spawn(&sp2, &c, &err) == 0);
  CHECK(launch_reap(&c, &st) == 0);
  launch_stop(&c, 1000);
  CHECK(c.pid == -1);
}

/* ---- mp against uni ---- */

static double row_max_abs(const float *x, size_t n) {
  double m = 0;
  for (size_t i = 0; i < n; i++) m = fabs(x[i]) > m ? fabs(x[i]) : m;
  return m;
}

#define NSEQ 3
#define MAXT 96
#define BS 16
#define NBLOCKS 64

typedef struct {
  ts_batch b;
  int32_t tokens[MAXT], pos[MAXT], seq_start[NSEQ + 1], ctx_len[NSEQ], rows[MAXT];
  int32_t table[NSEQ * 8];
} plan;

static void run_compare(model *m, const char *path, int tp, int pp, const char *split) {
  char exe[1024];
  snprintf(exe, sizeof exe, "%s/tessera", TESSERA_BINARY_DIR);
  executor_mp_config mc = {.launch = MP_LAUNCH_LOCAL, .model_path = path, .worker_exe = exe,
                           .tp = tp, .pp = pp, .layer_split = split, .device = "cpu",
                           .threads = 1, .max_tokens = MAXT};
  executor *mp = NULL, *uni = NULL;
  ts_err err = {0};
  int rc = executor_mp_create(&mp, &mc, &err);
  CHECK_MSG(rc == 0, "tp %d pp %d: %s", tp, pp, err.msg);
  if (rc < 0) return;
  CHECK(executor_uni_create(&uni, m, &err) == 0);
  CHECK(mp->info.vocab_size == uni->info.vocab_size && mp->info.max_pos == uni->info.max_pos);
  CHECK(mp->info.kv_bytes_per_token * tp * pp >= uni->info.kv_bytes_per_token);
  int nb_mp = 0, nb_uni = 0;
  CHECK(executor_init_kv(mp, BS, 0, NBLOCKS, &nb_mp, &err) == 0 && nb_mp == NBLOCKS);
  CHECK(executor_init_kv(uni, BS, 0, NBLOCKS, &nb_uni, &err) == 0 && nb_uni == NBLOCKS);
  CHECK(executor_health(mp, &err) == 0);

  /* Each sequence owns 8 distinct shuffled blocks. */
  int perm[NBLOCKS];
  for (int i = 0; i < NBLOCKS; i++) perm[i] = i;
  for (int i = NBLOCKS - 1; i > 0; i--) {
    int j = rnd(0, i), t = perm[i];
    perm[i] = perm[j];
    perm[j] = t;
  }
  static plan p;
  for (int i = 0; i < NSEQ * 8; i++) p.table[i] = perm[i];
  int len[NSEQ] = {0};
  int V = uni->info.vocab_size;
  float *la = malloc((size_t)MAXT * V * sizeof(float)), *lb = malloc((size_t)MAXT * V * sizeof(float));
  double worst = 0;
  for (uint64_t step = 1; step <= 8; step++) {
    int t = 0;
    for (int s = 0; s < NSEQ; s++) {
      p.seq_start[s] = t;
      /* Prefill chunks first, then single-token decodes. */
      int n = step <= 2 ? rnd(1, 20) : rnd(1, 2);
      for (int i = 0; i < n; i++, t++) {
        p.tokens[t] = rnd(0, V - 1);
        p.pos[t] = len[s] + i;
      }
      len[s] += n;
      p.ctx_len[s] = len[s];
    }
    p.seq_start[NSEQ] = t;
    int nl = 0;
    for (int i = 0; i < t; i++)
      if (rnd(0, 2) == 0 || i == t - 1) p.rows[nl++] = i;
    p.b = (ts_batch){t, p.tokens, p.pos, NSEQ, p.seq_start, p.ctx_len, 8, p.table, nl, p.rows};
    int ra = executor_execute_step(mp, step, &p.b, la, &err);
    CHECK_MSG(ra == 0, "step %d: %s", (int)step, err.msg);
    CHECK(executor_execute_step(uni, step, &p.b, lb, &err) == 0);
    if (ra < 0) break;
    for (int r = 0; r < nl; r++) {
      double e = 0, mx = 0;
      for (int v = 0; v < V; v++) {
        double d = fabs(la[(size_t)r * V + v] - lb[(size_t)r * V + v]);
        e = d > e ? d : e;
        mx = fabs(lb[(size_t)r * V + v]) > mx ? fabs(lb[(size_t)r * V + v]) : mx;
      }
      if (e / (mx + 1e-30) > worst) worst = e / (mx + 1e-30);
    }
  }
  /* Pipelined: one plan per sequence, up to max_inflight submitted before the first collect. */
  if (mp->pipe && mp->info.max_inflight > 1) {
    static plan q[NSEQ];
    float *lq = malloc((size_t)NSEQ * 4 * V * sizeof(float));
    for (uint64_t round = 0; round < 6; round++) {
      int n_fly = NSEQ < mp->info.max_inflight ? NSEQ : mp->info.max_inflight;
      for (int s = 0; s < n_fly; s++) {
        plan *x = &q[s];
        int n = rnd(1, 4);
        for (int i = 0; i < n; i++) {
          x->tokens[i] = rnd(0, V - 1);
          x->pos[i] = len[s] + i;
          x->rows[i] = i;
        }
        len[s] += n;
        x->seq_start[0] = 0;
        x->seq_start[1] = n;
        x->ctx_len[0] = len[s];
        x->b = (ts_batch){n, x->tokens, x->pos, 1, x->seq_start, x->ctx_len, 8, p.table + s * 8,
                          n, x->rows};
        uint64_t id = 100 + round * NSEQ + (uint64_t)s;
        CHECK_MSG(executor_submit_step(mp, id, &x->b, &err) == 0, "%s", err.msg);
      }
      for (int s = 0; s < n_fly; s++) {
        uint64_t id = 0;
        int n = q[s].b.n_tokens;
        CHECK_MSG(executor_collect_step(mp, &id, lq + (size_t)s * 4 * V, &err) == 0, "%s", err.msg);
        CHECK(id == 100 + round * NSEQ + (uint64_t)s);
        CHECK(executor_execute_step(uni, id, &q[s].b, lb, &err) == 0);
        for (size_t i = 0; i < (size_t)n * V; i++) {
          double d = fabs(lq[(size_t)s * 4 * V + i] - lb[i]) / (row_max_abs(lb, (size_t)n * V) + 1e-30);
          if (d > worst) worst = d;
        }
      }
    }
    /* More than max_inflight outstanding is refused; collecting with nothing in flight too. */
    uint64_t id;
    CHECK(executor_collect_step(mp, &id, lq, &err) < 0);
    free(lq);
  }
  CHECK_MSG(worst < 1e-4, "tp %d pp %d split %s: worst relative logits error %g", tp, pp,
            split ? split : "even", worst);
  fprintf(stderr, "tp %d pp %d split %s: worst relative error %.3g\n", tp, pp,
          split ? split : "even", worst);
  free(la);
  free(lb);
  executor_shutdown(uni);
  executor_shutdown(mp);
}

static void test_bad_layout(const char *path) {
  executor_mp_config mc = {.launch = MP_LAUNCH_LOCAL, .model_path = path, .tp = 3, .pp = 1,
                           .device = "cpu", .max_tokens = 64};
  executor *mp = NULL;
  ts_err err = {0};
  CHECK(executor_mp_create(&mp, &mc, &err) < 0 && mp == NULL);
  CHECK_MSG(strstr(err.msg, "tensor-parallel size 3 must divide") != NULL, "%s", err.msg);
  mc.tp = 1;
  mc.pp = 2;
  mc.layer_split = "4,4";
  CHECK(executor_mp_create(&mp, &mc, &err) < 0 && strstr(err.msg, "layer-split"));
}

int main(void) {
  rng.s = 0x9d2c5680a1b3e4f7ull ^ (uint64_t)getpid() * 0x2545f4914f6cdd1dull;
  fprintf(stderr, "seed %llx\n", (unsigned long long)rng.s);
  test_layer_split();
  test_host_addr();
  test_spawn();
  char path[1024];
  snprintf(path, sizeof path, "%s/models/stories260K-hf", test_shared_dir());
  backend *be = NULL;
  model *m = NULL;
  ts_err err = {0};
  if (backend_create(&be, "cpu", 1, &err) < 0 || model_load(&m, path, NULL, be, MAXT, &err) < 0) {
    fprintf(stderr, "cannot load %s: %s\n", path, err.msg);
    return 1;
  }
  test_bad_layout(path);
  run_compare(m, path, 2, 1, NULL);
  run_compare(m, path, 1, 2, "1,4");
  run_compare(m, path, 2, 2, NULL);
  run_compare(m, path, 1, 3, NULL);
  model_free(m);
  backend_destroy(be);
  return test_finish("test_dist_mp");
}
