/* tessera bench: prefill and decode speed of one model on one backend, with random token ids
 * (speed does not depend on the text). B sequences each prefill P tokens (one step per
 * sequence), then decode G steps of one token per sequence, every step computing and returning
 * the logits of each sequence's last token as serving does. */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "backend/backend.h"
#include "backend/cpu/cpu_backend.h"
#include "cli/cli.h"
#include "hub/hub.h"
#include "model/model.h"
#include "util/threadpool.h"

#define BENCH_BLOCK 16

typedef struct {
  const char *model, *device;
  long prompt, gen, batch, threads, warmup;
  int json, membw, bf16_act, host_logits;
  double temperature, top_p;
  long top_k;
} bench_args;

static void usage(FILE *f) {
  fprintf(f,
          "usage: tessera bench MODEL [options]\n"
          "\n"
          "Measures prefill and decode throughput with random token ids.\n"
          "\n"
          "options:\n"
          "  --prompt-tokens N   prompt tokens per sequence (default 512)\n"
          "  --gen-tokens N      decode steps (default 128)\n"
          "  --batch N           concurrent sequences (default 1)\n"
          "  --warmup N          untimed decode steps first, and one untimed prefill when N > 0\n"
          "                      (default 8)\n"
          "  --threads N         CPU threads, 0 = all cores (default 0)\n"
          "  --device D          cpu or cuda (default cpu)\n"
          "  --json              print one JSON object instead of text\n"
          "  --bf16-act          cpu: BF16 weights multiply activations rounded to BF16\n"
          "                      (AVX512-BF16 dot products, as llama.cpp computes)\n"
          "  --host-logits       return every step's logits to the host even where the\n"
          "                      backend samples on the device (cuda)\n"
          "  --temperature T, --top-p P, --top-k K\n"
          "                      device sampling of each step's tokens (default greedy)\n"
          "\n"
          "tessera bench --membw [--threads N] [--json] measures the memory read bandwidth\n"
          "instead (the decode roofline is weight bytes per token / this).\n");
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* CPU time of the process: with one thread on a shared machine, the cost of the work without
 * the time other processes held the core. */
static double cpu_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int parse_args(int argc, char **argv, bench_args *a) {
  memset(a, 0, sizeof *a);
  a->device = "cpu";
  a->prompt = 512;
  a->gen = 128;
  a->batch = 1;
  a->warmup = 8;
  a->top_p = 1.0;
  for (int i = 1; i < argc; i++) {
    const char *f = argv[i];
    if (!strcmp(f, "--help") || !strcmp(f, "-h")) {
      usage(stdout);
      return 1;
    }
    if (!strcmp(f, "--json")) {
      a->json = 1;
      continue;
    }
    if (!strcmp(f, "--bf16-act")) {
      a->bf16_act = 1;
      continue;
    }
    if (!strcmp(f, "--host-logits")) {
      a->host_logits = 1;
      continue;
    }
    if (!strcmp(f, "--temperature") || !strcmp(f, "--top-p")) {
      if (i + 1 >= argc) {
        fprintf(stderr, "tessera bench: %s needs a value (see --help)\n", f);
        return -1;
      }
      char *end;
      double x = strtod(argv[++i], &end);
      int is_t = !strcmp(f, "--temperature");
      if (*end || end == argv[i] || !(is_t ? x >= 0 && x <= 100 : x > 0 && x <= 1)) {
        fprintf(stderr, "tessera bench: bad %s '%s'\n", f, argv[i]);
        return -1;
      }
      *(is_t ? &a->temperature : &a->top_p) = x;
      continue;
    }
    if (!strcmp(f, "--membw")) {
      a->membw = 1;
      continue;
    }
    if (f[0] != '-') {
      if (a->model) {
        fprintf(stderr, "tessera bench: unexpected argument '%s'\n", f);
        return -1;
      }
      a->model = f;
      continue;
    }
    if (i + 1 >= argc) {
      fprintf(stderr, "tessera bench: %s needs a value (see --help)\n", f);
      return -1;
    }
    const char *v = argv[++i];
    long *dst = NULL, lo = 0;
    if (!strcmp(f, "--device")) {
      a->device = v;
      continue;
    }
    if (!strcmp(f, "--prompt-tokens")) dst = &a->prompt, lo = 1;
    else if (!strcmp(f, "--gen-tokens")) dst = &a->gen;
    else if (!strcmp(f, "--batch")) dst = &a->batch, lo = 1;
    else if (!strcmp(f, "--threads")) dst = &a->threads;
    else if (!strcmp(f, "--warmup")) dst = &a->warmup;
    else if (!strcmp(f, "--top-k")) dst = &a->top_k;
    if (!dst) {
      fprintf(stderr, "tessera bench: unknown option '%s' (see --help)\n", f);
      return -1;
    }
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || *end || end == v || x < lo || x > (1L << 20)) {
      fprintf(stderr, "tessera bench: %s expects an integer in [%ld, %ld], got '%s'\n", f, lo,
              1L << 20, v);
      return -1;
    }
    *dst = x;
  }
  if (!a->model && !a->membw) {
    fprintf(stderr, "tessera bench: missing MODEL (see --help)\n");
    return -1;
  }
  return 0;
}

