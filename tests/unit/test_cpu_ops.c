/* Every CPU backend op against a plain scalar reference written here (double accumulation), on
 * random non-zero inputs with odd sizes and unaligned tails, in every weight dtype, through both
 * the SIMD and the portable kernels, and the thread pool's coverage of a loop. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "backend/cpu/cpu_backend.h"
#include "test_util.h"
#include "util/threadpool.h"

static test_rng rng = {0x51ed2701a3c4b5e9ull};

static int rand_int(int lo, int hi) { return lo + (int)(test_rng_next(&rng) % (uint64_t)(hi - lo + 1)); }

static float *rand_floats(size_t n, float scale) {
  float *p = malloc(n * sizeof(float));
  for (size_t i = 0; i < n; i++) {
    float v = test_rng_float(&rng);
    if (v == 0) v = 0.5f;
    p[i] = v * scale;
  }
  return p;
}

/* A random weight [rows][stride] in dtype, plus its exact float values [rows][cols]. */
typedef struct {
  ts_tensor t;
  void *buf;
  float *ref; /* [rows][cols] */
} test_weight;

static float ref_f16(uint16_t h) {
  /* IEEE binary16 by definition, independent of the library's conversion. */
  int e = (h >> 10) & 31, m = h & 1023;
  double v = e == 0 ? ldexp(m, -24) : ldexp(1024 + m, e - 25);
  return (float)((h & 0x8000) ? -v : v);
}

static test_weight make_weight(ts_dtype dt, int rows, int cols, int stride, int vec) {
  test_weight w;
  memset(&w, 0, sizeof w);
  size_t row_bytes = ts_dtype_bytes(dt, stride);
  w.buf = malloc(row_bytes * (size_t)rows + 1);
  w.ref = malloc(sizeof(float) * (size_t)rows * cols);
  for (int r = 0; r < rows; r++) {
    uint8_t *row = (uint8_t *)w.buf + row_bytes * r;
    for (int c = 0; c < stride; c++) {
      float v = test_rng_float(&rng);
      if (dt == TS_F32) {
        memcpy(row + 4 * c, &v, 4);
        if (c < cols) w.ref[(size_t)r * cols + c] = v;
      } else if (dt == TS_F16 || dt == TS_BF16) {
        uint16_t h = dt == TS_F16 ? ts_f32_to_f16(v) : ts_f32_to_bf16(v);
        memcpy(row + 2 * c, &h, 2);
        if (c < cols)
          w.ref[(size_t)r * cols + c] = dt == TS_F16 ? ref_f16(h) : ts_bf16_to_f32(h);
      }
    }
    if (dt == TS_Q8_0 || dt == TS_Q4_0) {
      int bb = ts_dtype_table[dt].block_bytes;
      for (int blk = 0; blk < stride / 32; blk++) {
        uint8_t *b = row + (size_t)bb * blk;
        uint16_t hd = ts_f32_to_f16(0.01f + 0.05f * fabsf(test_rng_float(&rng)));
        b[0] = (uint8_t)(hd & 0xff);
        b[1] = (uint8_t)(hd >> 8);
        float d = ref_f16(hd);
        for (int j = 0; j < bb - 2; j++) b[2 + j] = (uint8_t)test_rng_next(&rng);
        for (int j = 0; j < 32; j++) {
          int c = blk * 32 + j;
          float v;
          if (dt == TS_Q8_0) v = d * (int8_t)b[2 + j];
          else v = d * (float)(j < 16 ? (b[2 + j] & 15) - 8 : (b[2 + j - 16] >> 4) - 8);
          if (c < cols) w.ref[(size_t)r * cols + c] = v;
        }
      }
    }
  }
  w.t.data = w.buf;
  w.t.dtype = dt;
  w.t.ndim = vec ? 1 : 2;
  if (vec) {
    w.t.shape[0] = cols;
  } else {
    w.t.shape[0] = rows;
    w.t.shape[1] = cols;
  }
  w.t.row_stride = stride;
  return w;
}

static void free_weight(test_weight *w) {
  free(w->buf);
  free(w->ref);
}

static int close_to(double got, double want, double tol) { return fabs(got - want) <= tol; }

