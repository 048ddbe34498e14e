/* tessera generate: loads a model (local path or hub id), encodes the prompt, prefills it in
 * chunks and decodes token by token, streaming the new text to stdout. Logs go to stderr. */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "backend/backend.h"
#include "cli/cli.h"
#include "engine/sampling.h"
#include "hub/hub.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"
#include "util/log.h"

#define GEN_BLOCK 16      /* KV block size (tokens) */
#define GEN_PREFILL 512   /* most prompt tokens per forward step */

static void usage(FILE *f) {
  fprintf(f,
          "usage: tessera generate MODEL [options]\n"
          "\n"
          "Generates a continuation of --prompt and prints only the new text to stdout as it is\n"
          "produced. MODEL is a Hugging Face model directory, a .gguf file or a hub id\n"
          "(owner/name, downloaded into the Hugging Face cache).\n"
          "\n"
          "options:\n"
          "  --prompt TEXT        text to continue (default: empty, start from BOS)\n"
          "  --max-tokens N       most tokens to generate (default 256; also bounded by the\n"
          "                       model's context length)\n"
          "  --temperature T      sampling temperature; 0 = greedy (default 0, so that output is\n"
          "                       reproducible)\n"
          "  --top-p P            nucleus sampling mass (default 1 = off)\n"
          "  --top-k K            sample among the K most likely tokens (default 0 = off)\n"
          "  --min-p P            drop tokens below P x the top probability (default 0 = off)\n"
          "  --seed S             random seed for sampling (default: from the clock)\n"
          "  --threads N          CPU threads, 0 = all cores (default 0)\n"
          "  --device D           cpu or cuda (default cpu)\n"
          "  --revision R         hub branch, tag or commit (default main)\n"
          "  --help               this text\n"
          "\n"
          "Generation stops at an end-of-sequence token, after --max-tokens tokens, or when the\n"
          "context is full.\n");
}

static int parse_int(const char *flag, const char *v, long lo, long hi, long *out) {
  char *end;
  errno = 0;
  long x = strtol(v, &end, 10);
  if (errno || *end || end == v || x < lo || x > hi) {
    fprintf(stderr, "tessera generate: %s expects an integer in [%ld, %ld], got '%s'\n", flag, lo,
            hi, v);
    return -1;
  }
  *out = x;
  return 0;
}

static int parse_float(const char *flag, const char *v, double lo, double hi, double *out) {
  char *end;
  errno = 0;
  double x = strtod(v, &end);
  if (errno || *end || end == v || !(x >= lo && x <= hi)) {
    fprintf(stderr, "tessera generate: %s expects a number in [%g, %g], got '%s'\n", flag, lo, hi,
            v);
    return -1;
  }
  *out = x;
  return 0;
}

typedef struct {
  const char *model;
  const char *prompt;
  long max_tokens;
  double temperature, top_p, min_p;
  long top_k;
  unsigned long long seed;
  int has_seed;
  long threads;
  const char *device;
  const char *revision;
  const char *dump_logits; /* hidden: raw logits of every step, for differential tests */
  int ignore_eos;          /* hidden: keep generating past end-of-sequence tokens */
} gen_args;