typedef struct {
  backend *be;
  model *m;
  kv_cache kv;
  int have_kv;
  int32_t *tokens, *pos, *seq_start, *ctx_len, *table, *rows, *ids;
  ts_sample_row *srows;
  float *logits;
} bench_state;

static void bench_free(bench_state *s) {
  if (s->have_kv) kv_cache_free(&s->kv, s->be);
  model_free(s->m);
  backend_destroy(s->be);
  free(s->tokens);
  free(s->pos);
  free(s->seq_start);
  free(s->ctx_len);
  free(s->table);
  free(s->rows);
  free(s->ids);
  free(s->srows);
  free(s->logits);
}

static uint64_t rng_next(uint64_t *x) {
  uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

static int run(const bench_args *a, ts_err *err) {
  bench_state s;
  memset(&s, 0, sizeof s);
  char path[4096];
  hub_options ho = {NULL, 0};
  int rc = hub_resolve(a->model, &ho, path, sizeof path, err);
  if (rc < 0) return rc;
  const int B = (int)a->batch, P = (int)a->prompt, G = (int)a->gen, W = (int)a->warmup;
  int max_tokens = P > B ? P : B;
  if ((rc = backend_create(&s.be, a->device, (int)a->threads, err)) < 0) goto done;
  if (a->bf16_act) {
    if (strcmp(a->device, "cpu") != 0 || !cpu_backend_set_bf16_act(s.be, 1)) {
      rc = ts_errorf(err, TS_EUNSUPPORTED, "--bf16-act needs the cpu device on a CPU with "
                                           "AVX512-BF16");
      goto done;
    }
  }
  if ((rc = model_load(&s.m, path, NULL, s.be, max_tokens, err)) < 0) goto done;
  const model_config *c = &s.m->cfg;
  int ctx = P + W + G + 1;
  if (c->max_pos > 0 && ctx > c->max_pos) {
    rc = ts_errorf(err, TS_ERANGE, "%d prompt + %d decode tokens exceed the context of %d", P,
                   W + G, c->max_pos);
    goto done;
  }
  int bps = (ctx + BENCH_BLOCK - 1) / BENCH_BLOCK; /* blocks per sequence */
  if ((rc = kv_cache_create(&s.kv, s.be, s.m->w.n_layers, B * bps, BENCH_BLOCK,
                            c->n_kv_head / s.m->shard.tp_size, c->head_dim, err)) < 0)
    goto done;
  s.have_kv = 1;
  s.tokens = malloc((size_t)max_tokens * sizeof(int32_t));
  s.pos = malloc((size_t)max_tokens * sizeof(int32_t));
  s.seq_start = malloc((size_t)(B + 1) * sizeof(int32_t));
  s.ctx_len = malloc((size_t)B * sizeof(int32_t));
  s.table = malloc((size_t)B * bps * sizeof(int32_t));
  s.rows = malloc((size_t)B * sizeof(int32_t));
  s.logits = malloc((size_t)B * c->vocab_size * sizeof(float));
  s.ids = malloc((size_t)B * sizeof(int32_t));
  s.srows = calloc((size_t)B, sizeof *s.srows);
  if (!s.tokens || !s.pos || !s.seq_start || !s.ctx_len || !s.table || !s.rows || !s.logits ||
      !s.ids || !s.srows) {
    rc = ts_errorf(err, TS_ENOMEM, "out of memory");
    goto done;
  }
  for (int i = 0; i < B * bps; i++) s.table[i] = i;
  uint64_t seed = 12345;
  /* Decode steps draw their tokens on the device when the backend can: only ids come back. */
  const int dev = s.be->ops->sample && !a->host_logits;
  for (int q = 0; q < B; q++) {
    s.srows[q].temperature = (float)a->temperature;
    s.srows[q].top_p = (float)a->top_p;
    s.srows[q].top_k = (int)a->top_k;
    s.srows[q].repetition_penalty = 1.0f;
    s.srows[q].seed = (uint64_t)q;
  }

  /* Prefill: one step per sequence, after an untimed one into sequence 0's blocks (which the
   * timed one overwrites) when warm-up is on, so first-use costs (library handles, lazily loaded
   * kernels, buffers) stay out of the figure as llama-bench's warm-up run keeps them out. */
  double t0 = 0, c0 = 0;
  for (int q = W > 0 ? -1 : 0; q < B; q++) {
    if (q == 0) t0 = now_s(), c0 = cpu_s();
    for (int i = 0; i < P; i++) {
      s.tokens[i] = (int32_t)(rng_next(&seed) % (uint64_t)c->vocab_size);
      s.pos[i] = i;
    }
    int32_t ss[2] = {0, P}, cl = P, last = P - 1;
    ts_batch b = {.n_tokens = P, .tokens = s.tokens, .pos = s.pos, .n_seqs = 1, .seq_start = ss,
                  .ctx_len = &cl, .max_blocks = bps,
                  .block_table = s.table + (size_t)(q < 0 ? 0 : q) * bps,
                  .n_logits = 1, .logits_rows = &last};
    if ((rc = model_forward(s.m, &s.kv, &b, NULL, NULL, s.logits, err)) < 0) goto done;
  }
  double t1 = now_s(), c1 = cpu_s();

  /* Decode: warm-up steps (CUDA graph capture happens here), then timed steps. */
  double t2 = 0, c2 = 0;
  for (int st = 0; st < W + G; st++) {
    if (st == W) t2 = now_s(), c2 = cpu_s();
    for (int q = 0; q < B; q++) {
      s.tokens[q] = (int32_t)(rng_next(&seed) % (uint64_t)c->vocab_size);
      s.pos[q] = P + st;
      s.seq_start[q] = q;
      s.ctx_len[q] = P + st + 1;
      s.rows[q] = q;
    }
    s.seq_start[B] = B;
    ts_batch b = {.n_tokens = B, .tokens = s.tokens, .pos = s.pos, .n_seqs = B,
                  .seq_start = s.seq_start, .ctx_len = s.ctx_len, .max_blocks = bps,
                  .block_table = s.table, .n_logits = B, .logits_rows = s.rows};
    for (int q = 0; q < B; q++) s.srows[q].counter = (uint64_t)st;
    rc = dev ? model_forward_sample(s.m, &s.kv, &b, s.srows, s.ids, err)
             : model_forward(s.m, &s.kv, &b, NULL, NULL, s.logits, err);
    if (rc < 0) goto done;
  }
  double t3 = now_s(), c3 = cpu_s();
  if (G == 0) t2 = t3, c2 = c3;
  double pre = (double)B * P / (t1 - t0 > 0 ? t1 - t0 : 1e-9);
  double dec = G ? (double)B * G / (t3 - t2 > 0 ? t3 - t2 : 1e-9) : 0;
  if (a->json)
    printf("{\"model\":\"%s\",\"device\":\"%s\",\"batch\":%d,\"prompt_tokens\":%d,"
           "\"gen_tokens\":%d,\"prefill_s\":%.6f,\"decode_s\":%.6f,\"prefill_tok_s\":%.1f,"
           "\"decode_tok_s\":%.1f,\"decode_step_ms\":%.4f,\"sampling\":\"%s\","
           "\"prefill_cpu_s\":%.6f,\"decode_cpu_step_ms\":%.4f}\n",
           c->arch_name, a->device, B, P, G, t1 - t0, t3 - t2, pre, dec,
           G ? (t3 - t2) * 1e3 / G : 0.0, dev ? "device" : "host logits", c1 - c0,
           G ? (c3 - c2) * 1e3 / G : 0.0);
  else
    printf("%s on %s: batch %d, prompt %d, gen %d\n  prefill_tok_s %.1f (%.3f s)\n"
           "  decode_tok_s %.1f (%.4f ms per step, %s)\n",
           c->arch_name, a->device, B, P, G, pre, t1 - t0, dec, G ? (t3 - t2) * 1e3 / G : 0.0,
           dev ? "device sampling" : "host logits");
  if (!a->json)
    printf("  process cpu time: prefill %.3f s, decode %.4f ms per step\n", c1 - c0,
           G ? (c3 - c2) * 1e3 / G : 0.0);
  rc = 0;
done:
  bench_free(&s);
  return rc;
}

/* ---- memory read bandwidth ------------------------------------------------------------ */

typedef struct {
  const uint64_t *buf;
  uint64_t sums[256]; /* one per thread, so the reads cannot be optimised away */
} membw_job;

#if defined(__x86_64__)
__attribute__((target("avx2"))) static uint64_t read_avx2(const uint64_t *p, int64_t n) {
  __m256i a = _mm256_setzero_si256(), b = a, c = a, d = a;
  for (int64_t i = 0; i + 16 <= n; i += 16) {
    a = _mm256_xor_si256(a, _mm256_load_si256((const __m256i *)(p + i)));
    b = _mm256_xor_si256(b, _mm256_load_si256((const __m256i *)(p + i + 4)));
    c = _mm256_xor_si256(c, _mm256_load_si256((const __m256i *)(p + i + 8)));
    d = _mm256_xor_si256(d, _mm256_load_si256((const __m256i *)(p + i + 12)));
  }
  a = _mm256_xor_si256(_mm256_xor_si256(a, b), _mm256_xor_si256(c, d));
  return (uint64_t)_mm256_extract_epi64(a, 0) ^ (uint64_t)_mm256_extract_epi64(a, 3);
}
#endif

static void membw_chunk(void *arg, int64_t s, int64_t e, int thread) {
  membw_job *j = arg;
  /* s, e count 64-byte lines */
#if defined(__x86_64__)
  if (__builtin_cpu_supports("avx2")) {
    j->sums[thread & 255] ^= read_avx2(j->buf + s * 8, (e - s) * 8);
    return;
  }
#endif
  uint64_t x = 0;
  for (int64_t i = s * 8; i < e * 8; i++) x ^= j->buf[i];
  j->sums[thread & 255] ^= x;
}

static int run_membw(const bench_args *a, ts_err *err) {
  threadpool *pool = NULL;
  int rc = threadpool_create(&pool, (int)a->threads, err);
  if (rc < 0) return rc;
  const size_t bytes = (size_t)1 << 30; /* far past any last-level cache */
  void *mem = NULL;
  if (posix_memalign(&mem, 64, bytes) != 0) {
    threadpool_free(pool);
    return ts_errorf(err, TS_ENOMEM, "cannot allocate %zu bytes for the bandwidth test", bytes);
  }
  membw_job j = {mem, {0}};
  uint64_t *u = mem;
  for (size_t i = 0; i < bytes / 8; i++) u[i] = i * 0x9E3779B97F4A7C15ull;
  double best = 0;
  for (int rep = 0; rep < 6; rep++) {
    double t0 = now_s();
    threadpool_parallel_for(pool, (int64_t)(bytes / 64), 1, membw_chunk, &j);
    double dt = now_s() - t0;
    if (rep > 0 && bytes / dt / 1e9 > best) best = bytes / dt / 1e9;
  }
  uint64_t chk = 0;
  for (int i = 0; i < 256; i++) chk ^= j.sums[i];
  if (a->json)
    printf("{\"threads\":%d,\"bytes\":%zu,\"read_gb_s\":%.2f,\"check\":%llu}\n",
           threadpool_size(pool), bytes, best, (unsigned long long)(chk & 1));
  else
    printf("memory read bandwidth: %.2f GB/s (%d threads, best of 5 passes over %zu MiB)\n",
           best, threadpool_size(pool), bytes >> 20);
  free(mem);
  threadpool_free(pool);
  return 0;
}

int cmd_bench(int argc, char **argv) {
  bench_args a;
  int rc = parse_args(argc, argv, &a);
  if (rc) return rc > 0 ? 0 : 2;
  ts_err err = {0};
  if ((a.membw ? run_membw(&a, &err) : run(&a, &err)) < 0) {
    fprintf(stderr, "tessera bench: %s\n", err.msg[0] ? err.msg : ts_strerror(err.code));
    return 1;
  }
  return 0;
}
