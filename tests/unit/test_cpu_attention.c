/* CPU attention: every kernel level against a float64 reference (random non-zero inputs, odd
 * context lengths, GQA groups 1/2/4/8, head_dim 64/128, several sequences of different lengths
 * in one step, paged blocks of 16 and of odd sizes), batch invariance (a query's output is
 * bit-identical whether its tokens come in one prefill, in chunks, or one decode token at a time,
 * whatever other sequence shares the step), and the vectorised exp against exp(). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "backend/cpu/cpu_backend.h"
#include "test_util.h"

static test_rng rng;

static int rand_int(int lo, int hi) { return lo + (int)(test_rng_next(&rng) % (uint64_t)(hi - lo + 1)); }

static float *rand_floats(size_t n, float scale) {
  float *p = malloc(n * sizeof(float));
  for (size_t i = 0; i < n; i++) {
    float v = test_rng_float(&rng);
    if (v == 0) v = 0.25f;
    p[i] = v * scale;
  }
  return p;
}

/* Sanitizer builds (-O0, instrumented) check memory, not numerics: fewer trials there. */
#if defined(__SANITIZE_ADDRESS__)
#define LIGHT 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define LIGHT 1
#endif
#endif
#ifndef LIGHT
#define LIGHT 0
#endif

#define MAX_SEQS 4
#define MAX_POS 112

/* One attention problem: n_seqs sequences with dense K/V/Q histories, each with its own random
 * blocks of the paged cache.   K, V [seq][pos][n_kv][hd]; Q [seq][pos][n_head][hd] */
typedef struct {
  int n_seqs, n_kv, group, n_head, hd, bs, max_blocks;
  float *K, *V, *Q;
  int32_t *table; /* [n_seqs][max_blocks] */
  kv_cache kv;
} problem;

static void problem_init(problem *p, backend *be, int n_seqs, int n_kv, int group, int hd, int bs) {
  memset(p, 0, sizeof *p);
  p->n_seqs = n_seqs;
  p->n_kv = n_kv;
  p->group = group;
  p->n_head = n_kv * group;
  p->hd = hd;
  p->bs = bs;
  p->max_blocks = (MAX_POS + bs - 1) / bs;
  int n_blocks = n_seqs * p->max_blocks;
  size_t kvn = (size_t)n_seqs * MAX_POS * n_kv * hd;
  p->K = rand_floats(kvn, 1.5f);
  p->V = rand_floats(kvn, 1.0f);
  p->Q = rand_floats((size_t)n_seqs * MAX_POS * p->n_head * hd, 2.0f);
  p->table = malloc(sizeof(int32_t) * (size_t)n_blocks);
  for (int i = 0; i < n_blocks; i++) p->table[i] = i;
  for (int i = n_blocks - 1; i > 0; i--) {
    int j = rand_int(0, i), t = p->table[i];
    p->table[i] = p->table[j];
    p->table[j] = t;
  }
  ts_err err = {0};
  CHECK(kv_cache_create(&p->kv, be, 2, n_blocks, bs, n_kv, hd, &err) == 0);
}

static void problem_free(problem *p, backend *be) {
  kv_cache_free(&p->kv, be);
  free(p->K);
  free(p->V);
  free(p->Q);
  free(p->table);
}

/* One step: sequence seq[i] brings positions [a[i], a[i] + n[i]) (its earlier positions are in
 * the cache already). The outputs land in out [seq][pos][n_head][hd]. */
static void run_step(backend *be, problem *p, int m, const int *seq, const int *a, const int *n, float *out) {
  int32_t tokens[MAX_SEQS * MAX_POS], pos[MAX_SEQS * MAX_POS], start[MAX_SEQS + 1], ctx[MAX_SEQS];
  int32_t table[MAX_SEQS * 16 * MAX_POS];
  int nt = 0;
  for (int i = 0; i < m; i++) {
    start[i] = nt;
    ctx[i] = a[i] + n[i];
    for (int t = a[i]; t < a[i] + n[i]; t++) {
      pos[nt] = t;
      tokens[nt++] = rand_int(0, 100);
    }
    for (int b = 0; b < p->max_blocks; b++)
      table[i * p->max_blocks + b] = b * p->bs < ctx[i] ? p->table[seq[i] * p->max_blocks + b] : -1;
  }
  start[m] = nt;
  ts_batch bt;
  memset(&bt, 0, sizeof bt);
  bt.n_tokens = nt;
  bt.tokens = tokens;
  bt.pos = pos;
  bt.n_seqs = m;
  bt.seq_start = start;
  bt.ctx_len = ctx;
  bt.max_blocks = p->max_blocks;
  bt.block_table = table;
  ts_err err = {0};
  CHECK(be->ops->step_begin(be->ctx, &bt, &p->kv, &err) == 0);
  size_t kr = (size_t)p->n_kv * p->hd, qr = (size_t)p->n_head * p->hd;
  float *k = malloc(sizeof(float) * nt * kr), *v = malloc(sizeof(float) * nt * kr);
  float *q = malloc(sizeof(float) * nt * qr), *o = malloc(sizeof(float) * nt * qr);
  for (int i = 0; i < m; i++)
    for (int t = start[i]; t < start[i + 1]; t++) {
      size_t src = (size_t)seq[i] * MAX_POS + pos[t];
      memcpy(k + t * kr, p->K + src * kr, kr * sizeof(float));
      memcpy(v + t * kr, p->V + src * kr, kr * sizeof(float));
      memcpy(q + t * qr, p->Q + src * qr, qr * sizeof(float));
    }
  be->ops->kv_write(be->ctx, &p->kv, 1, k, v);
  be->ops->attention(be->ctx, &p->kv, 1, q, p->n_head, 1.0f / sqrtf((float)p->hd), o);
  for (int i = 0; i < m; i++)
    for (int t = start[i]; t < start[i + 1]; t++)
      memcpy(out + ((size_t)seq[i] * MAX_POS + pos[t]) * qr, o + t * qr, qr * sizeof(float));
  free(k);
  free(v);
  free(q);
  free(o);
}