static void test_matmul(backend *be) {
  /* Q8_0 / Q4_0 quantize the activations too: tests/unit/test_quant.c. */
  const ts_dtype dts[] = {TS_F32, TS_F16, TS_BF16};
  for (size_t di = 0; di < sizeof dts / sizeof dts[0]; di++) {
    for (int trial = 0; trial < 6; trial++) {
      ts_dtype dt = dts[di];
      int quant = dt == TS_Q8_0 || dt == TS_Q4_0;
      /* Trial 5: rows long enough that a thread's rows span several cache blocks. */
      int k = quant ? 32 * rand_int(1, 5) : trial == 5 ? rand_int(2000, 5000) : rand_int(1, 150);
      int m = rand_int(1, 75);
      int n = trial == 0 ? 1 : rand_int(1, 20);
      int stride = k + (trial % 2 ? (quant ? 32 : rand_int(1, 7)) : 0);
      test_weight w = make_weight(dt, m, k, stride, 0);
      test_weight b = make_weight(trial % 3 == 0 ? TS_BF16 : TS_F32, 1, m, m, 1);
      float *x = rand_floats((size_t)n * k, 2.0f);
      float *y = malloc(sizeof(float) * (size_t)n * m);
      int with_bias = trial % 2 == 0;
      be->ops->matmul(be->ctx, x, &w.t, with_bias ? &b.t : NULL, n, y);
      for (int t = 0; t < n; t++)
        for (int r = 0; r < m; r++) {
          double acc = with_bias ? b.ref[r] : 0, mag = 0;
          for (int i = 0; i < k; i++) {
            acc += (double)x[(size_t)t * k + i] * w.ref[(size_t)r * k + i];
            mag += fabs((double)x[(size_t)t * k + i] * w.ref[(size_t)r * k + i]);
          }
          double got = y[(size_t)t * m + r];
          CHECK_MSG(close_to(got, acc, 1e-5 * (mag + 1)), "matmul %s n=%d m=%d k=%d t=%d r=%d: %g vs %g",
                    ts_dtype_table[dt].name, n, m, k, t, r, got, acc);
        }
      /* Batch invariance: the last token alone gives the same bits. */
      float *y1 = malloc(sizeof(float) * (size_t)m);
      be->ops->matmul(be->ctx, x + (size_t)(n - 1) * k, &w.t, with_bias ? &b.t : NULL, 1, y1);
      CHECK_MSG(!memcmp(y1, y + (size_t)(n - 1) * m, sizeof(float) * (size_t)m),
                "matmul %s n=%d m=%d k=%d: a token depends on its batch", ts_dtype_table[dt].name,
                n, m, k);
      free(y1);
      free(x);
      free(y);
      free_weight(&w);
      free_weight(&b);
    }
  }
}

static void test_norms(backend *be) {
  const ts_dtype dts[] = {TS_F32, TS_F16, TS_BF16};
  for (size_t di = 0; di < 3; di++) {
    int rows = rand_int(1, 13), dim = rand_int(1, 200);
    float eps = 1e-5f;
    test_weight w = make_weight(dts[di], 1, dim, dim, 1);
    float *x = rand_floats((size_t)rows * dim, 3.0f);
    float *res = rand_floats((size_t)rows * dim, 3.0f);
    float *res0 = malloc(sizeof(float) * rows * dim);
    memcpy(res0, res, sizeof(float) * rows * dim);
    float *out = malloc(sizeof(float) * rows * dim);
    float *inplace = malloc(sizeof(float) * rows * dim);
    memcpy(inplace, x, sizeof(float) * rows * dim);
    be->ops->rmsnorm(be->ctx, x, &w.t, eps, rows, dim, out);
    be->ops->rmsnorm(be->ctx, inplace, &w.t, eps, rows, dim, inplace);
    for (int r = 0; r < rows; r++) {
      double ss = 0;
      for (int i = 0; i < dim; i++) ss += (double)x[r * dim + i] * x[r * dim + i];
      double inv = 1 / sqrt(ss / dim + eps);
      for (int i = 0; i < dim; i++) {
        double want = x[r * dim + i] * inv * w.ref[i];
        CHECK_MSG(close_to(out[r * dim + i], want, 1e-5 * (fabs(want) + 1e-3)), "rmsnorm %g vs %g",
                  out[r * dim + i], want);
        CHECK(inplace[r * dim + i] == out[r * dim + i]);
      }
    }
    be->ops->add_rmsnorm(be->ctx, res, x, &w.t, eps, rows, dim, out);
    for (int r = 0; r < rows; r++) {
      double ss = 0;
      for (int i = 0; i < dim; i++) {
        float s = res0[r * dim + i] + x[r * dim + i];
        CHECK(res[r * dim + i] == s);
        ss += (double)s * s;
      }
      double inv = 1 / sqrt(ss / dim + eps);
      for (int i = 0; i < dim; i++) {
        double want = (double)res[r * dim + i] * inv * w.ref[i];
        CHECK_MSG(close_to(out[r * dim + i], want, 1e-5 * (fabs(want) + 1e-3)),
                  "add_rmsnorm %g vs %g", out[r * dim + i], want);
      }
    }
    free(x);
    free(res);
    free(res0);
    free(out);
    free(inplace);
    free_weight(&w);
  }
}

