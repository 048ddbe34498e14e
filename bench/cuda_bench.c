/* Times the CUDA backend's hot ops on random data through the backend vtable: bf16 matmul at
 * decode and prefill sizes, paged attention for a decode batch and a prefill chunk, RMSNorm.
 * Prints one line per case: median ms over the repeats and the achieved rate (TFLOP/s for
 * matmul, GB/s of compulsory traffic for the memory-bound ops). Built and run by
 * `CUDA_BENCH=1 bash tools/cuda_test.sh`. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/backend.h"
#include "backend/cuda/backend_cuda.h"

static backend *be;
static const backend_ops *ops;
static uint64_t rng = 0x2545f4914f6cdd1dull;

static float frand(void) {
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return (float)((rng >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
}

static void *dev_random(size_t n, ts_dtype dt) {
  size_t es = dt == TS_F32 ? 4 : 2;
  void *h = malloc(n * es);
  for (size_t i = 0; i < n; i++) {
    float v = frand();
    if (dt == TS_F32) ((float *)h)[i] = v;
    else ((uint16_t *)h)[i] = ts_f32_to_bf16(v);
  }
  void *d = ops->alloc(be->ctx, n * es);
  ops->upload(be->ctx, d, h, n * es);
  free(h);
  return d;
}

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

typedef void (*bench_fn)(void *arg);

/* Median over 15 timed runs of `inner` calls each, after warm-up; synchronises around each run. */
static double time_ms(bench_fn fn, void *arg, int inner) {
  ts_err err = {0};
  for (int i = 0; i < 3; i++) fn(arg);
  ops->sync(be->ctx, &err);
  double t[15];
  for (int r = 0; r < 15; r++) {
    double t0 = now_ms();
    for (int i = 0; i < inner; i++) fn(arg);
    if (ops->sync(be->ctx, &err)) {
      fprintf(stderr, "error: %s\n", err.msg);
      exit(1);
    }
    t[r] = (now_ms() - t0) / inner;
  }
  qsort(t, 15, sizeof t[0], cmp_double);
  return t[7];
}

typedef struct {
  ts_tensor w;
  float *x, *y;
  int n;
} mm_arg;

static void run_mm(void *p) {
  mm_arg *a = p;
  ops->matmul(be->ctx, a->x, &a->w, NULL, a->n, a->y);
}

static void bench_matmul(int n, int k, int m) {
  mm_arg a;
  memset(&a, 0, sizeof a);
  a.w.data = dev_random((size_t)m * k, TS_BF16);
  a.w.dtype = TS_BF16;
  a.w.ndim = 2;
  a.w.shape[0] = m;
  a.w.shape[1] = k;
  a.w.row_stride = k;
  a.x = dev_random((size_t)n * k, TS_F32);
  a.y = ops->alloc(be->ctx, (size_t)n * m * 4);
  a.n = n;
  double ms = time_ms(run_mm, &a, 10);
  double flops = 2.0 * n * k * m, bytes = (double)m * k * 2 + (double)n * k * 4 + (double)n * m * 4;
  printf("matmul bf16 n=%-5d k=%-5d m=%-6d %9.4f ms  %7.1f TFLOP/s  %7.1f GB/s\n", n, k, m, ms,
         flops / ms / 1e9, bytes / ms / 1e6);
  ops->free(be->ctx, a.w.data);
  ops->free(be->ctx, a.x);
  ops->free(be->ctx, a.y);
}

typedef struct {
  kv_cache *kv;
  float *q, *out;
  int n_head;
  float scale;
} att_arg;

static void run_att(void *p) {
  att_arg *a = p;
  ops->attention(be->ctx, a->kv, 0, a->q, a->n_head, a->scale, a->out);
}