/* Compares out (seq s, positions [a, b)) with a float64 softmax attention. */
static void check_reference(const problem *p, const float *out, int s, int a, int b, const char *what) {
  size_t kr = (size_t)p->n_kv * p->hd, qr = (size_t)p->n_head * p->hd;
  double sc[MAX_POS], scale = 1.0 / sqrt((double)p->hd);
  int bad = 0;
  for (int t = a; t < b && !bad; t++)
    for (int h = 0; h < p->n_head && !bad; h++) {
      const float *q = p->Q + ((size_t)s * MAX_POS + t) * qr + (size_t)h * p->hd;
      int kvh = h / p->group;
      double mx = -1e300, sum = 0;
      for (int j = 0; j <= t; j++) {
        const float *k = p->K + ((size_t)s * MAX_POS + j) * kr + (size_t)kvh * p->hd;
        double d = 0;
        for (int i = 0; i < p->hd; i++) d += (double)q[i] * k[i];
        sc[j] = d * scale;
        if (sc[j] > mx) mx = sc[j];
      }
      for (int j = 0; j <= t; j++) sum += (sc[j] = exp(sc[j] - mx));
      for (int i = 0; i < p->hd; i++) {
        double want = 0;
        for (int j = 0; j <= t; j++)
          want += sc[j] / sum * p->V[((size_t)s * MAX_POS + j) * kr + (size_t)kvh * p->hd + i];
        float got = out[((size_t)s * MAX_POS + t) * qr + (size_t)h * p->hd + i];
        if (!(fabs(got - want) <= 1e-5 * (1 + fabs(want)))) {
          CHECK_MSG(0, "%s: seq %d pos %d head %d dim %d: %.9g vs %.9g (hd %d group %d bs %d)", what, s, t, h, i,
                    got, want, p->hd, p->group, p->bs);
          bad = 1;
          break;
        }
      }
    }
  test_checks_++;
}

/* Several sequences of different lengths: a first step brings each one's head, a second its
 * tail (prefill-sized or single decode tokens), both checked against the reference. */
static void test_reference(backend *be) {
  static const int groups[4] = {1, 2, 4, 8};
  for (int trial = 0; trial < (LIGHT ? 6 : 12); trial++) {
    problem p;
    int bs = trial % 3 == 2 ? rand_int(3, 20) : 16;
    problem_init(&p, be, rand_int(1, MAX_SEQS), rand_int(1, 2), groups[trial % 4], trial % 2 ? 128 : 64, bs);
    float *out = calloc((size_t)p.n_seqs * MAX_POS * p.n_head * p.hd, sizeof(float));
    int seq[MAX_SEQS], a[MAX_SEQS], n[MAX_SEQS], ctx[MAX_SEQS], head[MAX_SEQS], m = 0;
    for (int s = 0; s < p.n_seqs; s++) {
      ctx[s] = rand_int(1, 50) * 2 + 1; /* odd lengths */
      head[s] = rand_int(0, 1) ? ctx[s] - 1 : rand_int(0, ctx[s] - 1);
    }
    for (int s = 0; s < p.n_seqs; s++)
      if (head[s] > 0) {
        seq[m] = s, a[m] = 0, n[m] = head[s];
        m++;
      }
    if (m > 0) run_step(be, &p, m, seq, a, n, out);
    m = 0;
    for (int s = 0; s < p.n_seqs; s++) {
      seq[m] = s, a[m] = head[s], n[m] = ctx[s] - head[s];
      m++;
    }
    run_step(be, &p, m, seq, a, n, out);
    for (int s = 0; s < p.n_seqs; s++) check_reference(&p, out, s, 0, ctx[s], "reference");
    free(out);
    problem_free(&p, be);
  }
}