/* A step plan for n_seqs sequences with random block tables: the sequences' step tokens are
 * their last q_len[s] positions. */
typedef struct {
  ts_batch b;
  int32_t tokens[256], pos[256], seq_start[9], ctx_len[8], table[8 * 16], rows[256];
} test_plan;

static void make_plan(test_plan *p, int n_seqs, const int *ctx, const int *q_len, int bs,
                      int n_blocks, int max_blocks, const int *perm) {
  memset(p, 0, sizeof *p);
  int t = 0;
  for (int s = 0; s < n_seqs; s++) {
    p->seq_start[s] = t;
    p->ctx_len[s] = ctx[s];
    for (int i = ctx[s] - q_len[s]; i < ctx[s]; i++) {
      p->pos[t] = i;
      p->tokens[t] = rand_int(0, 30);
      t++;
    }
    for (int blk = 0; blk < max_blocks; blk++)
      p->table[s * max_blocks + blk] = blk < (ctx[s] + bs - 1) / bs ? perm[s * max_blocks + blk] : -1;
  }
  (void)n_blocks;
  p->seq_start[n_seqs] = t;
  p->b.n_tokens = t;
  p->b.tokens = p->tokens;
  p->b.pos = p->pos;
  p->b.n_seqs = n_seqs;
  p->b.seq_start = p->seq_start;
  p->b.ctx_len = p->ctx_len;
  p->b.max_blocks = max_blocks;
  p->b.block_table = p->table;
}

static void test_attention(backend *be) {
  for (int trial = 0; trial < 4; trial++) {
    int bs = rand_int(1, 5) * (trial % 2 ? 1 : 4), n_seqs = rand_int(1, 4);
    int n_kv = rand_int(1, 3), group = rand_int(1, 3), n_head = n_kv * group;
    int hd = rand_int(1, 40) * 2 + (trial == 3 ? 1 : 0); /* odd head_dim is legal for attention */
    int max_blocks = 16, n_blocks = n_seqs * max_blocks;
    int perm[8 * 16];
    for (int i = 0; i < n_blocks; i++) perm[i] = i;
    for (int i = n_blocks - 1; i > 0; i--) {
      int j = rand_int(0, i), tmp = perm[i];
      perm[i] = perm[j];
      perm[j] = tmp;
    }
    kv_cache kv;
    ts_err err = {0};
    CHECK(kv_cache_create(&kv, be, 2, n_blocks, bs, n_kv, hd, &err) == 0);
    int ctx[4], q1[4], q2[4];
    for (int s = 0; s < n_seqs; s++) {
      q2[s] = rand_int(1, 4);
      ctx[s] = rand_int(q2[s], bs * max_blocks < 30 ? bs * max_blocks : 30);
      q1[s] = ctx[s] - q2[s]; /* prefill the rest first */
    }
    /* Dense per-sequence K/V history [seq][pos][n_kv][hd], the reference's view. */
    size_t row = (size_t)n_kv * hd;
    float *Kd = rand_floats((size_t)n_seqs * 32 * row, 1.5f), *Vd = rand_floats((size_t)n_seqs * 32 * row, 1.0f);
    for (int step = 0; step < 2; step++) {
      int c1[4], q[4];
      for (int s = 0; s < n_seqs; s++) {
        c1[s] = step == 0 ? q1[s] : ctx[s];
        q[s] = step == 0 ? q1[s] : q2[s];
      }
      test_plan p;
      make_plan(&p, n_seqs, c1, q, bs, n_blocks, max_blocks, perm);
      int nt = p.b.n_tokens;
      if (nt == 0) continue;
      CHECK(be->ops->step_begin(be->ctx, &p.b, &kv, &err) == 0);
      float *k = malloc(sizeof(float) * nt * row), *v = malloc(sizeof(float) * nt * row);
      for (int s = 0; s < n_seqs; s++)
        for (int t = p.seq_start[s]; t < p.seq_start[s + 1]; t++) {
          memcpy(k + t * row, Kd + ((size_t)s * 32 + p.pos[t]) * row, row * sizeof(float));
          memcpy(v + t * row, Vd + ((size_t)s * 32 + p.pos[t]) * row, row * sizeof(float));
        }
      be->ops->kv_write(be->ctx, &kv, 1, k, v);
      float *qv = rand_floats((size_t)nt * n_head * hd, 2.0f);
      float *out = malloc(sizeof(float) * nt * n_head * hd);
      float scale = 1.0f / sqrtf((float)hd);
      be->ops->attention(be->ctx, &kv, 1, qv, n_head, scale, out);
      for (int s = 0; s < n_seqs; s++)
        for (int t = p.seq_start[s]; t < p.seq_start[s + 1]; t++)
          for (int h = 0; h < n_head; h++) {
            const float *qq = qv + ((size_t)t * n_head + h) * hd;
            int kvh = h / group, n = p.pos[t] + 1;
            double sc[32], mx = -1e30, sum = 0;
            for (int j = 0; j < n; j++) {
              double d = 0;
              for (int i = 0; i < hd; i++) d += (double)qq[i] * Kd[((size_t)s * 32 + j) * row + kvh * hd + i];
              sc[j] = d * scale;
              if (sc[j] > mx) mx = sc[j];
            }
            for (int j = 0; j < n; j++) sum += (sc[j] = exp(sc[j] - mx));
            for (int i = 0; i < hd; i++) {
              double o = 0;
              for (int j = 0; j < n; j++) o += sc[j] / sum * Vd[((size_t)s * 32 + j) * row + kvh * hd + i];
              float got = out[((size_t)t * n_head + h) * hd + i];
              CHECK_MSG(close_to(got, o, 1e-5), "attention seq %d tok %d head %d: %g vs %g", s, t, h, got, o);
            }
          }
      free(k);
      free(v);
      free(qv);
      free(out);
    }
    free(Kd);
    free(Vd);
    kv_cache_free(&kv, be);
  }
}