/* n_seqs sequences of ctx tokens each, `news` new tokens per sequence. */
static void bench_attention(const char *name, int n_seqs, int ctx, int news, int n_head, int n_kv,
                            int hd) {
  const int bs = 16;
  int per_seq = (ctx + bs - 1) / bs, n_blocks = n_seqs * per_seq;
  kv_cache kv;
  memset(&kv, 0, sizeof kv);
  void *kp, *vp;
  kv.n_layers = 1;
  kv.n_blocks = n_blocks;
  kv.block_size = bs;
  kv.n_kv_l = n_kv;
  kv.head_dim = hd;
  kv.dtype = TS_BF16;
  kv.k = &kp;
  kv.v = &vp;
  size_t cache = (size_t)n_blocks * bs * n_kv * hd;
  kp = dev_random(cache, TS_BF16);
  vp = dev_random(cache, TS_BF16);
  int nt = n_seqs * news;
  int32_t *tok = calloc((size_t)nt, 4), *pos = malloc((size_t)nt * 4);
  int32_t *ss = malloc((size_t)(n_seqs + 1) * 4), *cl = malloc((size_t)n_seqs * 4);
  int32_t *bt = malloc((size_t)n_blocks * 4), *lr = malloc((size_t)n_seqs * 4);
  for (int s = 0; s < n_seqs; s++) {
    ss[s] = s * news;
    cl[s] = ctx;
    lr[s] = s * news + news - 1;
    for (int i = 0; i < news; i++) pos[s * news + i] = ctx - news + i;
    for (int j = 0; j < per_seq; j++) bt[s * per_seq + j] = s * per_seq + j;
  }
  ss[n_seqs] = nt;
  ts_batch b = {nt, tok, pos, n_seqs, ss, cl, per_seq, bt, n_seqs, lr};
  ts_err err = {0};
  if (ops->step_begin(be->ctx, &b, &kv, &err)) {
    fprintf(stderr, "step_begin: %s\n", err.msg);
    exit(1);
  }
  att_arg a = {&kv, dev_random((size_t)nt * n_head * hd, TS_F32), NULL, n_head,
               1.0f / sqrtf((float)hd)};
  a.out = ops->alloc(be->ctx, (size_t)nt * n_head * hd * 4);
  double ms = time_ms(run_att, &a, 10);
  double bytes = (double)n_seqs * ctx * n_kv * hd * 2 * 2 + (double)nt * n_head * hd * 8;
  double flops = 4.0 * n_head * hd * (double)n_seqs * news * (ctx - news / 2.0);
  printf("attention %-8s seqs=%-3d ctx=%-5d new=%-5d h=%d/%d hd=%d %9.4f ms  %7.1f GB/s  %6.2f "
         "TFLOP/s\n",
         name, n_seqs, ctx, news, n_head, n_kv, hd, ms, bytes / ms / 1e6, flops / ms / 1e9);
  ops->free(be->ctx, kp);
  ops->free(be->ctx, vp);
  ops->free(be->ctx, a.q);
  ops->free(be->ctx, a.out);
  free(tok);
  free(pos);
  free(ss);
  free(cl);
  free(bt);
  free(lr);
}

typedef struct {
  float *x, *out;
  ts_tensor w;
  int rows, dim;
} norm_arg;

static void run_norm(void *p) {
  norm_arg *a = p;
  ops->rmsnorm(be->ctx, a->x, &a->w, 1e-5f, a->rows, a->dim, a->out);
}

static void bench_rmsnorm(int rows, int dim) {
  norm_arg a;
  memset(&a, 0, sizeof a);
  a.rows = rows;
  a.dim = dim;
  a.x = dev_random((size_t)rows * dim, TS_F32);
  a.out = ops->alloc(be->ctx, (size_t)rows * dim * 4);
  a.w.data = dev_random((size_t)dim, TS_BF16);
  a.w.dtype = TS_BF16;
  a.w.ndim = 1;
  a.w.shape[0] = dim;
  double ms = time_ms(run_norm, &a, 20);
  printf("rmsnorm rows=%-5d dim=%-5d %9.4f ms  %7.1f GB/s\n", rows, dim, ms,
         (double)rows * dim * 8 / ms / 1e6);
  ops->free(be->ctx, a.x);
  ops->free(be->ctx, a.out);
  ops->free(be->ctx, a.w.data);
}

int main(void) {
  ts_err err = {0};
  if (backend_cuda_create(&be, 0, &err)) {
    fprintf(stderr, "%s\n", err.msg);
    return 1;
  }
  ops = be->ops;
  bench_matmul(1, 4096, 4096);
  bench_matmul(64, 4096, 4096);
  bench_matmul(2048, 4096, 4096);
  bench_matmul(2048, 4096, 14336);
  bench_attention("decode", 64, 2048, 1, 32, 8, 128);
  bench_attention("decode", 4, 8192, 1, 32, 8, 128);
  bench_attention("prefill", 1, 2048, 2048, 32, 8, 128);
  bench_rmsnorm(2048, 4096);
  be->destroy(be);
  return 0;
}