/* Returns 0 to run, 1 after --help, -1 on a usage error (already reported). */
static int parse_args(int argc, char **argv, gen_args *a) {
  memset(a, 0, sizeof *a);
  a->prompt = "";
  a->max_tokens = 256;
  a->top_p = 1.0;
  a->device = "cpu";
  for (int i = 1; i < argc; i++) {
    const char *f = argv[i];
    if (!strcmp(f, "--help") || !strcmp(f, "-h")) {
      usage(stdout);
      return 1;
    }
    if (f[0] != '-' || !f[1]) {
      if (a->model) {
        fprintf(stderr, "tessera generate: unexpected argument '%s'\n", f);
        return -1;
      }
      a->model = f;
      continue;
    }
    if (!strcmp(f, "--ignore-eos")) {
      a->ignore_eos = 1;
      continue;
    }
    if (i + 1 >= argc) {
      fprintf(stderr, "tessera generate: %s needs a value (see --help)\n", f);
      return -1;
    }
    const char *v = argv[++i];
    double d;
    long l;
    int rc = 0;
    if (!strcmp(f, "--prompt")) a->prompt = v;
    else if (!strcmp(f, "--max-tokens")) rc = parse_int(f, v, 0, INT_MAX / 2, &a->max_tokens);
    else if (!strcmp(f, "--temperature")) rc = parse_float(f, v, 0, 1e6, &a->temperature);
    else if (!strcmp(f, "--top-p")) rc = parse_float(f, v, 1e-9, 1, &a->top_p);
    else if (!strcmp(f, "--min-p")) rc = parse_float(f, v, 0, 1, &a->min_p);
    else if (!strcmp(f, "--top-k")) rc = parse_int(f, v, -1, INT_MAX, &a->top_k);
    else if (!strcmp(f, "--threads")) rc = parse_int(f, v, 0, 4096, &a->threads);
    else if (!strcmp(f, "--device")) a->device = v;
    else if (!strcmp(f, "--revision")) a->revision = v;
    else if (!strcmp(f, "--dump-logits")) a->dump_logits = v;
    else if (!strcmp(f, "--seed")) {
      char *end;
      errno = 0;
      a->seed = strtoull(v, &end, 10);
      if (errno || *end || end == v || v[0] == '-') {
        fprintf(stderr, "tessera generate: --seed expects a non-negative integer, got '%s'\n", v);
        return -1;
      }
      a->has_seed = 1;
    } else {
      fprintf(stderr, "tessera generate: unknown option '%s' (see --help)\n", f);
      return -1;
    }
    (void)d;
    (void)l;
    if (rc < 0) return -1;
  }
  if (!a->model) {
    fprintf(stderr, "tessera generate: missing MODEL (see --help)\n");
    return -1;
  }
  return 0;
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Everything generate owns, released in one place. */
typedef struct {
  backend *be;
  model *m;
  tokenizer *tok;
  kv_cache kv;
  int have_kv;
  sampler *smp;
  tok_stream *stream;
  int32_t *ids;        /* [cap] prompt then generated tokens */
  int32_t *pos;        /* [GEN_PREFILL] */
  int32_t *table;      /* [n_blocks] identity block table */
  float *logits;       /* [vocab] */
  int device_sample;   /* the backend draws the token: only its id comes back */
  int32_t next;        /* that id, after a step with logits */
  FILE *dump;          /* --dump-logits: int32 n_prompt, int32 vocab, prompt ids, then one
                        * float32 [vocab] row per step */
} gen_state;

static void gen_free(gen_state *g) {
  if (g->dump) fclose(g->dump);
  tok_stream_free(g->stream);
  sampler_free(g->smp);
  if (g->have_kv) kv_cache_free(&g->kv, g->be);
  model_free(g->m);
  tok_free(g->tok);
  backend_destroy(g->be);
  free(g->ids);
  free(g->pos);
  free(g->table);
  free(g->logits);
}

/* One forward step over ids[start, start+n) of the single sequence; logits of its last token. */
static int step(gen_state *g, int start, int n, int want_logits, ts_err *err) {
  for (int i = 0; i < n; i++) g->pos[i] = start + i;
  int32_t seq_start[2] = {0, n}, ctx_len = start + n, last = n - 1;
  ts_batch b = {.n_tokens = n,
                .tokens = g->ids + start,
                .pos = g->pos,
                .n_seqs = 1,
                .seq_start = seq_start,
                .ctx_len = &ctx_len,
                .max_blocks = g->kv.n_blocks,
                .block_table = g->table,
                .n_logits = want_logits ? 1 : 0,
                .logits_rows = &last};
  ts_sample_row row;
  if (want_logits && g->device_sample && sampler_device_row(g->smp, &row))
    return model_forward_sample(g->m, &g->kv, &b, &row, &g->next, err);
  return model_forward(g->m, &g->kv, &b, NULL, NULL, g->logits, err);
}

static int run(const gen_args *a, ts_err *err) {
  gen_state g;
  memset(&g, 0, sizeof g);
  char path[4096];
  hub_options ho = {a->revision, isatty(STDERR_FILENO)};
  int rc = hub_resolve(a->model, &ho, path, sizeof path, err);
  if (rc < 0) return rc;
  if ((rc = backend_create(&g.be, a->device, (int)a->threads, err)) < 0) goto done;
  if ((rc = model_load(&g.m, path, NULL, g.be, GEN_PREFILL, err)) < 0) goto done;
  if ((rc = tok_load_path(&g.tok, path, err)) < 0) goto done;
  const model_config *c = &g.m->cfg;

  /* The prompt; an empty one starts from BOS. */
  int32_t *pids = NULL;
  size_t n_prompt = 0;
  if (a->prompt[0]) {
    if ((rc = tok_encode(g.tok, a->prompt, strlen(a->prompt), TOK_ADD_SPECIAL, &pids, &n_prompt,
                         err)) < 0)
      goto done;
  }
  if (n_prompt == 0) {
    free(pids);
    pids = NULL;
    int bos = tok_bos_id(g.tok) >= 0 ? tok_bos_id(g.tok) : c->bos_id;
    if (bos < 0) {
      rc = ts_errorf(err, TS_EINVAL, "the prompt is empty and the model has no BOS token");
      goto done;
    }
    pids = malloc(sizeof *pids);
    if (!pids) {
      rc = ts_errorf(err, TS_ENOMEM, "out of memory");
      goto done;
    }
    pids[0] = bos;
    n_prompt = 1;
  }
  int ctx = c->max_pos > 0 ? c->max_pos : 4096;
  if ((long)n_prompt >= ctx) {
    free(pids);
    rc = ts_errorf(err, TS_ERANGE, "the prompt has %zu tokens; the context holds %d", n_prompt, ctx);
    goto done;
  }
  long total = (long)n_prompt + a->max_tokens;
  if (total > ctx) total = ctx;
  int n_blocks = (int)((total + GEN_BLOCK - 1) / GEN_BLOCK);
  g.ids = malloc((size_t)total * sizeof *g.ids);
  g.pos = malloc(GEN_PREFILL * sizeof *g.pos);
  g.table = malloc((size_t)n_blocks * sizeof *g.table);
  g.logits = malloc((size_t)c->vocab_size * sizeof *g.logits);
  if (!g.ids || !g.pos || !g.table || !g.logits) {
    free(pids);
    rc = ts_errorf(err, TS_ENOMEM, "out of memory");
    goto done;
  }
  memcpy(g.ids, pids, n_prompt * sizeof *pids);
  free(pids);
  for (int i = 0; i < n_blocks; i++) g.table[i] = i;
  int tp = g.m->shard.tp_size;
  if ((rc = kv_cache_create(&g.kv, g.be, g.m->w.n_layers, n_blocks, GEN_BLOCK, c->n_kv_head / tp,
                            c->head_dim, err)) < 0)
    goto done;
  g.have_kv = 1;

  sampling_params sp;
  sampling_params_default(&sp);
  sp.temperature = (float)a->temperature;
  sp.top_p = (float)a->top_p;
  sp.top_k = (int)a->top_k;
  sp.min_p = (float)a->min_p;
  sp.seed = a->seed;
  sp.has_seed = a->has_seed;
  uint64_t clock_seed = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
  if ((rc = sampler_create(&g.smp, &sp, c->vocab_size, clock_seed, err)) < 0) goto done;
  sampler_observe_prompt(g.smp, g.ids, n_prompt);
  /* --dump-logits needs the logits themselves. */
  g.device_sample = g.be->ops->sample && !a->dump_logits;
  if ((rc = tok_stream_create(&g.stream, g.tok, 1)) < 0) {
    rc = ts_errorf(err, rc, "cannot create the detokenizer stream");
    goto done;
  }
  /* Feed the prompt through the stream so the continuation's text is exactly what decoding the
   * whole sequence adds (leading-space rules, byte pieces split across the boundary). */
  const char *text;
  size_t len;
  for (size_t i = 0; i < n_prompt; i++) tok_stream_push(g.stream, g.ids[i], &text, &len);

  const int32_t *eos;
  int n_eos = tok_eos_ids(g.tok, &eos);
  if (a->ignore_eos) n_eos = 0;
  if (a->dump_logits) {
    int32_t hdr[2] = {(int32_t)n_prompt, c->vocab_size};
    g.dump = fopen(a->dump_logits, "wb");
    if (!g.dump || fwrite(hdr, sizeof hdr, 1, g.dump) != 1 ||
        fwrite(g.ids, sizeof *g.ids, n_prompt, g.dump) != n_prompt) {
      rc = ts_errorf(err, TS_EIO, "cannot write --dump-logits file %s", a->dump_logits);
      goto done;
    }
  }
  double t0 = now_s();
  for (int s = 0; s < (int)n_prompt; s += GEN_PREFILL) {
    int n = (int)n_prompt - s < GEN_PREFILL ? (int)n_prompt - s : GEN_PREFILL;
    if ((rc = step(&g, s, n, s + n == (int)n_prompt, err)) < 0) goto done;
  }
  double t1 = now_s();
  int n_gen = 0, cur = (int)n_prompt;
  const char *why = "max tokens";
  for (;;) {
    if (n_gen >= a->max_tokens) break;
    if (cur >= total) {
      why = "context length";
      break;
    }
    if (g.dump && fwrite(g.logits, sizeof *g.logits, (size_t)c->vocab_size, g.dump) !=
                      (size_t)c->vocab_size) {
      rc = ts_errorf(err, TS_EIO, "cannot write --dump-logits file %s", a->dump_logits);
      goto done;
    }
    sample_result r;
    if (g.device_sample)
      r.token = g.next;
    else
      sampler_sample(g.smp, g.logits, &r);
    int stop = 0;
    for (int i = 0; i < n_eos; i++) stop |= r.token == eos[i];
    for (int i = 0; i < c->n_eos && !a->ignore_eos; i++) stop |= r.token == c->eos_ids[i];
    if (stop) {
      why = "end of sequence";
      break;
    }
    sampler_observe(g.smp, r.token);
    g.ids[cur] = r.token;
    n_gen++;
    if (tok_stream_push(g.stream, r.token, &text, &len) == 0 && len) {
      fwrite(text, 1, len, stdout);
      fflush(stdout);
    }
    if (n_gen >= a->max_tokens || cur + 1 >= total) {
      cur++;
      continue; /* no logits needed for a token that cannot be followed */
    }
    if ((rc = step(&g, cur, 1, 1, err)) < 0) goto done;
    cur++;
  }
  if (tok_stream_flush(g.stream, &text, &len) == 0 && len) fwrite(text, 1, len, stdout);
  if (isatty(STDOUT_FILENO)) fputc('\n', stdout);
  fflush(stdout);
  double t2 = now_s();
  LOG_I("prompt %zu tokens in %.3f s (%.1f tok/s); generated %d tokens in %.3f s (%.1f tok/s); "
        "stopped: %s",
        n_prompt, t1 - t0, (double)n_prompt / (t1 - t0 > 0 ? t1 - t0 : 1e-9), n_gen, t2 - t1,
        n_gen / (t2 - t1 > 0 ? t2 - t1 : 1e-9), why);
  rc = 0;
done:
  gen_free(&g);
  return rc;
}

int cmd_generate(int argc, char **argv) {
  gen_args a;
  int rc = parse_args(argc, argv, &a);
  if (rc) return rc > 0 ? 0 : 2;
  ts_err err = {0};
  if (run(&a, &err) < 0) {
    fprintf(stderr, "tessera generate: %s\n", err.msg[0] ? err.msg : ts_strerror(err.code));
    return 1;
  }
  return 0;
}