static void test_rope(backend *be) {
  for (int trial = 0; trial < 6; trial++) {
    rope_params rp = {0};
    rp.theta = trial % 2 ? 10000.0f : 1000000.0f;
    rp.interleaved = trial % 3 == 1;
    if (trial >= 3) {
      rp.scaling = ROPE_SCALING_LLAMA3;
      rp.factor = 8;
      rp.low_freq_factor = 1;
      rp.high_freq_factor = 4;
      rp.orig_max_pos = 8192;
    }
    int hd = rand_int(1, 40) * 2, heads = rand_int(1, 5), n_blocks = 64, bs = 64;
    kv_cache kv;
    ts_err err = {0};
    CHECK(kv_cache_create(&kv, be, 1, n_blocks, bs, 1, 2, &err) == 0);
    int ctx[1] = {4000}, q[1] = {rand_int(1, 12)};
    int perm[64];
    for (int i = 0; i < 64; i++) perm[i] = i;
    test_plan p;
    make_plan(&p, 1, ctx, q, bs, n_blocks, 63, perm);
    for (int t = 0; t < p.b.n_tokens; t++) p.pos[t] = rand_int(0, 3999);
    CHECK(be->ops->step_begin(be->ctx, &p.b, &kv, &err) == 0);
    int n = p.b.n_tokens;
    float *x = rand_floats((size_t)n * heads * hd, 1.0f), *x0 = malloc(sizeof(float) * n * heads * hd);
    memcpy(x0, x, sizeof(float) * n * heads * hd);
    be->ops->rope(be->ctx, x, heads, hd, &rp);
    for (int t = 0; t < n; t++)
      for (int h = 0; h < heads; h++)
        for (int i = 0; i < hd / 2; i++) {
          double inv = 1.0 / pow(rp.theta, 2.0 * i / hd);
          if (rp.scaling == ROPE_SCALING_LLAMA3) {
            double wl = 2 * M_PI / inv, lo = 8192.0 / 1, hi = 8192.0 / 4;
            if (wl > lo) inv /= 8;
            else if (wl >= hi) {
              double sm = (8192.0 / wl - 1) / (4 - 1);
              inv = (1 - sm) * inv / 8 + sm * inv;
            }
          }
          double a = p.pos[t] * inv;
          int ia = rp.interleaved ? 2 * i : i, ib = rp.interleaved ? 2 * i + 1 : i + hd / 2;
          const float *v0 = x0 + ((size_t)t * heads + h) * hd;
          const float *v1 = x + ((size_t)t * heads + h) * hd;
          double wa = v0[ia] * cos(a) - v0[ib] * sin(a), wb = v0[ib] * cos(a) + v0[ia] * sin(a);
          /* float32 angles at positions up to 4000 are good to a few 1e-4 rad */
          CHECK_MSG(close_to(v1[ia], wa, 2e-3) && close_to(v1[ib], wb, 2e-3),
                    "rope trial %d pos %d pair %d: (%g,%g) vs (%g,%g)", trial, p.pos[t], i, v1[ia],
                    v1[ib], wa, wb);
        }
    free(x);
    free(x0);
    kv_cache_free(&kv, be);
  }
}