/* Sequence 0 (length len) through one prefill, random chunks, and a prefill head then single
 * decode tokens; a random stretch of sequence 1 shares some of the steps (placed before it, so
 * that sequence 0's tokens sit at other places in the step's tiles). */
static void invariance_run(backend *be, problem *p, int len, int mode, float *out) {
  int t = 0;
  while (t < len) {
    int n;
    if (mode == 0) n = len;
    else if (mode == 1) n = rand_int(1, len - t);
    else n = t == 0 ? rand_int(1, len) : 1;
    if (t + n > len) n = len - t;
    int seq[2], a[2], cnt[2], m = 0;
    if (p->n_seqs > 1 && rand_int(0, 2)) {
      int o = rand_int(1, MAX_POS - 1);
      seq[m] = 1, a[m] = 0, cnt[m] = o;
      m++;
    }
    seq[m] = 0, a[m] = t, cnt[m] = n;
    m++;
    run_step(be, p, m, seq, a, cnt, out);
    t += n;
  }
}

static void test_invariance(backend *be) {
  static const int groups[4] = {1, 2, 4, 8};
  for (int trial = 0; trial < (LIGHT ? 4 : 8); trial++) {
    problem p;
    int bs = trial % 4 == 3 ? rand_int(3, 20) : 16;
    problem_init(&p, be, 2, rand_int(1, 2), groups[trial % 4], trial % 2 ? 128 : 64, bs);
    int len = rand_int(MAX_POS / 2, MAX_POS - 1);
    size_t qr = (size_t)p.n_head * p.hd, per = (size_t)MAX_POS * qr;
    float *ref = calloc(2 * per, sizeof(float)), *got = calloc(2 * per, sizeof(float));
    invariance_run(be, &p, len, 0, ref);
    check_reference(&p, ref, 0, 0, len, "one prefill");
    for (int mode = 1; mode <= 2; mode++) {
      memset(got, 0, 2 * per * sizeof(float));
      invariance_run(be, &p, len, mode, got);
      int first = -1;
      for (int t = 0; t < len && first < 0; t++)
        if (memcmp(ref + t * qr, got + t * qr, qr * sizeof(float)) != 0) first = t;
      CHECK_MSG(first < 0, "%s: position %d differs from the one-step prefill (hd %d group %d bs %d len %d)",
                mode == 1 ? "chunked prefill" : "decode", first, p.hd, p.group, p.bs, len);
    }
    free(ref);
    free(got);
    problem_free(&p, be);
  }
}

/* The exp used by the softmax over its input range (x <= 0, down to -inf): within 2 ulp of the
 * correctly rounded value, exact at 0 and -inf. */
static void test_exp(void) {
  enum { N = 20000 };
  float *x = malloc(N * sizeof(float)), *y = malloc(N * sizeof(float));
  for (int i = 0; i < N; i++) {
    float u = (test_rng_float(&rng) + 1.0f) * 0.5f; /* [0, 1) */
    x[i] = i % 4 == 0 ? -u * 120.0f : i % 4 == 1 ? -u * 4.0f : i % 4 == 2 ? -u * 0.01f : -u * 20.0f;
  }
  x[0] = 0.0f;
  x[1] = -INFINITY;
  x[2] = -1e30f;
  x[3] = -87.5f;
  x[4] = -103.9f;
  x[5] = -0.34657359f;
  cpu_exp_f32(x, y, N - 3); /* an odd count: the masked tail */
  cpu_exp_f32(x + N - 3, y + N - 3, 3);
  CHECK(y[0] == 1.0f && y[1] == 0.0f && y[2] == 0.0f);
  double worst = 0;
  for (int i = 0; i < N; i++) {
    float want = (float)exp((double)x[i]);
    float ulp = want > 0 ? nextafterf(want, INFINITY) - want : nextafterf(0.0f, 1.0f);
    double e = fabs((double)y[i] - want) / ulp;
    if (e > worst) worst = e;
    if (!(e <= 2.0)) {
      CHECK_MSG(0, "exp(%.9g) = %.9g, want %.9g (%.1f ulp)", x[i], y[i], want, e);
      break;
    }
  }
  test_checks_++;
  free(x);
  free(y);
}

int main(void) {
  rng.s = test_seed(0xa77e);
  test_exp();
  for (int threads = 1; threads <= 3; threads += 2) {
    backend *be = NULL;
    ts_err err = {0};
    CHECK(backend_create(&be, "cpu", threads, &err) == 0);
    int top = cpu_backend_set_isa(be, 99);
    for (int level = 0; level <= top; level += top > 0 ? top : 1) { /* portable and the best */
      CHECK(cpu_backend_set_isa(be, level) == level);
      test_reference(be);
      test_invariance(be);
    }
    backend_destroy(be);
  }
  return test_finish("test_cpu_attention");
}