static void test_row_ops(backend *be) {
  const ts_dtype dts[] = {TS_F32, TS_F16, TS_BF16, TS_Q8_0};
  for (size_t di = 0; di < 4; di++) {
    int d = dts[di] == TS_Q8_0 ? 64 : rand_int(1, 90), vocab = 31;
    test_weight tab = make_weight(dts[di], vocab, d, d, 0);
    kv_cache kv;
    ts_err err = {0};
    CHECK(kv_cache_create(&kv, be, 1, 4, 16, 1, 2, &err) == 0);
    int ctx[2] = {rand_int(1, 30), rand_int(1, 30)}, q[2] = {ctx[0], ctx[1]};
    int perm[4] = {2, 0, 3, 1};
    test_plan p;
    make_plan(&p, 2, ctx, q, 16, 4, 2, perm);
    CHECK(be->ops->step_begin(be->ctx, &p.b, &kv, &err) == 0);
    int n = p.b.n_tokens;
    float *out = malloc(sizeof(float) * n * d);
    be->ops->embed(be->ctx, &tab.t, n, d, out);
    for (int t = 0; t < n; t++)
      for (int i = 0; i < d; i++) CHECK(out[(size_t)t * d + i] == tab.ref[(size_t)p.tokens[t] * d + i]);
    int32_t rows[5];
    for (int i = 0; i < 5; i++) rows[i] = rand_int(0, n - 1);
    float *g = malloc(sizeof(float) * 5 * d);
    be->ops->gather_rows(be->ctx, out, rows, 5, d, g);
    for (int i = 0; i < 5; i++) CHECK(!memcmp(g + i * d, out + (size_t)rows[i] * d, sizeof(float) * d));
    float *up = rand_floats((size_t)n * d, 4.0f), *gate = rand_floats((size_t)n * d, 4.0f);
    float *sm = malloc(sizeof(float) * n * d);
    be->ops->silu_mul(be->ctx, gate, up, n, d, sm);
    for (int i = 0; i < n * d; i++) {
      double want = gate[i] / (1 + exp(-(double)gate[i])) * up[i];
      CHECK(close_to(sm[i], want, 1e-6 * (fabs(want) + 1)));
    }
    free(out);
    free(g);
    free(up);
    free(gate);
    free(sm);
    free_weight(&tab);
    kv_cache_free(&kv, be);
  }
  /* A plan that reaches past the cache is refused with a message, not executed. */
  kv_cache kv;
  ts_err err = {0};
  CHECK(kv_cache_create(&kv, be, 1, 2, 4, 1, 2, &err) == 0);
  int ctx[1] = {7}, q[1] = {1}, perm[2] = {0, 5}; /* block 5 of 2 */
  test_plan p;
  make_plan(&p, 1, ctx, q, 4, 2, 2, perm);
  CHECK(be->ops->step_begin(be->ctx, &p.b, &kv, &err) == TS_EINVAL);
  CHECK(strstr(err.msg, "block") != NULL);
  kv_cache_free(&kv, be);
}

typedef struct {
  int *hits;
  int *by_thread; /* [3] items each thread ran (each thread writes only its own slot) */
  int64_t n, min_chunk;
  int bad_chunk;  /* a chunk that is empty, or not a whole number of min_chunk before the end */
  int bad_thread; /* a thread index outside [0, 3) */
} cover_arg;

static void cover(void *arg, int64_t s, int64_t e, int thread) {
  cover_arg *a = arg;
  if (thread < 0 || thread >= 3) {
    a->bad_thread = 1;
    return;
  }
  if (e <= s || s % a->min_chunk != 0 || (e < a->n && (e - s) % a->min_chunk != 0))
    a->bad_chunk = 1;
  for (int64_t i = s; i < e; i++) a->hits[i]++;
  a->by_thread[thread] += (int)(e - s);
}

/* Work slow enough that the workers get to claim chunks of the job. */
static void spin_items(void *arg, int64_t s, int64_t e, int thread) {
  volatile double *acc = arg;
  double x = 0;
  for (int64_t i = s; i < e; i++)
    for (int j = 0; j < 2000; j++) x += (double)(i ^ j) * 1e-9;
  acc[thread] += x;
}

static void test_threadpool(void) {
  threadpool *p;
  ts_err err = {0};
  CHECK(threadpool_create(&p, 3, &err) == 0);
  CHECK(threadpool_size(p) == 3);
  for (int trial = 0; trial < 400; trial++) {
    int n = rand_int(0, 3000), minc = rand_int(1, 70);
    int *hits = calloc((size_t)n + 1, sizeof(int));
    int by_thread[3] = {0, 0, 0};
    cover_arg a = {hits, by_thread, n, minc, 0, 0};
    threadpool_parallel_for(p, n, minc, cover, &a);
    int ok = 1;
    for (int i = 0; i < n; i++) ok &= hits[i] == 1;
    CHECK_MSG(ok, "n=%d min_chunk=%d not covered exactly once", n, minc);
    CHECK_MSG(!a.bad_chunk && !a.bad_thread, "n=%d min_chunk=%d: bad chunk or thread index", n,
              minc);
    /* Fewer than two min_chunks of work never leaves the caller. */
    if (n < 2 * minc) CHECK_MSG(by_thread[0] == n, "n=%d min_chunk=%d left the caller", n, minc);
    free(hits);
  }
  /* Slow items: over many jobs the workers must take part (dynamic chunks, not caller-only). */
  volatile double acc[3] = {0, 0, 0};
  int by_thread[3] = {0, 0, 0};
  /* Until the workers have run something (they may be descheduled on a loaded machine). */
  for (int job = 0; job < 20 || (job < 5000 && by_thread[1] + by_thread[2] == 0); job++) {
    int n = rand_int(48, 96);
    int *hits = calloc((size_t)n, sizeof(int));
    cover_arg a = {hits, by_thread, n, 1, 0, 0};
    threadpool_parallel_for(p, n, 1, spin_items, (void *)acc);
    threadpool_parallel_for(p, n, 1, cover, &a);
    int ok = 1;
    for (int i = 0; i < n; i++) ok &= hits[i] == 1;
    CHECK(ok && !a.bad_chunk);
    free(hits);
  }
  CHECK_MSG(by_thread[1] + by_thread[2] > 0, "the workers never ran a chunk");
  threadpool_free(p);
  CHECK(threadpool_create(&p, -1, &err) == TS_EINVAL);
  CHECK(threadpool_create(&p, 0, &err) == 0 && threadpool_size(p) >= 1);
  threadpool_free(p);
  /* A pool of one runs everything on the caller. */
  CHECK(threadpool_create(&p, 1, &err) == 0);
  int one[3] = {0, 0, 0}, *h1 = calloc(100, sizeof(int));
  cover_arg a1 = {h1, one, 100, 1, 0, 0};
  threadpool_parallel_for(p, 100, 1, cover, &a1);
  CHECK(one[0] == 100 && h1[0] == 1 && h1[99] == 1);
  free(h1);
  threadpool_free(p);
}

int main(void) {
  /* The references here keep float32 activations; AMX-BF16 rounds them (test_cpu_amx.c). */
  setenv("TESSERA_CPU_AMX", "0", 1);
  test_threadpool();
  backend *be = NULL;
  ts_err err = {0};
  CHECK(backend_create(&be, "nonsense", 1, &err) == TS_EINVAL);
#ifndef TESSERA_HAVE_CUDA
  CHECK(backend_create(&be, "cuda", 1, &err) == TS_EUNSUPPORTED);
#endif
  for (int threads = 1; threads <= 3; threads += 2) {
    CHECK(backend_create(&be, "cpu", threads, &err) == 0);
    int top = cpu_backend_set_isa(be, 99);
    for (int level = 0; level <= top; level++) { /* every kernel level this CPU has */
      CHECK(cpu_backend_set_isa(be, level) == level);
      test_matmul(be);
      test_norms(be);
      test_rope(be);
      test_attention(be);
      test_row_ops(be);
    }
    backend_destroy(be);
  }
  return test_finish("test_cpu_ops");
}
